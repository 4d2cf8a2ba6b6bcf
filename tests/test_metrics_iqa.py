"""NIQE and CLIPIQA against pyiqa 0.1.16 (installed with --no-deps, tests/requirements-nodeps.txt).

NIQE: the same pristine parameters (basicsr 1.4.2's niqe_pris_params.npz, copied to
tests/data/metrics; written as the .mat that pyiqa reads) on the TID2013 images, tight to
1e-9. CLIPIQA: real CLIP weights cannot be downloaded here, so a small random OpenAI-layout
CLIP ResNet is built with pyiqa's own CLIP class and fed to both implementations.
"""

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metrics as M
from common.io import UserError

DATA = Path(__file__).parent / "data" / "metrics"
NAMES = ("I03", "I04", "I06", "I08", "I19")
PARAMS_NPZ = DATA / "niqe_pris_params.npz"


def tid(which, name):
    return np.asarray(Image.open(DATA / "tid2013" / which / f"{name}.png").convert("RGB"))


def import_pyiqa(module):
    """A pyiqa module; its clip import needs pkg_resources (gone from setuptools >= 81), of which
    openai-clip only uses `packaging`."""
    pytest.importorskip("torchvision")  # made importable on CPU torch by conftest.py
    import packaging.version

    sys.modules.setdefault("pkg_resources", types.SimpleNamespace(packaging=packaging))
    pytest.importorskip("pyiqa")
    return pytest.importorskip(module)


# ----------------------------------------------------------------------------- NIQE


@pytest.fixture(scope="module")
def params():
    return M.niqe_params(str(PARAMS_NPZ))


def test_niqe_params_file_and_window(params):
    mu, cov = params
    assert mu.shape == (36,) and cov.shape == (36, 36) and np.allclose(cov, cov.T)
    with np.load(PARAMS_NPZ) as data:  # basicsr ships fspecial(7, 7/6) beside the model: ours is the same window
        assert np.abs(data["gaussian_window"] - M._niqe_window().numpy()).max() < 1e-15


@pytest.fixture(scope="module")
def pyiqa_niqe(params, tmp_path_factory):
    niqe_arch = import_pyiqa("pyiqa.archs.niqe_arch")
    from scipy.io import savemat

    path = tmp_path_factory.mktemp("niqe") / "niqe_modelparameters.mat"
    savemat(str(path), {"mu_prisparam": params[0][None], "cov_prisparam": params[1]})
    assert np.array_equal(M.niqe_params(str(path))[1], params[1])  # the .mat route reads the same numbers
    return niqe_arch.NIQE(pretrained_model_path=str(path))


@pytest.mark.parametrize("which", ["dist", "ref"])
def test_niqe_matches_pyiqa(which, params, pyiqa_niqe):
    for name in NAMES:
        rgb = tid(which, name)
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255  # pyiqa's image loading: ToTensor
        reference = pyiqa_niqe(x).item()
        ours = M.niqe(rgb, params)
        print(f"[parity] niqe {which}/{name}: ours {ours:.10f} pyiqa {reference:.10f}")
        assert ours == pytest.approx(reference, abs=1e-9), name


def test_niqe_pyiqa_grey_is_pyiqas(pyiqa_niqe):
    from pyiqa.utils.color_util import to_y_channel

    for name in NAMES:
        rgb = tid("dist", name)
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
        assert np.array_equal(M.niqe_grey(rgb, "pyiqa"), to_y_channel(x, 255, "yiq")[0, 0].double().numpy())


def test_niqe_matlab_convention_and_known_values(params):
    # the published MATLAB values (IQA-PyTorch ResultsCalibra/results_official.csv); float64 here
    # is close on I04/I06 and not bit-faithful elsewhere (see niqe()'s docstring), so these are loose
    official = {"I03": 15.7536, "I04": 3.6549, "I06": 3.2355, "I08": 3.1840, "I19": 8.6352}
    ours = {name: M.niqe(tid("dist", name), params, "matlab") for name in NAMES}
    print("[known] niqe matlab convention:", {k: round(v, 4) for k, v in ours.items()})
    assert ours["I04"] == pytest.approx(official["I04"], abs=1e-3)
    assert ours["I06"] == pytest.approx(official["I06"], abs=1e-3)
    for name in NAMES:
        assert ours[name] == pytest.approx(official[name], rel=0.06)
    # the heavily distorted images score worse (higher) than their references
    assert M.niqe(tid("dist", "I03"), params) > 3 * M.niqe(tid("ref", "I03"), params)


def test_niqe_bad_input(params, tmp_path):
    with pytest.raises(ValueError, match="too small for NIQE"):
        M.niqe(np.zeros((100, 150, 3), np.uint8), params)
    bad = tmp_path / "x.npz"
    np.savez(bad, mu_pris_param=np.zeros(3), cov_pris_param=np.eye(3))
    with pytest.raises(UserError, match="expected \\(36,\\)"):
        M.niqe_params(str(bad))
    with pytest.raises(UserError, match="NIQE parameters"):
        M.niqe_params("nobody/nothing/niqe.mat")


# ----------------------------------------------------------------------------- CLIPIQA


def tiny_pyiqa_clip(seed=0):
    clip_model = import_pyiqa("pyiqa.archs.clip_model")
    torch.manual_seed(seed)
    model = clip_model.CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16,
                            vision_patch_size=None, context_length=77, vocab_size=49408,
                            transformer_width=64, transformer_heads=1, transformer_layers=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # CLIP's init zeroes bn3 and leaves BatchNorm at identity: randomise all of it
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=g))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
        for p in (model.visual.attnpool.q_proj.bias, model.visual.attnpool.k_proj.bias, model.visual.attnpool.v_proj.bias):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        model.logit_scale.fill_(3.0)  # exp(3) = 20: not OpenAI's 100, so a hard-coded scale would show
    return model.float().eval()


@pytest.fixture(scope="module")
def clip_pair():
    reference = tiny_pyiqa_clip()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    return reference, M.CLIPIQA.from_state(state)


def test_clipiqa_prompt_ids_are_openais():
    clip = import_pyiqa("clip")
    texts = [t for pair in M.CLIPIQA_PROMPTS for t in pair]
    expected = clip.tokenize(texts)
    for row, ids in zip(expected, M.CLIPIQA_PROMPT_IDS):
        assert row[: len(ids)].tolist() == list(ids) and (row[len(ids):] == 0).all()


def test_clipiqa_towers_match_pyiqa_clip(clip_pair):
    reference, ours = clip_pair
    clip = import_pyiqa("clip")
    ids = clip.tokenize([t for pair in M.CLIPIQA_PROMPTS for t in pair])
    with torch.no_grad():
        text_error = (torch.nn.functional.normalize(reference.encode_text(ids), dim=-1) - ours.text_features()).abs().max().item()
        x = torch.rand(2, 3, 96, 128)
        image_error = (reference.encode_image(x, pos_embedding=False) - ours.visual(x)).abs().max().item()
    print(f"[parity] clipiqa text {text_error:.2e} image {image_error:.2e}")
    assert text_error < 1e-5 and image_error < 1e-4


def test_clipiqa_matches_pyiqa(clip_pair, monkeypatch):
    reference_clip, ours = clip_pair
    clipiqa_arch = import_pyiqa("pyiqa.archs.clipiqa_arch")
    monkeypatch.setattr(clipiqa_arch, "load", lambda *args, **kwargs: reference_clip)
    reference = clipiqa_arch.CLIPIQA(model_type="clipiqa").eval()
    rng = np.random.default_rng(0)
    images = [tid("dist", "I08")[:160, :224], tid("ref", "I19")[64:224, 100:324], rng.integers(0, 256, (160, 224, 3), dtype=np.uint8)]
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images])
    with torch.no_grad():
        expected = reference(x)[:, 0]
    got = ours(x)
    print(f"[parity] clipiqa scores ours {got.tolist()} pyiqa {expected.tolist()}")
    assert torch.allclose(got, expected, atol=1e-6) and (expected - 0.5).abs().min() > 1e-2  # not a trivial 0.5
    # tiled protocol: a whole image smaller than the tile is one pass; tiles average
    assert M.clipiqa_tiled(ours, images[0], tile=512) == pytest.approx(got[0].item(), abs=1e-6)
    tiled = M.clipiqa_tiled(ours, images[0], tile=64)
    boxes = M.tiles(160, 224, 64)
    crops = torch.stack([x[0, :, r : r + h, c : c + w] for r, c, h, w in boxes])
    assert tiled == pytest.approx(ours(crops).mean().item(), abs=1e-6)


def test_clipiqa_loads_safetensors_file(clip_pair, tmp_path):
    from safetensors.torch import save_file

    reference, ours = clip_pair
    path = tmp_path / "open_clip_model.safetensors"
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(path))
    loaded = M.CLIPIQA.from_pretrained(str(path))
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(loaded(x), ours(x))
    save_file({"visual.something": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="not a CLIP ResNet"):
        M.CLIPIQA.from_pretrained(str(tmp_path / "bad.safetensors"))


# ----------------------------------------------------------------------------- CLI


def test_cli_niqe_and_clipiqa(clip_pair, params, tmp_path, capsys, monkeypatch):
    import json

    from common.io import run_cli

    _, ours = clip_pair
    pred = tmp_path / "pred"
    pred.mkdir()
    images = {"a": tid("dist", "I04")[:192, :200], "b": tid("ref", "I19")[:192, :300]}
    for stem, rgb in images.items():
        Image.fromarray(rgb).save(pred / f"{stem}.png")
    seen = []
    monkeypatch.setattr(M.CLIPIQA, "from_pretrained", classmethod(lambda cls, source: seen.append(source) or ours))
    argv = ["--pred", pred, "--metrics", "niqe,clipiqa", "--niqe-params", PARAMS_NPZ, "--clipiqa-weights", "my/rn50.safetensors",
            "--clipiqa-tile", "128", "--out", tmp_path / "m.json"]
    code = run_cli(M.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((tmp_path / "m.json").read_text())
    assert seen == ["my/rn50.safetensors"] and list(result["metrics"]) == ["niqe", "clipiqa"]
    for stem, rgb in images.items():
        assert result["per_image"]["niqe"][stem] == pytest.approx(M.niqe(rgb, params), abs=1e-12)
        assert result["per_image"]["clipiqa"][stem] == pytest.approx(M.clipiqa_tiled(ours, rgb, 128), abs=1e-7)
    assert f"{result['metrics']['niqe']:.4f}" in out
    # an image too small for NIQE is named in one line
    Image.fromarray(images["a"][:100, :150]).save(pred / "c.png")
    code = run_cli(M.main, [str(a) for a in ["--pred", pred, "--metrics", "niqe", "--niqe-params", PARAMS_NPZ]])
    _, err = capsys.readouterr()
    assert code == 2 and err.splitlines()[-1].startswith("error: c: image 150x100 too small for NIQE")

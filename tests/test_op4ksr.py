"""op4ksr.py end to end on a tiny random Flux + F16 VAE: RoPE table (Fig. 5), parity of the
copied models, LoRAs (ours vs diffusers + peft), training, inference, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusion4k as d4k
import op4ksr
from common.io import run_cli
from conftest import ROOT, free_port
from tiny_pipelines import make_flux_pipeline

CROP = 64  # tiny F16 VAE: 4 px per latent pixel, 8 px per token; L_AP periods (4, 8) need quadrants > 20 px


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return make_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe", guidance=True, seed=0)


def write_hr(folder: Path, count=2, size=96):
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(count):
        base = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
        Image.fromarray(np.clip(base + g.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def train_argv(flux_folder, data, output, *extra):
    return ["train", "--flux", str(flux_folder), "--vae", str(flux_folder), "--data", str(data), "--output", str(output),
            "--crop", str(CROP), "--lora-rank", "4", "--max-sequence-length", "16", "--checkpoint-every", "1", "--log-every", "1",
            "--keep-checkpoints", "0", "--lpips-weight", "0", *map(str, extra)]


@pytest.fixture(scope="module")
def trained(flux_folder, tmp_path_factory):
    """A 3-step training run (lr raised so that the LoRAs move visibly)."""
    root = tmp_path_factory.mktemp("train")
    data = write_hr(root / "hr")
    output = root / "run"
    assert run_cli(op4ksr.main, train_argv(flux_folder, data, output, "--steps", 3, "--lr", "1e-2")) == 0
    return output / "op4ksr.safetensors"


def lr_image(path: Path, size=(20, 16), mode="RGB"):
    g = np.random.default_rng(1)
    array = g.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array)
    if mode == "L":
        image = image.convert("L")
    elif mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(128)
    elif mode == "I;16":
        image = Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257))
    image.save(path)
    return path


# ----------------------------------------------------------------------------- RoPE: Fig. 5


def test_rope_table_of_fig5():
    """Per-token phase step of the 28 frequency pairs of a 56-dim spatial axis: >= 5 degrees for
    8 pairs at theta 10000 and 15 pairs at theta 100 (RFR)."""
    counts = {}
    assert op4ksr.RFR_THETA == 100.0
    for theta in (10000.0, 100.0):
        steps = op4ksr.rope_phase_steps(theta)
        assert torch.equal(steps, torch.rad2deg(op4ksr.rope_frequencies(56, theta)))  # what the kit's RoPE uses
        assert len(steps) == 28
        counts[theta] = int((steps >= 5).sum())
        print(f"theta {theta:g}: {counts[theta]} of 28 pairs step >= 5 deg/token; slowest {steps.min().item():.4f} deg")
    assert counts == {10000.0: 8, 100.0: 15}


def test_theta_reaches_the_spatial_axes_only(flux_folder):
    flux_a = op4ksr.load_flux(flux_folder, torch.float32, theta=10000.0)
    ids = op4ksr.latent_image_ids(4, 4)
    cos_a, _ = op4ksr.rope_table(ids, flux_a.config.axes_dim, 10000.0)
    cos_b, _ = op4ksr.rope_table(ids, flux_a.config.axes_dim, 100.0)
    axis0 = flux_a.config.axes_dim[0] // 2
    assert torch.equal(cos_a[..., :axis0], cos_b[..., :axis0])  # axis 0 ids are all 0: unchanged
    assert not torch.allclose(cos_a[..., axis0:], cos_b[..., axis0:])


def test_rescale_rope_base_is_loading_at_that_theta(flux_folder):
    """RFR on a loaded transformer: the same weights, the RoPE base of load_flux(theta=100)."""
    g = torch.Generator().manual_seed(0)
    rescaled = op4ksr.rescale_rope_base(op4ksr.load_flux(flux_folder, torch.float32))
    loaded = op4ksr.load_flux(flux_folder, torch.float32, theta=op4ksr.RFR_THETA)
    assert rescaled.config == loaded.config and rescaled.config.theta == 100.0
    z, txt, y = torch.randn(1, 4, 8, 6, generator=g), torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    args = (op4ksr.pack_latents(z), op4ksr.latent_image_ids(8, 6), txt, torch.zeros(1, 5, 3), torch.tensor([0.3]), y, torch.tensor([1.0]))
    with torch.no_grad():
        assert torch.equal(rescaled(*args), loaded(*args))


# ----------------------------------------------------------------------------- copied models


def test_models_equal_diffusion4k(flux_folder):
    g = torch.Generator().manual_seed(0)
    ours, ref = op4ksr.load_flux(flux_folder, torch.float32, theta=100.0), d4k.load_flux(flux_folder, torch.float32, theta=100.0)
    z, txt, y = torch.randn(1, 4, 8, 6, generator=g), torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    args = (op4ksr.pack_latents(z), op4ksr.latent_image_ids(8, 6), txt, torch.zeros(1, 5, 3), torch.tensor([0.3]), y, torch.tensor([1.0]))
    with torch.no_grad():
        assert torch.equal(ours(*args), ref(*args))
    vae, vae_ref = op4ksr.load_vae(flux_folder, stride=2), d4k.load_vae(flux_folder, stride=2)
    image = torch.rand(1, 3, 32, 24, generator=g) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(image)
        assert latent.shape == (1, 4, 8, 6) and torch.equal(latent, vae_ref.encode(image))
        assert torch.equal(vae.decode(latent), vae_ref.decode(latent))


# ----------------------------------------------------------------------------- LoRA


def test_conv_lora_starts_at_the_base_and_merges_exactly(flux_folder):
    vae = op4ksr.load_vae(flux_folder, stride=2)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        base = vae.encode(image)
        op4ksr.add_encoder_lora(vae, rank=3, alpha=6)
        assert torch.equal(vae.encode(image), base)  # B = 0
        for m in vae.encoder.modules():
            if isinstance(m, op4ksr.LoRAConv2d):
                m.lora_B.normal_(0, 0.05)
        adapted = vae.encode(image)
    exported = op4ksr.export_vae_lora(vae.encoder, vae)
    assert "vae.encoder.mid_block.attentions.0.to_q.lora_A.weight" in exported  # 1x1 conv as diffusers' Linear: 2-D
    assert exported["vae.encoder.mid_block.attentions.0.to_q.lora_A.weight"].ndim == 2
    assert exported["vae.encoder.conv_in.lora_A.weight"].shape == (3, 3, 3, 3)
    plain = op4ksr.load_vae(flux_folder, stride=2)
    flux = op4ksr.load_flux(flux_folder, torch.float32)
    op4ksr.merge_op4ksr_lora(exported, flux, plain, "test")
    with torch.no_grad():
        error = (plain.encode(image) - adapted).abs().max().item()
    print(f"conv LoRA merged vs wrapped: max abs error {error:.2e} (LoRA effect {(adapted - base).abs().max():.2e})")
    assert error < 1e-5 and (adapted - base).abs().max() > 1e-2


def test_conv_lora_matches_peft():
    peft = pytest.importorskip("peft")
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    model = torch.nn.Sequential(conv)
    ours = op4ksr.LoRAConv2d(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), 4, 8, torch.Generator().manual_seed(0))
    ours.base.load_state_dict(conv.state_dict())
    with torch.no_grad():
        ours.lora_B.normal_()
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), model)
    with torch.no_grad():
        ref[0].lora_A["default"].weight.copy_(ours.lora_A)
        ref[0].lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(2, 8, 11, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_checkpoint_lora_loads_into_diffusers(flux_folder, tmp_path):
    """The OP4KSR file loads as it is into diffusers' FluxTransformer2DModel (peft load_lora_adapter)
    and gives what our merged transformer gives, at RFR theta 100."""
    pytest.importorskip("peft")
    import diffusers

    transformer, vae = op4ksr.load_flux(flux_folder, torch.float32, theta=100.0), op4ksr.load_vae(flux_folder, stride=2)
    op4ksr.add_flux_lora(transformer, 3, alpha=6, seed=1)
    op4ksr.add_encoder_lora(vae, 3, seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in transformer.modules():
            if isinstance(m, op4ksr.SplitLoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    prompt = {"txt": torch.randn(1, 5, 32, generator=g), "y": torch.randn(1, 32, generator=g), "text": "x"}
    path = tmp_path / "ckpt.safetensors"
    op4ksr.save_op4ksr(path, transformer, vae, prompt, {"sigma": 0.25, "guidance": 1.0, "scale": 4, "base_flux": "tiny", "base_vae": "tiny"})
    z = torch.randn(1, 4, 8, 6, generator=g)
    inputs = (op4ksr.pack_latents(z), op4ksr.latent_image_ids(8, 6), prompt["txt"], torch.zeros(1, 5, 3), torch.tensor([0.25]), prompt["y"], torch.tensor([1.0]))
    with torch.no_grad():
        wrapped = transformer(*inputs)
    merged = op4ksr.load_flux(flux_folder, torch.float32, theta=100.0)
    op4ksr.merge_op4ksr_lora({k: v for k, v in load_file(path).items() if ".lora_" in k}, merged, op4ksr.load_vae(flux_folder, stride=2), "test")
    ref = diffusers.FluxTransformer2DModel.from_pretrained(flux_folder / "transformer").eval()
    ref.pos_embed.theta = 100
    with torch.no_grad():
        ours = merged(*inputs)
        ref.load_lora_adapter(load_file(path), prefix="transformer", adapter_name="op4ksr")
        expected = ref(hidden_states=inputs[0], encoder_hidden_states=prompt["txt"], pooled_projections=prompt["y"], timestep=inputs[4],
                       img_ids=inputs[1][0], txt_ids=torch.zeros(5, 3), guidance=inputs[6], return_dict=False)[0]
    plain = op4ksr.load_flux(flux_folder, torch.float32, theta=100.0)
    with torch.no_grad():
        effect = (plain(*inputs) - ours).abs().max().item()
    error = (ours - expected).abs().max().item()
    print(f"OP4KSR LoRA: ours (merged) vs diffusers+peft max abs error {error:.2e}; wrapped vs merged "
          f"{(wrapped - ours).abs().max():.2e}; the LoRA moves the output by {effect:.2e}")
    assert error < 1e-4 and (wrapped - ours).abs().max() < 1e-4 and effect > 100 * error


# OMGSR-F's peft target lists as train/train_omgsr_f.py writes them (set_flux_transformer_lora,
# set_vae_encoder_lora)
OMGSR_F_FLUX = ["x_embedder", "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                "ff_context.net.0.proj", "ff_context.net.2"]
OMGSR_F_VAE = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v",
               "to_out.0"]


def peft_lora_shapes(model, targets, rank=3):
    """{peft LoRA key: shape} after peft adapts `model` with OMGSR-F's LoraConfig (alpha = rank, gaussian)."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian")
    model = peft.inject_adapter_in_model(config, model)
    return {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(model).items()}


def test_flux_lora_targets_are_what_peft_selects_with_omgsr_f_list(flux_folder):
    """Same modules, and the same A / B shapes per projection, as peft on diffusers' Flux."""
    pytest.importorskip("peft")
    import diffusers

    reference = diffusers.FluxTransformer2DModel.from_pretrained(flux_folder / "transformer")
    theirs = peft_lora_shapes(reference, OMGSR_F_FLUX)
    transformer = op4ksr.add_flux_lora(op4ksr.load_flux(flux_folder, torch.float32), 3)
    exported = op4ksr.export_flux_lora(transformer)
    ours = {k.removeprefix("transformer."): tuple(v.shape) for k, v in exported.items()}
    targets = op4ksr.flux_lora_targets(transformer.config)
    print(f"Flux LoRA: {len(ours) // 2} peft projections on {len(targets)} of our modules: {targets}")
    assert ours == theirs
    assert targets["img_in"] == 1
    assert targets["double_blocks.0.img_attn.qkv"] == targets["double_blocks.0.txt_attn.qkv"] == 3
    # single blocks: q, k, v of linear1; not proj_mlp (linear1's last rows) nor proj_out (linear2)
    assert targets["single_blocks.1.linear1"] == 3 and "single_blocks.1.linear2" not in targets
    assert not any(name.startswith(("txt_in", "time_in", "final_layer")) or "mod" in name for name in targets)


def test_encoder_lora_is_what_peft_selects_and_loads_into_diffusers(flux_folder):
    """The encoder LoRA: the modules and shapes peft gives diffusers' AutoencoderKL encoder with
    OMGSR-F's list; the exported file loads into it (peft) with our output. diffusers has no
    stride-2 conv_in, so the outputs are compared at F8; the F16 encoder has the same targets."""
    pytest.importorskip("peft")
    import diffusers
    from peft import set_peft_model_state_dict

    reference = diffusers.AutoencoderKL.from_pretrained(flux_folder / "vae").eval()
    theirs = peft_lora_shapes(reference.encoder, OMGSR_F_VAE)
    vae = op4ksr.add_encoder_lora(op4ksr.load_vae(flux_folder, stride=1), 3, alpha=6, seed=2)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in vae.encoder.modules():
            if isinstance(m, op4ksr.LoRAConv2d):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    exported = op4ksr.export_vae_lora(vae.encoder, vae)
    exported = {k.removeprefix("vae.encoder."): v for k, v in exported.items()}
    assert {k: tuple(v.shape) for k, v in exported.items()} == theirs
    f16 = op4ksr.load_vae(flux_folder, stride=2)
    assert op4ksr.encoder_lora_targets(f16) == op4ksr.encoder_lora_targets(vae)
    set_peft_model_state_dict(reference.encoder, exported)
    image = torch.rand(1, 3, 32, 24, generator=g) * 2 - 1
    plain = op4ksr.load_vae(flux_folder, stride=1)
    with torch.no_grad():
        ours, expected, base = vae.encoder(image), reference.encoder(image), plain.encoder(image)
    error, effect = (ours - expected).abs().max().item(), (ours - base).abs().max().item()
    print(f"encoder LoRA: ours vs diffusers+peft max abs error {error:.2e}; "
          f"the LoRA moves the output by {effect:.2e}")
    assert error < 1e-5 and effect > 1000 * error


def test_lora_init_is_peft_gaussian():
    """A ~ N(0, 1/r^2) and B = 0 (peft's init_lora_weights="gaussian", OMGSR-F's), so training starts
    at the base model; a fused linear's rows past the adapted blocks never change."""
    peft = pytest.importorskip("peft")
    g = torch.Generator().manual_seed(0)
    fused = op4ksr.SplitLoRALinear(torch.nn.Linear(64, 3 * 32 + 40), 3, 32, 8, 8, g)
    conv = op4ksr.LoRAConv2d(torch.nn.Conv2d(64, 16, 3, padding=1), 8, 8, g)
    config = peft.LoraConfig(r=8, target_modules=["0"], init_lora_weights="gaussian")
    reference = peft.inject_adapter_in_model(config, torch.nn.Sequential(torch.nn.Linear(64 * 9, 16)))[0]
    peft_a = reference.lora_A["default"].weight
    for a, b in ((fused.lora_A, fused.lora_B), (conv.lora_A, conv.lora_B), (peft_a, None)):
        print(f"LoRA A {tuple(a.shape)}: std {a.std():.4f} (1/r = {1 / 8}), mean {a.mean():+.4f}")
        assert abs(a.std().item() - 1 / 8) < 0.01 and abs(a.mean().item()) < 0.01
        assert b is None or not b.any()
    assert fused.lora_A.shape == (3, 8, 64) and fused.lora_B.shape == (3, 32, 8)
    x = torch.randn(5, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(fused(x), fused.base(x))
        fused.lora_B.normal_()
        moved = fused(x) - fused.base(x)
    assert (moved[:, :96].abs() > 0).all() and not moved[:, 96:].any()


# ----------------------------------------------------------------------------- train + inference


def test_train_writes_a_checkpoint(trained):
    with safe_open(str(trained), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["format"] == "op4ksr" and float(meta["theta"]) == 100.0
    assert float(meta["sigma"]) == op4ksr.OMGSR_SIGMA
    assert json.loads(meta["flux_config"])["hidden_size"] == 32 and meta["lora_rank"] == "4"
    assert "prompt.txt" in keys and "prompt.y" in keys
    assert any(k.startswith("transformer.") for k in keys) and any(k.startswith("vae.encoder.") for k in keys)
    log = [json.loads(line) for line in (trained.parent / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) and "periodicity" in r for r in log)
    assert not any("perceptual" in r for r in log)  # --lpips-weight 0
    lora_b = load_file(trained)["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    assert lora_b.abs().max() > 0  # the LoRA trained


def test_resume_continues_exactly(flux_folder, trained, tmp_path):
    """2 steps, then --resume to 3 == the straight 3-step run."""
    data = trained.parent.parent / "hr"
    output = tmp_path / "run"
    assert run_cli(op4ksr.main, train_argv(flux_folder, data, output, "--steps", 2, "--lr", "1e-2")) == 0
    assert run_cli(op4ksr.main, train_argv(flux_folder, data, output, "--steps", 3, "--lr", "1e-2", "--resume")) == 0
    a, b = load_file(trained), load_file(output / "op4ksr.safetensors")
    assert a.keys() == b.keys()
    error = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resume: max abs difference to the uninterrupted run {error:.2e}")
    assert error < 1e-6


def test_super_resolve_writes_the_right_size_deterministically(trained, tmp_path):
    source = lr_image(tmp_path / "lr.png", (20, 12))
    outputs = [tmp_path / "a.png", tmp_path / "b.png"]
    for out in outputs:
        assert run_cli(op4ksr.main, ["--input", str(source), "--weights", str(trained), "--output", str(out)]) == 0
    with Image.open(outputs[0]) as image:
        assert image.size == (80, 48) and image.mode == "RGB"
        settings = json.loads(image.text["settings"])
        assert settings["theta"] == 100.0 and settings["f16_decode"] == "partitioned"
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    # --size and the colour fixes; a side that is not a multiple of the token (8 px here)
    for fix in ("wavelet", "adain"):
        out = tmp_path / f"{fix}.png"
        assert run_cli(op4ksr.main, ["--input", str(source), "--weights", str(trained), "--output", str(out), "--size", "60", "--color-fix", fix]) == 0
        with Image.open(out) as image:
            assert image.size == (60, 36)


def test_folder_of_inputs_and_converted_modes(trained, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for mode, name in (("L", "gray.png"), ("RGBA", "alpha.png"), ("I;16", "deep.png"), ("RGB", "plain.jpg")):
        lr_image(folder / name, (16, 16), mode)
    assert run_cli(op4ksr.main, ["--input", str(folder), "--weights", str(trained), "--scale", "2"]) == 0
    written = sorted((tmp_path / "in_op4ksr").iterdir())
    assert [p.name for p in written] == ["alpha.png", "deep.png", "gray.png", "plain.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.size == (32, 32) and image.mode == "RGB"


def write_lpips_hub(root: Path) -> Path:
    """Random LPIPS-VGG weights at the default Hub paths under `root`, in the published layouts:
    torchvision / timm VGG16 (.safetensors, a head key included) and the lpips package's lin0..lin4 .pth."""
    from safetensors.torch import save_file

    model = op4ksr.LPIPS()
    with torch.no_grad():
        for lin in model.lins:
            lin.weight.uniform_(0, 0.1)
    for spec in (op4ksr.LPIPS_VGG_LINEAR, op4ksr.LPIPS_VGG_BACKBONE):
        (root / spec).parent.mkdir(parents=True, exist_ok=True)
    backbone = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    backbone["head.fc.weight"] = torch.zeros(2, 2)
    save_file(backbone, str(root / op4ksr.LPIPS_VGG_BACKBONE))
    torch.save({f"lin{i}.model.1.weight": lin.weight.detach().clone() for i, lin in enumerate(model.lins)},
               root / op4ksr.LPIPS_VGG_LINEAR)
    return root


def test_default_run_trains_with_lpips_from_the_hub_sources(flux_folder, tmp_path, monkeypatch):
    """Without LPIPS options the run fetches LPIPS-VGG from the Hub files SC-VAE training uses and
    logs the perceptual term; the Hub is replaced by a local copy of those paths."""
    defaults = op4ksr.sr_train_parser().parse_args(["--data", "d", "--output", "o"])
    assert (defaults.lpips_weight, defaults.lpips_linear, defaults.lpips_backbone) == (
        2.0, d4k.LPIPS_VGG_LINEAR, d4k.LPIPS_VGG_BACKBONE)
    hub, real, asked = write_lpips_hub(tmp_path / "hub"), op4ksr.resolve_source, []

    def resolve(source, subfolder=None, allow_patterns=("*.safetensors", "*.json"), token=None):
        if not Path(source).is_absolute() and (hub / source).is_dir():  # the two Hub repos
            asked.append((source, allow_patterns))
            return hub / source
        return real(source, subfolder, allow_patterns, token)

    monkeypatch.setattr(op4ksr, "resolve_source", resolve)
    argv = train_argv(flux_folder, write_hr(tmp_path / "hr"), tmp_path / "run", "--steps", 1,
                      "--lpips-crop", 32)
    del argv[argv.index("--lpips-weight") : argv.index("--lpips-weight") + 2]
    assert run_cli(op4ksr.main, argv) == 0
    assert asked == [("timm/vgg16.tv_in1k", ("model.safetensors",)),
                     ("chaofengc/IQA-PyTorch-Weights", ("LPIPS_v0.1_vgg-a78928a0.pth",))]
    record = json.loads((tmp_path / "run" / "train_log.jsonl").read_text())
    print(f"default run, step 1: {record}")
    assert record["perceptual"] > 0


def test_f16_decode_reaches_the_decoder(flux_folder, trained, tmp_path, monkeypatch):
    """--f16-decode sets the decoder's path in inference and in training (default: partitioned)."""
    seen, real = [], op4ksr.decoder_head

    def spy(h, conv_out, stride, partitioned=False, *args, **kwargs):
        if stride > 1:  # the F16 decoder's head
            seen.append(partitioned)
        return real(h, conv_out, stride, partitioned, *args, **kwargs)

    monkeypatch.setattr(op4ksr, "decoder_head", spy)
    source = lr_image(tmp_path / "lr.png", (16, 16))
    images = {}
    for mode in ("partitioned", "centred", None):
        out, seen[:] = tmp_path / f"{mode}.png", []
        extra = ["--f16-decode", mode] if mode else []
        argv = ["--input", str(source), "--weights", str(trained), "--output", str(out), *extra]
        assert run_cli(op4ksr.main, argv) == 0
        assert seen == [mode != "centred"]
        images[mode] = np.asarray(Image.open(out)).astype(int)
    assert np.array_equal(images[None], images["partitioned"])
    assert not np.array_equal(images["partitioned"], images["centred"])
    # the partitioned result is the centred one moved one pixel down and right (inside the image)
    shifted = np.abs(images["partitioned"][1:, 1:] - images["centred"][:-1, :-1])[2:-2, 2:-2]
    assert shifted.max() <= 1
    seen[:] = []
    argv = train_argv(flux_folder, trained.parent.parent / "hr", tmp_path / "run", "--steps", 1,
                      "--f16-decode", "centred")
    assert run_cli(op4ksr.main, argv) == 0
    assert seen and not any(seen)


def test_script_runs_as_a_command(trained, tmp_path):
    source = lr_image(tmp_path / "lr.png", (16, 8))
    done = subprocess.run([sys.executable, str(ROOT / "op4ksr.py"), "--input", str(source), "--weights", str(trained)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "lr_op4ksr.png") as image:
        assert image.size == (64, 32)


# ----------------------------------------------------------------------------- bad input


def fails(capsys, argv, fragment):
    code = run_cli(op4ksr.main, argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and fragment in err[0], err  # one line, exit 2
    return err[0]


def test_without_weights_explains_how_to_get_them(capsys, tmp_path):
    source = lr_image(tmp_path / "lr.png")
    message = fails(capsys, ["--input", str(source)], "op4ksr.py train")
    assert "FLUX.1-dev" in message
    assert not (tmp_path / "lr_op4ksr.png").exists()


def test_bad_inputs_are_refused_without_output(capsys, trained, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    out = tmp_path / "out.png"
    fails(capsys, ["--input", str(bad), "--weights", str(trained), "--output", str(out)], "not a readable image")
    source = lr_image(tmp_path / "lr.png", (80, 40))
    fails(capsys, ["--input", str(source), "--weights", str(trained), "--output", str(out), "--size", "64"], "already larger than the target")
    # absurd targets: refused before any model is loaded (the --flux given does not exist)
    for extra, fragment in ((["--scale", "1000"], "target"), (["--scale", "0"], "--scale"), (["--size", "100000"], "--size")):
        fails(capsys, ["--input", str(source), "--weights", str(trained), "--output", str(out), "--flux", "/nonexistent", *extra], fragment)
    fails(capsys, ["--input", str(source), "--weights", str(tmp_path / "missing.safetensors")], "missing.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    fails(capsys, ["--input", str(source), "--weights", str(tmp_path / "other.safetensors")], "not an OP4KSR checkpoint")
    assert not out.exists() and not (tmp_path / "lr_op4ksr.png").exists()


def test_existing_output_needs_overwrite(capsys, trained, tmp_path):
    source = lr_image(tmp_path / "lr.png")
    out = tmp_path / "out.png"
    out.write_bytes(b"keep me")
    fails(capsys, ["--input", str(source), "--weights", str(trained), "--output", str(out)], "--overwrite")
    assert out.read_bytes() == b"keep me"
    assert run_cli(op4ksr.main, ["--input", str(source), "--weights", str(trained), "--output", str(out), "--overwrite"]) == 0
    with Image.open(out) as image:
        assert image.size == (80, 64)


def rewrite(path: Path, target: Path, metadata=None, tensors=None):
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    state = load_file(path)
    meta.update(metadata or {})
    state.update(tensors or {})
    save_file(state, target, meta)
    return target


def test_checkpoint_for_another_base_is_refused(capsys, trained, tmp_path):
    source = lr_image(tmp_path / "lr.png")
    config = json.loads(load_meta(trained)["flux_config"]) | {"hidden_size": 3072}
    other = rewrite(trained, tmp_path / "other.safetensors", {"flux_config": json.dumps(config), "base_flux_note": "x"})
    fails(capsys, ["--input", str(source), "--weights", str(other)], "hidden_size=3072")
    key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    wrong = rewrite(trained, tmp_path / "wrong.safetensors", tensors={key: torch.zeros(48, 4)})
    fails(capsys, ["--input", str(source), "--weights", str(wrong)], "another base model")
    extra = rewrite(trained, tmp_path / "extra.safetensors", tensors={"transformer.foo.lora_A.weight": torch.zeros(4, 4),
                                                                      "transformer.foo.lora_B.weight": torch.zeros(4, 4)})
    fails(capsys, ["--input", str(source), "--weights", str(extra)], "transformer.foo")
    assert not (tmp_path / "lr_op4ksr.png").exists()


def load_meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_train_refuses_bad_settings(capsys, flux_folder, tmp_path):
    data = write_hr(tmp_path / "hr", count=1, size=64)
    fails(capsys, train_argv(flux_folder, data, tmp_path / "o", "--steps", 1, "--crop", 36), "--crop 36")
    fails(capsys, train_argv(flux_folder, tmp_path / "nothing", tmp_path / "o", "--steps", 1), "no such data folder")


# ----------------------------------------------------------------------------- training: encoder checkpointing, torchrun


def test_encoder_gradient_checkpointing_keeps_loss_and_gradients(flux_folder):
    vae = op4ksr.load_vae(flux_folder, torch.float32, "cpu", stride=2)
    op4ksr.add_encoder_lora(vae, 4, seed=1)
    for p in vae.encoder.parameters():  # move the LoRAs off zero, so that their B gradients are not all that is tested
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    image = torch.rand(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(0)) * 2 - 1
    names = set(vae.encoder.state_dict())

    def run(enabled):
        vae.encoder.gradient_checkpointing = enabled
        vae.encoder.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = vae.encode(image).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in vae.encoder.named_parameters() if p.requires_grad}
        return loss.detach(), grads, sum(saved)

    plain_loss, plain_grads, plain_saved = run(False)
    loss, grads, saved = run(True)
    again_loss, again_grads, again_saved = run(False)  # switched off again: back to the plain graph
    print(f"encoder checkpointing: saved activations {plain_saved} -> {saved} elements")
    assert set(vae.encoder.state_dict()) == names  # parameters and their names unchanged
    assert len(grads) > 10 and grads.keys() == plain_grads.keys()
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7)
    assert saved < plain_saved / 3 and again_saved == plain_saved
    assert torch.equal(again_loss, plain_loss)
    with torch.no_grad():  # no recomputation (and no checkpoint warnings) without gradients
        vae.encoder.gradient_checkpointing = True
        checkpointed = vae.encode(image)
        vae.encoder.gradient_checkpointing = False
        assert torch.equal(checkpointed, vae.encode(image))


def test_torchrun_two_processes_match_one(flux_folder, tmp_path):
    """Data parallel over 2 CPU processes (gloo), batch 1 each == 1 process with batch 2: same losses and LoRAs."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this PyTorch build")
    data = write_hr(tmp_path / "hr", count=4)
    common = ["--steps", "2", "--lr", "1e-3", "--device", "cpu"]
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(ROOT / "op4ksr.py")]
    result = subprocess.run(command + train_argv(flux_folder, data, tmp_path / "two", *common, "--batch-size", "1"),
                            capture_output=True, text=True, timeout=150, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_cli(op4ksr.main, train_argv(flux_folder, data, tmp_path / "one", *common, "--batch-size", "2")) == 0

    def losses(output):
        return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]

    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    print(f"torchrun: losses 2 processes x batch 1 {two}, 1 process x batch 2 {one}")
    assert len(two) == len(one) == 2 and np.allclose(two, one, rtol=1e-5, atol=0)
    a, b = load_file(tmp_path / "two" / "op4ksr.safetensors"), load_file(tmp_path / "one" / "op4ksr.safetensors")
    assert a.keys() == b.keys()
    error = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"torchrun: LoRA max abs difference {error:.2e}")
    assert error < 1e-4

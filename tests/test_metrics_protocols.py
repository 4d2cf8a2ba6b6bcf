"""metrics.py --protocol: each preset computes what its paper's evaluation computed.

diffusion4k is checked against Diffusion-4K's scripts as they call their libraries (torchvision's
resize + center_crop before FID, Pillow's JPEG q95 files read back by OpenCV for GLCM and CR,
torchmetrics' 100 cos CLIPScore); cupscale against pyiqa's clipscore preprocessing and the LPIPS
of an output brought to its input's size; op4ksr through its Y-channel settings. The networks are
tiny stand-ins (their parity with the references is in test_metrics_networks.py), so the whole
file runs in seconds.
"""

import io
import json

import numpy as np
import pytest
import torch
from conftest import randomize_
from PIL import Image

import metrics as M
from common.io import run_cli


def torchvision_functional():
    """torchvision.transforms.functional (importable on CPU torch thanks to conftest.py)."""
    return pytest.importorskip("torchvision.transforms.functional")


def texture(seed, h, w):
    rng = np.random.default_rng(seed)
    x = np.arange(w)[None, :, None]
    y = np.arange(h)[:, None, None]
    base = 120 + 50 * np.sin(x / (3 + seed)) + 30 * np.cos(y / (5 + seed)) + rng.normal(0, 18, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def run(argv, capsys):
    code = run_cli(M.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


class PooledColours(torch.nn.Module):
    """A 12-d stand-in for the FID Inception network: the preprocessing is under test here."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # metrics.py reads the device off a parameter

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1) * self.scale


def fid_of(features_pred, features_ref):
    stats = {"pred": M.FeatureStats(), "ref": M.FeatureStats()}
    for which, features in (("pred", features_pred), ("ref", features_ref)):
        for f in features:
            stats[which].update(f)
    return M.fid_from_stats(stats["pred"], stats["ref"])


# ----------------------------------------------------------------------------- presets and overrides


def test_protocols_preset_options_and_explicit_options_win(tmp_path):
    tmp_path = str(tmp_path)
    base = M.parse_args(["--pred", tmp_path])
    assert (base.protocol, base.fid_size, base.y_channel, base.tile, base.resize_to_ref) == (
        None, 0, False, 512, False)
    d4k = M.parse_args(["--pred", tmp_path, "--protocol", "diffusion4k"])
    assert (d4k.fid_size, d4k.fid_resize, d4k.clip_model, d4k.clip_form, d4k.glcm_input) == (
        "pred", "tf1", "b16", "torchmetrics", "jpeg95")
    cup = M.parse_args(["--protocol", "cupscale", "--pred", tmp_path])
    assert (cup.fid_resize, cup.clip_model, cup.clip_form, cup.lpips_net, cup.tile, cup.resize_to_ref,
            cup.clipiqa_tile) == ("clean", "b32", "pyiqa", "alex", 0, True, 0)
    op = M.parse_args(["--protocol", "op4ksr", "--pred", tmp_path])
    assert (op.y_channel, op.crop_border, op.tile, op.clipiqa_tile, op.niqe_convention) == (
        True, 0, 512, 512, "pyiqa")
    # what is typed overrides the preset, whichever side of --protocol it stands on
    op = M.parse_args(["--no-y-channel", "--protocol", "op4ksr", "--pred", tmp_path, "--tile", "256"])
    assert (op.y_channel, op.tile, op.clipiqa_tile) == (False, 256, 512)
    cup = M.parse_args(["--pred", tmp_path, "--protocol", "cupscale", "--no-resize-to-ref", "--clip-form",
                        "hessel"])
    assert (cup.resize_to_ref, cup.clip_form, cup.clip_model) == (False, "hessel", "b32")
    assert M.parse_args(["--pred", tmp_path, "--protocol", "diffusion4k", "--fid-size", "0"]).fid_size == 0


@pytest.mark.parametrize("protocol, folders, columns", [
    (None, {}, ["glcm", "cr"]),
    (None, {"ref": "r"}, ["glcm", "cr", "psnr", "ssim"]),
    ("diffusion4k", {}, ["aesthetic", "glcm", "cr"]),  # Table 1's order: FID, CLIPScore, Aesthetics, GLCM, CR
    ("diffusion4k", {"ref": "r", "prompts": "p"}, ["fid", "clip", "aesthetic", "glcm", "cr"]),
    ("cupscale", {"ref": "lr"}, ["clipiqa", "lpips"]),  # --ref holds the inputs: no FID against them
    ("cupscale", {"ref": "lr", "fid_ref": "gt", "prompts": "p"}, ["clipiqa", "fid", "lpips", "clip"]),
    ("op4ksr", {}, ["niqe", "clipiqa"]),
    ("op4ksr", {"ref": "gt"}, ["psnr", "ssim", "lpips", "niqe", "clipiqa"]),
])
def test_default_columns_follow_the_papers_tables(protocol, folders, columns):
    assert M.default_metrics(protocol, **folders) == columns


# ----------------------------------------------------------------------------- diffusion4k


@pytest.mark.parametrize("shape, size", [((150, 230), 96), ((230, 150), 96), ((96, 131), 96), ((96, 96), 96),
                                         ((64, 80), 96), ((333, 201), 128)])
def test_fid_preprocessing_is_torchvision_resize_and_center_crop(shape, size):
    """generate_and_eval_fid.py's fid_preprocess: F.resize(uint8 NCHW tensor, size), then
    F.center_crop(size, size). Both sides run the same float32 interpolation and round it, so
    the uint8 results are compared exactly."""
    TF = torchvision_functional()
    rgb = texture(1, *shape)
    theirs = TF.center_crop(TF.resize(torch.tensor(rgb).unsqueeze(0).permute(0, 3, 1, 2), size), (size, size))
    ours = M.resize_center_crop(rgb, size)
    assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
    assert np.array_equal(ours, theirs[0].permute(1, 2, 0).numpy())


def test_jpeg95_round_trip_is_pillows_file_read_by_opencv(tmp_path):
    """Upstream saves with Pillow `image.save(NAME.jpg, quality=95)` and eval.py reads the file with
    cv2.imread: jpeg95's bytes are that file's, and the pixels GLCM scores are OpenCV's decode."""
    cv2 = pytest.importorskip("cv2")
    image = Image.fromarray(texture(2, 96, 136))
    image.save(tmp_path / "0000.jpg", quality=95)
    encoded = M.jpeg95(image)
    assert encoded == (tmp_path / "0000.jpg").read_bytes()
    ours = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    bgr = cv2.imread(str(tmp_path / "0000.jpg"))
    assert np.array_equal(ours, bgr[..., ::-1])
    assert np.array_equal(M.grey_opencv(ours), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))


def upstream_glcm_cr(jpeg_files, size):
    """eval.py's two numbers, written from its description: cv2 grey // 4, 64-px patches of the
    top-left size x size, graycomatrix (distances 1-4, four angles, normed) and shannon_entropy
    per patch, mean over patches then images; CR = N size^2 3 / total file bytes."""
    cv2 = pytest.importorskip("cv2")
    graycomatrix = pytest.importorskip("skimage.feature").graycomatrix
    from skimage.measure import shannon_entropy

    scores = []
    for path in jpeg_files:
        grey = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY) // 4
        patches = [grey[r : r + 64, c : c + 64] for r in range(0, size, 64) for c in range(0, size, 64)]
        angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
        matrices = [graycomatrix(p, [1, 2, 3, 4], angles, levels=64, normed=True) for p in patches]
        scores.append(np.mean([shannon_entropy(m) for m in matrices]))
    total_bytes = sum(p.stat().st_size for p in jpeg_files)
    return float(np.mean(scores)), len(jpeg_files) * size * size * 3 / total_bytes


def tiny_clip(folder):
    """A CLIP with random weights, two layers per tower, 32-px images, a word-level tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = ["<unk>", "a", "photo", "depicts", "red", "house", "dog", "in", "the", "snow", "tree", "of"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    vision = M.ClipVisionTower(M.ClipTowerConfig(48, 2, 3), patch=8, image_size=32, embed_dim=24)
    text = M.ClipTextTower(M.ClipTowerConfig(32, 2, 2), vocab=len(vocab), context=77, embed_dim=24)
    return randomize_(M.ClipViT(vision, text, M.ClipScoreTokenizer(folder / "tokenizer.json")), std=0.2).eval()


@pytest.mark.filterwarnings("ignore:FID. (pred|ref) has")
def test_diffusion4k_protocol_reproduces_the_upstream_pipeline(tmp_path, capsys, monkeypatch):
    TF = torchvision_functional()
    pred, ref = tmp_path / "samples", tmp_path / "aesthetic_eval"
    pred.mkdir(), ref.mkdir()
    samples = [texture(i, 128, 128) for i in range(3)]  # lossless PNGs: upstream's in-memory samples
    for i, rgb in enumerate(samples):
        Image.fromarray(rgb).save(pred / f"{i:04d}.png")
    shapes = [(150, 200), (210, 140), (128, 131), (300, 300)]
    photos = [texture(10 + i, h, w) for i, (h, w) in enumerate(shapes)]
    for i, rgb in enumerate(photos):
        Image.fromarray(rgb).save(ref / f"{i:04d}.png")  # real photos of other sizes and shapes
    captions = ["a red house", "a dog in the snow", "the tree"]
    prompts = tmp_path / "metadata.jsonl"
    rows = [{"file_name": f"{i:04d}.png", "text": text} for i, text in enumerate(captions)]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))

    clip, mlp, requested = tiny_clip(tmp_path), randomize_(M.AestheticMLP(24), std=0.05).eval(), []
    monkeypatch.setattr(M.InceptionV3, "from_pretrained", classmethod(lambda cls, source: PooledColours()))
    def load_clip(cls, source, towers=("vision", "text")):
        requested.append(source)
        return clip

    monkeypatch.setattr(M.ClipViT, "from_pretrained", classmethod(load_clip))
    monkeypatch.setattr(M.AestheticMLP, "from_pretrained", classmethod(lambda cls, source: mlp))
    argv = ["--protocol", "diffusion4k", "--pred", pred, "--ref", ref, "--prompts", prompts]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    result = json.loads((pred / "metrics.json").read_text())
    assert list(result["metrics"]) == ["fid", "clip", "aesthetic", "glcm", "cr"]
    assert requested == ["b16", "l14"]  # ViT-B/16 for CLIPScore, ViT-L/14 under the aesthetic MLP
    assert result["settings"]["protocol"] == "diffusion4k"
    assert result["settings"]["fid_samples"] == {"pred": 3, "ref": 4}

    # FID: every image resized and centre-cropped to the samples' 128 px by torchvision, then TF1 bilinear
    def upstream_features(rgb):
        x = TF.center_crop(TF.resize(torch.tensor(rgb).unsqueeze(0).permute(0, 3, 1, 2), 128), (128, 128))
        return PooledColours()(M.fid_input(x.float(), "tf1"))

    expected = fid_of([upstream_features(s) for s in samples], [upstream_features(p) for p in photos])
    assert result["metrics"]["fid"] == pytest.approx(expected, rel=1e-9)
    # CLIPScore: 100 cos per image on the sample itself, averaged
    scores = [M.clip_score(clip, [Image.fromarray(s)], [c]).item() for s, c in zip(samples, captions)]
    assert result["metrics"]["clip"] == pytest.approx(np.mean(scores), rel=1e-6)
    # GLCM and CR: on the JPEG q95 files upstream would have written, read back as eval.py reads them
    jpegs = tmp_path / "q95"
    jpegs.mkdir()
    for i, rgb in enumerate(samples):
        Image.fromarray(rgb).save(jpegs / f"{i:04d}.jpg", quality=95)
    glcm, cr = upstream_glcm_cr(sorted(jpegs.iterdir()), 128)
    assert result["metrics"]["glcm"] == pytest.approx(glcm, abs=1e-12)  # entropy sums in another order: ulps
    assert result["metrics"]["cr"] == pytest.approx(cr, rel=1e-12)


def test_clip_metrics_batch_across_images_and_skip_corrupt_ones(tmp_path, capsys, monkeypatch):
    """CLIPScore and aesthetics run the towers on CLIP_BATCH images at a time (here 2, the last
    batch partial and flushed after the loop) with the scores of one image per call; an unreadable
    image under --on-error skip gets no entry."""
    pred = tmp_path / "pred"
    pred.mkdir()
    samples = [texture(i, 48 + 8 * i, 64) for i in range(7)]
    for i, rgb in enumerate(samples):
        Image.fromarray(rgb).save(pred / f"{i:04d}.png")
    for corrupt in ("0002", "0006"):  # one in the middle, and the last file
        (pred / f"{corrupt}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    captions = ["a red house", "a dog in the snow", "the tree", "snow", "a photo of a dog",
                "the house", "a"]
    prompts = tmp_path / "metadata.jsonl"
    prompts.write_text("".join(json.dumps({"file_name": f"{i:04d}.png", "text": text}) + "\n"
                               for i, text in enumerate(captions)))
    clip, mlp = tiny_clip(tmp_path), randomize_(M.AestheticMLP(24), std=0.05).eval()
    load_clip = classmethod(lambda cls, source, towers=(): clip)
    monkeypatch.setattr(M.ClipViT, "from_pretrained", load_clip)
    monkeypatch.setattr(M.AestheticMLP, "from_pretrained", classmethod(lambda cls, source: mlp))
    monkeypatch.setattr(M, "CLIP_BATCH", 2)
    sizes = []  # the batch of each call of the vision tower

    def encode_pixels(pixels, encode=clip.encode_pixels):
        sizes.append(len(pixels))
        return encode(pixels)

    monkeypatch.setattr(clip, "encode_pixels", encode_pixels)

    argv = ["--pred", pred, "--prompts", prompts, "--metrics", "clip,aesthetic"]
    code, _, err = run([*argv, "--on-error", "skip"], capsys)
    assert code == 0, err
    result = json.loads((pred / "metrics.json").read_text())
    readable = ["0000", "0001", "0003", "0004", "0005"]
    assert result["count"] == 5 and len(result["skipped"]) == 2
    assert sizes == [2, 2, 2, 2, 1, 1]  # clip and aesthetic take turns; the 5th image at the end
    for name in readable:
        image, caption = Image.open(pred / f"{name}.png").convert("RGB"), captions[int(name)]
        expected = M.clip_score(clip, [image], [caption]).item()
        assert result["per_image"]["clip"][name] == pytest.approx(expected, rel=1e-6, abs=1e-4)
        expected = M.aesthetic_score(clip, mlp, [image]).item()
        assert result["per_image"]["aesthetic"][name] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert [list(result["per_image"][m]) for m in ("clip", "aesthetic")] == [readable, readable]


@pytest.mark.filterwarnings("ignore:FID. (pred|ref) has")
def test_samples_of_several_sizes_need_an_explicit_fid_size(tmp_path, capsys, monkeypatch):
    pred = tmp_path / "pred"
    pred.mkdir()
    Image.fromarray(texture(0, 96, 96)).save(pred / "0000.png")
    Image.fromarray(texture(1, 64, 80)).save(pred / "0001.png")
    monkeypatch.setattr(M.InceptionV3, "from_pretrained", classmethod(lambda cls, source: PooledColours()))
    argv = ["--protocol", "diffusion4k", "--pred", pred, "--ref", pred, "--metrics", "fid"]
    code, _, err = run(argv, capsys)
    assert code == 2 and "pred images differ in size (shorter sides 96 and 64 px); pass --fid-size" in err
    assert not (pred / "metrics.json").exists()
    code, _, err = run([*argv, "--fid-size", 64], capsys)
    assert code == 0, err
    assert json.loads((pred / "metrics.json").read_text())["settings"]["fid_size"] == 64


# ----------------------------------------------------------------------------- cupscale


def test_pyiqa_clip_preprocessing_is_torchvisions_tensor_resize():
    """pyiqa's clip_preprocess_tensor: resize(x, 224, BICUBIC, antialias=True) of the [0, 1] float
    image, center_crop(224), normalize(CLIP mean, std). The same interpolate call on both sides;
    the normalisation is written differently, hence float32 rounding (1e-6) and nothing more."""
    TF = torchvision_functional()
    from torchvision.transforms import InterpolationMode

    image = Image.fromarray(texture(4, 300, 451))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    theirs = TF.normalize(TF.center_crop(TF.resize(x, 224, InterpolationMode.BICUBIC, antialias=True), 224),
                          M.CLIP_MEAN, M.CLIP_STD)[0]
    ours = M.clip_preprocess(image, 224, "tensor")
    assert ours.shape == (3, 224, 224) and torch.allclose(ours, theirs, atol=1e-6)
    assert (ours - M.clip_preprocess(image, 224, "pil")).abs().max() > 1e-3  # Pillow's kernel is another one


def test_clip_forms_torchmetrics_100cos_and_cupscale_2p5cos(tmp_path):
    TF = torchvision_functional()
    from torchvision.transforms import InterpolationMode

    clip = tiny_clip(tmp_path)
    images = [Image.fromarray(texture(i, 40, 56)) for i in range(4)]
    captions = ["a red house", "a dog in the snow", "tree", "the house of the dog"]

    def cos(pixels, texts):
        with torch.no_grad():
            image_embeddings = torch.nn.functional.normalize(clip.vision(pixels), dim=-1)
        return (image_embeddings * clip.encode_texts(texts)).sum(-1)

    def pyiqa_pixels(image):
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        return TF.normalize(TF.center_crop(TF.resize(x, 32, InterpolationMode.BICUBIC, antialias=True), 32),
                            M.CLIP_MEAN, M.CLIP_STD)

    pil = torch.stack([M.clip_preprocess(im, 32) for im in images])
    torchmetrics = M.clip_score(clip, images, captions, "torchmetrics")
    assert torch.allclose(torchmetrics, (100 * cos(pil, captions)).clamp(min=0), atol=1e-4)
    cupscale = M.clip_score(clip, images, captions, "pyiqa")
    prefixed = ["A photo depicts " + c for c in captions]
    expected = 2.5 * torch.relu(cos(torch.cat([pyiqa_pixels(im) for im in images]), prefixed))
    assert torch.allclose(cupscale, expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:FID. (pred|ref) has")
def test_cupscale_protocol_compares_outputs_at_their_input_size(tmp_path, capsys, monkeypatch):
    outputs, inputs, photos = tmp_path / "upscaled", tmp_path / "lr", tmp_path / "gt"
    for folder in (outputs, inputs, photos):
        folder.mkdir()
    for i in range(3):
        Image.fromarray(texture(i, 128, 128)).save(outputs / f"{i:04d}.png")
        Image.fromarray(texture(30 + i, 64, 64)).save(inputs / f"{i:04d}.png")
    for i in range(5):
        Image.fromarray(texture(20 + i, 160, 120)).save(photos / f"{i:04d}.png")
    monkeypatch.setattr(M.InceptionV3, "from_pretrained", classmethod(lambda cls, source: PooledColours()))
    argv = ["--protocol", "cupscale", "--pred", outputs, "--ref", inputs, "--fid-ref", photos,
            "--metrics", "psnr,fid"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    result = json.loads((outputs / "metrics.json").read_text())
    low = [np.asarray(Image.open(inputs / f"{i:04d}.png")) for i in range(3)]
    resized = [Image.open(outputs / f"{i:04d}.png").resize((64, 64), Image.BICUBIC) for i in range(3)]
    assert result["metrics"]["psnr"] == pytest.approx(np.mean([M.psnr(r, l) for r, l in zip(resized, low)]))
    assert result["settings"]["fid_samples"] == {"pred": 3, "ref": 5}
    assert result["settings"]["fid_resize"] == "clean" and "fid_ref" not in result["settings"]
    # without the resize the pairs are refused, as before
    code, _, err = run([*argv, "--no-resize-to-ref", "--overwrite"], capsys)
    assert code == 2 and "0000: pred is 128x128 but ref is 64x64" in err


# ----------------------------------------------------------------------------- op4ksr


def test_op4ksr_protocol_scores_psnr_and_ssim_on_y(tmp_path, capsys):
    sr, gt = tmp_path / "sr", tmp_path / "gt"
    sr.mkdir(), gt.mkdir()
    for i in range(2):
        Image.fromarray(texture(i, 96, 112)).save(gt / f"{i:04d}.png")
        noisy = texture(i, 96, 112).astype(int) + np.random.default_rng(i).integers(-9, 10, (96, 112, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(sr / f"{i:04d}.png")
    code, _, err = run(["--protocol", "op4ksr", "--pred", sr, "--ref", gt, "--metrics", "psnr,ssim"], capsys)
    assert code == 0, err
    result = json.loads((sr / "metrics.json").read_text())
    names = ("0000.png", "0001.png")
    pairs = [(np.asarray(Image.open(sr / name)), np.asarray(Image.open(gt / name))) for name in names]
    assert result["metrics"]["psnr"] == pytest.approx(np.mean([M.psnr(a, b, 0, "y") for a, b in pairs]))
    assert result["metrics"]["ssim"] == pytest.approx(np.mean([M.ssim(a, b, 0, "y") for a, b in pairs]))
    assert result["settings"]["y_channel"] is True and result["settings"]["crop_border"] == 0

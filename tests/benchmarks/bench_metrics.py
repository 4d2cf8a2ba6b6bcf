"""Throughput of metrics.py on 4K images, against the reference packages in the same run.

    python tests/benchmarks/bench_metrics.py [--size 4096] [--device cuda] [--skimage-patches 256]

1. GLCM Score + Compression Ratio of one image: metrics.py (vectorised bincount) against
   Diffusion-4K's loop (scikit-image graycomatrix + shannon_entropy per 64x64 patch; timed on
   --skimage-patches patches and scaled to the whole grid, since the full loop takes minutes).
2. Feature extraction, full-size networks with random weights (no download needed), the same
   weights in ours and the reference, images/s:
   - FID InceptionV3, whole image -> 299 (tf1 resize) vs torch-fidelity; patch FID (299 crops);
   - CLIP ViT-B/16 and ViT-L/14 image towers (224) vs transformers' CLIPVisionModelWithProjection;
   - LPIPS-alex on 512 tiles vs the lpips package.
References that are not installed are reported as such. Speed is measured here, never asserted
in tests.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import metrics as M  # noqa: E402


def timed(fn, device, repeats=1):
    fn()  # warm-up (cuDNN autotuning, lazy init)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def row(name, seconds, images=1, note=""):
    print(f"{name:<44} {seconds * 1000:>10.1f} ms  {images / seconds:>8.2f} img/s  {note}")


def import_reference(name):
    try:
        if name != "transformers":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from test_metrics_networks import import_torchvision  # the CPU-torch torchvision shim

            import_torchvision()
        return __import__(name)
    except BaseException as error:  # pytest.skip raises a BaseException subclass
        print(f"{name}: not available ({type(error).__name__}); reference skipped")
        return None


def bench_glcm(image, patches):
    from PIL import Image

    print(f"\n== GLCM Score + Compression Ratio, {image.shape[1]}x{image.shape[0]}")
    seconds = timed(lambda: M.glcm_score(image), "cpu")
    row("metrics.glcm_score", seconds)
    pil = Image.fromarray(image)
    row("metrics.jpeg95 (CR numerator)", timed(lambda: M.jpeg95(pil), "cpu"))
    try:
        from skimage.feature import graycomatrix
        from skimage.measure import shannon_entropy
    except ImportError:
        print("scikit-image: not available; reference skipped")
        return
    q = M.grey_opencv(image) >> 2
    grid = (q.shape[0] // 64) * (q.shape[1] // 64)
    tiles = [q[r : r + 64, c : c + 64] for r in range(0, q.shape[0] - 63, 64) for c in range(0, q.shape[1] - 63, 64)][:patches]
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    start = time.perf_counter()
    reference = [shannon_entropy(graycomatrix(t, [1, 2, 3, 4], angles, levels=64, normed=True)) for t in tiles]
    per_patch = (time.perf_counter() - start) / len(tiles)
    row(f"scikit-image loop ({len(tiles)} patches, scaled)", per_patch * grid, note=f"{per_patch * grid / seconds:.1f}x the time of ours")
    ours = M.glcm_value_entropy(M.glcm_counts(np.stack(tiles)), 64, 64)
    print(f"max abs difference on the timed patches: {np.abs(ours - np.array(reference)).max():.2e}")


def randomise(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(1.0)
                m.running_mean.zero_()
                m.weight.fill_(1.0)
    return module.eval()


@torch.no_grad()
def bench_inception(image, device, batch):
    print(f"\n== FID InceptionV3 on {image.shape[1]}x{image.shape[0]} ({device})")
    ours = randomise(M.InceptionV3()).to(device)
    x = M.to_float_tensor(image, device)
    row("ours, whole image (tf1 resize)", timed(lambda: ours(M.fid_input(x, "tf1")), device))
    crops = len(M.fid_crops(x, 299, False))
    row(f"ours, patch FID ({crops} crops of 299)", timed(lambda: M.fid_features(ours, image, patch=299, batch=batch), device), crops, "crops/s")
    fidelity = import_reference("torch_fidelity")
    if fidelity is None:
        return
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with tempfile.TemporaryDirectory() as folder:
        state = ours.state_dict()
        state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
        torch.save(state, f"{folder}/w.pth")
        reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=f"{folder}/w.pth").to(device)
    u8 = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)
    row("torch-fidelity, whole image", timed(lambda: reference(u8), device))
    print(f"max abs feature difference: {(reference(u8)[0] - ours(M.fid_input(x, 'tf1'))).abs().max().item():.2e}")


@torch.no_grad()
def bench_clip(image, device):
    from PIL import Image

    transformers = import_reference("transformers")
    pil = Image.fromarray(image)
    print(f"\n== CLIP image towers on {image.shape[1]}x{image.shape[0]} ({device}), preprocessing included")
    for name, (width, layers, heads, patch, embed) in {"ViT-B/16": (768, 12, 12, 16, 512), "ViT-L/14": (1024, 24, 16, 14, 768)}.items():
        cfg = M.ClipTowerConfig(width, layers, heads)
        ours = M.ClipViT(randomise(M.ClipVisionTower(cfg, patch, 224, embed)), None).to(device)
        row(f"ours {name}", timed(lambda: ours.encode_images([pil]), device))
        if transformers is None:
            continue
        config = transformers.CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                               num_attention_heads=heads, patch_size=patch, image_size=224, projection_dim=embed)
        reference = transformers.CLIPVisionModelWithProjection(config).eval().to(device)
        state = M.clip_state_from_transformers(reference.state_dict())  # vision_model.* / visual_projection.*
        ours.vision.load_state_dict({k.removeprefix("vision."): v for k, v in state.items()})
        pixels = M.clip_preprocess(pil, 224)[None].to(device)
        row(f"transformers {name} (tower only)", timed(lambda: reference(pixel_values=pixels), device))
        row(f"ours {name} (tower only)", timed(lambda: ours.vision(pixels), device))
        error = (reference(pixel_values=pixels).image_embeds - ours.vision(pixels)).abs().max().item()
        print(f"max abs embedding difference: {error:.2e}")


@torch.no_grad()
def bench_lpips(image, device, tile):
    print(f"\n== LPIPS-alex on {image.shape[1]}x{image.shape[0]} in {tile} tiles ({device})")
    ours = randomise(M.LPIPSMetric("alex")).to(device)
    other = np.ascontiguousarray(image[::-1])
    n = len(M.tiles(*image.shape[:2], tile))
    row(f"ours ({n} tiles)", timed(lambda: M.lpips_tiled(ours, image, other, tile), device))
    lpips = import_reference("lpips")
    if lpips is None:
        return
    reference = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval().to(device)
    a = M.to_float_tensor(image, device)[..., :tile, :tile] / 127.5 - 1
    b = M.to_float_tensor(other, device)[..., :tile, :tile] / 127.5 - 1
    row("lpips package, one tile", timed(lambda: reference(a, b), device))
    row("ours, one tile", timed(lambda: ours(a, b), device))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skimage-patches", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--only", default="glcm,inception,clip,lpips")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : args.size, 0 : args.size]
    image = np.clip(128 + 60 * np.sin(x / 37.0)[..., None] * np.cos(y / 53.0)[..., None] + rng.normal(0, 20, (args.size, args.size, 3)), 0, 255).astype(np.uint8)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    parts = args.only.split(",")
    if "glcm" in parts:
        bench_glcm(image, args.skimage_patches)
    if "inception" in parts:
        bench_inception(image, args.device, args.batch)
    if "clip" in parts:
        bench_clip(image, args.device)
    if "lpips" in parts:
        bench_lpips(image, args.device, 512)


if __name__ == "__main__":
    main()

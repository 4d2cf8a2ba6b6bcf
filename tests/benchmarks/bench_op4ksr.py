"""OP4KSR speed and memory: one patch-free pass (F16 VAE, whole image through Flux at once)
against the patch-based baseline of one-step SR methods (F8 VAE, 1024-px tiles with overlap,
one Flux pass per tile, blended), in the same run on the same random weights.

    python tests/benchmarks/bench_op4ksr.py            # tiny models on the CPU (a smoke run)
    python tests/benchmarks/bench_op4ksr.py --full     # FLUX.1-dev-sized Flux + F16/F8 VAE, 4096^2, CUDA bf16

Random weights need no download; times are for the models only (no image I/O). Not collected by pytest.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import op4ksr  # noqa: E402


def random_model(model, device, dtype, seed=0):
    """Materialise a meta-built model on `device` with small random weights (norm scales 1)."""
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("scale", "norm.weight", "norm1.weight", "norm2.weight", "norm_out.weight")) or p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0, 0.02 if p.ndim == 2 else 0.05, generator=g)
    return model.eval().requires_grad_(False)


def blend_ramp(size, overlap, device):
    ramp = torch.ones(size, device=device)
    if overlap:
        edge = torch.linspace(0, 1, overlap + 2, device=device)[1:-1]
        ramp[:overlap], ramp[-overlap:] = edge, edge.flip(0)
    return ramp[:, None] * ramp[None, :]


def starts(length, tile, stride):
    positions = list(range(0, max(length - tile, 0) + 1, stride))
    return positions if positions[-1] + tile >= length else positions + [length - tile]


@torch.inference_mode()
def patch_free(flux, vae16, image, txt, y, sigma=op4ksr.OMGSR_SIGMA):
    return vae16.decode(op4ksr.sr_latent(flux, vae16, image, txt, y, sigma, 1.0))


@torch.inference_mode()
def patch_based(flux, vae8, image, txt, y, tile, overlap, sigma=op4ksr.OMGSR_SIGMA):
    _, _, h, w = image.shape
    out, weight = torch.zeros_like(image, dtype=torch.float32), torch.zeros(h, w, device=image.device)
    ramp = blend_ramp(tile, overlap, image.device)
    count = 0
    for top in starts(h, tile, tile - overlap):
        for left in starts(w, tile, tile - overlap):
            patch = image[..., top : top + tile, left : left + tile]
            sr = vae8.decode(op4ksr.sr_latent(flux, vae8, patch, txt, y, sigma, 1.0))
            out[..., top : top + tile, left : left + tile] += sr.float() * ramp
            weight[top : top + tile, left : left + tile] += ramp
            count += 1
    return out / weight, count


def measure(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
    return result, seconds, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size models at 4096^2 on CUDA in bf16")
    parser.add_argument("--size", type=int, help="output side (default 4096 full, 256 tiny)")
    parser.add_argument("--tile", type=int, help="baseline tile side (default 1024 full, 64 tiny)")
    parser.add_argument("--overlap", type=int, help="baseline tile overlap (default 512 full = OMGSR-F's 64 latents, 32 tiny)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up (the best is reported)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each Flux block (in the warm-up)")
    args = parser.parse_args()
    if args.full and not torch.cuda.is_available():
        sys.exit("--full needs a CUDA GPU")
    device = torch.device("cuda" if args.full else "cpu")
    dtype = torch.bfloat16 if args.full else torch.float32
    if args.full:
        flux_config, vae_config, txt_len = op4ksr.FluxConfig(theta=100.0), op4ksr.FLUX_VAE, 512
        size, tile, overlap = args.size or 4096, args.tile or 1024, 512 if args.overlap is None else args.overlap
    else:
        flux_config = op4ksr.FluxConfig(in_channels=16, hidden_size=64, num_heads=4, depth=1, depth_single_blocks=2,
                                        vec_in_dim=32, context_in_dim=32, axes_dim=(4, 6, 6), theta=100.0)
        vae_config, txt_len = op4ksr.VAEConfig(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, z_channels=4), 16
        size, tile, overlap = args.size or 256, args.tile or 64, 32 if args.overlap is None else args.overlap
    with torch.device("meta"):
        flux = op4ksr.Flux(flux_config)
        vae8 = op4ksr.AutoEncoder(vae_config)
    flux, vae8 = random_model(flux, device, dtype), random_model(vae8, device, dtype, seed=1)
    if args.compile:
        op4ksr.compile_blocks(flux)
    with torch.device("meta"):
        vae16 = op4ksr.AutoEncoder(op4ksr.VAEConfig(**{**vae_config.__dict__, "stride": 2}))
    vae16.load_state_dict(vae8.state_dict(), assign=True)  # the F16 VAE: the same weights, stride-2 conv_in
    vae16 = vae16.eval()
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
    txt = torch.randn(1, txt_len, flux_config.context_in_dim, generator=g).to(device, dtype)
    y = torch.randn(1, flux_config.vec_in_dim, generator=g).to(device, dtype)
    tokens = (size // (vae16.config.downsample_factor * 2)) ** 2
    print(f"device {torch.cuda.get_device_name() if args.full else 'cpu'}, {dtype}, output {size}x{size}, "
          f"Flux {sum(p.numel() for p in flux.parameters()) / 1e9:.2f}B params"
          f"{', blocks compiled' if args.compile else ''}")

    runs = {"OP4KSR patch-free (F16, %d tokens, 1 pass)" % tokens: lambda: patch_free(flux, vae16, image, txt, y)}
    if not args.skip_baseline:
        runs[f"patch-based baseline (F8, {tile}-px tiles, overlap {overlap})"] = lambda: patch_based(flux, vae8, image, txt, y, tile, overlap)
    for name, fn in runs.items():
        result, _, _ = measure(fn, device)  # warm-up
        timings = [measure(fn, device) for _ in range(args.repeats)]
        best = min(timings, key=lambda t: t[1])
        extra = f", {result[1]} tiles" if isinstance(result, tuple) else ""
        memory = f"{best[2]:.2f} GiB" if device.type == "cuda" else "n/a on the CPU"
        print(f"{name}: {best[1]:.3f} s, peak memory {memory}{extra}")


if __name__ == "__main__":
    main()

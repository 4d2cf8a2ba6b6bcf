"""OP4KSR's Fig. 3 comparison in one run: one patch-free pass (F16 VAE, the whole image through Flux at
once; --f8: also with the F8 VAE) against OMGSR-F's tiled inference (F8 VAE, latent tiles of 128
with overlap 64, 7 x 7 = 49 Flux passes at 4096^2, Gaussian blend: op4ksr.py's --recipe omgsr-f), on
the same random weights: time, peak memory, FLOPs, and the speed-up ratio.

    python tests/benchmarks/bench_op4ksr.py            # tiny models on the CPU (a smoke run)
    python tests/benchmarks/bench_op4ksr.py --full     # FLUX.1-dev-sized Flux + F16/F8 VAE, 4096^2, CUDA bf16

Random weights need no download; times are for the models only (no image I/O). Not collected by pytest.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]
import op4ksr  # noqa: E402
from random_weights import random_model  # noqa: E402

TINY_FLUX = op4ksr.FluxConfig(in_channels=16, hidden_size=64, num_heads=4, depth=1, depth_single_blocks=2,
                              vec_in_dim=32, context_in_dim=32, axes_dim=(4, 6, 6), theta=100.0)
TINY_VAE = op4ksr.VAEConfig(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, z_channels=4)


def build(flux_config, vae_config, device, dtype, compile=False):
    """Random Flux and F8 VAE built directly in `dtype` on `device`, and the F16 VAE: the same weights."""
    flux = random_model(lambda: op4ksr.Flux(flux_config), device, dtype)
    vae8 = random_model(lambda: op4ksr.AutoEncoder(vae_config), device, dtype, seed=1)
    if compile:
        op4ksr.compile_blocks(flux)
    with torch.device("meta"):
        vae16 = op4ksr.AutoEncoder(op4ksr.VAEConfig(**{**vae_config.__dict__, "stride": 2}))
    vae16.load_state_dict(vae8.state_dict(), assign=True)  # the F16 VAE: the same weights, stride-2 conv_in
    return flux, vae8, vae16.eval()


@torch.inference_mode()
def patch_free(flux, vae16, image, txt, y, sigma=op4ksr.OMGSR_SIGMA):
    return vae16.decode(op4ksr.sr_latent(flux, vae16, image, {"txt": txt, "y": y}, sigma, 1.0))


@torch.inference_mode()
def omgsr_f_tiled(flux, vae8, image, txt, y, process_size):
    """OMGSR-F's inference as `op4ksr.py --recipe omgsr-f` runs it: F8 encode, one Flux pass per latent
    tile of process_size / 8 (overlap half a tile, Gaussian blend), decode. Returns (image, tiles)."""
    pipe = op4ksr.SRPipeline(flux, vae8, txt, y, op4ksr.OMGSR_SIGMA, 1.0, 4.0, image.device, image.dtype, {})
    latent = op4ksr.omgsr_f_latent(pipe, image, process_size)
    h, w, tile = *latent.shape[-2:], process_size // 8
    tiles = [len(op4ksr.omgsr_f_tile_starts(n, min(tile, h, w), tile // 2)) for n in (h, w)]
    return vae8.decode(latent.to(image.dtype)), tiles[0] * tiles[1] if h * w > tile * tile else 1


def measure(fn, device):
    """(result, seconds, peak bytes above what was allocated before the call: CUDA only, else None)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    return result, seconds, peak


def flops_of(fn) -> float:
    """FLOPs of one untimed run (torch's FlopCounterMode: matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def run(flux_config, vae_config, size, txt_len, device, dtype, process_size, repeats=2, baseline=True,
        f8=False, compile=False, count_flops=True) -> dict:
    """Time the patch-free pass (F16; with f8 also F8) and OMGSR-F's tiled inference on one size x size
    image with the same weights, each after one warm-up: {name: (best seconds, its peak bytes above the
    models or None, FLOPs (count_flops: one more run) or None, Flux passes)}."""
    flux, vae8, vae16 = build(flux_config, vae_config, device, dtype, compile)
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
    txt = torch.randn(1, txt_len, flux_config.context_in_dim, generator=g).to(device, dtype)
    y = torch.randn(1, flux_config.vec_in_dim, generator=g).to(device, dtype)
    runs = {}
    for vae in (vae16, vae8) if f8 else (vae16,):
        tokens = (size // (vae.config.downsample_factor * 2)) ** 2
        name = f"patch-free, F{8 * vae.config.stride} ({tokens} tokens, 1 pass)"
        runs[name] = lambda vae=vae: patch_free(flux, vae, image, txt, y)
    if baseline:
        name = f"OMGSR-F tiled, F8 (latent tiles of {process_size // 8}, overlap {process_size // 16})"
        runs[name] = lambda: omgsr_f_tiled(flux, vae8, image, txt, y, process_size)
    results = {}
    for name, fn in runs.items():
        result, _, _ = measure(fn, device)  # warm-up
        _, seconds, peak = min((measure(fn, device) for _ in range(repeats)), key=lambda t: t[1])
        count = result[1] if isinstance(result, tuple) else 1
        results[name] = seconds, peak, flops_of(fn) if count_flops else None, count
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size models at 4096^2 on CUDA in bf16")
    parser.add_argument("--size", type=int, help="output side (default 4096 full, 256 tiny)")
    parser.add_argument("--process-size", type=int,
                        help="OMGSR-F's process size: latent tiles of a /8 of it (default 2 x size / the F8 "
                             "VAE's factor: 1024 at 4096^2, 7 x 7 = 49 tiles)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs after one warm-up (the best is reported)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--f8", action="store_true", help="also the patch-free pass with the F8 VAE")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each Flux block (in the warm-up)")
    args = parser.parse_args()
    if args.full and not torch.cuda.is_available():
        sys.exit("--full needs a CUDA GPU")
    device = torch.device("cuda" if args.full else "cpu")
    dtype = torch.bfloat16 if args.full else torch.float32
    if args.full:
        flux_config, vae_config, txt_len, size = op4ksr.FluxConfig(theta=100.0), op4ksr.FLUX_VAE, 512, 4096
    else:
        flux_config, vae_config, txt_len, size = TINY_FLUX, TINY_VAE, 16, 256
    size = args.size or size
    factor = 2 ** (len(vae_config.channel_multipliers) - 1)
    process_size = args.process_size or 2 * size // factor
    with torch.device("meta"):
        params = sum(p.numel() for p in op4ksr.Flux(flux_config).parameters())
    print(f"device {torch.cuda.get_device_name() if args.full else 'cpu'}, {dtype}, output {size}x{size}, "
          f"Flux {params / 1e9:.2f}B params{', blocks compiled' if args.compile else ''}")
    results = run(flux_config, vae_config, size, txt_len, device, dtype, process_size, args.repeats,
                  not args.skip_baseline, args.f8, args.compile)
    for name, (seconds, peak, flops, passes) in results.items():
        memory = f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a on the CPU"
        print(f"{name}: {seconds:.3f} s, peak memory {memory}, {flops / 1e12:.3f} TFLOP, "
              f"{passes} Flux pass{'es' if passes > 1 else ''}")
    names = list(results)
    if not args.skip_baseline:
        free, tiled = results[names[0]], results[names[-1]]
        print(f"speed-up of the patch-free F16 pass over OMGSR-F's tiles: {tiled[0] / free[0]:.2f}x in time, "
              f"{tiled[2] / free[2]:.2f}x in FLOPs (OP4KSR's Fig. 3 claims nearly 10x at 4K)")


if __name__ == "__main__":
    main()

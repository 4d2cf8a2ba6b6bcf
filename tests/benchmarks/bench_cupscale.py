"""Benchmark C-Upscale: seconds and peak memory of one upscale, and each prior's cost against
plain regional denoising (MultiDiffusion with no prior), all in the same run.

    python tests/benchmarks/bench_cupscale.py            # CPU, tiny random SD3 + VAE, 64 -> 128 px, 12 steps
    python tests/benchmarks/bench_cupscale.py --full     # GPU, SD3-Medium-sized MMDiT + VAE with random
                                                         # weights in bf16, 1024 -> 4096 px (49 regions x 12 steps)

Weights are random (no download): speed does not depend on their values. Text conditioning is
random too (333 tokens; the text encoders run once per prompt, outside the sampling loop, and
are not timed). Each configuration is timed end to end through `cupscale.upscale`: tiled VAE
encode, the regional sampling loop, tiled decode. RSP uses one random regional prompt per
region (three batch rows per region instead of two). Not collected by pytest.
"""

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cupscale as cu  # noqa: E402

TINY_SD3 = cu.SD3Config(in_channels=4, out_channels=4, hidden_size=64, num_heads=2, depth=2, adm_in_channels=64,
                        context_dim=64, pos_embed_max_size=64)
TINY_VAE = cu.VAEConfig(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, z_channels=4,
                        scale_factor=1.5305, shift_factor=0.0609)
CONFIGS = {  # name: (gsp, rap, rsp)
    "plain regional (MultiDiffusion)": (False, False, False),
    "+ GSP": (True, False, False),
    "+ RAP": (False, True, False),
    "+ RSP (composer)": (False, False, True),
    "C-Upscale (all three)": (True, True, True),
}


def random_model(cls, config, device, dtype, seed):
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device=device).to(dtype).eval().requires_grad_(False)
    generator = torch.Generator(device).manual_seed(seed)
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, device=device, dtype=torch.float32) * 0.02)
    return model


def peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process RSS (peak so far)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SD3-Medium sizes on CUDA in bf16, 1024 -> 4096")
    parser.add_argument("--scale", type=float, help="default 4 (--full) or 2 (tiny)")
    parser.add_argument("--steps", type=int, default=28, help="full schedule; int(0.45 * steps) are run")
    parser.add_argument("--region-batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="time each configuration this many times, keep the fastest")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each MMDiT block; each configuration compiles in a warm-up run")
    args = parser.parse_args()

    device = torch.device("cuda" if args.full else "cpu")
    dtype = torch.bfloat16 if args.full else torch.float32
    sd3, vae_config = (cu.SD3_MEDIUM, cu.SD3_VAE) if args.full else (TINY_SD3, TINY_VAE)
    transformer = random_model(cu.MMDiT, sd3, device, dtype, 0)
    if args.compile:
        cu.compile_blocks(transformer)
    vae = random_model(cu.AutoEncoder, vae_config, device, dtype, 1)
    pipe = cu.Pipeline("sd3", transformer, vae, {}, {}, device, dtype, "random weights")
    factor = vae_config.downsample_factor
    input_px, scale = (1024, args.scale or 4) if args.full else (64, args.scale or 2)
    region_px, overlap_px = (1024, 512) if args.full else (64, 32)
    config = cu.CUpscaleConfig(vae_scale=factor, region_px=region_px, overlap_px=overlap_px, num_steps=args.steps,
                               region_batch=args.region_batch, vae_tile_px=1024 if args.full else 64,
                               vae_overlap_px=128 if args.full else 16)
    width, height = cu.target_size(input_px, input_px, scale, pipe.size_multiple)
    regions = cu.plan_regions(height // factor, width // factor, config.region, config.stride)
    generator = torch.Generator().manual_seed(2)

    def condition():
        return {"context": torch.randn(1, 333, sd3.context_dim, generator=generator).to(dtype),
                "pooled": torch.randn(1, sd3.adm_in_channels, generator=generator).to(dtype)}

    conditions = {"global": condition(), "negative": condition(), "regions": {r.key: condition() for r in regions}}
    image = Image.fromarray((torch.rand(input_px // 16, input_px // 16, 3, generator=generator) * 255).byte().numpy())
    image = image.resize((input_px, input_px), Image.BICUBIC)
    steps = int(config.strength * config.num_steps)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{dtype}, {input_px} -> {width}x{height}, {len(regions)} regions x {steps} steps, "
          f"region batch {args.region_batch}{', blocks compiled' if args.compile else ''}")

    def run(gsp, rap, rsp):
        run_config = dataclasses.replace(config, gsp=gsp, rap=rap, rsp=rsp)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        cu.upscale(pipe, image, width, height, conditions, run_config, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for switches in CONFIGS.values() if args.compile else [(False, False, False)]:
        run(*switches)  # warm-up (kernel selection, allocator; compilation: each prior has its own graphs)
    baseline = None
    for name, switches in CONFIGS.items():
        seconds = min(run(*switches) for _ in range(args.repeat))
        baseline = baseline or seconds
        print(f"{name:34s} {seconds:8.2f} s  ({seconds / baseline:5.2f}x plain, {seconds - baseline:+7.2f} s)  peak {peak_memory(device)}")


if __name__ == "__main__":
    main()

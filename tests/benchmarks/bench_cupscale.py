"""Benchmark C-Upscale: seconds and peak memory of one upscale, and each prior's cost against
plain regional denoising (MultiDiffusion with no prior), all in the same run.

    python tests/benchmarks/bench_cupscale.py          # CPU, tiny random SD3 + VAE, 64 -> 128 px, 13 steps
    python tests/benchmarks/bench_cupscale.py --full   # GPU, SD3-Medium-sized MMDiT + VAE, random weights,
                                                       # bf16, 1024 -> 4096 px (49 regions x 13 steps)
    python tests/benchmarks/bench_cupscale.py --full --short   # one configuration, one step: seconds, not
                                                               # 3-6 minutes (the GPU acceptance run's part)

Weights are random (no download): speed does not depend on their values. Text conditioning is
random too (333 tokens; the text encoders run once per prompt, outside the sampling loop, and
are not timed). Each configuration is timed end to end through `cupscale.upscale`: tiled VAE
encode, the regional sampling loop, tiled decode. RSP uses one random regional prompt per
region (three batch rows per region instead of two). Not collected by pytest.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]
import cupscale as cu  # noqa: E402
from random_weights import random_model  # noqa: E402

TINY_SD3 = cu.SD3Config(in_channels=4, out_channels=4, hidden_size=64, num_heads=2, depth=2,
                        adm_in_channels=64, context_dim=64, pos_embed_max_size=64)
TINY_VAE = cu.VAEConfig(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, z_channels=4,
                        scale_factor=1.5305, shift_factor=0.0609)
CONFIGS = {  # name: (gsp, rap, rsp)
    "plain regional (MultiDiffusion)": (False, False, False),
    "+ GSP": (True, False, False),
    "+ RAP": (False, True, False),
    "+ RSP (composer)": (False, False, True),
    "C-Upscale (all three)": (True, True, True),
}
# --short: what the CLI runs without regional prompts, and what plan.py's cupscale-* workloads model
SHORT = {"C-Upscale, GSP + RAP (no regional prompts)": (True, True, False)}
SHORT_STEPS = 2  # SD3's schedule cut at strength 0.45 (diffusers-strength): 1 denoising step


def build(sd3, vae_config, device, dtype, compile=False) -> cu.Pipeline:
    """An SD3 pipeline of random weights built directly in `dtype` (no text encoders: random conditions)."""
    transformer = random_model(lambda: cu.MMDiT(sd3), device, dtype)
    if compile:
        cu.compile_blocks(transformer)
    vae = random_model(lambda: cu.AutoEncoder(vae_config), device, dtype, seed=1)
    return cu.Pipeline("sd3", transformer, vae, {}, {}, device, dtype, "random weights")


def random_inputs(sd3, regions, input_px, dtype) -> tuple[Image.Image, dict]:
    """A smooth random LR image and random conditions: global, negative and one per region (RSP)."""
    generator = torch.Generator().manual_seed(2)

    def condition():
        return {"context": torch.randn(1, 333, sd3.context_dim, generator=generator).to(dtype),
                "pooled": torch.randn(1, sd3.adm_in_channels, generator=generator).to(dtype)}

    regional = {r.key: condition() for r in regions}
    conditions = {"global": condition(), "negative": condition(), "regions": regional}
    pixels = (torch.rand(input_px // 16, input_px // 16, 3, generator=generator) * 255).byte().numpy()
    return Image.fromarray(pixels).resize((input_px, input_px), Image.BICUBIC), conditions


def run(sd3, vae_config, config: cu.CUpscaleConfig, input_px, scale, configs: dict, device, dtype, repeat=1,
        compile=False) -> dict:
    """Time `cupscale.upscale` end to end under each of `configs` {name: (gsp, rap, rsp)}, after a warm-up
    (of each configuration when compiled: each prior has its own graphs): {name: (seconds, peak bytes
    above the models on the GPU, or None)}, the fastest of `repeat` runs."""
    pipe = build(sd3, vae_config, device, dtype, compile)
    width, height = cu.target_size(input_px, input_px, scale, pipe.size_multiple)
    factor = config.vae_scale
    regions = cu.plan_regions(height // factor, width // factor, config.region, config.stride)
    image, conditions = random_inputs(sd3, regions, input_px, dtype)

    def timed(switches):
        run_config = dataclasses.replace(config, **dict(zip(("gsp", "rap", "rsp"), switches)))
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        cu.upscale(pipe, image, width, height, conditions, run_config, seed=0)
        if device.type != "cuda":
            return time.perf_counter() - start, None
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) - base

    for switches in configs.values() if compile else list(configs.values())[:1]:
        timed(switches)  # warm-up (kernel selection, allocator; compilation)
    return {name: min((timed(switches) for _ in range(repeat)), key=lambda t: t[0])
            for name, switches in configs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SD3-Medium sizes on CUDA in bf16, 1024 -> 4096")
    parser.add_argument("--short", action="store_true",
                        help=f"one configuration ({', '.join(SHORT)}) and --steps {SHORT_STEPS} (one step)")
    parser.add_argument("--scale", type=float, help="default 4 (--full) or 2 (tiny)")
    parser.add_argument("--steps", type=int,
                        help="full schedule (default 28, --short 2); int(0.45 * steps) are run")
    parser.add_argument("--region-batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each configuration this many times, keep the fastest")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each MMDiT block; each configuration compiles in a warm-up run")
    args = parser.parse_args()

    device = torch.device("cuda" if args.full else "cpu")
    dtype = torch.bfloat16 if args.full else torch.float32
    sd3, vae_config = (cu.SD3_MEDIUM, cu.SD3_VAE) if args.full else (TINY_SD3, TINY_VAE)
    input_px, scale = (1024, args.scale or 4) if args.full else (64, args.scale or 2)
    region_px, overlap_px, tile_px, tile_overlap = (1024, 512, 1024, 128) if args.full else (64, 32, 64, 16)
    steps = args.steps or (SHORT_STEPS if args.short else 28)
    config = cu.CUpscaleConfig(vae_scale=vae_config.downsample_factor, region_px=region_px,
                               overlap_px=overlap_px, num_steps=steps, region_batch=args.region_batch,
                               vae_tile_px=tile_px, vae_overlap_px=tile_overlap)
    steps = len(cu.start_sigmas(config.strength, config.num_steps, config.shift)) - 1
    side = cu.target_size(input_px, input_px, scale, 2 * config.vae_scale)[0] // config.vae_scale
    regions = len(cu.plan_regions(side, side, config.region, config.stride))
    where = torch.cuda.get_device_name(device) if args.full else f"{torch.get_num_threads()} threads"
    compiled = ", blocks compiled" if args.compile else ""
    print(f"device {device} ({where}), {dtype}, {input_px} -> {side * config.vae_scale} px square, {regions} "
          f"regions x {steps} steps, region batch {args.region_batch}{compiled}")
    results = run(sd3, vae_config, config, input_px, scale, SHORT if args.short else CONFIGS, device, dtype,
                  args.repeat, args.compile)
    baseline = None
    for name, (seconds, peak) in results.items():
        baseline = baseline or seconds
        memory = f"{peak / 2**30:.1f} GiB above the models" if peak is not None else "n/a on the CPU"
        print(f"{name:42s} {seconds:8.2f} s  ({seconds / baseline:5.2f}x the first, "
              f"{seconds - baseline:+7.2f} s)  peak {memory}")


if __name__ == "__main__":
    main()

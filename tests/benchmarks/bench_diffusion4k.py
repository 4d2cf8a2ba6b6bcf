"""Diffusion-4K at 4096x4096: seconds per denoising step and peak memory, ours vs diffusers with
the SAME random weights, in one run; plus our F16 VAE decode of a 4096^2 image.

    python tests/benchmarks/bench_diffusion4k.py           # CPU: tiny Flux / SD3 / VAE configs, small sizes
    python tests/benchmarks/bench_diffusion4k.py --full    # CUDA, bf16: FLUX.1-dev (12B) and SD3-Medium (2B)
                                                           # with random weights at 4096^2 through the F16 VAE

A denoising step is one transformer forward for Flux (guidance is distilled) and one forward
of batch 2 for SD3 (classifier-free guidance). At 4096^2 with the F16 VAE both see a 256^2
latent: Flux 16,384 image tokens + 512 T5 tokens, SD3 16,384 + 333. The paper (Table 5, one
A100) reports 2.42 s/step for Flux-F16 and 1.16 s/step for SD3-F16. Not a test: pytest only
collects test_*.py.
"""

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE), str(HERE.parent)]

import conftest  # noqa: E402, F401  (makes the test environment's CPU-only torchvision importable)
import diffusion4k as d  # noqa: E402
from bench_flux import (  # noqa: E402
    build_models, compile_reference, flux_forward_flops, make_inputs, measure, run_reference,
)
from random_weights import random_model  # noqa: E402

TINY_SD3 = d.SD3Config(hidden_size=128, num_heads=2, depth=3, context_dim=64, adm_in_channels=64,
                       pos_embed_max_size=64)
TINY_VAE = d.VAEConfig(base_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, stride=2)
TINY_FLUX = d.FluxConfig(hidden_size=128, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=64,
                         vec_in_dim=64, axes_dim=(8, 28, 28))


def sd3_models(config: d.SD3Config, device, dtype, std=0.02):
    """diffusers' SD3Transformer2DModel with random weights, and ours holding the same tensors."""
    from diffusers import SD3Transformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            reference = SD3Transformer2DModel.from_config(d.diffusers_config(config, "sd3"))
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0.0, std, generator=generator)
    reference = reference.to(dtype).eval()  # its position table is built in fp32; loaded weights are in dtype
    state = reference.state_dict()
    with torch.device("meta"):
        ours = d.MMDiT(config)
    table = d.sd3_key_table(config.depth)
    d.assign_state_dict(ours, d.to_original_layout(state, table, "benchmark"), "benchmark")
    return ours.eval(), reference


def sd3_step_flops(config: d.SD3Config, image_tokens: int, text_tokens: int, batch: int = 2) -> float:
    """2 * per-token linear params * L + 4 * L^2 * d per block, times the CFG batch.
    Per token and block: qkv 3d^2 + proj d^2 + MLP 2*r*d^2 (the last block's context stream has
    qkv only; ignored here, < 1 %)."""
    dim, mlp = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    tokens = image_tokens + text_tokens
    per_block = 2 * (4 * dim * dim + 2 * dim * mlp) * tokens + 4 * tokens**2 * dim
    return batch * config.depth * per_block


def report(title, results, flops):
    print(title)
    print(f"  {'model':<10} {'s/step':>9} {'ours/diff':>10} {'peak GiB':>9} {'TFLOP/s':>8}")
    for label, (seconds, peak, _) in results.items():
        ratio = seconds / results["diffusers"][0] if "diffusers" in results else float("nan")
        memory = f"{peak[0] / 2**30:>9.2f}" if peak else f"{'n/a':>9}"
        print(f"  {label:<10} {seconds:>9.4f} {ratio:>10.3f} {memory} {flops / seconds / 1e12:>8.2f}")
    if "diffusers" in results:
        difference = (results["ours"][2] - results["diffusers"][2]).abs().max().item()
        print(f"  max abs difference of the outputs: {difference:.3e}")


def flux_step(config: d.FluxConfig, image_tokens: int, text_tokens: int, device, dtype, warmup=1, iters=3,
              reference=True, compile=False) -> dict:
    """One Flux step (one forward) timed by bench_flux.measure: {"diffusers", "ours"} (ours alone
    without `reference`: random weights, no diffusers needed)."""
    if reference:
        ours, theirs = build_models(config, device, dtype, std=0.02)
    else:
        ours, theirs = random_model(lambda: d.Flux(config), device, dtype), None
    if compile:
        ours = d.compile_blocks(ours)
        theirs = compile_reference(theirs) if theirs is not None else None
    inputs = make_inputs(config, image_tokens, text_tokens, device, dtype)
    forwards = {"ours": lambda: ours(**inputs)}
    if theirs is not None:
        forwards = {"diffusers": lambda: run_reference(theirs, inputs), **forwards}
    return measure(forwards, device, warmup, iters)


def sd3_step(config: d.SD3Config, latent: int, text_tokens: int, device, dtype, warmup=1, iters=3,
             reference=True, compile=False) -> dict:
    """One SD3 step (a CFG forward of batch 2) on a latent x latent input, as `flux_step`."""
    if reference:
        ours, theirs = sd3_models(config, device, dtype)
    else:
        ours, theirs = random_model(lambda: d.MMDiT(config), device, dtype), None
    if compile:
        ours = d.compile_blocks(ours)
        theirs = compile_reference(theirs) if theirs is not None else None
    generator = torch.Generator(device).manual_seed(1)
    x = torch.randn(2, config.in_channels, latent, latent, generator=generator, device=device, dtype=dtype)
    context = torch.randn(2, text_tokens, config.context_dim, generator=generator, device=device, dtype=dtype)
    pooled = torch.randn(2, config.adm_in_channels, generator=generator, device=device, dtype=dtype)
    t = torch.full((2,), 750.0, device=device, dtype=dtype)
    forwards = {"ours": lambda: ours(x, t, context, pooled)}
    if theirs is not None:
        forwards = {"diffusers": lambda: theirs(hidden_states=x, encoder_hidden_states=context,
                                                pooled_projections=pooled, timestep=t, return_dict=False)[0],
                    **forwards}
    return measure(forwards, device, warmup, iters)


def f16_decode(config: d.VAEConfig, size: int, device, dtype, warmup=1, iters=3) -> dict:
    """Our F16 VAE (`config` with stride 2) decoding one size x size image: {"ours": ...} as `flux_step`."""
    vae = random_model(lambda: d.AutoEncoder(config), device, dtype)
    factor = config.downsample_factor
    z = torch.randn(1, config.z_channels, size // factor, size // factor, device=device, dtype=dtype)
    return measure({"ours": lambda: vae.decode(z)}, device, warmup, iters)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full-size models on CUDA in bf16 at 4096^2")
    parser.add_argument("--size", type=int, help="image side (default 4096 with --full, else 256)")
    parser.add_argument("--only", choices=["flux", "sd3", "vae"], help="run one part")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block, ours and diffusers', in the warm-up")
    args = parser.parse_args(argv)

    device = "cuda" if args.full else "cpu"
    if args.full and not torch.cuda.is_available():
        sys.exit("error: CUDA is not available (run without --full for the CPU version)")
    dtype = torch.bfloat16 if args.full else torch.float32
    size = args.size or (4096 if args.full else 256)
    latent = size // 16  # F16 VAE
    image_tokens = (latent // 2) ** 2
    where = torch.cuda.get_device_name() if args.full else f"CPU, {torch.get_num_threads()} threads"
    print(f"Diffusion-4K benchmark at {size}x{size} (F16 VAE: {latent}^2 latent, {image_tokens:,} image "
          f"tokens), {where}{', transformer blocks compiled' if args.compile else ''}")
    timing = dict(warmup=args.warmup, iters=args.iters)

    if args.only in (None, "flux"):
        config, text = (d.FLUX_DEV, 512) if args.full else (TINY_FLUX, 64)
        results = flux_step(config, image_tokens, text, device, dtype, **timing, compile=args.compile)
        report(f"Flux ({'FLUX.1-dev' if args.full else 'tiny'}), one step = one forward", results,
               flux_forward_flops(config, image_tokens, text))
        free_memory(device)

    if args.only in (None, "sd3"):
        config, text = (d.SD3_MEDIUM, 333) if args.full else (TINY_SD3, 77)
        results = sd3_step(config, latent, text, device, dtype, **timing, compile=args.compile)
        report(f"SD3 ({'SD3-Medium' if args.full else 'tiny'}), one step = CFG forward of batch 2", results,
               sd3_step_flops(config, image_tokens, text))
        free_memory(device)

    if args.only in (None, "vae"):
        config = d.FLUX_VAE.__class__(stride=2) if args.full else TINY_VAE
        seconds, peak, _ = f16_decode(config, size, device, dtype, **timing)["ours"]
        memory = f", peak {peak[0] / 2**30:.2f} GiB" if peak else ""
        print(f"F16 VAE decode of one {size}x{size} image: {seconds:.3f} s{memory}")


def free_memory(device):
    """Hand the cached memory of a finished part's models (freed with its function's frame) back."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

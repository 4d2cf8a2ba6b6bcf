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

TINY_SD3 = d.SD3Config(hidden_size=128, num_heads=2, depth=3, context_dim=64, adm_in_channels=64, pos_embed_max_size=64)
TINY_VAE = d.VAEConfig(base_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1, stride=2)
TINY_FLUX = d.FluxConfig(hidden_size=128, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=64, vec_in_dim=64,
                         axes_dim=(8, 28, 28))


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
    reference = reference.eval()
    state = reference.state_dict()
    with torch.device("meta"):
        ours = d.MMDiT(config)
    d.assign_state_dict(ours, d.to_original_layout(state, d.sd3_key_table(config.depth), "benchmark"), "benchmark")
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

    if args.only in (None, "flux"):
        config = d.FLUX_DEV if args.full else TINY_FLUX
        text = 512 if args.full else 64
        ours, reference = build_models(config, device, dtype, std=0.02)
        if args.compile:
            ours, reference = d.compile_blocks(ours), compile_reference(reference)
        inputs = make_inputs(config, image_tokens, text, device, dtype)
        results = measure({"diffusers": lambda: run_reference(reference, inputs), "ours": lambda: ours(**inputs)},
                          device, args.warmup, args.iters)
        report(f"Flux ({'FLUX.1-dev' if args.full else 'tiny'}), one step = one forward", results,
               flux_forward_flops(config, image_tokens, text))
        del ours, reference
        torch.cuda.empty_cache() if args.full else None

    if args.only in (None, "sd3"):
        config = d.SD3_MEDIUM if args.full else TINY_SD3
        text = 333 if args.full else 77
        ours, reference = sd3_models(config, device, dtype)
        if args.compile:
            ours, reference = d.compile_blocks(ours), compile_reference(reference)
        generator = torch.Generator(device).manual_seed(1)
        x = torch.randn(2, config.in_channels, latent, latent, generator=generator, device=device, dtype=dtype)
        context = torch.randn(2, text, config.context_dim, generator=generator, device=device, dtype=dtype)
        pooled = torch.randn(2, config.adm_in_channels, generator=generator, device=device, dtype=dtype)
        t = torch.full((2,), 750.0, device=device, dtype=dtype)
        results = measure({
            "diffusers": lambda: reference(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                                           timestep=t, return_dict=False)[0],
            "ours": lambda: ours(x, t, context, pooled),
        }, device, args.warmup, args.iters)
        report(f"SD3 ({'SD3-Medium' if args.full else 'tiny'}), one step = CFG forward of batch 2", results,
               sd3_step_flops(config, image_tokens, text))
        del ours, reference
        torch.cuda.empty_cache() if args.full else None

    if args.only in (None, "vae"):
        config = d.FLUX_VAE.__class__(stride=2) if args.full else TINY_VAE
        with torch.device(device):
            vae = d.AutoEncoder(config).to(dtype).eval()
        factor = config.downsample_factor
        z = torch.randn(1, config.z_channels, size // factor, size // factor, device=device, dtype=dtype)
        results = measure({"ours": lambda: vae.decode(z)}, device, args.warmup, args.iters)
        seconds, peak, _ = results["ours"]
        memory = f", peak {peak[0] / 2**30:.2f} GiB" if peak else ""
        print(f"F16 VAE decode of one {size}x{size} image: {seconds:.3f} s{memory}")


if __name__ == "__main__":
    main()

"""Time one Flux transformer forward: ours (diffusion4k.Flux) vs diffusers' FluxTransformer2DModel,
with the SAME random weights, in the same run.

    python tests/benchmarks/bench_flux.py                # CPU, small config (hidden 256, 2+4 blocks, 1024 image tokens)
    python tests/benchmarks/bench_flux.py --full         # CUDA, full FLUX.1-dev, random bf16 weights,
                                                         # 16,384 image + 512 text tokens (4096^2 with the F16 VAE)

Prints seconds per forward (median of --iters after --warmup), the ratio ours / diffusers, peak
GPU memory (torch.cuda.max_memory_allocated) and the achieved TFLOP/s from `flux_forward_flops`.
Not a test: pytest collects only test_*.py, so this file is never run by the suite.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import conftest  # noqa: E402, F401  (makes the test environment's CPU-only torchvision importable)
import diffusion4k as d  # noqa: E402

SMALL = d.FluxConfig(hidden_size=256, num_heads=4, depth=2, depth_single_blocks=4, axes_dim=(8, 28, 28))


def linear_params_per_token(config: d.FluxConfig) -> int:
    """Weights of the per-token matmuls that one token passes through, summed over the blocks.

    Double block: a token uses its own stream's weights only: qkv 3d^2, proj d^2, MLP 2*r*d^2.
    Single block: linear1 d*(3d + r*d), linear2 (d + r*d)*d. (d = hidden, r = mlp_ratio.)
    Left out: the modulation and embedding MLPs (once per sample, not per token) and the
    in/out projections (img_in, txt_in, final linear: < 0.3 % of the total at full size).
    """
    dim, mlp = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    double = 3 * dim * dim + dim * dim + 2 * dim * mlp
    single = dim * (3 * dim + mlp) + (dim + mlp) * dim
    return config.depth * double + config.depth_single_blocks * single


def flux_forward_flops(config: d.FluxConfig, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one forward = 2 * params_linear * L + 4 * L^2 * d * n_blocks.

    L = image_tokens + text_tokens (every block attends over the joint sequence);
    2 * params_linear * L: one multiply-add per weight per token (see linear_params_per_token);
    4 * L^2 * d: the two attention matmuls (Q K^T and P V), 2 * L^2 * d each, per block;
    n_blocks = depth + depth_single_blocks (19 + 38 = 57 for FLUX.1).
    FLUX.1-dev at 16,384 + 512 tokens: 2 * 6.45e9 * 16,896 + 4 * 16,896^2 * 3072 * 57 = 4.18e14.
    """
    tokens = image_tokens + text_tokens
    blocks = config.depth + config.depth_single_blocks
    return 2.0 * linear_params_per_token(config) * tokens + 4.0 * tokens**2 * config.hidden_size * blocks


def build_models(config: d.FluxConfig, device, dtype, std):
    """diffusers' model with random weights, and ours holding the same tensors (converted)."""
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype: no fp32 copy of 12B weights
    try:
        with torch.device(device):
            reference = FluxTransformer2DModel.from_config(d.diffusers_config(config, "flux"))
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            parameter.normal_(0.0, std, generator=generator)
            if any(f".{norm}." in name for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")):
                parameter.add_(1.0)  # QK RMSNorm scales around 1, like trained ones
    reference = reference.to(device=device, dtype=dtype).eval()
    state = reference.state_dict()
    original = d.to_original_layout(state, d.flux_table_for(state), "benchmark")  # shares unfused tensors
    with torch.device("meta"):
        ours = d.Flux(config)
    d.assign_state_dict(ours, original, "benchmark").eval()
    return ours, reference


def compile_reference(model):
    """diffusers' counterpart of `compile_blocks`: torch.compile each of its repeated blocks."""
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(model, name, ()):
            block.compile()
    return model


def make_inputs(config, image_tokens, text_tokens, device, dtype):
    side = int(round(image_tokens**0.5))
    height, width = 2 * side, 2 * (image_tokens // side)  # latent size; 2x2 packing
    generator = torch.Generator(device).manual_seed(1)
    img_ids = d.latent_image_ids(height, width, device)
    return dict(
        img=torch.randn(1, img_ids.shape[1], config.in_channels, generator=generator, device=device, dtype=dtype),
        img_ids=img_ids,
        txt=torch.randn(1, text_tokens, config.context_in_dim, generator=generator, device=device, dtype=dtype),
        txt_ids=torch.zeros(1, text_tokens, 3, device=device),
        timesteps=torch.tensor([0.75], device=device, dtype=dtype),
        y=torch.randn(1, config.vec_in_dim, generator=generator, device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype) if config.guidance_embed else None,
    )


def run_reference(model, x):
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                 guidance=x["guidance"], return_dict=False)[0]


def measure(forwards: dict, device, warmup, iters):
    """Median seconds per call of each forward, and its peak memory (total, and above what was
    allocated before the call; CUDA only). The models are timed in alternation, call by call,
    so a change in machine load (other jobs, clocks) affects both alike."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = {label: [] for label in forwards}
    peaks = {label: (0, 0) for label in forwards}
    outputs = {}
    with torch.inference_mode():
        for _ in range(warmup):
            for forward in forwards.values():
                forward()
        for _ in range(iters):
            for label, forward in forwards.items():
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                start = time.perf_counter()
                outputs[label] = forward()
                sync()
                times[label].append(time.perf_counter() - start)
                if cuda:
                    peak = torch.cuda.max_memory_allocated()
                    peaks[label] = (max(peaks[label][0], peak), max(peaks[label][1], peak - before))
                outputs[label] = outputs[label].float()
    return {label: (statistics.median(times[label]), peaks[label] if cuda else None, outputs[label]) for label in forwards}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size FLUX.1-dev config on CUDA in bf16 (needs ~35 GB of GPU memory)")
    parser.add_argument("--device", default=None, help="default: cuda with --full, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: bfloat16 with --full, else float32")
    parser.add_argument("--image-tokens", type=int, default=None, help="default: 16384 with --full (4096^2, F16 VAE), else 1024")
    parser.add_argument("--text-tokens", type=int, default=None, help="default: 512 with --full, else 64")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each block of both models (ours: compile_blocks), in the warm-up")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if args.full else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.full else "float32"))
    image_tokens = args.image_tokens or (16384 if args.full else 1024)
    text_tokens = args.text_tokens or (512 if args.full else 64)
    config = d.FLUX_DEV if args.full else SMALL
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: CUDA is not available (run without --full for the CPU benchmark)")

    ours, reference = build_models(config, device, dtype, std=0.02 if args.full else 0.05)
    if args.compile:
        ours, reference = d.compile_blocks(ours), compile_reference(reference)
    inputs = make_inputs(config, image_tokens, text_tokens, device, dtype)
    flops = flux_forward_flops(config, inputs["img"].shape[1], text_tokens)
    name = ("FLUX.1-dev config" if args.full else f"small config (hidden {config.hidden_size}, "
            f"{config.depth}+{config.depth_single_blocks} blocks)")
    where = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Flux forward, {name}, {inputs['img'].shape[1]} image + {text_tokens} text tokens, "
          f"{str(dtype).removeprefix('torch.')}, {where}{', blocks compiled' if args.compile else ''}")
    print(f"params {sum(p.numel() for p in ours.parameters()):,}; per-token linear params {linear_params_per_token(config):,}; "
          f"FLOPs per forward {flops:.3e}; median of {args.iters} after {args.warmup} warm-up")

    results = measure({"diffusers": lambda: run_reference(reference, inputs), "ours": lambda: ours(**inputs)},
                      device, args.warmup, args.iters)

    print(f"{'model':<10} {'s/forward':>10} {'ours/diff':>10} {'peak GiB':>9} {'+fwd GiB':>9} {'TFLOP/s':>8}")
    for label in ("diffusers", "ours"):
        seconds, peak, _ = results[label]
        ratio = seconds / results["diffusers"][0]
        memory = f"{peak[0] / 2**30:>9.2f} {peak[1] / 2**30:>9.2f}" if peak else f"{'n/a':>9} {'n/a':>9}"
        print(f"{label:<10} {seconds:>10.4f} {ratio:>10.3f} {memory} {flops / seconds / 1e12:>8.3f}")
    difference = (results["ours"][2] - results["diffusers"][2]).abs().max().item()
    print(f"max abs difference of the outputs: {difference:.3e} (output magnitude {results['diffusers'][2].abs().max().item():.3e})")


if __name__ == "__main__":
    main()

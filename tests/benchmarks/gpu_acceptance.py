"""GPU acceptance run: every CLI end to end at full size in bf16 on CUDA with random weights, and the
benchmarks beside plan.py's predictions, on one GPU without network, in at most 8 minutes.

    python tests/benchmarks/gpu_acceptance.py --out acceptance.md            # one CUDA GPU (H100: ~5 min)
    python tests/benchmarks/gpu_acceptance.py --size tiny --out tiny.md      # CPU, tiny models (~1-2 min)

1. Checkpoints (no Hub access): FLUX.1-dev- and SD3-Medium-sized models are built on the meta device,
   materialised on the GPU directly in bf16, randomised (random_weights.py) and written in the layouts
   the CLIs load unmodified: a diffusers pipeline folder each (transformer/ and vae/ by diffusion4k.py's
   own writers, the text encoders in transformers' names, tokenizers made here with `tokenizers`; SD3's
   T5-XXL is a link to Flux's), an OP4KSR checkpoint as `op4ksr.py train` writes it (random LoRAs and
   prompt embeddings), random FID Inception and LPIPS-VGG weights, a test image. About 41 GB of disk.
2. CLIs, each a subprocess with HF_HUB_OFFLINE=1: diffusion4k.py Flux and SD3 at 4096^2 (2 steps),
   op4ksr.py 1024 -> 4096, cupscale.py 1024 -> 4096 (one step), metrics.py on their outputs. Recorded:
   exit code, wall time, the output, the peak GPU memory of the process.
3. Benchmarks, in this process: one Flux-12B and one SD3-2B step at 4096^2, ours and diffusers' with the
   same weights; the F16 decode of a 4096^2 image; OP4KSR at 4096^2; a one-step C-Upscale 1024 -> 4096.
   Measured s/step, peak memory above the weights and TFLOP/s beside plan.py's roofline predictions,
   which a second process computes on the meta device meanwhile.
4. One summary (markdown) written to --out and printed; exit code 0 when every part passed.

Each part prints its estimate and has a limit (twice the estimate, within what is left of --budget); a
failed part is recorded and the run goes on. Estimates on one H100 (s): writing ~60 (41 GB at ~1 GB/s),
each CLI 15-40 (start-up ~6, weights read at ~3 GB/s, plan.py's compute, PNG writing), benchmarks 5-20.
Not run: ssim and niqe (CPU, 45-90 s per 4096^2 image), clip, aesthetic and clipiqa (their weights are
OpenAI / transformers files no writer here produces).

diffusers on a machine without network. The diffusers columns need diffusers 0.42.1 (a test
requirement); without it they are left out with a note. On a connected machine with the same Python
and platform, `pip download diffusers==0.42.1 -d wheels/` fetches it with its dependencies; copy wheels/
over and `pip install --no-index --find-links wheels/ diffusers==0.42.1` installs what is missing. With
`pip download diffusers==0.42.1 --no-deps -d wheels/` and `pip install --no-deps wheels/*.whl`, its hard
dependencies must be there already: importlib_metadata (zipp), filelock, huggingface-hub, numpy, regex,
requests (charset-normalizer, idna, urllib3, certifi), safetensors, Pillow; the runtime requirements
bring huggingface-hub, safetensors, numpy, Pillow, so download importlib_metadata, zipp, regex, requests,
charset-normalizer, idna, urllib3 and certifi the same way.
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE), str(ROOT / "tests")]

import bench_cupscale  # noqa: E402
import bench_diffusion4k  # noqa: E402
import bench_op4ksr  # noqa: E402
from bench_flux import flux_forward_flops  # noqa: E402
from random_weights import random_model, randomise_  # noqa: E402
from tiny_pipelines import WORDS, byte_alphabet, reference_sdpa  # noqa: E402

import cupscale as cu  # noqa: E402
import diffusion4k as d  # noqa: E402
import metrics as M  # noqa: E402
import op4ksr as op  # noqa: E402
from common.io import atomic_write  # noqa: E402

GIB = 2**30
PROMPT = "a lighthouse at dawn"
STEPS = 2  # denoising steps of the generation runs
CUPSCALE_STEPS = 2  # SD3's schedule cut at strength 0.45: one denoising step (bench_cupscale.SHORT_STEPS)
FLUX_TEXT, SD3_TEXT = 512, 333  # tokens: FLUX.1-dev's T5; SD3's 77 CLIP + 256 T5
SR_SCALE = 4

# ================================================================================== what is run


@dataclass(frozen=True)
class Size:
    """The models, image side, device and time budget of one run."""

    name: str
    device: str
    flux: d.FluxConfig
    sd3: d.SD3Config
    vae: d.VAEConfig  # Flux's VAE (F8 weights; the F16 VAE is the same with stride 2)
    sd3_vae: d.VAEConfig
    t5: d.T5Config
    clip_l: d.CLIPTextConfig  # with its projection (SD3); Flux loads CLIP-L without it
    clip_g: d.CLIPTextConfig
    side: int  # px of every generated and super-resolved image
    lora_rank: int
    cupscale: dict  # CUpscaleConfig fields of the C-Upscale run given to the CLI (none: its defaults)
    budget_s: float
    dtype: torch.dtype = torch.bfloat16

    def cupscale_config(self) -> cu.CUpscaleConfig:
        return cu.CUpscaleConfig(vae_scale=self.sd3_vae.downsample_factor, num_steps=CUPSCALE_STEPS,
                                 **self.cupscale)

    def cupscale_args(self) -> list[str]:
        return [str(a) for name, value in self.cupscale.items() for a in (CUPSCALE_FLAGS[name], value)]


CUPSCALE_FLAGS = {"region_px": "--region-size", "overlap_px": "--region-overlap",
                  "vae_tile_px": "--vae-tile", "vae_overlap_px": "--vae-overlap"}
FULL = Size("full", "cuda", d.FLUX_DEV, d.SD3_MEDIUM, d.FLUX_VAE, d.SD3_VAE, d.T5_XXL, d.CLIP_L, d.CLIP_G,
            side=4096, lora_rank=64, cupscale={}, budget_s=450)  # + start-up and summary: < 8 minutes
TINY_VAE = d.VAEConfig(base_channels=32, channel_multipliers=(1, 1, 1, 1), num_res_blocks=1)  # F8 / F16
TINY = Size(
    "tiny", "cpu",
    flux=d.FluxConfig(hidden_size=128, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=128,
                      vec_in_dim=32, axes_dim=(8, 28, 28)),
    sd3=d.SD3Config(hidden_size=128, num_heads=2, depth=2, context_dim=128, adm_in_channels=96,
                    pos_embed_max_size=32),
    vae=TINY_VAE,
    sd3_vae=dataclasses.replace(TINY_VAE, scale_factor=d.SD3_VAE.scale_factor,
                                shift_factor=d.SD3_VAE.shift_factor),
    t5=d.T5Config(vocab_size=128, d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2),
    clip_l=d.CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, projection_dim=32),
    clip_g=d.CLIPTextConfig(vocab_size=514, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, hidden_act="gelu", projection_dim=64),
    side=256, lora_rank=4, budget_s=300,
    cupscale=dict(region_px=128, overlap_px=64, vae_tile_px=128, vae_overlap_px=32),
)
SIZES = {size.name: size for size in (FULL, TINY)}

# Seconds on one H100 (see the module docstring); a tiny part gets TINY_ESTIMATE_S. A part may take
# LIMIT_FACTOR times its estimate, at least MIN_LIMIT_S (start-up, model construction), within the budget.
ESTIMATES = {
    "write flux": 35, "write op4ksr": 8, "write sd3": 10, "write metrics": 8,
    "cli flux": 35, "cli sd3": 25, "cli op4ksr": 30, "cli cupscale": 40,
    "metrics t2i": 15, "metrics sr": 25,
    "bench flux": 15, "bench sd3": 10, "bench decode": 6, "bench op4ksr": 10, "bench cupscale": 20,
    "predictions": 5,
}
TINY_ESTIMATE_S = 10
LIMIT_FACTOR, MIN_LIMIT_S = 3, 60


class Paths:
    """Where a run's checkpoints, inputs, outputs and logs go."""

    def __init__(self, root: Path):
        self.root, self.logs = root, root / "logs"
        self.flux, self.sd3, self.op4ksr = root / "flux", root / "sd3", root / "op4ksr.safetensors"
        self.metric_weights, self.lr, self.hr = root / "metric_weights", root / "lr.png", root / "hr"
        self.t2i, self.sr = root / "out" / "t2i", root / "out" / "sr"


# ============================================================================ 1. checkpoints


def write_flux_pipeline(size: Size, folder: Path) -> dict:
    """FLUX.1-dev's diffusers layout with random weights: transformer/ and vae/ by diffusion4k.py's
    writers (those of its training output), CLIP-L and T5 in transformers' names, their tokenizers."""
    transformer = random_model(lambda: d.Flux(size.flux), size.device, size.dtype, seed=1)
    d.save_transformer(transformer.state_dict(), transformer, "flux", folder, size.dtype)
    del transformer
    write_vae(size, size.vae, folder, seed=2)
    write_text_encoder(size, d.CLIPTextEncoder, dataclasses.replace(size.clip_l, projection_dim=None),
                       folder / "text_encoder", seed=3)
    write_text_encoder(size, d.T5Encoder, size.t5, folder / "text_encoder_2", seed=4)
    write_clip_tokenizer(folder / "tokenizer")
    write_t5_tokenizer(folder / "tokenizer_2")
    d.write_json({"_class_name": "FluxPipeline"}, folder / "model_index.json")
    return written(folder)


def write_sd3_pipeline(size: Size, folder: Path, flux: Path) -> dict:
    """SD3-Medium's diffusers layout as `write_flux_pipeline`; its T5 and T5 tokenizer link to Flux's
    (the same T5-XXL: 9.5 GB of disk saved)."""
    transformer = random_model(lambda: d.MMDiT(size.sd3), size.device, size.dtype, seed=5)
    d.save_transformer(transformer.state_dict(), transformer, "sd3", folder, size.dtype)
    del transformer
    write_vae(size, size.sd3_vae, folder, seed=6)
    write_text_encoder(size, d.CLIPTextEncoder, size.clip_l, folder / "text_encoder", seed=7)
    write_text_encoder(size, d.CLIPTextEncoder, size.clip_g, folder / "text_encoder_2", seed=8)
    write_clip_tokenizer(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer_2")
    for link, target in (("text_encoder_3", "text_encoder_2"), ("tokenizer_3", "tokenizer_2")):
        (folder / link).symlink_to(Path("..") / flux.name / target, target_is_directory=True)
    d.write_json({"_class_name": "StableDiffusion3Pipeline"}, folder / "model_index.json")
    return written(folder)


def write_vae(size: Size, config: d.VAEConfig, folder: Path, seed: int):
    vae = random_model(lambda: d.AutoEncoder(config), size.device, size.dtype, seed)
    d.save_vae(vae, folder, dtype=size.dtype)


def write_text_encoder(size: Size, cls, config, folder: Path, seed: int):
    """A transformers folder: model.safetensors (our modules carry transformers' names) and config.json."""
    model = random_model(lambda: cls(config), size.device, size.dtype, seed)
    d.save_safetensors(model.state_dict(), folder / "model.safetensors")
    values = {key: value for key, value in dataclasses.asdict(config).items() if value is not None}
    t5 = {"model_type": "t5", "feed_forward_proj": "gated-gelu"}
    d.write_json({**values, **(t5 if cls is d.T5Encoder else {"model_type": "clip_text_model"})},
                 folder / "config.json")


def write_clip_tokenizer(folder: Path):
    """CLIP's byte-level BPE with every byte a token and no merges: valid ids for any prompt."""
    alphabet = byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def write_t5_tokenizer(folder: Path):
    """A SentencePiece-style unigram tokenizer.json (the `tokenizers` package alone): <pad> 0, </s> 1,
    <unk> 2, a few whole words and the letters."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [("\u2581" + word, -1.0) for word in dict.fromkeys(WORDS)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))


def write_op4ksr(size: Size, path: Path, flux: Path) -> dict:
    """An OP4KSR checkpoint as `op4ksr.py train` writes it (`save_op4ksr`) for the Flux pipeline: LoRAs of
    rank `lora_rank` on OMGSR-F's Flux and F16-encoder targets, RFR theta 100, random prompt embeddings.
    LoRA B starts at 0 in training; here it is random too, so that merging it changes the weights."""
    config = op.FluxConfig(**{**vars(size.flux), "theta": 100.0})
    transformer = random_model(lambda: op.Flux(config), size.device, size.dtype, seed=1)
    f16 = op.VAEConfig(**{**vars(size.vae), "stride": 2})
    vae = random_model(lambda: op.AutoEncoder(f16), size.device, size.dtype, seed=2)
    op.add_flux_lora(transformer, size.lora_rank, seed=9)
    op.add_encoder_lora(vae, size.lora_rank, seed=10)
    generator = torch.Generator(size.device).manual_seed(11)
    with torch.no_grad():
        for module in [*transformer.modules(), *vae.modules()]:
            if isinstance(module, (op.SplitLoRALinear, op.LoRAConv2d)):
                module.lora_B.normal_(0.0, 0.02, generator=generator)
    g = torch.Generator().manual_seed(12)
    prompt = {"txt": torch.randn(1, FLUX_TEXT, config.context_in_dim, generator=g),
              "y": torch.randn(1, config.vec_in_dim, generator=g), "text": op.DEFAULT_PROMPT}
    settings = {"sigma": op.OMGSR_SIGMA, "guidance": 1.0, "scale": SR_SCALE, "base_flux": str(flux),
                "base_vae": str(flux), "lora_rank": size.lora_rank, "lora_alpha": size.lora_rank, "steps": 0}
    op.save_op4ksr(path, transformer, vae, prompt, settings)
    return written(path)


def write_metric_weights_and_images(size: Size, paths: Paths) -> dict:
    """Random FID Inception (torchvision's names) and LPIPS-VGG (torchvision's `features.*` backbone,
    the lpips package's `lin<i>.model.1.weight`) in fp32, and the test image: a smooth random pattern,
    size.side px (the reference of the SR runs, under each run's name) and 1/4 of it (their input)."""
    folder = paths.metric_weights
    inception = randomise_(M.InceptionV3(), seed=13)
    d.save_safetensors(inception.state_dict(), folder / "inception.safetensors")
    lpips = randomise_(M.LPIPSMetric("vgg"), seed=14).state_dict()
    backbone = {key: value for key, value in lpips.items() if key.startswith("features.")}
    d.save_safetensors(backbone, folder / "vgg.safetensors")
    lins = {f"lin{i}.model.1.weight": lpips[f"lins.{i}.weight"].abs() for i in range(5)}  # distances >= 0
    d.save_safetensors(lins, folder / "lpips_vgg.safetensors")
    y, x = np.mgrid[0 : size.side, 0 : size.side] * (256 / size.side)
    pattern = 128 + 60 * np.sin(x / 7)[..., None] * np.cos(y / 11)[..., None]
    noise = np.random.default_rng(0).normal(0, 12, (size.side, size.side, 3))
    hr = Image.fromarray(np.clip(pattern + noise, 0, 255).astype(np.uint8))
    paths.hr.mkdir(parents=True)
    hr.save(paths.hr / "op4ksr.png", compress_level=1)
    os.link(paths.hr / "op4ksr.png", paths.hr / "cupscale.png")
    hr.resize((size.side // SR_SCALE,) * 2, Image.BICUBIC).save(paths.lr)
    return written(folder)


def written(path: Path) -> dict:
    """The part's note: the bytes a file or a folder holds (links not followed)."""
    files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()] if path.is_dir() else [path]
    return {"note": f"{sum(p.stat().st_size for p in files) / 1e9:.2f} GB written"}


# =================================================================================== 2. CLIs

# Runs a CLI unchanged as its own __main__ and, at exit, writes the peak GPU memory of its process
# (torch's caching allocator: allocated and reserved bytes) to the file named by ACCEPTANCE_PEAK_FILE.
LAUNCHER = """
import atexit, json, os, runpy, sys, torch
def peak():
    if torch.cuda.is_initialized():
        peaks = [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]
        open(os.environ["ACCEPTANCE_PEAK_FILE"], "w").write(json.dumps(peaks))
atexit.register(peak)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def cli_runs(size: Size, paths: Paths) -> dict:
    """{part: (title, script and arguments, output image)} of the four method CLIs."""
    common = ["--device", size.device, "--dtype", "bf16"]
    side, lr = f"{size.side}^2", f"{size.side // SR_SCALE} -> {size.side}"
    generate = ["--prompt", PROMPT, "--height", str(size.side), "--width", str(size.side),
                "--steps", str(STEPS)]
    flux, sd3 = paths.t2i / "flux.png", paths.t2i / "sd3.png"
    sr, upscaled = paths.sr / "op4ksr.png", paths.sr / "cupscale.png"
    return {
        "cli flux": (f"diffusion4k.py Flux {side}, {STEPS} steps",
                     ["diffusion4k.py", "--model", paths.flux, *generate, "--output", flux, *common], flux),
        "cli sd3": (f"diffusion4k.py SD3 {side}, {STEPS} steps",
                    ["diffusion4k.py", "--model", paths.sd3, *generate, "--output", sd3, *common], sd3),
        "cli op4ksr": (f"op4ksr.py {lr}",
                       ["op4ksr.py", "--input", paths.lr, "--weights", paths.op4ksr, "--output", sr,
                        *common], sr),
        "cli cupscale": (f"cupscale.py {lr}, one step",
                         ["cupscale.py", "--input", paths.lr, "--prompt", PROMPT, "--model", paths.sd3,
                          "--scale", str(SR_SCALE), "--steps", str(CUPSCALE_STEPS), *size.cupscale_args(),
                          "--output", upscaled, *common], upscaled),
    }


def metric_runs(size: Size, paths: Paths) -> dict:
    """{part: (title, arguments, JSON output)}: texture metrics of the generated images; full-reference
    metrics, FID (whole images) and periodicity of the super-resolved ones against the test image."""
    weights = paths.metric_weights
    t2i, sr = paths.root / "metrics_t2i.json", paths.root / "metrics_sr.json"
    return {
        "metrics t2i": ("metrics.py on the generated images",
                        ["metrics.py", "--pred", paths.t2i, "--metrics", "glcm,cr", "--out", t2i, "--device",
                         size.device], t2i),
        "metrics sr": ("metrics.py on the super-resolved images",
                       ["metrics.py", "--pred", paths.sr, "--ref", paths.hr, "--metrics",
                        "psnr,lpips,fid,periodicity", "--lpips-net", "vgg", "--lpips-backbone",
                        weights / "vgg.safetensors", "--lpips-linear", weights / "lpips_vgg.safetensors",
                        "--inception", weights / "inception.safetensors", "--out", sr, "--device",
                        size.device], sr),
    }


def run_cli(argv: list, output: Path, log: Path) -> dict:
    """Run one CLI offline (its output must not exist); exit code, output size, peak GPU memory."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peak_file = log.with_suffix(".peak.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCEPTANCE_PEAK_FILE": str(peak_file)}
    command = [sys.executable, "-c", LAUNCHER, str(ROOT / argv[0]), *map(str, argv[1:])]
    with open(log, "w") as stream:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode
    data = {"exit": code, "output": describe(output), "peak": read_json(peak_file)}
    if code:
        data["note"] = " / ".join(last_lines(log, 3))
    elif output.suffix == ".json":
        data["metrics"] = read_json(output)["metrics"]
    return data


def describe(path: Path) -> str:
    if not path.is_file():
        return "none"
    if path.suffix == ".json":
        return f"{path.name}, {path.stat().st_size / 1e3:.1f} kB"
    with Image.open(path) as image:
        return f"{path.name} {image.width}x{image.height}, {path.stat().st_size / 1e6:.1f} MB"


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def last_lines(path: Path, count: int) -> list[str]:
    """The last lines a terminal would show (progress bars rewrite their line with carriage returns)."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in path.read_text(errors="replace").splitlines()]
    return [line for line in lines if line][-count:]


# ============================================================================= 3. benchmarks


def bench_flux(size: Size, reference: bool) -> dict:
    """One Flux step (16,384 + 512 tokens at 4096^2), ours and diffusers' with the same weights."""
    tokens = (size.side // 32) ** 2
    with reference_sdpa(size.device):
        results = bench_diffusion4k.flux_step(size.flux, tokens, FLUX_TEXT, size.device, size.dtype,
                                              warmup=1, iters=2, reference=reference)
    return measured(results, flux_forward_flops(size.flux, tokens, FLUX_TEXT))


def bench_sd3(size: Size, reference: bool) -> dict:
    """One SD3 step (a CFG batch of 2) on the F16 latent of a size.side image."""
    latent = size.side // 16
    with reference_sdpa(size.device):
        results = bench_diffusion4k.sd3_step(size.sd3, latent, SD3_TEXT, size.device, size.dtype,
                                             warmup=1, iters=2, reference=reference)
    flops = bench_diffusion4k.sd3_step_flops(size.sd3, (latent // 2) ** 2, SD3_TEXT)
    return measured(results, flops)


def bench_decode(size: Size) -> dict:
    config = dataclasses.replace(size.vae, stride=2)
    results = bench_diffusion4k.f16_decode(config, size.side, size.device, size.dtype, warmup=1, iters=2)
    return measured(results)


def measured(results: dict, flops=None) -> dict:
    """bench_flux.measure's results as {label: {"seconds", "above" (peak bytes above the weights)}}."""
    out = {label: {"seconds": seconds, "above": peaks[1] if peaks else None}
           for label, (seconds, peaks, _) in results.items()}
    return {"runs": out, "flops": flops}


def bench_op4ksr_run(size: Size) -> dict:
    """OP4KSR's patch-free pass (F16 encode, one Flux step, decode) at size.side, RFR theta 100."""
    config = op.FluxConfig(**{**vars(size.flux), "theta": 100.0})
    device = torch.device(size.device)
    results = bench_op4ksr.run(config, size.vae, size.side, FLUX_TEXT, device, size.dtype, process_size=0,
                               repeats=1, baseline=False, count_flops=False)  # no tiled baseline
    (seconds, peak, _, _), = results.values()
    return {"runs": {"ours": {"seconds": seconds, "above": peak}}, "flops": None}


def bench_cupscale_run(size: Size) -> dict:
    """bench_cupscale's short mode: C-Upscale with GSP and RAP, one step, side / 4 -> side."""
    device, lr = torch.device(size.device), size.side // SR_SCALE
    results = bench_cupscale.run(size.sd3, size.sd3_vae, size.cupscale_config(), lr, SR_SCALE,
                                 bench_cupscale.SHORT, device, size.dtype)
    (seconds, peak), = results.values()
    return {"runs": {"ours": {"seconds": seconds, "above": peak}}, "flops": None}


# ========================================================================== plan.py's figures


def predict(size_name: str, reference: bool) -> dict:
    """plan.py's predictions for what this run measures (run in a separate process: plan.py replaces
    attention functions while it traces): {key: {"flops", "seconds": {gpu: s}, "peak", "weights"}}."""
    import plan

    size = SIZES[size_name]
    s = plan.Setup(flux=size.flux, sd3=size.sd3, vae=size.vae, sd3_vae=size.sd3_vae)
    flux = plan.generate_trace(s, "flux", size.side)
    sd3 = plan.generate_trace(s, "sd3", size.side)
    cupscale, _ = plan.cupscale_trace(s, size.side)  # one step: the short run's length
    out = {"bench flux": figures(flux, "transformer"), "bench decode": figures(flux, "vae"),
           "cli flux": figures(flux, steps=STEPS), "bench sd3": figures(sd3, "transformer"),
           "cli sd3": figures(sd3, steps=STEPS), "cli op4ksr": figures(plan.op4ksr_trace(s, size.side)),
           "cli cupscale": figures(cupscale)}
    out["bench op4ksr"], out["bench cupscale"] = out["cli op4ksr"], out["cli cupscale"]
    if reference:
        out["bench flux diffusers"] = figures(plan.diffusers_trace(s, "flux", size.side))
        out["bench sd3 diffusers"] = figures(plan.diffusers_trace(s, "sd3", size.side))
    out["peak_flops"] = {gpu: spec["bf16"] for gpu, spec in plan.GPUS.items()}
    return out


def figures(trace, phase=None, steps=1) -> dict:
    """A whole trace's (or one phase's) FLOPs, roofline seconds and peak (offload none; the weights are
    every component's, all resident in that mode). A generate trace runs one step: `steps` adds the
    transformer phase steps - 1 times more."""
    stats, more = trace.phases[phase] if phase else trace.total, steps - 1
    step = trace.phases["transformer"] if more else stats
    seconds = {gpu: value + more * step.seconds[gpu] for gpu, value in stats.seconds.items()}
    return {"flops": stats.flops + more * step.flops, "seconds": seconds, "peak": stats.peak["none"],
            "weights": sum(trace.sizes.values())}


# ============================================================================ running parts


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout after `seconds` (at the next Python instruction: a CUDA kernel or a file write
    under way finishes first; a subprocess being waited for is killed by subprocess.run)."""
    def expire(signum, frame):
        raise PartTimeout(f"stopped at its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Part:
    key: str
    title: str
    estimate_s: float
    status: str = "not run"
    seconds: float = 0.0
    note: str = ""
    data: dict = field(default_factory=dict)


class Runner:
    """Runs parts one after the other within the budget; a part that fails or runs out of time is recorded
    and the next one runs."""

    def __init__(self, size: Size, budget_s: float):
        self.size, self.budget_s, self.start, self.parts = size, budget_s, time.perf_counter(), []

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def __call__(self, key: str, title: str, fn, *args) -> Part:
        estimate = ESTIMATES[key] if self.size is FULL else TINY_ESTIMATE_S
        part = Part(key, title, estimate)
        self.parts.append(part)
        limit = min(max(LIMIT_FACTOR * estimate, MIN_LIMIT_S), self.left())
        print(f"== {title}: estimated {estimate:.0f} s, limit {max(limit, 0):.0f} s", flush=True)
        if limit < 1:
            part.status, part.note = "skipped", "the run's time budget is spent"
            return part
        begin = time.perf_counter()
        try:
            with time_limit(limit):
                part.data = fn(*args)
            part.status, part.note = "failed" if part.data.get("exit") else "ok", part.data.get("note", "")
        except PartTimeout as error:
            part.status, part.note = "timeout", str(error)
        except Exception as error:  # any failure is the part's result; the next part runs
            part.status, part.note = "failed", f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        part.seconds = time.perf_counter() - begin
        release_memory(self.size)
        print(f"   {part.status} in {part.seconds:.1f} s {part.note}", flush=True)
        return part


def release_memory(size: Size):
    gc.collect()
    if size.device == "cuda":
        torch.cuda.empty_cache()


def diffusers_version() -> str | None:
    """diffusers' version when it imports (bench_diffusion4k's conftest import lets it beside a CPU torch)."""
    try:
        import diffusers
    except Exception:  # ImportError, or what a broken install raises while importing
        return None
    return diffusers.__version__


def run_all(size: Size, paths: Paths, budget_s: float, reference: bool) -> tuple[list, dict]:
    """Every part in order (module docstring); plan.py's predictions in a second process meanwhile."""
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state, plan.py's patches
    with spawn.Pool(1) as pool:
        planned = pool.apply_async(predict, (size.name, reference))
        run = Runner(size, budget_s)
        side = f"{size.side}^2"
        run("write flux", "write the Flux pipeline (transformer, VAE, CLIP-L, T5)", write_flux_pipeline,
            size, paths.flux)
        run("write op4ksr", "write the OP4KSR checkpoint", write_op4ksr, size, paths.op4ksr, paths.flux)
        run("write sd3", "write the SD3 pipeline (T5 linked)", write_sd3_pipeline, size, paths.sd3,
            paths.flux)
        run("write metrics", "write metric weights and the test image", write_metric_weights_and_images,
            size, paths)
        for key, (title, argv, output) in {**cli_runs(size, paths), **metric_runs(size, paths)}.items():
            run(key, title, run_cli, argv, output, paths.logs / f"{key.replace(' ', '_')}.log")
        run("bench flux", f"benchmark: one Flux step at {side}", bench_flux, size, reference)
        run("bench sd3", f"benchmark: one SD3 step at {side}", bench_sd3, size, reference)
        run("bench decode", f"benchmark: F16 decode at {side}", bench_decode, size)
        run("bench op4ksr", f"benchmark: OP4KSR at {side}", bench_op4ksr_run, size)
        run("bench cupscale", f"benchmark: C-Upscale to {side}, one step", bench_cupscale_run, size)
        predictions = run("predictions", "plan.py's predictions (computed meanwhile)", planned.get)
    return run.parts, predictions.data if predictions.status == "ok" else {}


# ================================================================================== 4. summary


def summary(size: Size, parts: list, predictions: dict, header: dict) -> str:
    """The markdown report: verdict, machine, parts, CLIs, benchmarks beside plan.py, metric values, notes."""
    passed = sum(part.status == "ok" for part in parts)
    verdict = "PASS" if passed == len(parts) else "FAIL"
    lines = [f"# GPU acceptance run ({size.name}): {verdict}, {passed} of {len(parts)} parts passed", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    gpu = "h200" if "H200" in header["device"] else "h100"
    by_key = {part.key: part for part in parts}
    for section in (parts_table(parts), cli_table(by_key, predictions, gpu),
                    bench_table(by_key, predictions, gpu), metric_values(by_key), notes(size, predictions)):
        lines += ["", *section]
    return "\n".join(lines) + "\n"


def parts_table(parts: list) -> list[str]:
    rows = [f"| {p.title} | {p.status} | {p.seconds:.1f} | {p.estimate_s:.0f} | {p.note} |" for p in parts]
    return ["## Parts", "", "| part | status | s | estimated s | note |", "|---|---|---|---|---|", *rows]


def cli_table(parts: dict, predictions: dict, gpu: str) -> list[str]:
    """Each CLI run; beside it plan.py's peak (weights resident, text encoders not) and compute seconds."""
    rows = []
    for key, part in parts.items():
        if not key.startswith(("cli", "metrics")) or not part.data:
            continue
        peak, planned = part.data["peak"], predictions.get(key)
        measured = f"{gib(peak[0])} / {gib(peak[1])}" if peak else "n/a"
        plan = f"{gib(planned['peak'])} | {planned['seconds'][gpu]:.3g}" if planned else "- | -"
        rows.append(f"| {part.title} | {part.data['exit']} | {part.seconds:.1f} | {part.data['output']} | "
                    f"{measured} | {plan} |")
    header = ("| run | exit | wall s | output | peak GiB allocated / reserved | plan.py peak GiB | "
              f"plan.py compute s ({gpu.upper()}) |")
    return ["## CLIs end to end", "", header, "|---|---|---|---|---|---|---|", *rows]


def bench_table(parts: dict, predictions: dict, gpu: str) -> list[str]:
    """Each benchmark run beside plan.py: seconds (roofline), memory above the weights, FLOPs, TFLOP/s."""
    peak_flops = predictions.get("peak_flops", {}).get(gpu)
    rows = []
    for key, part in parts.items():
        if not key.startswith("bench") or part.status != "ok":
            continue
        for label, run in part.data["runs"].items():
            planned = predictions.get(key + (" diffusers" if label == "diffusers" else ""))
            flops = part.data["flops"] or (planned or {}).get("flops")
            rows.append(bench_row(part.title, label, run, planned, flops, gpu, peak_flops))
    header = (f"| benchmark | model | s | plan.py s ({gpu.upper()}) | measured / plan | GiB above weights | "
              "plan.py GiB | TFLOP | TFLOP/s | of bf16 peak |")
    return ["## Benchmarks beside plan.py's predictions", "", header, "|---|" * 10, *rows]


def bench_row(title, label, run, planned, flops, gpu, peak_flops) -> str:
    """One benchmark row; "-" where plan.py has no figure, "n/a" where the CPU measures no memory."""
    seconds, above = run["seconds"], run["above"]
    cells = [title, label, f"{seconds:.3g}"]
    if planned:
        predicted = planned["seconds"][gpu]
        cells += [f"{predicted:.3g}", f"{seconds / predicted:.3g}"]
    else:
        cells += ["-", "-"]
    cells += [gib(above) if above is not None else "n/a", gib(planned["peak"] - planned["weights"]) if planned
              else "-"]
    if flops:
        achieved = flops / seconds
        share = f"{achieved / peak_flops:.0%}" if peak_flops else "-"
        cells += [f"{flops / 1e12:.3g}", f"{achieved / 1e12:.3g}", share]
    else:
        cells += ["-", "-", "-"]
    return "| " + " | ".join(cells) + " |"


def gib(n: int) -> str:
    return f"{n / GIB:.3g}"


def metric_values(parts: dict) -> list[str]:
    lines = ["## Metric values (random weights: they show that each metric runs, not quality)", ""]
    for key in ("metrics t2i", "metrics sr"):
        values = parts[key].data.get("metrics") if key in parts else None
        shown = ", ".join(f"{name} {value:.4g}" for name, value in (values or {}).items())
        lines.append(f"- {parts[key].title if key in parts else key}: {shown or 'not computed'}")
    return lines


def notes(size: Size, predictions: dict) -> list[str]:
    lines = ["## Notes", "",
             "- plan.py's seconds are a roofline (eager ops at peak FLOP/s or HBM bandwidth, no launch "
             "overhead); its peaks leave out the CUDA context, allocator slack and the text encoders, which "
             "visit the GPU while the CLIs encode the prompt.",
             "- The CLIs' wall time includes start-up, reading the weights and writing the PNG; the "
             "benchmarks time the models alone (median of 2 after a warm-up; OP4KSR and C-Upscale: one "
             "run after a warm-up).",
             "- Not run: ssim and niqe (numpy on the CPU: 45-90 s per 4096^2 image), clip, aesthetic "
             "and clipiqa (their OpenAI / transformers weight files have no writer here)."]
    if size is TINY:
        lines.append("- Tiny run: plan.py's C-Upscale figures are for its default 1024-px regions, the run's "
                     "are 128 px.")
    if not predictions:
        lines.append("- plan.py's predictions are missing: see the part \"plan.py's predictions\".")
    return lines


# ================================================================================ command line


def checkpoint_bytes(size: Size) -> int:
    """Disk the models' weights take in bf16 (T5 once); the OP4KSR LoRAs and the images add under 1 GB."""
    factories = [lambda: d.Flux(size.flux), lambda: d.MMDiT(size.sd3), lambda: d.T5Encoder(size.t5),
                 lambda: d.CLIPTextEncoder(size.clip_l), lambda: d.CLIPTextEncoder(size.clip_l),
                 lambda: d.CLIPTextEncoder(size.clip_g), lambda: d.AutoEncoder(size.vae),
                 lambda: d.AutoEncoder(size.sd3_vae)]
    with torch.device("meta"):
        weights = sum(t.numel() for factory in factories for t in factory().state_dict().values())
    return 2 * weights


def machine(size: Size, diffusers: str | None) -> dict:
    if size.device == "cuda":
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        device = f"CPU, {torch.get_num_threads()} threads"
    return {"device": device, "torch": torch.__version__,
            "diffusers": diffusers or "not installed: the diffusers columns are left out (see --help)"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the summary (markdown), also printed")
    parser.add_argument("--size", choices=list(SIZES), default="full",
                        help="full: real model sizes on CUDA; tiny: tiny models on the CPU (the suite's)")
    parser.add_argument("--workdir", help="a new or empty folder for the checkpoints and outputs, kept "
                        "(default: a temporary folder in TMPDIR, removed at the end); full size: 41 GB")
    parser.add_argument("--budget", type=float,
                        help=f"seconds for the parts (default: {FULL.budget_s:.0f} full, {TINY.budget_s:.0f} "
                        "tiny)")
    return parser.parse_args(argv)


def setup_problem(size: Size, workdir: Path) -> str | None:
    """Why the run cannot start (None: it can): no CUDA, a used folder, too little disk."""
    if size.device == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available; --size tiny runs on the CPU"
    if workdir.exists() and any(workdir.iterdir()):
        return f"--workdir {workdir} is not empty"
    existing = next(folder for folder in (workdir, *workdir.parents) if folder.exists())
    needed, free = checkpoint_bytes(size), shutil.disk_usage(existing).free
    if free < 1.1 * needed + 1e9:
        return (f"{existing} has {free / 1e9:.1f} GB free, the checkpoints need {needed / 1e9:.1f} GB "
                "(--workdir elsewhere)")
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    size, start = SIZES[args.size], time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_acceptance_"))
    problem = setup_problem(size, workdir)
    if problem:
        if not args.workdir:
            workdir.rmdir()
        print(f"error: {problem}", file=sys.stderr)
        return 2
    diffusers = diffusers_version()
    header = {**machine(size, diffusers), "checkpoints": f"{checkpoint_bytes(size) / 1e9:.1f} GB, {workdir}"}
    print(*(f"{key}: {value}" for key, value in header.items()), sep="\n", flush=True)
    budget = args.budget or size.budget_s
    try:
        left = budget - (time.perf_counter() - start)
        parts, predictions = run_all(size, Paths(workdir), left, diffusers is not None)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    header["time"] = f"{time.perf_counter() - start:.0f} s (budget {budget:.0f} s)"
    header["command"] = " ".join(["python", *(sys.argv if argv is None else [__file__, *argv])])
    text = summary(size, parts, predictions, header)
    with atomic_write(args.out) as temp:
        temp.write_text(text, encoding="utf-8")
    print(text)
    return 0 if all(part.status == "ok" for part in parts) else 1


if __name__ == "__main__":
    sys.exit(main())

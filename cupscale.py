"""C-Upscale on Stable Diffusion 3: tuning-free creative upscaling with global-regional priors.

Paper: Qian, Cai, Pan, Yao, Mei, "Creatively Upscaling Images with Global-Regional Priors",
arXiv 2505.16976 (IJCV 2025). No official code is public. The paper uses SDXL; this reconstruction
runs on SD3-Medium (MMDiT joint attention, flow matching), each adaptation argued where it is coded.

The low-resolution (LR) image, resized to the target and encoded, is z_L. Noise z_L to a middle
level (strength 0.45) and denoise it; at every step the latent is cut into overlapping regions of
the model's native size (1024 px, overlap 512 px) whose velocities are averaged (MultiDiffusion).
Three priors guide every step:
  GSP (global structure prior, Eqs. 4-5): z_t <- z_t - lambda_t dL/dz_t with
      L = 1/2 |LL(x0_hat) - LL(z_L)|^2 on the Haar low band, lambda_t = 0.2 under a cosine decay.
  RAP (regional attention prior): a pass of the noised LR image gives every head's image-to-text
      distribution; resized to the HR token grid and cropped to a region it is A, and the region's
      image queries attend as o = m A V_txt + (1 - m) R V_img (m: their mass on the text keys).
  RSP (regional semantic prior): a multimodal LLM captions each region; in every joint block the
      image features attended with the global and with the regional prompt are averaged.
Other readings of the SDXL settings on SD3 and the GSP ablations have a section of their own.

Run
    python cupscale.py --input lr.png --prompt "a lighthouse at dawn" --scale 4 --output hr.png
    python cupscale.py ... --region-prompts regions.json    # RSP from a file ({"row,col": prompt})
    python cupscale.py ... --caption-cmd "llava-cli --image {image} --prompt {prompt}"
    python cupscale.py ... --no-gsp | --no-rap | --no-rsp | --mode multidiffusion   # ablations
`--model`: a Hub repo (default: SD3-Medium's, gated), a diffusers folder or a Stability single
file with the text encoders.

After the method: the models (MMDiT, VAE, CLIP, T5), the pipeline and weight loading (copied from
diffusion4k.py by tests/sync_copies.py), and the command line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from torch.utils.checkpoint import checkpoint

from common.attention import attention
from common.io import (
    DIFFUSION_PREFIX,
    DTYPES,
    SEED,
    ArgumentParser,
    UserError,
    atomic_files,
    build,
    check_apart,
    check_output_file,
    component_path,
    count_blocks,
    device_dtype,
    device_name,
    first_keys,
    folder_config,
    image_size,
    image_to_tensor,
    integer,
    is_count,
    load_image,
    mismatch_report,
    number,
    progress_bar,
    read_component,
    read_json,
    read_prefixed,
    resolve_source,
    run_cli,
    safetensors_keys,
    seed_everything,
    tensor_to_image,
    warn,
    write_image,
)

GSP_SCHEDULES = ("cosine", "linear", "increasing")
GSP_NORMALISATIONS = ("sum", "mean", "sdxl")
NOISE_LEVELS = ("diffusers-strength", "snr-matched", "flow-sigma")
SDXL_TRAIN_STEPS = SD3_TRAIN_STEPS = 1000
PRIORS = {"gsp": "global structure", "rap": "regional attention", "rsp": "regional semantic"}

TEXT_CHUNK_ELEMENTS = 2**26  # RAP's image->text probabilities are built in chunks this large
MAX_TARGET_PIXELS = 8192 * 8192  # 225 regions; beyond, hours of work and a 200 MB image
MIN_INPUT_SIDE = 64  # px: less holds too little structure for GSP and RAP
MAX_SCALE = math.isqrt(MAX_TARGET_PIXELS) // MIN_INPUT_SIDE  # 128

@dataclass
class CUpscaleConfig:
    """The paper's settings (Sec. 5.1), with SD3-Medium's sampler defaults."""

    vae_scale: int = 8  # image px per latent px
    region_px: int = 1024  # the model's training resolution
    overlap_px: int = 512
    strength: float = 0.45  # the paper's t = 0.45 T, 0.45 of the steps
    noise_level: str = "diffusers-strength"  # how strength reads on SD3 (`start_sigmas`)
    num_steps: int = 28
    shift: float = 3.0
    guidance: float = 7.5  # CFG: the paper follows DemoFusion's 7.5
    gsp: bool = True
    rap: bool = True
    rsp: bool = True  # needs regional prompts; without them it is off
    gsp_step_size: float = 0.2
    gsp_schedule: str = "cosine"
    gsp_normalisation: str = "sum"  # the reading of Eq. 4's loss (`gsp_step_scale`)
    region_batch: int = 4  # regions per model call (each 2 or 3 batch rows)
    vae_tile_px: int = 1024
    vae_overlap_px: int = 128
    caption_timeout_s: float = 300.0  # per region; a local LLaVA loads its weights every call

    @property
    def region(self) -> int:  # in latent px
        return self.region_px // self.vae_scale

    @property
    def stride(self) -> int:  # in latent px
        return (self.region_px - self.overlap_px) // self.vae_scale


# ==== the method: creative upscaling

@torch.no_grad()
def upscale(pipe: Pipeline, image: Image.Image, width: int, height: int, conditions: dict,
            config: CUpscaleConfig, seed: int, progress=None) -> torch.Tensor:
    """C-Upscale `image`: (3, height, width) in [-1, 1] on the CPU. The noise is drawn on the CPU:
    one image on any device."""
    device, dtype = pipe.device, pipe.dtype
    generator = seed_everything(seed)

    def to_device(condition: dict) -> dict:
        return {k: v.to(device) for k, v in condition.items()}

    moved = {name: to_device(conditions[name]) for name in ("global", "negative")}
    regions = conditions.get("regions") if config.rsp else None
    moved["regions"] = None if regions is None else {k: to_device(c) for k, c in regions.items()}
    max_side = pipe.transformer.config.pos_embed_max_size * pipe.size_multiple
    small_size = rap_size(*image.size, config.region_px, pipe.size_multiple, max_side)
    resized, small = (image_to_tensor(image.resize(size, Image.BICUBIC))[None]
                      for size in ((width, height), small_size))
    rest_device = "cpu" if pipe.offload != "none" else device
    tile, overlap = config.vae_tile_px, config.vae_overlap_px
    vae = partial(tiled_vae, device=device, dtype=dtype)
    with on_device(pipe.vae, device, rest_device):
        lr_latent, rap_latent = (vae(pipe.vae.encode, x, tile, overlap) for x in (resized, small))
    with on_device(pipe.transformer, device, rest_device):
        z = sample_regions(pipe.transformer, lr_latent, rap_latent, moved, config, dtype,
                           generator, progress)
    factor = pipe.vae.config.downsample_factor
    with on_device(pipe.vae, device, rest_device):
        decoded = vae(pipe.vae.decode, z, tile // factor, overlap // factor)
    return decoded[0].clamp(-1, 1).cpu()

def sample_regions(model: MMDiT, lr_latent, rap_latent, conditions: dict, config: CUpscaleConfig,
                   dtype, generator: torch.Generator, progress=None) -> torch.Tensor:
    """Diffuse-then-denoise z_L = `lr_latent` (the paper's R(z_L)) with the priors; RAP sees
    `rap_latent` (the LR image at `rap_size`) under one fixed noise. An Euler step blends the
    regions' velocities into v, applies GSP to x0_hat = z - sigma v, then moves z by
    (sigma_next - sigma) v. GSP on the merged canvas is GSP in every region (even offsets,
    uniform weights)."""
    sigmas = start_sigmas(config.strength, config.num_steps, config.shift,
                          config.noise_level).tolist()
    noise, rap_noise = (torch.randn(x.shape, generator=generator).to(x.device)
                        for x in (lr_latent, rap_latent))
    z = (1 - sigmas[0]) * lr_latent + sigmas[0] * noise
    regions = plan_regions(z.shape[-2], z.shape[-1], config.region, config.stride)
    patch = model.config.patch_size
    grids = [[side // patch for side in x.shape[-2:]] for x in (z, rap_latent)]
    interpolation = region_interpolation(regions, *grids, patch) if config.rap else None
    global_condition = {k: v.to(dtype) for k, v in conditions["global"].items()}
    batches = region_batches(regions, config.region_batch)
    steps, lr_maps = len(sigmas) - 1, None
    low_band_size = z.shape[1] * regions[0].height * regions[0].width // 4  # one region's LL
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if config.rap:
            noisy_lr = ((1 - sigma) * rap_latent + sigma * rap_noise).to(dtype)
            lr_maps = capture_text_attention(model, noisy_lr, sigma, global_condition)
        velocities = []
        for j, batch in enumerate(batches):
            velocities.append(denoise_regions(model, z[0], batch, sigma, conditions, config, dtype,
                                              lr_maps, interpolation))
            if progress is not None:
                if z.is_cuda:  # the bar's s/step is the GPU's time, not the time to queue kernels
                    torch.cuda.synchronize(z.device)
                progress(i * len(batches) + j + 1, steps * len(batches))
        v = merge_regions(torch.cat(velocities), regions, z[0].shape)[None]
        if config.gsp:
            step_size = (config.gsp_step_size * gsp_weight(i, steps, config.gsp_schedule)
                         * gsp_step_scale(config.gsp_normalisation, sigma, low_band_size))
            z = z + global_structure_prior(z - sigma * v, lr_latent, step_size)
        z = z + (sigma_next - sigma) * v
    return z

@torch.no_grad()
def denoise_regions(model: MMDiT, canvas, regions: list[Region], sigma: float, conditions: dict,
                    config: CUpscaleConfig, dtype, lr_maps=None, interpolation=None):
    """The CFG velocity (n, C, h, w) in fp32 of n regions of the latent canvas (C, H, W).

    Batch rows, n each: negative, global and, with RSP, regional prompt; there the global rows take
    the regional pooled vector (Eq. 8 conditions a region on its prompt): one image stream, two
    text streams, merged by `attention_composer`. RAP is on when `lr_maps` is given.
    """
    n, composer = len(regions), conditions.get("regions") is not None
    rows = [conditions["negative"]] * n + [conditions["global"]] * n
    if composer:
        own = [conditions["regions"][r.key] for r in regions]
        rows[n:] = [conditions["global"] | {"pooled": c["pooled"]} for c in own] + own
    condition = {key: torch.cat([r[key] for r in rows]).to(dtype) for key in ("context", "pooled")}
    x = crop_regions(canvas, regions).to(dtype).repeat(3 if composer else 2, 1, 1, 1)
    priors = [interpolation[r.key] for r in regions] if lr_maps is not None else None
    attend = partial(regional_attention, n=n, composer=composer, priors=priors, lr_maps=lr_maps)
    hook = attention_hook(model, lambda block: partial(attend, block=block))
    with hook if composer or priors is not None else contextlib.nullcontext():
        out = model.velocity(x, sigma, condition).float()
    uncond, cond = out[:n], out[n : 2 * n]
    if composer:
        cond = (cond + out[2 * n :]) / 2  # one image stream: the rows agree up to rounding
    return uncond + config.guidance * (cond - uncond)

def start_sigmas(strength: float, num_steps: int, shift: float, noise_level="diffusers-strength"):
    """The sigmas of diffuse-then-denoise, from the start level down to 0.

    The paper noises to "t = 0.45 T" and runs 0.45 of SDXL's 50 steps (22): diffusers' img2img
    arithmetic, which on SD3's own schedule starts at sigma 0.707 and runs 13 of 28 steps. SD3 was
    tuned on this schedule, while equal SNR in two latent spaces (SDXL 4 channels, SD3 16) is not
    equal corruption.
    """
    if noise_level != "diffusers-strength":
        return alternative_start_sigmas(strength, num_steps, shift, noise_level)
    start = int(max(num_steps - min(num_steps * strength, num_steps), 0))  # as diffusers' img2img
    sigmas = sd3_sigmas(num_steps, shift)[start:]
    if len(sigmas) < 2:
        raise ValueError(f"strength {strength} of {num_steps} steps leaves no step to take")
    return sigmas.float()

class Region(NamedTuple):
    """A window of the latent canvas (latent px) and its (row, col) in the grid."""

    row: int
    col: int
    top: int
    left: int
    height: int
    width: int

    @property
    def key(self) -> str:  # the key in a --region-prompts file
        return f"{self.row},{self.col}"

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def box(self, scale: int) -> list[int]:  # (left, top, right, bottom) in image px
        bottom, right = self.top + self.height, self.left + self.width
        return [scale * side for side in (self.left, self.top, right, bottom)]

def plan_regions(latent_height: int, latent_width: int, region: int, stride: int) -> list[Region]:
    """Overlapping `region`-square windows over a latent canvas, row by row (Sec. 5.1: the model's
    training size, overlapping by half); the last one ends on the border, so all have one size
    (one batch). Sizes and offsets are even: 2x2 latent px make one SD3 token."""
    sizes = (latent_height, latent_width, region, stride)
    if min(sizes) <= 0 or stride > region or any(n % 2 for n in sizes):
        raise ValueError(f"canvas {latent_height}x{latent_width}, region {region} and stride "
                         f"{stride} must be positive and even, stride <= region (latent px)")
    height, width = min(region, latent_height), min(region, latent_width)
    rows = _window_starts(latent_height, height, stride)
    cols = _window_starts(latent_width, width, stride)
    return [Region(r, c, top, left, height, width)
            for r, top in enumerate(rows) for c, left in enumerate(cols)]

def region_batches(regions: list[Region], batch_size: int) -> list[list]:
    """Lists of at most `batch_size` regions, to bound memory at 8192^2 (225 regions)."""
    return [regions[start : start + batch_size] for start in range(0, len(regions), batch_size)]

def crop_regions(canvas: torch.Tensor, regions: list[Region]) -> torch.Tensor:
    """(..., H, W) -> (N, ..., h, w)."""
    return torch.stack([canvas[(..., *region.slices)] for region in regions])

def merge_regions(region_outputs: torch.Tensor, regions: list[Region], shape) -> torch.Tensor:
    """Blend (N, ..., h, w) outputs of all the planned regions into a (..., H, W) canvas."""
    weights = blend_weights(regions, *shape[-2:]).to(region_outputs)
    canvas = region_outputs.new_zeros(shape)
    for output, weight, region in zip(region_outputs, weights, regions):
        canvas[(..., *region.slices)] += weight * output
    return canvas

def blend_weights(regions: list[Region], latent_height: int, latent_width: int) -> torch.Tensor:
    """(N, h, w): 1 / (regions covering the pixel), uniform as in MultiDiffusion, which the paper
    follows (no seams at overlap 512 px)."""
    count = torch.zeros(latent_height, latent_width, dtype=torch.float64)  # 1/3 exact in fp64
    for region in regions:
        count[region.slices] += 1
    assert (count > 0).all(), "the regions leave latent pixels uncovered"
    return torch.stack([1 / count[region.slices] for region in regions])


# ==== the method: global structure prior (GSP)

def global_structure_prior(x0_pred: torch.Tensor, lr_latent: torch.Tensor, step_size: float):
    """The GSP update -step_size * dL/dz (Eqs. 4-5), to add to the noisy latent z.

    L = 1/2 sum (LL(x0_pred) - LL(lr_latent))^2 on a one-level Haar low band (the paper gives no
    level count). x0_pred = z - sigma v is held constant, as the paper's cost analysis implies, so
    dL/dz = IDWT(LL gap, 0, 0, 0): the step moves the low band `step_size` of the way to the LR
    latent's and keeps the details.
    """
    if x0_pred.shape != lr_latent.shape:
        raise ValueError(f"prediction {tuple(x0_pred.shape)} and LR latent "
                         f"{tuple(lr_latent.shape)} differ")
    gap = haar_dwt(x0_pred.float() - lr_latent.float())  # the DWT is linear
    gap[..., 1:, :, :] = 0  # the low band's gap alone
    return (-step_size * haar_idwt(gap)).to(x0_pred.dtype)

def gsp_weight(step: int, num_steps: int, schedule: str) -> float:
    """lambda_i / lambda: the paper's decreasing cosine (1 + cos(pi p)) / 2 at progress
    p = step / (num_steps - 1)."""
    progress = step / (num_steps - 1) if num_steps > 1 else 0.0
    if schedule != "cosine":
        return ablation_gsp_weight(progress, schedule)
    return 0.5 * (1 + math.cos(math.pi * progress))

def gsp_step_scale(normalisation: str, sigma: float, low_band_size: int) -> float:
    """The factor on lambda_i for a reading of Eq. 4's "MSE". "sum" (L = 1/2 sum) gives 1: a step
    closes lambda of the low-band gap on any region size or noise level, and lambda = 1 is
    DiffuseHigh's hard replacement, which the paper criticises (Fig. 8: 0.2 reduces repetition,
    1.0 makes artifacts)."""
    if normalisation != "sum":
        return alternative_gsp_step_scale(normalisation, sigma, low_band_size)
    return 1.0

# --- BEGIN copy of diffusion4k.py: Haar wavelets ---
def haar_dwt(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D Haar DWT (..., H, W) -> (..., 4, H/2, W/2): LL, LH, HL, HH as pywt's."""
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"haar_dwt needs an even height and width, got {tuple(x.shape[-2:])}")
    return haar_butterfly(F.pixel_unshuffle(x[..., None, :, :], 2))  # each 2x2 block's a b c d

def haar_idwt(bands: torch.Tensor) -> torch.Tensor:
    """Inverse of `haar_dwt`: the same butterfly, whose matrix is symmetric and orthonormal."""
    return F.pixel_shuffle(haar_butterfly(bands), 2)[..., 0, :, :]

def haar_butterfly(x: torch.Tensor) -> torch.Tensor:
    a, b, c, d = x.unbind(-3)
    return torch.stack([a + b + c + d, a + b - c - d, a - b + c - d, a - b - c + d], dim=-3) / 2
# --- END copy: Haar wavelets ---


# ==== the method: regional attention prior (RAP)

def regional_attention(q, k, v, num_context: int, *, n: int, composer: bool, priors, lr_maps,
                       block: int):
    """Joint block `block`'s attention (B, H, L, D) for n regions, with RAP and the composer.

    RAP is on when `priors` (per region: its rows of the interpolation matrices) and `lr_maps`
    (per block: S of the LR pass, (H, h, w, T)) are given. SD3 has no cross-attention: one softmax
    runs over [text; image] keys. Per head, an image query's row is P = [m S, (1 - m) R]: m its
    mass on the text keys, S its softmax over them alone (SDXL's cross-attention), R over the
    image keys. RAP replaces S by the prior A (rows summing to one, like S's):
        o_RAP = m A V_txt + (1 - m) R V_img = o + m (A - S) V_txt,
    per head and block (the LR and HR passes share the weights), on the global-prompt rows' image
    queries. o and m come from one SDPA call; S is built in chunks of queries.
    """
    img, global_rows = slice(num_context, None), slice(n, 2 * n)
    if priors is None:
        out = attention(q, k, v)
    else:
        out = torch.empty_like(q)
        out[:n] = attention(q[:n], k[:n], v[:n])
        if composer:
            out[2 * n :] = attention(q[2 * n :], k[2 * n :], v[2 * n :])
        rows = (q[global_rows], k[global_rows], v[global_rows])
        out[global_rows], mass = attention_and_text_mass(*rows, num_context)
        for i in range(n):
            q_img, k_txt = q[n + i, :, img], k[n + i, :, :num_context]
            v_txt = v[n + i, :, :num_context].float()
            prior = region_prior(lr_maps[block], *priors[i])
            for chunk in query_chunks(q_img, k_txt):
                text_probs = text_distribution(q_img[:, chunk], k_txt)  # S: (H, chunk, T)
                m = mass[i, :, img][:, chunk, None].float()
                correction = m * ((prior[:, chunk].float() - text_probs) @ v_txt)
                out[n + i, :, img][:, chunk] += correction.to(out.dtype)
    if composer:  # the global and the regional rows go on with the composed features
        composed = attention_composer(out[global_rows, :, img], out[2 * n :, :, img])
        out[n:, :, img] = torch.cat([composed, composed])
    return out

def attention_and_text_mass(q, k, v, num_context: int):
    """Joint attention (B, H, L, D) and each query's mass on the first `num_context` keys (B, H, L)
    in one SDPA call: q and k get 8 zero channels, v an indicator of the text keys and 7 zeros
    (fused kernels want head dims of 8k)."""
    head_dim = q.shape[-1]
    extra = v.new_zeros(*v.shape[:-1], 8)
    extra[..., :num_context, 0] = 1
    out = attention(F.pad(q, (0, 8)), F.pad(k, (0, 8)), torch.cat([v, extra], dim=-1),
                    scale=head_dim**-0.5)
    return out[..., :head_dim], out[..., head_dim]

def region_prior(lr_map: torch.Tensor, row_weights: torch.Tensor, col_weights: torch.Tensor):
    """A for one region, (H, tokens, T): the LR map (H, h, w, T) resized bilinearly to the HR
    grid at the region's tokens only (a 4K image's whole grid would take 25 GB)."""
    x = torch.einsum("ih,khwt->kiwt", row_weights.to(lr_map), lr_map)
    return torch.einsum("jw,kiwt->kijt", col_weights.to(lr_map), x).flatten(1, 2)

def region_interpolation(regions: list[Region], canvas_tokens: tuple, lr_tokens: tuple,
                         patch: int) -> dict:
    """Per region key, the rows of the HR <- LR interpolation matrices at its tokens."""
    rows, cols = (interpolation_matrix(out, size) for out, size in zip(canvas_tokens, lr_tokens))
    return {r.key: (rows[r.top // patch : (r.top + r.height) // patch],
                    cols[r.left // patch : (r.left + r.width) // patch]) for r in regions}

def interpolation_matrix(size_out: int, size_in: int) -> torch.Tensor:
    """M (size_out, size_in) with M @ x = F.interpolate's linear resize (align_corners=False) of x:
    the resize of the identity's columns."""
    identity = torch.eye(size_in, dtype=torch.float64)[None]  # size_in channels of length size_in
    return F.interpolate(identity, size=size_out, mode="linear", align_corners=False)[0].T

@torch.no_grad()
def capture_text_attention(model: MMDiT, latent, sigma: float, condition: dict) -> list:
    """RAP's source: per joint block, S of the image queries (H, h/p, w/p, T) in a pass of the
    noised LR latent with the global prompt."""
    grid = [side // model.config.patch_size for side in latent.shape[-2:]]
    maps = []

    def attend(q, k, v, num_context):  # the blocks run in order: maps[i] is block i's
        q_img, k_txt = q[0, :, num_context:], k[0, :, :num_context]  # (H, N, D), (H, T, D)
        probs = q.new_empty(*q_img.shape[:2], num_context)
        for chunk in query_chunks(q_img, k_txt):
            probs[:, chunk] = text_distribution(q_img[:, chunk], k_txt).to(q.dtype)
        maps.append(probs.unflatten(1, grid))
        return attention(q, k, v)

    with attention_hook(model, lambda block: attend):
        model.velocity(latent, sigma, condition)
    return maps

def text_distribution(q_img: torch.Tensor, k_txt: torch.Tensor) -> torch.Tensor:
    """S: each image query's softmax over the text keys alone, (..., N, T) in fp32."""
    logits = (q_img @ k_txt.transpose(-1, -2)).float() * q_img.shape[-1] ** -0.5
    return torch.softmax(logits, dim=-1)

def query_chunks(q_img: torch.Tensor, k_txt: torch.Tensor) -> list[slice]:
    size = max(1, TEXT_CHUNK_ELEMENTS // (q_img.shape[0] * k_txt.shape[1]))  # heads x text keys
    return [slice(start, start + size) for start in range(0, q_img.shape[1], size)]

@contextlib.contextmanager
def attention_hook(model: MMDiT, make_attend):
    """Bind `make_attend(block_index)` over every joint block's `JointBlock.attend` for the
    duration, eagerly under `compile_blocks` (traced, their Python would make a graph per block)."""
    for index, block in enumerate(model.joint_blocks):
        block.attend = torch.compiler.disable(make_attend(index))
    try:
        yield
    finally:
        for block in model.joint_blocks:
            del block.attend


# ==== the method: regional semantic prior (RSP)

def attention_composer(global_features: torch.Tensor, regional_features: torch.Tensor):
    """The Attention Composer (Sec. 4.5): f = (f_RAP + f_RSP) / 2, a region's image features
    attended with the global prompt and RAP, and with its own prompt p_n = MLLM(crop_n, p)
    (Eqs. 7-8): RAP's follow the LR image, RSP's detail the region's objects. SD3's joint
    attention gives an image token one output per prompt row; both rows go on with the average.
    """
    return (global_features + regional_features) / 2


# ==== alternative readings and ablations

# Other readings of the paper's SDXL settings on SD3 (--noise-level, --gsp-normalisation) and its
# GSP ablation schedules (--gsp-schedule): the method hands off to them only when asked.

def alternative_start_sigmas(strength: float, num_steps: int, shift: float, noise_level: str):
    """`start_sigmas` under the other readings of "t = 0.45 T": "snr-matched", the SNR of SDXL's
    t (0.578), or "flow-sigma", sigma = strength (the most literal). Both run int(strength *
    num_steps) steps (12 of 28), uniform in unshifted time, down to SD3's last non-zero sigma."""
    if noise_level not in ("snr-matched", "flow-sigma"):
        raise ValueError(f"unknown noise level {noise_level!r}; choose from {NOISE_LEVELS}")
    steps = int(strength * num_steps)
    if steps < 1:
        raise ValueError(f"strength {strength} of {num_steps} steps leaves no step to take")
    first = flow_sigma_for_sdxl_strength(strength) if noise_level == "snr-matched" else strength
    mu = math.log(shift)
    t_first = time_shift(torch.tensor([first], dtype=torch.float64), -mu).item()
    t_last = time_shift(torch.tensor([1 / SD3_TRAIN_STEPS], dtype=torch.float64), mu).item()
    sigmas = time_shift(torch.linspace(t_first, t_last, steps, dtype=torch.float64), mu)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()

def flow_sigma_for_sdxl_strength(strength: float) -> float:
    """The flow sigma with the SNR of SDXL's t = strength * T: (1 - sigma) / sigma =
    sqrt(a / (1 - a)) with a = alpha_bar_t, so sigma = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    alpha_bar = sdxl_alpha_bar(min(round(strength * SDXL_TRAIN_STEPS), SDXL_TRAIN_STEPS - 1))
    return math.sqrt(1 - alpha_bar) / (math.sqrt(alpha_bar) + math.sqrt(1 - alpha_bar))

def sdxl_alpha_bar(timestep: int) -> float:
    """SDXL's alpha_bar_t: scaled-linear betas, 0.00085 to 0.012."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, SDXL_TRAIN_STEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)[timestep].item()

def ablation_gsp_weight(progress: float, schedule: str) -> float:
    """`gsp_weight` under the paper's ablations (Fig. 8): "linear" 1 - p (fewer repetitions, but
    artifacts), "increasing" p (blurry)."""
    if schedule == "linear":
        return 1 - progress
    if schedule == "increasing":
        return progress
    raise ValueError(f"unknown GSP schedule {schedule!r}; choose from {', '.join(GSP_SCHEDULES)}")

def alternative_gsp_step_scale(normalisation: str, sigma: float, low_band_size: int) -> float:
    """`gsp_step_scale` under the other readings of Eq. 4's "MSE": "mean", 2 / n over a region's
    n = `low_band_size` LL coefficients (lambda 0.2 then has no visible effect), or "sdxl",
    lambda's effect on SDXL, where x0_hat = (z_t - sqrt(1 - a) eps) / sqrt(a) closes lambda / a
    of the gap; a has sigma's SNR, (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2), floored at a_999."""
    if normalisation == "mean":
        return 2 / low_band_size
    if normalisation == "sdxl":
        alpha_bar = (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)
        return 1 / max(alpha_bar, sdxl_alpha_bar(SDXL_TRAIN_STEPS - 1))
    raise ValueError(f"unknown GSP normalisation {normalisation!r}; "
                     f"choose from {GSP_NORMALISATIONS}")


# ==== the models: transformer

# --- BEGIN copy of diffusion4k.py: transformer blocks ---
def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of t (B,) -> (B, dim), periods up to 1e4."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=t.device)
    args = t.float()[:, None] * torch.exp(-math.log(1e4) * steps / half)
    return torch.cat([args.cos(), args.sin()], dim=-1)

def modulate(x, shift, scale):
    """adaLN of tokens (B, L, C) by per-sample (B, C) shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]

def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

def split_heads(qkv: torch.Tensor, num_heads: int):
    """(B, L, 3*H*D) -> q, k, v each (B, H, L, D)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)

def merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)

def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

def check_divisible(width: int, heads: int, heads_name: str = "num_heads"):
    if width % heads:
        raise ValueError(f"hidden_size {width} is not divisible by {heads_name} {heads}")

class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm_final = layer_norm(dim)
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

def residuals(x, attn, mods, proj, norm, mlp):
    """A stream's gated residual attention and MLP (adaLN-Zero)."""
    _, _, gate1, shift2, scale2, gate2 = mods
    x = x + gate1[:, None] * proj(attn)
    return x + gate2[:, None] * mlp(modulate(norm(x), shift2, scale2))

def run_checkpointed(model: nn.Module, layer, *args):
    """layer(*args), recomputed in backward if `model.gradient_checkpointing`."""
    if model.gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)

def compile_blocks(model: nn.Module) -> nn.Module:
    """Regional compilation: each block class compiles once, the rest stays eager."""
    for name in ("double_blocks", "single_blocks", "joint_blocks"):
        for block in getattr(model, name, ()):
            block.compile()
    return model
# --- END copy: transformer blocks ---

# --- BEGIN copy of diffusion4k.py: SD3 transformer ---
@dataclass(frozen=True)
class SD3Config:
    """SD3 MMDiT. Defaults: SD3-Medium."""

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    hidden_size: int = 1536
    num_heads: int = 24
    depth: int = 24
    mlp_ratio: float = 4.0
    adm_in_channels: int = 2048  # pooled CLIP-L + CLIP-G
    context_dim: int = 4096
    pos_embed_max_size: int = 192  # 192 patches = 3072 px (F8), 6144 px (F16)

    def __post_init__(self):
        check_divisible(self.hidden_size, self.num_heads)

SD3_MEDIUM = SD3Config()

class MMDiT(nn.Module):
    """SD3's multimodal diffusion transformer: joint blocks over [context, image]."""

    def __init__(self, config: SD3Config = SD3_MEDIUM):
        super().__init__()
        self.config = config
        dim, p, n = config.hidden_size, config.patch_size, config.depth
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(config.in_channels, dim, kernel_size=p, stride=p)
        # a fixed sin-cos table; positions are its centre crop
        self.register_buffer("pos_embed", torch.zeros(1, config.pos_embed_max_size**2, dim))
        self.t_embedder = TimestepMLP(256, dim)
        self.y_embedder = TimestepMLP(config.adm_in_channels, dim)
        self.context_embedder = nn.Linear(config.context_dim, dim)
        self.joint_blocks = nn.ModuleList(
            JointBlock(dim, config.num_heads, config.mlp_ratio, last=i == n - 1) for i in range(n))
        self.final_layer = FinalLayer(dim, p * p * config.out_channels)
        self.gradient_checkpointing = False

    def forward(self, x, timesteps, context, y):
        """Latents x (B, C, H, W), timesteps (B,) = sigma * 1000, context, y -> velocity."""
        b, _, height, width = x.shape
        p, channels = self.config.patch_size, self.config.out_channels
        h, w = height // p, width // p
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.cropped_pos_embed(h, w)
        c = self.t_embedder(timestep_embedding(timesteps).to(x.dtype)) + self.y_embedder(y)
        context = self.context_embedder(context)
        for block in self.joint_blocks:
            context, tokens = run_checkpointed(self, block, context, tokens, c)
        out = self.final_layer(tokens, c)  # channels last inside each patch
        out = out.view(b, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, channels, height, width)

    def velocity(self, z, sigma, condition: dict, guidance=None):
        """As `Flux.velocity`, given {"context", "pooled"}; the timestep stays fp32, as in
        diffusers (bf16 would round 857.7 to 856)."""
        t = sigma.float() * 1000 if torch.is_tensor(sigma) else torch.tensor(sigma * 1000)
        return self(z, t.to(z.device).expand(len(z)), condition["context"], condition["pooled"])

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        size = self.config.pos_embed_max_size
        if h > size or w > size:
            raise ValueError(f"{h}x{w} patches exceed the stored {size}x{size} position grid")
        top, left = (size - h) // 2, (size - w) // 2
        grid = self.pos_embed.view(1, size, size, -1)[:, top : top + h, left : left + w]
        return grid.flatten(1, 2)

class JointBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, last: bool):
        super().__init__()
        self.context_block = StreamBlock(dim, num_heads, mlp_ratio, pre_only=last)
        self.x_block = StreamBlock(dim, num_heads, mlp_ratio)

    def forward(self, context, x, c):
        ctx_qkv, ctx_mods = self.context_block.pre_attention(context, c)
        x_qkv, x_mods = self.x_block.pre_attention(x, c)
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(ctx_qkv, x_qkv))
        n = context.shape[1]
        attn = merge_heads(self.attend(q, k, v, n))
        if not self.context_block.pre_only:
            context = self.context_block.post_attention(context, attn[:, :n], ctx_mods)
        return context, self.x_block.post_attention(x, attn[:, n:], x_mods)

    def attend(self, q, k, v, num_context: int):
        """Joint attention over [context, image]; C-Upscale replaces it per block."""
        return attention(q, k, v)

class StreamBlock(nn.Module):
    """One stream of a joint block; the last context stream (`pre_only`) has no output."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.num_heads, self.pre_only = num_heads, pre_only
        self.norm1 = layer_norm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.mods = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.mods * dim))
        if not pre_only:
            hidden = int(dim * mlp_ratio)
            self.attn.proj = nn.Linear(dim, dim)
            self.norm2 = layer_norm(dim)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def pre_attention(self, x, c):
        mods = self.adaLN_modulation(c).chunk(self.mods, dim=-1)
        qkv = self.attn.qkv(modulate(self.norm1(x), *mods[:2]))
        return split_heads(qkv, self.num_heads), mods

    def post_attention(self, x, attn, mods):
        return residuals(x, attn, mods, self.attn.proj, self.norm2, self.mlp_forward)

    def mlp_forward(self, x):
        return self.mlp.fc2(F.gelu(self.mlp.fc1(x), approximate="tanh"))

class TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x):
        return self.mlp(x)

def load_sd3(source, dtype=torch.bfloat16, device="cpu", token=None) -> MMDiT:
    """An SD3 MMDiT from a Stability file, a diffusers folder or a Hub repo id."""
    path = component_path(source, "transformer", token)
    state = read_component(path, dtype, device)
    if "joint_blocks.0.x_block.attn.qkv.weight" not in state:
        if not {"transformer_blocks.0.attn.to_q.weight", "pos_embed.pos_embed"} <= state.keys():
            raise ValueError(f"{source}: not an SD3 transformer checkpoint (first keys: "
                             f"{first_keys(state)})")
        table = sd3_key_table(count_blocks(state, r"transformer_blocks\.(\d+)\."))
        state = to_original_layout(state, table, f"{source} (diffusers SD3)")
    return build(lambda: MMDiT(sd3_config_from_state(state, folder_config(path))), state,
                 f"{source} (SD3)", source)

def sd3_config_from_state(state: dict, folder_config: dict | None = None) -> SD3Config:
    """Dimensions from the tensors; heads from config.json, else 64 wide."""
    if any(".ln_q." in key or ".attn2." in key for key in state):
        raise ValueError("this is an SD3.5 checkpoint (QK norm / dual attention); only SD3-Medium "
                         "is supported")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    heads = (folder_config or {}).get("num_attention_heads")
    if heads is None and hidden % 64:
        raise ValueError(f"SD3 checkpoint of width {hidden}: a single file does not store "
                         f"the head count and {hidden} is no multiple of SD3's head dim 64; "
                         "load its diffusers folder instead")
    return SD3Config(
        in_channels=in_channels, patch_size=patch, hidden_size=hidden,
        num_heads=heads or hidden // 64,
        out_channels=state["final_layer.linear.weight"].shape[0] // patch**2,
        depth=count_blocks(state, r"joint_blocks\.(\d+)\."),
        mlp_ratio=state["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / hidden,
        adm_in_channels=state["y_embedder.mlp.0.weight"].shape[1],
        context_dim=state["context_embedder.weight"].shape[1],
        pos_embed_max_size=math.isqrt(state["pos_embed"].shape[1]))

def sd3_key_table(depth: int) -> dict:
    """Stability key -> diffusers keys of an SD3 MMDiT of this depth."""
    rows = [("x_embedder.proj", "pos_embed.proj"), ("context_embedder", "context_embedder"),
            ("final_layer.linear", "proj_out"),
            ("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")]
    for original, folder in (("t", "timestep"), ("y", "text")):
        o, f = f"{original}_embedder.mlp", f"time_text_embed.{folder}_embedder"
        rows += [(f"{o}.0", f"{f}.linear_1"), (f"{o}.2", f"{f}.linear_2")]
    # per stream: diffusers' suffix and names of q/k/v and output projection
    streams = (("x", "", "to_{}", "to_out.0"), ("context", "_context", "add_{}_proj", "to_add_out"))
    for i in range(depth):
        f = f"transformer_blocks.{i}"
        for stream, suffix, qkv, out in streams:
            s = f"joint_blocks.{i}.{stream}_block"
            pre_only = stream == "context" and i == depth - 1  # has only (shift, scale) and qkv
            rows += [(f"{s}.attn.qkv", [f"{f}.attn.{qkv.format(x)}" for x in "qkv"]),
                     (f"{s}.adaLN_modulation.1", f"{f}.norm1{suffix}.linear",
                      "swap" if pre_only else None)]
            if not pre_only:
                rows += [(f"{s}.attn.proj", f"{f}.attn.{out}"),
                         (f"{s}.mlp.fc1", f"{f}.ff{suffix}.net.0.proj"),
                         (f"{s}.mlp.fc2", f"{f}.ff{suffix}.net.2")]
    return {"pos_embed": (["pos_embed.pos_embed"], None), **key_table(rows)}
# --- END copy: SD3 transformer ---


# ==== the models: VAE

# --- BEGIN copy of diffusion4k.py: F16 VAE ---
def vae_conv_in(in_channels: int, channels: int, stride: int) -> nn.Conv2d:
    """Stride 2 makes Diffusion-4K's F16 VAE from the F8 one's weights (4x fewer Flux tokens)."""
    return nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1)

def decoder_head(h: torch.Tensor, conv_out: nn.Conv2d, stride: int, partitioned: bool = False,
                 band_rows: int = 64) -> torch.Tensor:
    """The decoder's last stage: conv_out(h), for F16 conv_out(nearest_x2(h)) (the centred form),
    in bands of input rows, so the upsampled map never exists whole. Diffusion-4K decodes in 2x2
    partitions, each zero-padded on its outer side and cropped one pixel in (and trained its
    decoders so): output (r, c) is the 3x3 conv centred on upsampled pixel (r - 1, c - 1), the
    centred output moved one pixel down and right (`partitioned`)."""
    if stride == 1:
        return conv_out(h)
    s, rows = stride, h.shape[-2]
    shift = int(partitioned)  # how far the result moves down and right
    bands = []
    for top in range(0, rows, band_rows):
        n = min(band_rows, rows - top)
        low, high = max(top - 1, 0), min(top + n + 1, rows)  # a row either side, zero off-map
        band = F.pad(h[..., low:high, :], (0, 0, low - (top - 1), top + n + 1 - high))
        up = F.interpolate(band, scale_factor=float(s), mode="nearest")
        first = s - 1 - shift  # of the rows the 3x3 window reaches
        up = F.pad(up[..., first : first + s * n + 2, :], (1 + shift, 1 - shift))
        bands.append(F.conv2d(up, conv_out.weight, conv_out.bias))
    return torch.cat(bands, dim=-2)
# --- END copy: F16 VAE ---

# --- BEGIN copy of diffusion4k.py: VAE ---
@dataclass(frozen=True)
class VAEConfig:
    """16-channel AutoencoderKL (Flux, SD3); stride 2: Diffusion-4K's F16 VAE."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_multipliers: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    stride: int = 1

    def __post_init__(self):
        widths = [self.base_channels * m for m in self.channel_multipliers]
        scale, shift = self.scale_factor, self.shift_factor
        for bad, problem in (
            (self.stride not in (1, 2), f"stride {self.stride} (1: F8, 2: F16)"),
            (any(w % 32 for w in widths), f"widths {widths} (multiples of 32 for GroupNorm)"),
            (not 0 < scale < math.inf, f"scaling_factor {scale} (finite, > 0)"),
            (not math.isfinite(shift), f"shift_factor {shift} (finite)"),
        ):
            if bad:
                raise ValueError(f"this VAE cannot have {problem}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1) * self.stride

FLUX_VAE = VAEConfig()
SD3_VAE = VAEConfig(scale_factor=1.5305, shift_factor=0.0609)

class AutoEncoder(nn.Module):
    """AutoencoderKL with the LDM / BFL `ae.safetensors` keys."""

    def __init__(self, config: VAEConfig = FLUX_VAE):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> normalised latents (the posterior mean)."""
        mean = self.encoder(x).chunk(2, dim=1)[0]
        return (mean - self.config.shift_factor) * self.config.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1] (not clipped)."""
        return self.decoder(z / self.config.scale_factor + self.config.shift_factor)

def encode_raw(vae: AutoEncoder, x: torch.Tensor, generator=None) -> torch.Tensor:
    """Unnormalised latents: a posterior sample, or without generator the mean."""
    mean, logvar = vae.encoder(x).float().chunk(2, dim=1)
    if generator is None:
        return mean
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise

class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, mults = config.base_channels, config.channel_multipliers
        self.conv_in = vae_conv_in(config.in_channels, ch, config.stride)
        self.down, width = nn.ModuleList(), ch
        for level, mult in enumerate(mults):
            self.down.append(resnet_level(width, ch * mult, config.num_res_blocks))
            width = ch * mult
            if level < len(mults) - 1:
                self.down[-1].downsample = Downsample(width)
        self.mid = mid_block(width)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, 2 * config.z_channels, 3, padding=1)
        self.gradient_checkpointing = False  # OP4KSR trains encoder LoRAs at 4096^2

    def forward(self, x):
        h = self.conv_in(x)
        for block in (*level_blocks(self.down, "downsample"), *self.mid):
            h = run_checkpointed(self, block, h)
        return self.conv_out(F.silu(self.norm_out(h)))

class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, mults = config.base_channels, config.channel_multipliers
        self.stride = config.stride
        self.gradient_checkpointing = False
        self.partitioned = True  # F16: decode as Diffusion-4K's code (`decoder_head`)
        width = ch * mults[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = mid_block(width)
        self.up = nn.ModuleList()
        for level in reversed(range(len(mults))):
            self.up.insert(0, resnet_level(width, ch * mults[level], config.num_res_blocks + 1))
            width = ch * mults[level]
            if level > 0:
                self.up[0].upsample = Upsample(width)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, config.out_channels, 3, padding=1)

    def forward(self, z):
        return self.head(self.features(z))

    def features(self, z):
        """The map after norm_out + SiLU, which SC-VAE training compares."""
        h = self.conv_in(z)
        for block in (*self.mid, *level_blocks(reversed(self.up), "upsample")):
            h = run_checkpointed(self, block, h)
        return F.silu(self.norm_out(h))

    def head(self, h):
        return decoder_head(h, self.conv_out, self.stride, self.partitioned)

def resnet_level(width: int, out: int, count: int) -> nn.Module:
    """A resolution level: `count` ResnetBlocks width -> out; the caller adds its resampler."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(out if i else width, out) for i in range(count))
    return level

def level_blocks(levels, resampler: str) -> list[nn.Module]:
    """The levels' ResnetBlocks and resamplers, in running order."""
    return [m for level in levels for m in (*level.block, getattr(level, resampler, None)) if m]

class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x):
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return self.nin_shortcut(x) + h

class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        hidden = self.norm(x)
        # contiguous: else SDPA falls back to math, writing hw x hw scores
        q, k, v = (conv(hidden).view(b, 1, c, h * w).transpose(-1, -2).contiguous()
                   for conv in (self.q, self.k, self.v))
        out = attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)

class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # the weights expect right/bottom padding only

class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

def mid_block(channels: int) -> nn.Sequential:
    mid = nn.Sequential()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid

def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)

VAE_FIXED = {  # the diffusers AutoencoderKL settings this VAE supports
    "norm_num_groups": 32, "act_fn": "silu", "mid_block_add_attention": True,
    "use_quant_conv": False, "use_post_quant_conv": False,
    "down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}

def load_vae(source, dtype=torch.float32, device="cpu", stride=None, scale_factor=None,
             shift_factor=None, token=None) -> AutoEncoder:
    """A 16-channel AutoencoderKL from a single file, a diffusers folder or a Hub repo id; scale,
    shift and stride from the arguments, else config.json, else Flux's."""
    path = component_path(source, "vae", token)
    config = folder_config(path)
    for key, supported in VAE_FIXED.items():
        values = config.get(key, supported)
        if any(value != supported for value in (values if isinstance(values, list) else [values])):
            raise ValueError(f"{source}: config.json has {key} {values!r}; this VAE supports only "
                             f"{supported!r}")
    state = read_component(path, dtype, device, prefix="first_stage_model.")
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in state:
        state = to_original_layout(state, vae_table_for(state), f"{source} (diffusers VAE)")
    quant = any(key.startswith(("quant_conv", "post_quant_conv")) for key in state)
    if "encoder.down.0.block.0.conv1.weight" not in state or quant:
        raise ValueError(f"{source}: not a 16-channel Flux/SD3 VAE checkpoint "
                         f"(first keys: {first_keys(state)})")

    settings = [next(value for value in (given, config.get(key), default) if value is not None)
                for given, key, default in ((scale_factor, "scaling_factor", FLUX_VAE.scale_factor),
                                            (shift_factor, "shift_factor", FLUX_VAE.shift_factor),
                                            (stride, "stride", 1))]
    return build(lambda: AutoEncoder(vae_config_from_state(state, *settings)), state,
                 f"{source} (VAE)", source)

def vae_config_from_state(state: dict, scale_factor: float, shift_factor: float,
                          stride: int) -> VAEConfig:
    base, in_channels = state["encoder.conv_in.weight"].shape[:2]
    levels = count_blocks(state, r"encoder\.down\.(\d+)\.")
    widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    return VAEConfig(
        in_channels=in_channels, out_channels=state["decoder.conv_out.weight"].shape[0],
        base_channels=base, channel_multipliers=tuple(width // base for width in widths),
        num_res_blocks=count_blocks(state, r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=state["decoder.conv_in.weight"].shape[1], scale_factor=scale_factor,
        shift_factor=shift_factor, stride=stride)

def vae_table_for(state: dict) -> dict:
    """The key table of this VAE state (either layout), with the ResnetBlock shortcuts it has."""
    folder = any(key.startswith("encoder.down_blocks.") for key in state)
    down, block = ("down_blocks", "resnets") if folder else ("down", "block")
    levels = count_blocks(state, rf"encoder\.{down}\.(\d+)\.")
    res_blocks = count_blocks(state, rf"encoder\.{down}\.0\.{block}\.(\d+)\.")
    rows = []

    def resnet(original, diffusers):
        rows.extend((f"{original}.{name}", f"{diffusers}.{name}")
                    for name in ("norm1", "conv1", "norm2", "conv2"))
        shortcut = (f"{original}.nin_shortcut", f"{diffusers}.conv_shortcut")
        if f"{shortcut[folder]}.weight" in state:  # only where a block changes width
            rows.append(shortcut)

    for part in ("encoder", "decoder"):
        attn = f"{part}.mid_block.attentions.0"
        rows += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_out", f"{part}.conv_out"),
                 (f"{part}.norm_out", f"{part}.conv_norm_out"),
                 (f"{part}.mid.attn_1.norm", f"{attn}.group_norm")]
        for i in (0, 1):
            resnet(f"{part}.mid.block_{i + 1}", f"{part}.mid_block.resnets.{i}")
        for original, diffusers in (*((x, f"to_{x}") for x in "qkv"), ("proj_out", "to_out.0")):
            rows.append((f"{part}.mid.attn_1.{original}", f"{attn}.{diffusers}", "conv1x1"))
    for level in range(levels):
        up = levels - 1 - level  # diffusers counts decoder blocks from the lowest resolution
        for j in range(res_blocks):
            resnet(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}")
        for j in range(res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}")
        if level < levels - 1:
            rows.append((f"encoder.down.{level}.downsample.conv",
                         f"encoder.down_blocks.{level}.downsamplers.0.conv"))
        if level > 0:
            rows.append((f"decoder.up.{level}.upsample.conv",
                         f"decoder.up_blocks.{up}.upsamplers.0.conv"))
    return key_table(rows)
# --- END copy: VAE ---


# ==== the models: text encoders and tokenizers

# --- BEGIN copy of diffusion4k.py: text encoders ---
# Module names are transformers' keys.
@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder (gated-GELU). Defaults: T5-XXL."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

T5_XXL = T5Config()

class T5Encoder(nn.Module):
    """ids (B, T) -> last hidden state; a learned bias per (head, offset bucket) gives positions."""

    def __init__(self, config: T5Config = T5_XXL):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        e = self.encoder = nn.Module()
        e.block = nn.ModuleList(T5Block(config, owns_position_bias=i == 0)
                                for i in range(config.num_layers))
        e.final_layer_norm = T5LayerNorm(config)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask (B, T): true for real tokens; Flux and SD3 attend padding."""
        c = self.config
        buckets = t5_position_buckets(ids.shape[1], c.relative_attention_num_buckets,
                                      c.relative_attention_max_distance, ids.device)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = table(buckets).permute(2, 0, 1)[None]  # (1, H, T, T)
        if mask is not None:
            bias = torch.where(mask.bool()[:, None, None, :], bias, torch.finfo(bias.dtype).min)
        x = self.shared(ids)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

def t5_position_buckets(length: int, num_buckets: int, max_distance: int, device=None):
    """(query, key) -> T5's bucket of key - query: keys after the query in the upper half; small
    offsets get a bucket each, larger ones log-wider buckets."""
    position = torch.arange(length, device=device)
    offset = position[None, :] - position[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = offset.abs()
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return (offset > 0).long() * half + torch.where(distance < exact, distance, far)

class T5Block(nn.Module):
    def __init__(self, c: T5Config, owns_position_bias: bool):
        super().__init__()
        inner = c.num_heads * c.d_kv
        attn, ff = self.layer = nn.ModuleList([nn.Module(), nn.Module()])
        sa = attn.SelfAttention = nn.Module()
        sa.q, sa.k, sa.v = (nn.Linear(c.d_model, inner, bias=False) for _ in range(3))
        sa.o = nn.Linear(inner, c.d_model, bias=False)
        if owns_position_bias:  # block 0 stores the table every block uses
            sa.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)
        mlp = ff.DenseReluDense = nn.Module()  # v1.1: gated GELU despite the name
        mlp.wi_0, mlp.wi_1 = (nn.Linear(c.d_model, c.d_ff, bias=False) for _ in range(2))
        mlp.wo = nn.Linear(c.d_ff, c.d_model, bias=False)
        attn.layer_norm, ff.layer_norm = T5LayerNorm(c), T5LayerNorm(c)
        self.num_heads = c.num_heads

    def forward(self, x, position_bias):
        attn, ff = self.layer
        sa, h = attn.SelfAttention, attn.layer_norm(x)
        proj = (sa.q, sa.k, sa.v, sa.o)  # T5's logits have no 1/sqrt(d): it is in the weights
        x = x + multi_head_attention(h, proj, self.num_heads, position_bias, scale=1.0)
        mlp, h = ff.DenseReluDense, ff.layer_norm(x)
        h = F.gelu(mlp.wi_0(h), approximate="tanh") * mlp.wi_1(h)
        return x + mlp.wo(h.to(mlp.wo.weight.dtype))  # wo may stay fp32: its fp16 output overflows

class T5LayerNorm(nn.Module):
    """T5's LayerNorm is an RMSNorm, statistics in fp32."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c.d_model))
        self.eps = c.layer_norm_epsilon

    def forward(self, x):
        return self.weight * rms_normalize(x, self.eps).to(self.weight.dtype)

def multi_head_attention(x, proj, num_heads, mask=None, scale=None):
    """Self-attention of x (B, L, C) by the linear maps (q, k, v, out)."""
    q, k, v = (p(x).unflatten(-1, (num_heads, -1)).transpose(1, 2) for p in proj[:3])
    return proj[3](merge_heads(attention(q, k, v, mask=mask, scale=scale)))

CLIP_ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}

@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer. Defaults: OpenAI CLIP ViT-L/14."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    projection_dim: int | None = 768  # None: no `text_projection` (Flux's CLIPTextModel)
    layer_norm_eps: float = 1e-5
    # 2 (Hub configs) is transformers' "legacy": pool at argmax(ids), the first <|endoftext|>
    eos_token_id: int = 2

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of "
                             f"{sorted(CLIP_ACTIVATIONS)}")
        check_divisible(self.hidden_size, self.num_attention_heads, "num_attention_heads")

CLIP_L = CLIPTextConfig()

CLIP_G = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                        num_attention_heads=20, hidden_act="gelu", projection_dim=1280)

class CLIPTextEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig = CLIP_L):
        super().__init__()
        self.config, d, projection = config, config.hidden_size, config.projection_dim
        m = self.text_model = nn.Module()
        e = m.embeddings = nn.Module()
        e.token_embedding = nn.Embedding(config.vocab_size, d)
        e.position_embedding = nn.Embedding(config.max_position_embeddings, d)
        m.encoder = nn.Module()
        m.encoder.layers = nn.ModuleList(CLIPLayer(config) for _ in range(config.num_hidden_layers))
        m.final_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.text_projection = nn.Linear(d, projection, bias=False) if projection else None

    def forward(self, ids: torch.Tensor) -> CLIPTextOutput:
        m, length = self.text_model, ids.shape[1]
        x = m.embeddings.token_embedding(ids) + m.embeddings.position_embedding.weight[:length]
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        for layer in m.encoder.layers:
            penultimate = x
            x = layer(x, causal)
        x = m.final_layer_norm(x)
        eos_id = self.config.eos_token_id
        eos = ids.argmax(-1) if eos_id == 2 else (ids == eos_id).int().argmax(-1)
        pooled = x[torch.arange(len(ids), device=ids.device), eos]
        projected = self.text_projection(pooled) if self.text_projection is not None else pooled
        return CLIPTextOutput(x, penultimate, pooled, projected)

class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    penultimate: torch.Tensor  # the last layer's input: SD3's per-token features
    pooled: torch.Tensor  # final-LN'd state at EOS: Flux's `y`
    text_embeds: torch.Tensor  # pooled @ text_projection (SD3), else `pooled`

class CLIPLayer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        d = c.hidden_size
        a = self.self_attn = nn.Module()
        a.q_proj, a.k_proj, a.v_proj, a.out_proj = (nn.Linear(d, d) for _ in range(4))
        mlp = self.mlp = nn.Module()
        mlp.fc1, mlp.fc2 = nn.Linear(d, c.intermediate_size), nn.Linear(c.intermediate_size, d)
        self.layer_norm1, self.layer_norm2 = (nn.LayerNorm(d, eps=c.layer_norm_eps) for _ in "12")
        self.num_heads, self.act = c.num_attention_heads, CLIP_ACTIVATIONS[c.hidden_act]

    def forward(self, x, causal):
        a = self.self_attn
        proj = (a.q_proj, a.k_proj, a.v_proj, a.out_proj)
        x = x + multi_head_attention(self.layer_norm1(x), proj, self.num_heads, causal)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))

class PromptTokenizer:
    """Prompts -> ids (B, max_length): [bos] tokens eos pad ..., cut to fit with a note naming
    `name`. A subclass sets `tokenizer`, a `tokenizers.Tokenizer`, or its own `encode`."""

    bos_id = None

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        rows = self.encode([prompts] if isinstance(prompts, str) else list(prompts))
        head = [] if self.bos_id is None else [self.bos_id]
        room = self.max_length - len(head) - 1
        dropped = [len(ids) - room for ids in rows if len(ids) > room]
        if dropped and self.name:
            which = ("the prompt is" if len(rows) == 1
                     else f"{len(dropped)} of {len(rows)} prompts are")
            longest = "" if len(dropped) == 1 else " from the longest"
            print(f"note: {which} too long for {self.name}, which reads {self.max_length} tokens: "
                  f"{max(dropped)} dropped{longest}", file=sys.stderr)
        out = torch.full((len(rows), self.max_length), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            row = head + ids[:room] + [self.eos_id]
            out[i, : len(row)] = torch.tensor(row)
        return out

class CLIPTokenizer(PromptTokenizer):
    """CLIP's byte-level BPE as OpenAI's SimpleTokenizer, padded with the folder's pad token.
    Added tokens stay whole, as in transformers (SD3's CLIP-G: "!!" is "!" "!")."""

    WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    def __init__(self, folder, max_length: int = 77, pad_id: int | None = None,
                 name: str | None = "CLIP"):
        folder = Path(folder)
        files = [folder / "vocab.json", folder / "merges.txt"]
        for file in files:
            if not file.is_file():
                raise ValueError(f"{folder}: no {file.name} (a CLIP tokenizer folder has "
                                 "vocab.json and merges.txt)")
        tok = self.tokenizer = Tokenizer(BPE.from_file(
            *map(str, files), end_of_word_suffix="</w>", continuing_subword_prefix=""))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([  # words, then bytes as characters
            pre_tokenizers.Split(Regex(self.WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tokens_map, config = (read_json(folder / file) if (folder / file).is_file() else {}
                              for file in ("special_tokens_map.json", "tokenizer_config.json"))
        added = config.get("added_tokens_decoder", {})
        bos, eos = "<|startoftext|>", "<|endoftext|>"
        tok.add_special_tokens([bos, eos, *(t["content"] for t in added.values())])
        self.bos_id, self.eos_id = tok.token_to_id(bos), tok.token_to_id(eos)
        if pad_id is None:
            pad = tokens_map.get("pad_token") or config.get("pad_token") or eos
            pad = pad["content"] if isinstance(pad, dict) else pad
            pad_id = tok.token_to_id(pad)
            if pad_id is None:
                raise ValueError(f"{folder}: pad token {pad!r} is not in vocab.json")
        self.max_length, self.pad_id, self.name = max_length, pad_id, name

class T5Tokenizer(PromptTokenizer):
    """T5's tokenizer from tokenizer.json, or spiece.model (needs `sentencepiece`)."""

    def __init__(self, path, max_length: int = 512, name: str | None = "T5"):
        path = Path(path)
        if path.is_dir():
            json_file = path / "tokenizer.json"
            path = json_file if json_file.exists() else path / "spiece.model"
        if not path.is_file():
            raise ValueError(f"{path}: no such file (a T5 tokenizer is tokenizer.json or "
                             "spiece.model)")
        try:
            if path.suffix == ".json":
                tok = self.tokenizer = Tokenizer.from_file(str(path))
                self.eos_id, self.pad_id = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
            else:
                import sentencepiece

                tok = sentencepiece.SentencePieceProcessor(model_file=str(path))
                self.encode, self.eos_id, self.pad_id = tok.encode, tok.eos_id(), tok.pad_id()
        except Exception as error:  # both libraries raise assorted types
            raise ValueError(f"{path}: not a readable T5 tokenizer ({error})") from None
        if None in (self.eos_id, self.pad_id) or min(self.eos_id, self.pad_id) < 0:
            raise ValueError(f"{path}: the tokenizer has no </s> or <pad> token")
        self.max_length, self.name = max_length, name

def load_t5(source, dtype=torch.bfloat16, device="cpu", prefix="", subfolder=None) -> T5Encoder:
    """A frozen T5 encoder from a transformers folder, a Hub repo or one safetensors file."""
    if dtype == torch.float16:
        raise ValueError("T5 overflows in float16: load it in bfloat16 or float32")
    skip = ("decoder.", "lm_head.")
    state, config_json = read_weights(source, dtype, device, prefix, subfolder, skip)
    if "encoder.embed_tokens.weight" in state:  # a copy of shared.weight
        state.setdefault("shared.weight", state.pop("encoder.embed_tokens.weight"))
    return build(lambda: T5Encoder(t5_config_from(state, config_json)), state,
                 f"{source}: T5 encoder", source).requires_grad_(False)

def load_clip(source, dtype=torch.bfloat16, device="cpu", prefix="",
              subfolder=None) -> CLIPTextEncoder:
    """A frozen CLIP text encoder, as `load_t5`; keys with or without `text_model.`."""
    skip = ("vision_model.", "visual_projection.", "logit_scale",
            "text_model.embeddings.position_ids", "embeddings.position_ids")
    state, config_json = read_weights(source, dtype, device, prefix, subfolder, skip)
    own = ("text_model.", "text_projection.")
    state = {k if k.startswith(own) else "text_model." + k: v for k, v in state.items()}
    return build(lambda: CLIPTextEncoder(clip_config_from(state, config_json)), state,
                 f"{source}: CLIP text encoder", source).requires_grad_(False)

def read_weights(source, dtype, device, prefix, subfolder, skip) -> tuple[dict, dict]:
    """(`read_prefixed`, config.json) of a component."""
    path = component_path(source, subfolder)
    state = read_prefixed(path, dtype, device, prefix, skip)
    if not state:
        raise ValueError(f"{path}: no tensors" + (f" starting with {prefix!r}" if prefix else ""))
    return state, folder_config(path)

def t5_config_from(state: dict, config_json: dict) -> T5Config:
    attn, mlp = "encoder.block.0.layer.0.SelfAttention", "encoder.block.0.layer.1.DenseReluDense"
    (vocab, width), (buckets, heads), (inner, _), (d_ff, _) = tensor_shapes(
        state, "not a T5 encoder checkpoint", "shared.weight",
        f"{attn}.relative_attention_bias.weight", f"{attn}.q.weight", f"{mlp}.wi_0.weight")
    if config_json.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise ValueError("only T5 v1.1 (gated-gelu) encoders are supported, "
                         f"not {config_json['feed_forward_proj']!r}")
    return T5Config(
        vocab_size=vocab, d_model=width, d_kv=inner // heads, num_heads=heads, d_ff=d_ff,
        num_layers=count_blocks(state, r"encoder\.block\.(\d+)\."),
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=config_json.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=config_json.get("layer_norm_epsilon", 1e-6))

def clip_config_from(state: dict, config_json: dict) -> CLIPTextConfig:
    """Dimensions from the tensors, the rest from config.json, else 64-wide heads and quick_gelu
    for CLIP-L, gelu otherwise."""
    (vocab, width), (positions, _), (ff, _) = tensor_shapes(
        state, "not a CLIP text encoder checkpoint",
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.0.mlp.fc1.weight")
    projection = state.get("text_projection.weight")
    if config_json:  # a saved config omits values equal to transformers' defaults
        given = config_json.get("text_config", config_json)  # a CLIPModel config nests it
        defaults = {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                    "eos_token_id": 49407}
        heads, act, eps, eos = (given.get(key, default) for key, default in defaults.items())
    elif width % 64:
        raise ValueError(f"a CLIP of width {width} without config.json: its head count is not "
                         "stored and the width is no multiple of CLIP's head dim 64; load its "
                         "transformers folder instead")
    else:
        heads, act, eps, eos = width // 64, "quick_gelu" if width == 768 else "gelu", 1e-5, 2
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=ff, num_attention_heads=heads,
        num_hidden_layers=count_blocks(state, r"text_model\.encoder\.layers\.(\d+)\."),
        max_position_embeddings=positions, hidden_act=act, layer_norm_eps=eps, eos_token_id=eos,
        projection_dim=None if projection is None else projection.shape[0])

def tensor_shapes(state: dict, what: str, *keys: str) -> list[torch.Size]:
    for key in keys:
        if key not in state:
            raise ValueError(f"{what}: no {key} (its first keys: {first_keys(state)})")
    return [state[key].shape for key in keys]
# --- END copy: text encoders ---


# ==== pipeline

def load_sd3_pipeline(model, device=None, dtype=None, offload="none", token=None) -> Pipeline:
    device, dtype = device_dtype(device, dtype)
    single_file = Path(str(model)).expanduser().is_file()
    rest_device = "cpu" if offload != "none" else device
    print(f"loading SD3 from {model}", file=sys.stderr)
    transformer = load_sd3(model, dtype, rest_device, token=token)
    scale, shift = (SD3_VAE.scale_factor, SD3_VAE.shift_factor) if single_file else (None, None)
    vae = load_vae(model, dtype, rest_device, stride=1, scale_factor=scale, shift_factor=shift,
                   token=token)
    text_source, encoder_file = (TEXT_SOURCES["sd3"], model) if single_file else (model, None)
    encoders, tokenizers = load_text_encoders("sd3", text_source, dtype, transformer, token,
                                              encoder_file)
    return Pipeline("sd3", transformer, vae, encoders, tokenizers, device, dtype, str(model),
                    offload)

def model_geometry(model, token=None) -> tuple[int, int, int]:
    """(VAE factor, patch, position-table side) from the configs or a single file's headers: sizes
    the model cannot take are refused before any weight is read."""
    path = Path(str(model)).expanduser()
    if path.is_file():
        keys = safetensors_keys(path)
        wanted = [DIFFUSION_PREFIX + "x_embedder.proj.weight", DIFFUSION_PREFIX + "pos_embed"]
        levels = count_blocks(keys, r"first_stage_model\.encoder\.down\.(\d+)\.")
        if not set(wanted) <= set(keys) or not levels:
            raise UserError(f"{model}: not an SD3-Medium single file with its VAE "
                            f"(no {wanted[1]} or VAE)")
        with safe_open(path, framework="pt") as f:
            patch = f.get_slice(wanted[0]).get_shape()[-1]
            table = f.get_slice(wanted[1]).get_shape()[1]
        return 2 ** (levels - 1), patch, math.isqrt(table)
    transformer, vae = (resolve_source(model, part, ("config.json",), token) / "config.json"
                        for part in ("transformer", "vae"))
    if not (transformer.is_file() and vae.is_file() and transformer.parent != vae.parent):
        raise UserError(f"{model}: not an SD3 pipeline folder "
                        "(it lacks transformer/ or vae/config.json)")
    settings, widths = read_json(transformer), read_json(vae).get("block_out_channels")
    patch, table = (config_count(settings, key, transformer)
                    for key in ("patch_size", "pos_embed_max_size"))
    if not (isinstance(widths, list) and widths):
        raise UserError(f"{vae}: field block_out_channels is {json.dumps(widths)[:40]}, not a "
                        "non-empty list (an SD3-Medium VAE config.json?)")
    return 2 ** (len(widths) - 1), patch, table

def config_count(config: dict, key: str, file: Path) -> int:
    value = config.get(key)
    if not is_count(value):
        raise UserError(f"{file}: field {key} is {json.dumps(value)[:40]}, not a positive integer "
                        "(an SD3-Medium transformer config.json?)")
    return value

def encode_conditions(pipe: Pipeline, prompt: str, negative_prompt: str = "",
                      region_prompts: dict | None = None, batch_size: int = 16) -> dict:
    """`denoise_regions`' conditions (on the CPU): global, negative and regional."""
    prompts = [prompt, negative_prompt, *(region_prompts or {}).values()]
    encoded = [c for start in range(0, len(prompts), batch_size)
               for c in encode_prompts(pipe, prompts[start : start + batch_size])]
    regions = dict(zip(region_prompts, encoded[2:])) if region_prompts is not None else None
    return {"global": encoded[0], "negative": encoded[1], "regions": regions}

def target_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """The input's size times `scale`, rounded to `multiple`."""
    if min(width, height) < MIN_INPUT_SIDE:
        raise UserError(f"the input is {width}x{height}: too small (each side needs at least "
                        f"{MIN_INPUT_SIDE} px)")
    w, h = (max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))
    if w * h > MAX_TARGET_PIXELS:
        raise UserError(f"the target {w}x{h} ({w * h / 1e6:.0f} Mpx) is beyond the "
                        f"{MAX_TARGET_PIXELS / 1e6:.0f} Mpx (8192x8192) this pipeline bounds its "
                        "memory for; lower --scale")
    return w, h

def rap_size(width: int, height: int, region_px: int, multiple: int, max_side: int):
    """RAP's LR pass size: the input's, shrunk to the native area and the position table."""
    shrink = min(1.0, region_px / math.sqrt(width * height), max_side / max(width, height))
    return tuple(max(multiple, round(side * shrink / multiple) * multiple)
                 for side in (width, height))

def check_regions(config: CUpscaleConfig, pos_embed_patches: int, patch: int):
    multiple = config.vae_scale * patch
    windows = (("--region-size", config.region_px, "--region-overlap", config.overlap_px, "size"),
               ("--vae-tile", config.vae_tile_px, "--vae-overlap", config.vae_overlap_px, "tile"))
    for size_flag, size, overlap_flag, overlap, name in windows:
        if size % multiple or overlap % multiple or not 0 <= overlap < size:
            raise UserError(f"{size_flag} {size} and {overlap_flag} {overlap} must be multiples of "
                            f"{multiple} px with 0 <= overlap < {name}")
    if config.region_px // multiple > pos_embed_patches:
        raise UserError(f"--region-size {config.region_px}: the model's position table covers at "
                        f"most {pos_embed_patches * multiple} px")


# ==== pipeline: its pieces from diffusion4k.py

# --- BEGIN copy of diffusion4k.py: pipeline ---
TEXT_SOURCES = {"flux": "black-forest-labs/FLUX.1-dev",  # text encoders of single transformer files
                "sd3": "stabilityai/stable-diffusion-3-medium-diffusers"}

@dataclass
class Pipeline:
    kind: str  # "flux" or "sd3"
    transformer: nn.Module
    vae: AutoEncoder
    text_encoders: dict  # name -> encoder, on the CPU but while encoding
    tokenizers: dict
    device: torch.device
    dtype: torch.dtype
    source: str
    offload: str = "none"  # "none", "model" (components take turns on the GPU) or "blocks" (too)

    @property
    def schnell(self) -> bool:
        return self.kind == "flux" and not self.transformer.config.guidance_embed

    @property
    def size_multiple(self) -> int:
        return self.vae.config.downsample_factor * 2

def load_text_encoders(kind, source, dtype, transformer, token=None, encoder_file=None):
    """Text encoders and tokenizers of a diffusers folder or Hub repo (SD3's: or `encoder_file`)."""
    text_dtype = torch.float32 if dtype == torch.float16 else dtype  # T5 overflows in fp16
    t5_length = 512 if kind == "flux" and transformer.config.guidance_embed else 256  # schnell: 256
    labels = ({"clip_l": "CLIP", "t5": "T5"} if kind == "flux"  # name -> tokenizer label
              else {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5"})
    suffixes = dict(zip(labels, ("", "_2", "_3")))  # of diffusers' subfolders
    tokenizers, encoders = {}, {}
    for name, suffix in suffixes.items():
        files = component_path(source, f"tokenizer{suffix}", token, ("*.json", "*.txt", "*.model"))
        tokenizers[name] = (T5Tokenizer(files, t5_length) if name == "t5"
                            else CLIPTokenizer(files, name=labels[name]))
    for name, suffix in suffixes.items():
        load = load_t5 if name == "t5" else load_clip
        if encoder_file is None or kind == "flux":
            encoders[name] = load(source, text_dtype, subfolder=f"text_encoder{suffix}")
        else:  # Stability's names
            prefix = f"text_encoders.{'t5xxl' if name == 't5' else name}.transformer."
            encoders[name] = load(encoder_file, text_dtype, prefix=prefix)
    return encoders, tokenizers

@torch.no_grad()
def encode_prompts(pipe: Pipeline, prompts: list[str]) -> list[dict]:
    """Each prompt's conditioning on the CPU: Flux {txt, y}; SD3 {context, pooled}."""
    gpu, features = pipe.device, {}
    for name, encoder in pipe.text_encoders.items():
        with on_device(encoder, gpu, "cpu"):
            features[name] = encoder(pipe.tokenizers[name](prompts).to(gpu))
    t5, clip_l, clip_g = features["t5"], features["clip_l"], features.get("clip_g")
    if pipe.kind == "flux":
        cond = {"txt": t5, "y": clip_l.pooled}
    else:
        clip = torch.cat([clip_l.penultimate, clip_g.penultimate], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # 2048 features -> 4096
        cond = {"context": torch.cat([clip, t5], dim=1),
                "pooled": torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=-1)}
    return [{k: v[i : i + 1].cpu() for k, v in cond.items()} for i in range(len(prompts))]

@contextlib.contextmanager
def on_device(module: nn.Module, device, rest_device):
    """Run a module on `device`, its weights resting on `rest_device`, dropping the device copy."""
    module.to(rest_device)
    slots = weight_slots(module)
    resting = [held(slot) for slot in slots]
    place(slots, [t.to(device) for t in resting])
    try:
        yield module
    finally:
        place(slots, resting)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()

def weight_slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(owner, name) for owner in module.modules()
            for name, t in [*owner._parameters.items(), *owner._buffers.items()] if t is not None]

def held(slot: tuple[nn.Module, str]) -> torch.Tensor:
    owner, name = slot
    return owner._parameters.get(name, owner._buffers.get(name))

def place(slots: list, tensors: list):
    """Let the slots hold these tensors (frozen parameters stay parameters)."""
    for (owner, name), t in zip(slots, tensors):
        if name in owner._parameters and not isinstance(t, nn.Parameter):
            t = nn.Parameter(t, requires_grad=False)
        (owner._parameters if name in owner._parameters else owner._buffers)[name] = t
# --- END copy: pipeline ---

# --- BEGIN copy of diffusion4k.py: flow-matching schedule ---
def sd3_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """diffusers' SD3 schedule: `steps` levels from 1 to shift(1/1000), shifted again, then 0."""
    mu = math.log(shift)
    smallest = time_shift(torch.tensor([1e-3], dtype=torch.float64), mu).item()
    sigmas = time_shift(torch.linspace(1.0, smallest, steps, dtype=torch.float64), mu)
    return torch.cat([sigmas, sigmas.new_zeros(1)])

def time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Shift a schedule towards noise: sigma' = e^mu / (e^mu + 1/sigma - 1); SD3's shift s: ln s."""
    shifted = math.exp(mu) / (math.exp(mu) + 1 / sigmas.clamp_min(1e-12) - 1)
    return torch.where(sigmas > 0, shifted, 0.0)
# --- END copy: flow-matching schedule ---

# --- BEGIN copy of diffusion4k.py: tiled VAE ---
def tiled_vae(fn, x: torch.Tensor, tile: int, overlap: int, device, dtype) -> torch.Tensor:
    """fn (VAE encode or decode) of x (1, C, H, W) in overlapping tiles blended by ramps; fp32."""
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x.to(device, dtype)).float()
    th, tw, stride = min(tile, height), min(tile, width), tile - overlap
    out = weight = None
    for top in _window_starts(height, th, stride):
        for left in _window_starts(width, tw, stride):
            y = fn(x[..., top : top + th, left : left + tw].to(device, dtype)).float()
            ratio = y.shape[-1] / tw  # 8 for decoding, 1/8 for encoding
            if out is None:
                weight = y.new_zeros(round(height * ratio), round(width * ratio))
                out = y.new_zeros(1, y.shape[1], *weight.shape)
            fade = round(overlap * ratio)
            wy = blend_window(y.shape[-2], fade * (top > 0), fade * (top + th < height))
            wx = blend_window(y.shape[-1], fade * (left > 0), fade * (left + tw < width))
            w = torch.outer(wy, wx).to(y)
            oy, ox = round(top * ratio), round(left * ratio)
            rows, cols = slice(oy, oy + y.shape[-2]), slice(ox, ox + y.shape[-1])
            out[..., rows, cols] += y * w
            weight[rows, cols] += w
    return out / weight

def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts every `stride`, and one flush with the end."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts

def blend_window(size: int, fade_start: int, fade_end: int) -> torch.Tensor:
    """1-D tile weights: linear ramps over the first `fade_start` and last `fade_end` samples."""
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    weights = torch.ones(size, dtype=torch.float64)
    for fade, distance in ((fade_start, centres), (fade_end, size - centres)):
        if fade:
            weights = torch.minimum(weights, distance / fade)
    return weights
# --- END copy: tiled VAE ---


# ==== weight loading

# --- BEGIN copy of diffusion4k.py: weight loading ---
def to_original_layout(state: dict, table: dict, what: str) -> dict:
    """diffusers tensors -> original keys by a table {original: ([folder keys], transform)}."""
    state, out, missing, wrong = dict(state), {}, [], []
    for original, (parts, transform) in table.items():
        if absent := [part for part in parts if part not in state]:
            missing += absent
            continue
        tensors = [state.pop(part) for part in parts]
        if len({t.shape[1:] for t in tensors}) > 1:
            wrong += [f"{part} {tuple(t.shape)}" for part, t in zip(parts, tensors)]
            continue
        fused = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        out[original] = TRANSFORMS[transform][0](fused)
    report = mismatch_report({"missing": missing, "unexpected": list(state), "mismatched": wrong})
    if report:
        raise ValueError(f"{what}: not a checkpoint of this model: {report}")
    return out

def key_table(rows) -> dict:
    """Table rows (weight and bias) of layers (original, folder or [folders][, transform])."""
    table = {}
    for original, folder, *transform in rows:
        folders = [folder] if isinstance(folder, str) else folder
        transform = transform[0] if transform else None
        for p in ("weight", "bias"):
            table[f"{original}.{p}"] = ([f"{f}.{p}" for f in folders], transform)
    return table

def swap_halves(t):
    """BFL/SAI store final adaLN outputs as (shift, scale), diffusers as (scale, shift)."""
    return torch.cat(t.chunk(2)[::-1])

TRANSFORMS = {  # (folder -> original, original -> folder)
    None: (lambda t: t, lambda t: t),
    "swap": (swap_halves, swap_halves),
    "conv1x1": (lambda t: t[..., None, None] if t.ndim == 2 else t,
                lambda t: t.flatten(1) if t.ndim == 4 else t),
}
# --- END copy: weight loading ---


# ==== command line

def main(argv=None):
    args = parser().parse_args(argv)
    # Every check that can fail comes before the weights are read.
    if args.prompt and not args.prompt.strip():
        raise UserError("--prompt is blank: give the global prompt (or leave the option out)")
    input_size = image_size(args.input)  # from the header: absurd targets go before decoding
    output, record_path = check_outputs(args)
    config = config_from(args)
    try:
        sigmas = start_sigmas(config.strength, config.num_steps, config.shift, config.noise_level)
    except ValueError:
        raise UserError(f"--strength {args.strength:g} of --steps {args.steps} leaves no step to "
                        f"take (--noise-level {args.noise_level})") from None
    steps, start_sigma = len(sigmas) - 1, sigmas[0].item()
    target_size(*input_size, args.scale, 2)  # before the model is looked up
    image = load_image(args.input)
    if not args.prompt:
        print("note: no --prompt; C-Upscale's priors need one (the paper always gives one): using "
              "the empty prompt", file=sys.stderr)
    geometry = model_geometry(args.model, args.token)
    config.vae_scale, patch, table = geometry
    check_regions(config, table, patch)
    width, height = target_size(*image.size, args.scale, config.vae_scale * patch)
    regions = plan_regions(height // config.vae_scale, width // config.vae_scale, config.region,
                           config.stride)
    region_prompts = regional_prompts(args, config, regions, image, (width, height))
    config.rsp = region_prompts is not None

    pipe = load_sd3_pipeline(args.model, args.device, DTYPES.get(args.dtype), args.offload,
                             args.token)
    if args.compile:
        compile_blocks(pipe.transformer)
    loaded = (pipe.vae.config.downsample_factor, pipe.transformer.config.patch_size,
              pipe.transformer.config.pos_embed_max_size)
    if loaded != geometry:
        raise UserError(f"{args.model}: its config files (VAE factor, patch, position table "
                        f"{geometry}) disagree with its weights {loaded}")
    conditions = encode_conditions(pipe, args.prompt, args.negative_prompt, region_prompts)
    batches = math.ceil(len(regions) / config.region_batch)
    switches = ", ".join(f"{p.upper()} {'on' if getattr(config, p) else 'off'}" for p in PRIORS)
    print(f"upscaling {image.width}x{image.height} -> {width}x{height}: {len(regions)} regions x "
          f"{steps} steps from sigma {start_sigma:.3f} ({args.noise_level}; {switches})",
          file=sys.stderr)
    started = time.perf_counter()
    progress = progress_bar(f"denoising ({steps} steps x {batches} region batches)")
    hr = upscale(pipe, image, width, height, conditions, config, args.seed, progress)
    settings = dict(input=str(args.input), input_size=list(image.size), width=width,
                    height=height, steps_run=steps, start_sigma=round(start_sigma, 6),
                    gsp=config.gsp, rap=config.rap, rsp=config.rsp, regions=len(regions),
                    dtype=str(pipe.dtype))
    record = [{"key": r.key, "box": r.box(config.vae_scale),
               "prompt": (region_prompts or {}).get(r.key)} for r in regions]
    write_outputs(args, (output, record_path), tensor_to_image(hr), settings, record)
    print(f"wrote {output} and {record_path.name} ({width}x{height}, "
          f"{time.perf_counter() - started:.1f} s)", file=sys.stderr)

def config_from(args) -> CUpscaleConfig:
    on = args.mode != "multidiffusion"  # the baseline: every prior off
    same = ("strength", "noise_level", "guidance", "gsp_step_size", "gsp_schedule",
            "gsp_normalisation", "region_batch")  # named alike in the config and the options
    return CUpscaleConfig(
        region_px=args.region_size, overlap_px=args.region_overlap, num_steps=args.steps,
        vae_tile_px=args.vae_tile, vae_overlap_px=args.vae_overlap,
        **{p: on and not getattr(args, f"no_{p}") for p in PRIORS},
        **{key: getattr(args, key) for key in same})

def check_outputs(args) -> tuple[Path, Path]:
    """OUTPUT and OUTPUT.regions.json, each apart from every input."""
    output = check_output_file(args.output, args.overwrite)
    record_path = output.with_suffix(".regions.json")
    if record_path.is_dir():
        raise UserError(f"{record_path} is a folder, where the regions of --output {output} go; "
                        "choose another --output")
    check_output_file(record_path, args.overwrite, suffixes=None)
    inputs = [("--input", args.input), ("--model", args.model),
              ("--region-prompts", args.region_prompts)]
    check_apart([("--output", output), ("--output", record_path)], inputs)
    return output, record_path

def write_outputs(args, paths: tuple[Path, Path], picture: Image.Image, run: dict, regions: list):
    """The image, with the settings as metadata, and its sidecar of regions: both or neither."""
    given = ("model", "scale", "steps", "strength", "noise_level", "guidance", "seed",
             "negative_prompt", "mode", "gsp_step_size", "gsp_schedule", "gsp_normalisation",
             "region_size", "region_overlap")
    settings = {key: getattr(args, key) for key in given} | run
    metadata = {"prompt": args.prompt, "seed": args.seed, "settings": json.dumps(settings)}
    record = {"prompt": args.prompt, "rsp": run["rsp"], "regions": regions}
    with atomic_files(paths, args.overwrite) as (image_file, record_file):
        write_image(picture, image_file, paths[0].suffix, metadata)
        record_file.write_text(json.dumps(record, indent=1), encoding="utf-8")

def parser() -> ArgumentParser:
    default = CUpscaleConfig()
    parser = ArgumentParser(prog="cupscale.py", description="C-Upscale: creative, tuning-free "
                            "upscaling with SD3-Medium and global-regional priors.")
    add = parser.add_argument
    add("--input", required=True, help="the low-resolution image")
    add("--output", default="cupscale.png", help="the image (a .png keeps the settings); regions "
        "and prompts go to OUTPUT.regions.json")
    add("--overwrite", action="store_true", help="replace existing outputs")
    add("--prompt", default="", help="the global prompt (the method needs one)")
    add("--negative-prompt", default="")
    add("--scale", type=number(1, MAX_SCALE), default=4.0, help="upscaling factor (4: 1K -> 4K)")
    add("--model", default=TEXT_SOURCES["sd3"],
        help="SD3-Medium: Hub repo, diffusers folder, or single file with text encoders")
    add("--steps", type=integer(1, SD3_TRAIN_STEPS), default=default.num_steps,
        help="SD3's full schedule, of which the --strength share runs (28 -> 13)")
    add("--strength", type=number(0, 1), default=default.strength, help="noise level (paper: 0.45)")
    add("--noise-level", choices=NOISE_LEVELS, default=default.noise_level,
        help="how --strength reads on SD3: sigma 0.707 as diffusers' img2img, SDXL's SNR (0.578) "
        "or sigma = strength")
    add("--guidance", type=number(0, 100), default=default.guidance, help="CFG scale")
    add("--seed", type=SEED, default=0)
    add("--region-size", type=integer(1), default=default.region_px, help="region side (px)")
    add("--region-overlap", type=integer(0), default=default.overlap_px, help="in px")
    add("--region-batch", type=integer(1), default=default.region_batch,
        help="regions per model call")
    rsp = parser.add_mutually_exclusive_group()
    rsp.add_argument("--region-prompts", help='RSP: JSON {"row,col": prompt}, one per region')
    rsp.add_argument("--caption-cmd", help="RSP: a command run per region (no shell), {image} "
                     "the region's crop (PNG), {prompt} the global prompt; it prints the prompt")
    add("--caption-failure", choices=["stop", "rsp-off"], default="stop",
        help="when a caption command fails: stop, or go on with RSP off")
    for prior, name in PRIORS.items():
        add(f"--no-{prior}", action="store_true", help=f"ablation: no {name} prior")
    add("--mode", choices=["cupscale", "multidiffusion"], default="cupscale",
        help="multidiffusion: the baseline, no prior")
    add("--gsp-step-size", type=number(0, 1), default=default.gsp_step_size,
        help="GSP's lambda (0.2): the low-band gap's share closed per step")
    add("--gsp-schedule", choices=GSP_SCHEDULES, default=default.gsp_schedule,
        help="lambda over the steps (the paper: cosine; the others: its ablation)")
    add("--gsp-normalisation", choices=GSP_NORMALISATIONS, default=default.gsp_normalisation,
        help="the reading of Eq. 4's 'MSE': sum, mean or sdxl (lambda / alpha_bar)")
    add("--vae-tile", type=integer(1), default=default.vae_tile_px, help="VAE tile side (px)")
    add("--vae-overlap", type=integer(0), default=default.vae_overlap_px, help="in px")
    add("--device", type=device_name, help="cuda (default when available), cuda:N or cpu")
    add("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    add("--offload", choices=["none", "model"], default="none",
        help="model: MMDiT and VAE wait on the CPU between uses")
    add("--compile", action="store_true", help="torch.compile the MMDiT blocks (RAP stays eager)")
    add("--token", help="Hugging Face token (default: HF_TOKEN or huggingface-cli login)")
    return parser


# ==== command line: regional prompts (RSP's files and captions)

def regional_prompts(args, config: CUpscaleConfig, regions: list[Region], image, size):
    """RSP's prompt per region key, or None (RSP off), said in one line before any slow work.
    Captions come before the weights are read (a local captioner has the GPU)."""
    rsp = "RSP (regional semantic prior)"
    if not config.rsp:
        reason = "--no-rsp" if args.mode != "multidiffusion" else "--mode multidiffusion"
        print(f"{rsp} off: {reason}", file=sys.stderr)
        return None
    if args.region_prompts:
        prompts = load_region_prompts(args.region_prompts, regions)
        print(f"{rsp} on: {len(regions)} regional prompts from {args.region_prompts}",
              file=sys.stderr)
        return prompts
    if args.caption_cmd:
        print(f"{rsp} on: captioning {len(regions)} regions with --caption-cmd", file=sys.stderr)
        return caption_regions(image.resize(size, Image.BICUBIC), regions, args.caption_cmd,
                               args.prompt, config.vae_scale, config.caption_timeout_s,
                               args.caption_failure == "rsp-off")
    print(f"{rsp} off: no --region-prompts or --caption-cmd (the paper captions each region with "
          "LLaVA-1.6; pass one to turn it on)", file=sys.stderr)
    return None

def load_region_prompts(path, regions: list[Region]) -> dict[str, str]:
    return parse_region_prompts(read_json(path), regions, source=str(path))

def parse_region_prompts(data, regions: list[Region], source="region prompts") -> dict[str, str]:
    """Check a {"row,col": prompt} mapping (from 0 at the top left) against the regions: one
    non-empty string per region, any other entry named in one line. Keys come back normalised."""
    rows, cols = regions[-1].row + 1, regions[-1].col + 1
    grid = (f"expected one entry per region, keys 'row,col' with row 0..{rows - 1} "
            f"and col 0..{cols - 1}")
    if not isinstance(data, dict):
        raise UserError(f"{source}: a JSON object is needed, {grid}")
    expected = {region.key for region in regions}
    prompts, unknown, not_text, repeated = {}, [], [], []
    for key, prompt in data.items():
        normalised = str(key).replace(" ", "")
        if normalised not in expected:
            unknown.append(str(key))
        elif normalised in prompts:  # "0,1" and "0, 1" in one file
            repeated.append(str(key))
        elif not isinstance(prompt, str) or not prompt.strip():
            not_text.append(str(key))
        else:
            prompts[normalised] = prompt.strip()
    missing = [r.key for r in regions if r.key not in prompts and r.key not in not_text]
    named = (("unknown regions", unknown), ("missing regions", missing),
             ("empty or not text", not_text), ("given twice", repeated))
    problems = [f"{label} {_describe_keys(keys)}" for label, keys in named if keys]
    if problems:
        raise UserError(f"{source} does not match the {rows}x{cols} regions: "
                        f"{'; '.join(problems)} ({grid})")
    return prompts

def _describe_keys(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more

def caption_regions(image: Image.Image, regions: list[Region], command: str, global_prompt: str,
                    vae_scale: int, timeout_s: float, rsp_off_on_failure=False) -> dict | None:
    """Regional prompts from `command` (split like a shell line, {image} and {prompt} filled in),
    run per region as the paper's LLaVA-1.6 captions each crop given the global prompt. A failure
    stops the run or, with `rsp_off_on_failure`, turns RSP off (None)."""
    try:
        template = shlex.split(command)
    except ValueError as error:  # an unclosed quote or a trailing backslash
        raise UserError(f"--caption-cmd cannot be split into arguments ({error}): "
                        f"{command}") from None
    if not any("{image}" in argument for argument in template):
        raise UserError(f"--caption-cmd must contain the placeholder {{image}}: {command}")
    prompts = {}
    with tempfile.TemporaryDirectory(prefix="cupscale-regions-") as folder:
        for region in regions:
            crop_path = Path(folder) / f"region_{region.row}_{region.col}.png"
            image.crop(region.box(vae_scale)).save(crop_path)
            arguments = [a.replace("{image}", str(crop_path)).replace("{prompt}", global_prompt)
                         for a in template]
            try:
                prompts[region.key] = _run_caption_command(arguments, timeout_s)
            except UserError as error:
                if not rsp_off_on_failure:
                    raise UserError(f"region {region.key}: {error}") from None
                warn(f"region {region.key}: {error}; RSP (regional semantic prior) off "
                     "(--caption-failure rsp-off)")
                return None
    return prompts

def _run_caption_command(command: list[str], timeout_s: float) -> str:
    """One caption command's standard output as one line, or a UserError naming it. The output
    goes to files: a pipe would stay open while a child left in the background lives."""
    shown = shlex.join(command)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                       start_new_session=True)
        except FileNotFoundError:
            raise UserError(f"caption command not found: {command[0]}") from None
        except OSError as error:  # not executable, not a program, ...
            raise UserError(f"caption command cannot run: {command[0]}: "
                            f"{error.strerror or error}") from None
        try:
            code = process.wait(timeout_s)
        except BaseException as error:  # timeout, Ctrl-C, SIGTERM: none of the command outlives it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if isinstance(error, subprocess.TimeoutExpired):
                raise UserError(f"caption command timed out after {timeout_s:g} s: "
                                f"{shown}") from None
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        lines = stderr.decode(errors="replace").strip().splitlines() or ["no error output"]
        raise UserError(f"caption command failed with exit code {code}: {shown}: "
                        f"{lines[-1][:200]}")
    try:
        caption = " ".join(stdout.decode("utf-8").split())
    except UnicodeDecodeError as error:
        raise UserError(f"caption command printed non-UTF-8 bytes (at byte {error.start}): "
                        f"{shown}") from None
    if not caption:
        raise UserError(f"caption command printed nothing: {shown}")
    if not caption.isprintable():  # terminal escapes or binary output, not a prompt
        raise UserError(f"caption command printed control characters, not a prompt: {shown}")
    return caption


if __name__ == "__main__":
    sys.exit(run_cli(main, memory_hint="try --offload model or a smaller --vae-tile"))

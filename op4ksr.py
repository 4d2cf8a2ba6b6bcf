"""OP4KSR: One-Step Patch-Free 4K Super-Resolution with Periodic Artifact Suppression.

Deng, Yu, Chen, Shen, Zhang, Li, Yuan, Zhou and Yu, arXiv 2605.13457 (2026).

The LR image, resized (bicubic) to the target, is encoded by an F16 VAE encoder with a LoRA; its
latent z is taken as the noisy latent at a fixed sigma, Flux with a LoRA predicts the velocity once
over all 16,384 tokens of a 4096^2 image, and the frozen F16 decoder decodes x0 = z - sigma v
(`sr_latent`). Two remedies suppress the periodic artifacts of one step at 4K. RoPE base-frequency
rescaling (RFR) lowers the RoPE base of the position axes from 10000 to 100, so that more frequency
pairs tell adjacent tokens apart (`rescale_rope_base`). The periodicity loss L_AP penalises, per
quadrant q and channel c, the power P_p at the lattice frequencies of the periods p of a latent
pixel and a token (16, 32 px) beyond the ground truth's (`lattice_power`), in units of the
variance V of the ground truth's pixel differences:

    L_AP = mean_{q,c,p} sum_{k,l} relu(P_p(x)_kl - P_p(x_hr)_kl) / V(x_hr)
    L    = ||x - x_hr||^2 + 2 LPIPS(x, x_hr) + lambda_AP L_AP,   lambda_AP = 1        (`sr_loss`)

The LoRAs train on (HR, LR) pairs made by Real-ESRGAN's degradation. The paper publishes no code,
weights, loss weights or sigma: sigma, the LoRA targets and the guidance input follow OMGSR-F, which
OP4KSR builds on, the fixed prompt S3Diff's, the LPIPS-to-MSE ratio OSEDiff's. OMGSR-F's public
LoRAs also run here, patch-free or by OMGSR-F's own tiled inference (--recipe omgsr-f).

Commands
    python op4ksr.py --input lr.png --weights op4ksr.safetensors       # 4x, writes lr_op4ksr.png
    python op4ksr.py --input lr.png --weights omgsr-f-1024-adapter/ [--recipe omgsr-f]
    torchrun --nproc_per_node 8 op4ksr.py train --data hr4k/ --output runs/op4ksr
    python op4ksr.py calibrate-sigma --data hr4k/

After the method come the models (diffusion4k.py's kits), the pipeline with OMGSR-F's own tiled
inference, training with its Real-ESRGAN data, weight loading and, last, the command line.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import astuple, dataclass, field, fields, replace
from io import BytesIO
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from torch.utils.checkpoint import checkpoint

from common.attention import attention
from common.io import (
    DTYPES,
    IMAGE_SUFFIXES,
    SEED,
    ArgumentParser,
    UserError,
    assign_state_dict,
    atomic_write,
    build,
    check_apart,
    check_output_file,
    check_regular_file,
    check_train_output,
    check_weights,
    component_path,
    count_blocks,
    device_dtype,
    device_name,
    first_keys,
    folder_config,
    folder_lock,
    image_size,
    image_to_tensor,
    integer,
    is_count,
    is_number,
    latest_checkpoint,
    load_image,
    load_safetensors,
    loads_unique,
    mismatch_report,
    number,
    os_error_text,
    positive,
    progress_bar,
    read_component,
    read_json,
    read_prefixed,
    read_text,
    resolve_source,
    run_cli,
    safetensors_metadata,
    save_image,
    save_torch,
    shape_mismatch,
    source_name,
    tensor_to_image,
    undone_on_failure,
    verify_image,
    warn,
)

DEFAULT_FLUX = "black-forest-labs/FLUX.1-dev"
DEFAULT_VAE = "Owen777/UltraFlux-v1"  # its vae/: Flux's VAE retrained as F16
DEFAULT_PROMPT = ("A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, "
                  "and natural lighting.")  # S3Diff's positive prompt
OMGSR_STEPS, OMGSR_MU, OMGSR_MID_TIMESTEP = 999, 1.15, 244  # OMGSR-F's schedule
MAX_SIDE = 8192  # 65,536 F16 tokens, far beyond the training sizes

@dataclass
class LossWeights:
    """The training loss terms' weights; 0 switches a term off."""
    pixel_mse: float = 1.0
    pixel_l1: float = 0.0
    latent_mse: float = 0.0
    perceptual: float = 2.0  # LPIPS on crops
    periodicity: float = 1.0  # lambda_AP


# ==== the method: one step at 4K

def sr_latent(transformer: Flux, vae: AutoEncoder, image: torch.Tensor, condition: dict,
              sigma: float, guidance=None) -> torch.Tensor:
    """The one step: the LR input resized to the target (B, 3, H, W) in [-1, 1] -> x0's latent.
    z = E(image) is the noisy latent at `sigma` (no noise added, as OMGSR-F)."""
    z = vae.encode(image)
    return z - sigma * transformer.velocity(z, sigma, condition, guidance)

RFR_THETA = 100.0

def rescale_rope_base(transformer: Flux, theta: float = RFR_THETA) -> Flux:
    """RFR: the same weights, the position axes' RoPE base (Flux's forward reads config.theta)
    lowered from 10000 so adjacent tokens at 4K differ more per frequency pair: 15 of 28 turn by
    >= 5 degrees per token at theta 100, 8 at 10000 (`rope_phase_steps`)."""
    transformer.config = replace(transformer.config, theta=theta)
    return transformer

def rope_phase_steps(theta: float, dim: int = 56) -> torch.Tensor:
    """RFR's Fig. 5: the degrees each frequency pair of a RoPE position axis turns per token."""
    return torch.rad2deg(rope_frequencies(dim, theta))

def omgsr_sigmas(steps: int = OMGSR_STEPS, mu: float = OMGSR_MU) -> torch.Tensor:
    """sigma_t = e^mu / (e^mu + steps / t - 1), t = 0..steps: OMGSR-F's schedule, Flux's shifted
    with the mu of a 1024^2 image at every size."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    return math.exp(mu) / (math.exp(mu) + 1 / t - 1)

OMGSR_SIGMA = float(omgsr_sigmas()[OMGSR_MID_TIMESTEP])  # 0.505: OMGSR-F's SNR-matched t = 244

def matched_sigma(pairs, update=None) -> tuple[int, float]:
    """OMGSR's mid-timestep calibration over batches (HR latents, LR latents): (t, sigma_t) of the
    timestep giving the noisy HR latent the LR latent's SNR. With P = mean(hr^2) and D = mean((lr -
    hr)^2), the LR latent has SNR P / D, the noisy one P (1 - sigma)^2 / sigma^2; the t minimising
    the sum over batches of their |differences| wins."""
    sigmas = omgsr_sigmas()[1:]  # t = 0 has sigma 0: infinite SNR
    total, done = torch.zeros_like(sigmas), 0
    for hr, lr in pairs:
        power = hr.double().pow(2).mean().cpu()
        distortion = (lr.double() - hr.double()).pow(2).mean().cpu()
        total += (power * (1 - sigmas) ** 2 / sigmas**2 - power / distortion).abs()
        done += len(hr)
        best = int(total.argmin())
        if update is not None:
            update(done, postfix={"t": best + 1, "sigma": f"{float(sigmas[best]):.4f}"})
    if not done:
        raise ValueError("matched_sigma needs at least one (HR, LR) batch")
    return best + 1, float(sigmas[best])


# ==== the method: the training loss and L_AP

def sr_loss(pred, target, weights: LossWeights, perceptual=None, pred_latent=None,
            target_latent=None, periods=(16, 32)):
    """(weighted sum, {term: detached value}) of the terms with a non-zero weight."""
    if weights.perceptual and perceptual is None:
        raise ValueError("weights.perceptual > 0 needs a perceptual(pred, target) callable")
    terms = {"pixel_mse": lambda: F.mse_loss(pred, target),
             **alternative_terms(pred, target, weights, pred_latent, target_latent),
             "perceptual": lambda: perceptual(pred, target),
             "periodicity": lambda: periodicity_loss(pred, target, periods)}
    parts = {name: term() for name, term in terms.items() if getattr(weights, name)}
    total = sum(getattr(weights, name) * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}

# --- BEGIN kit: periodicity loss ---
VARIANCE_FLOOR = 1e-5  # about the variance of 8-bit quantisation in [-1, 1]: flat quadrants ~0

def periodicity_loss(pred, target=None, periods=(16, 32), quadrants: int = 4) -> torch.Tensor:
    """L_AP of images (B, C, H, W) in [-1, 1]. Only lattice power above the ground truth's counts,
    so real periodic texture (fabric, tiles) keeps its strength. Without `target` all of it counts,
    in units of pred's own variance."""
    power, variance = lattice_power(pred, periods, quadrants)
    if target is not None:
        with torch.no_grad():
            target_power, variance = lattice_power(target, periods, quadrants)
        power = F.relu(power - target_power)
    return (power / (variance.detach() + VARIANCE_FLOOR)).sum(dim=-1).mean() / len(periods)

def lattice_power(image: torch.Tensor, periods=(16, 32), quadrants: int = 4):
    """Power (B, Q, C, bins) of each quadrant's pixel differences at the lattice frequencies
    (ky / p, kx / p) of each period p, and their variance (B, Q, C, 1), L_AP's unit.

    The paper penalises the periodic peaks of each quadrant's autocorrelation, at the lattice lags
    (k p, l p). Their Fourier dual is the lattice frequencies: by Wiener-Khinchin the power there is
    the transform of the autocovariance summed over every lattice lag, the power of all that
    repeats with period p: the FFT of the quadrant folded onto one period (the mean of its p x p
    tiles), whose gradient moves only what repeats (the autocovariance at a few lags would also
    fall by decorrelating the repeats). Differences weight frequency f by 2 (sin^2(pi fy) +
    sin^2(pi fx)), flattening natural images' ~1/f spectrum so that a grid's high harmonics count,
    and giving (0, 0) weight 0."""
    tiles = split_into_quadrants(image, quadrants).float()
    h, w = tiles.shape[-2:]
    smallest = max(5 * p // 2 for p in periods) + 1  # quadrants hold lags of 2.5 periods each way
    if min(h, w) <= smallest:
        raise ValueError(f"lattice lags up to {smallest - 1} px need quadrants larger than "
                         f"{smallest} px, got {h}x{w}")
    horizontal = tiles[..., 1:, 1:] - tiles[..., 1:, :-1]
    vertical = tiles[..., 1:, 1:] - tiles[..., :-1, 1:]
    variance = torch.stack([horizontal, vertical]).var(dim=(-2, -1), unbiased=False).mean(dim=0)
    powers = []
    for p in periods:
        n, m = h // p, w // p
        tile = tiles[..., : n * p, : m * p].reshape(*tiles.shape[:-2], n, p, m, p)
        spectrum = torch.fft.fft2(tile.mean(dim=(-4, -2)), norm="forward")  # bin k: frequency k / p
        sin2 = torch.sin(torch.pi * torch.fft.fftfreq(p, device=image.device)).square()
        weight = 2 * (sin2[:, None] + sin2[None, :])
        powers.append(((spectrum.real.square() + spectrum.imag.square()) * weight).flatten(-2))
    return torch.cat(powers, dim=-1), variance[..., None]

def split_into_quadrants(image: torch.Tensor, quadrants: int = 4) -> torch.Tensor:
    """(B, C, H, W) -> (B, Q, C, H/side, W/side) with Q = side^2; an odd remainder is dropped."""
    side = math.isqrt(quadrants)
    if side * side != quadrants:
        raise ValueError(f"quadrants must be a square number (1, 4, 9, ...), got {quadrants}")
    b, c, height, width = image.shape
    h, w = height // side, width // side
    tiles = image[..., : side * h, : side * w].reshape(b, c, side, h, side, w)
    return tiles.permute(0, 2, 4, 1, 3, 5).reshape(b, quadrants, c, h, w)
# --- END kit: periodicity loss ---


# ==== the method: LoRAs on Flux and the F16 encoder

# OMGSR-F's peft target lists (diffusers names), found in our models through the loaders' key tables
OMGSR_F_FLUX_TARGETS = ("x_embedder", "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
OMGSR_F_VAE_TARGETS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out",
                       "to_k", "to_q", "to_v", "to_out.0")

def add_flux_lora(model: Flux, rank: int, alpha: float | None = None, seed: int = 0) -> Flux:
    """Freeze Flux and wrap OMGSR-F's targets with SplitLoRALinear (alpha: the rank)."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, parts in flux_lora_targets(model.config).items():
        base = model.get_submodule(name)
        rows = model.config.hidden_size if parts > 1 else base.out_features
        lora = SplitLoRALinear(base, parts, rows, rank, alpha or rank, generator)
        model.set_submodule(name, lora)
    return model

def flux_lora_targets(config: FluxConfig) -> dict[str, int]:
    """Our Flux linears that OMGSR-F's list selects, with how many leading row blocks (qkv: 3)."""
    targets = {}
    for key, (parts, _) in flux_table(config).items():
        chosen = [peft_selects(p.removesuffix(".weight"), OMGSR_F_FLUX_TARGETS) for p in parts]
        if key.endswith(".weight") and any(chosen):
            count = sum(chosen)
            assert chosen[:count] == [True] * count and (len(parts) == 1 or count > 1), key
            targets[key.removesuffix(".weight")] = count
    return targets

def peft_selects(module: str, targets) -> bool:
    return any(module == target or module.endswith("." + target) for target in targets)

class SplitLoRALinear(nn.Module):
    """LoRA on the first `parts` blocks of `rows` rows of a frozen linear, as peft's on separate q,
    k, v: y = W x + b + (alpha / r) [B_1 A_1 x, ..., B_n A_n x, 0]. peft's "gaussian" init
    (OMGSR-F's); fp32."""

    def __init__(self, base: nn.Linear, parts: int, rows: int, rank: int, alpha: float, generator):
        super().__init__()
        self.base, self.scale, device = base, alpha / rank, base.weight.device
        a = torch.randn(parts, rank, base.in_features, generator=generator) / rank
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(parts, rows, rank, device=device))

    def forward(self, x):
        down = F.linear(x, self.lora_A.flatten(0, 1).to(x.dtype)).chunk(len(self.lora_B), dim=-1)
        up = torch.cat([F.linear(d, b.to(x.dtype)) for d, b in zip(down, self.lora_B)], dim=-1)
        return self.base(x) + F.pad(up * self.scale, (0, self.base.out_features - up.shape[-1]))

def add_encoder_lora(vae: AutoEncoder, rank: int, alpha: float | None = None,
                     seed: int = 0) -> AutoEncoder:
    vae.encoder.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in encoder_lora_targets(vae):
        base = vae.encoder.get_submodule(name)
        vae.encoder.set_submodule(name, LoRAConv2d(base, rank, alpha or rank, generator))
    return vae

def encoder_lora_targets(vae: AutoEncoder) -> list[str]:
    """The encoder convs OMGSR-F's VAE list selects: all, the attention's 1x1 convs included."""
    return [key.removeprefix("encoder.").removesuffix(".weight")
            for key, ((part,), _) in vae_lora_table(vae).items()
            if peft_selects(part.removeprefix("encoder.").removesuffix(".weight"),
                            OMGSR_F_VAE_TARGETS)]

class LoRAConv2d(nn.Module):
    """peft's Conv2d LoRA: y = conv(x) + (alpha / r) B(A(x)), A a conv like the base's to r
    channels, B a 1x1 conv back. Init and dtype as SplitLoRALinear's."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError("LoRAConv2d supports plain convolutions only (groups 1, zero padding)")
        self.base, self.scale, device = base, alpha / rank, base.weight.device
        a = torch.randn(rank, base.in_channels, *base.kernel_size, generator=generator) / rank
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1, device=device))

    def forward(self, x):
        c = self.base
        down = F.conv2d(x, self.lora_A.to(x.dtype), None, c.stride, c.padding, c.dilation)
        return c(x) + F.conv2d(down, self.lora_B.to(x.dtype)) * self.scale


# ==== alternative readings and options

def alternative_terms(pred, target, weights: LossWeights, pred_latent, target_latent) -> dict:
    """Loss terms the paper does not name, off by default: pixel L1 (OMGSR-F's) and the MSE of x0's
    latent to the base encoder's HR latent."""
    if weights.latent_mse and (pred_latent is None or target_latent is None):
        raise ValueError("weights.latent_mse > 0 needs pred_latent and target_latent")
    return {"pixel_l1": lambda: F.l1_loss(pred, target),
            "latent_mse": lambda: F.mse_loss(pred_latent, target_latent)}

@contextlib.contextmanager
def lora_off(module: nn.Module):
    scales = {m: m.scale for m in module.modules() if isinstance(m, (LoRAConv2d, SplitLoRALinear))}
    for m in scales:
        m.scale = 0.0
    try:
        yield module
    finally:
        for m, scale in scales.items():
            m.scale = scale

# Colour fixes, off by default (the paper names none); --recipe omgsr-f uses OMGSR-F's AdaIN.

def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`image`'s detail bands over `reference`'s coarse band (colour, shading)."""
    if reference.shape[-2:] != image.shape[-2:]:
        reference = F.interpolate(reference, size=image.shape[-2:], mode="bicubic",
                                  align_corners=False)
    return image - wavelet_lowpass(image) + wavelet_lowpass(reference)

def wavelet_lowpass(image: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Coarsest band of an a-trous wavelet decomposition: binomial 3x3 blurs, dilation 2^level."""
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=image.dtype, device=image.device) / 4
    kernel = (taps[:, None] * taps[None, :]).expand(image.shape[1], 1, 3, 3)
    for level in range(levels):
        step = 2**level
        padded = F.pad(image, (step, step, step, step), mode="replicate")
        image = F.conv2d(padded, kernel, dilation=step, groups=image.shape[1])
    return image

def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    (mean, std), (ref_mean, ref_std) = channel_stats(image), channel_stats(reference)
    return (image - mean) / (std + 1e-6) * ref_std + ref_mean

def omgsr_adain(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """OMGSR-F's AdaIN: `adain_color_fix` with 1e-5 added to the variances."""
    (mean, std), (ref_mean, ref_std) = channel_stats(image, 1e-5), channel_stats(reference, 1e-5)
    return (image - mean) / std * ref_std + ref_mean

def channel_stats(x: torch.Tensor, eps: float = 0.0):
    """Each channel's mean and unbiased standard deviation sqrt(var + eps)."""
    dims = (-2, -1)
    return x.mean(dim=dims, keepdim=True), (x.var(dim=dims, keepdim=True) + eps).sqrt()


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

# --- BEGIN copy of diffusion4k.py: Flux transformer ---
@dataclass(frozen=True)
class FluxConfig:
    """Flux.1 transformer. Defaults: FLUX.1-dev."""

    in_channels: int = 64  # 16 latent channels x 2x2 packing
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    mlp_ratio: float = 4.0
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    axes_dim: tuple = (16, 56, 56)  # RoPE dims per position axis (unused, row, column)
    theta: float = 10000.0
    guidance_embed: bool = True  # dev: distilled guidance input; schnell: none

    def __post_init__(self):
        check_divisible(self.hidden_size, self.num_heads)
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {head_dim}")

FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance_embed=False)

class Flux(nn.Module):
    """Flux.1: double-stream blocks, then single-stream blocks over [text, image]; BFL's keys."""

    def __init__(self, config: FluxConfig = FLUX_DEV):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        block = (dim, config.num_heads, config.mlp_ratio)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(config.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if config.guidance_embed else None
        self.txt_in = nn.Linear(config.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(*block) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(*block) for _ in range(config.depth_single_blocks))
        self.final_layer = FinalLayer(dim, config.in_channels)
        self.gradient_checkpointing = False

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        """Packed latents img and T5 features txt with RoPE ids (B or 1, L, 3) -> velocity."""
        vec = self.time_in(timestep_embedding(timesteps * 1000).to(img.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this Flux model is guidance-distilled (dev): pass a guidance "
                                 "scale")
            vec = vec + self.guidance_in(timestep_embedding(guidance * 1000).to(img.dtype))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        ids = torch.cat([txt_ids, img_ids], dim=-2)
        ids = ids if ids.ndim == 3 else ids[None]
        rope = rope_table(ids, self.config.axes_dim, self.config.theta)
        for block in self.double_blocks:
            img, txt = run_checkpointed(self, block, img, txt, vec, rope)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = run_checkpointed(self, block, x, vec, rope)
        return self.final_layer(x[:, txt.shape[1] :], vec)

    def velocity(self, z, sigma, condition: dict, guidance=None):
        """Velocity of latents z (B, C, H, W) at sigma (float or (B,)) given {"txt", "y"}; sigma
        and guidance in z's dtype, as in diffusers."""
        b, _, h, w = z.shape
        txt, y = condition["txt"].expand(b, -1, -1), condition["y"].expand(b, -1)
        txt_ids = torch.zeros(1, txt.shape[1], 3, device=z.device)
        t, g = (None if s is None else torch.as_tensor(s, dtype=z.dtype, device=z.device).expand(b)
                for s in (sigma, guidance))
        v = self(pack_latents(z), latent_image_ids(h, w, z.device), txt, txt_ids, t, y, g)
        return unpack_latents(v, h, w)

class DoubleStreamBlock(nn.Module):
    """Text and image have their own weights but attend jointly."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp_hidden = int(dim * mlp_ratio)
        self.img_mod = Modulation(dim, double=True)
        self.img_norm1 = layer_norm(dim)
        self.img_attn = SelfAttention(dim, num_heads)
        self.img_norm2 = layer_norm(dim)
        self.img_mlp = feed_forward(dim, mlp_hidden)
        self.txt_mod = Modulation(dim, double=True)
        self.txt_norm1 = layer_norm(dim)
        self.txt_attn = SelfAttention(dim, num_heads)
        self.txt_norm2 = layer_norm(dim)
        self.txt_mlp = feed_forward(dim, mlp_hidden)

    def forward(self, img, txt, vec, rope):
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        img_qkv = self.img_attn.qkv_heads(modulate(self.img_norm1(img), *img_mod[:2]))
        txt_qkv = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), *txt_mod[:2]))
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(txt_qkv, img_qkv))  # text first
        attn = attention_with_rope(q, k, v, rope)
        n = txt.shape[1]
        img = residuals(img, attn[:, n:], img_mod, self.img_attn.proj, self.img_norm2, self.img_mlp)
        txt = residuals(txt, attn[:, :n], txt_mod, self.txt_attn.proj, self.txt_norm2, self.txt_mlp)
        return img, txt

class SingleStreamBlock(nn.Module):
    """One weight set over [text, image]: attention and MLP in parallel."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.pre_norm = layer_norm(dim)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x, vec, rope):
        shift, scale, gate = self.modulation(vec)
        fused = self.linear1(modulate(self.pre_norm(x), shift, scale))
        qkv, mlp = fused.split([x.shape[-1] * 3, self.mlp_hidden], -1)
        q, k, v = split_heads(qkv, self.num_heads)
        attn = attention_with_rope(self.norm.query_norm(q), self.norm.key_norm(k), v, rope)
        mlp = F.gelu(mlp, approximate="tanh")
        return x + gate[:, None] * self.linear2(torch.cat([attn, mlp], dim=-1))

class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        return self.norm.query_norm(q), self.norm.key_norm(k), v

class Modulation(nn.Module):
    """vec -> (shift, scale, gate), twice for double blocks."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.lin = nn.Linear(dim, (6 if double else 3) * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec)).chunk(self.lin.out_features // vec.shape[-1], dim=-1)

class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_normalize(x, 1e-6).type_as(x) * self.scale

class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))

def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    gelu = nn.GELU(approximate="tanh")
    return nn.Sequential(nn.Linear(dim, hidden), gelu, nn.Linear(hidden, dim))

def attention_with_rope(q, k, v, rope):
    return merge_heads(attention(apply_rope(q, rope), apply_rope(k, rope), v))

def rope_table(ids: torch.Tensor, axes_dim, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) (B, 1, L, head_dim/2) of positions ids (B, L, axes), each axis a slice of the
    head dim; angles in fp64, as fp32 loses the slow frequencies."""
    angles = torch.cat([ids[..., i, None].double() * rope_frequencies(dim, theta).to(ids.device)
                        for i, dim in enumerate(axes_dim)], dim=-1)
    return angles.cos().float()[:, None], angles.sin().float()[:, None]

def rope_frequencies(dim: int, theta: float) -> torch.Tensor:
    """One RoPE axis' rotation speeds theta^(-2j/dim)."""
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)

def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """Rotate pairs (x[2j], x[2j+1]) of x (B, H, L, D), in fp32."""
    cos, sin = rope
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2).type_as(x)

def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4) tokens of 2x2 patches."""
    return F.pixel_unshuffle(z, 2).flatten(2).transpose(1, 2).contiguous()

def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    grid = x.transpose(1, 2).unflatten(-1, (height // 2, width // 2))
    return F.pixel_shuffle(grid.contiguous(), 2)

def latent_image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """RoPE positions (0, row, col) of the packed tokens."""
    rows_cols = torch.cartesian_prod(torch.arange(height // 2), torch.arange(width // 2))
    return F.pad(rows_cols, (1, 0))[None].float().to(device)

def load_flux(source, dtype=torch.bfloat16, device="cpu", axes_dim=None, theta=10000.0,
              token=None) -> Flux:
    """A Flux transformer from a BFL file, a diffusers folder or a Hub repo id."""
    path = component_path(source, "transformer", token)
    state = read_component(path, dtype, device)
    if "double_blocks.0.img_attn.qkv.weight" not in state:
        if "transformer_blocks.0.attn.to_q.weight" not in state:
            raise ValueError(f"{source}: not a Flux transformer checkpoint (first keys: "
                             f"{first_keys(state)})")
        state = to_original_layout(state, flux_table_for(state), f"{source} (diffusers Flux)")
    return build(lambda: Flux(flux_config_from_state(state, folder_config(path), axes_dim, theta)),
                 state, f"{source} (Flux)", source)

def flux_config_from_state(state: dict, folder_config: dict | None = None, axes_dim=None,
                           theta=10000.0) -> FluxConfig:
    """Dimensions from the tensors; the RoPE split from `axes_dim` or config.json."""
    hidden, in_channels = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    axes_dim = axes_dim or (folder_config or {}).get("axes_dims_rope")
    if not axes_dim and head_dim != 128:  # the released models' split fits head dim 128 only
        raise ValueError(f"Flux checkpoint with head dim {head_dim}: pass the RoPE axes_dim "
                         "(it is not stored in the weights)")
    return FluxConfig(
        in_channels=in_channels, hidden_size=hidden,
        num_heads=hidden // head_dim, depth=count_blocks(state, r"double_blocks\.(\d+)\."),
        depth_single_blocks=count_blocks(state, r"single_blocks\.(\d+)\."),
        mlp_ratio=state["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
        vec_in_dim=state["vector_in.in_layer.weight"].shape[1],
        context_in_dim=state["txt_in.weight"].shape[1], theta=theta,
        axes_dim=tuple(axes_dim or FLUX_DEV.axes_dim),
        guidance_embed="guidance_in.in_layer.weight" in state)

def flux_table_for(state: dict) -> dict:
    return flux_key_table(count_blocks(state, r"transformer_blocks\.(\d+)\."),
                          count_blocks(state, r"single_transformer_blocks\.(\d+)\."),
                          "time_text_embed.guidance_embedder.linear_1.weight" in state)

def flux_key_table(depth: int, depth_single: int, guidance: bool) -> dict:
    """BFL key -> diffusers keys of a Flux with these blocks."""
    rows = [("img_in", "x_embedder"), ("txt_in", "context_embedder"),
            ("final_layer.linear", "proj_out"),
            ("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")]
    embedders = [("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance")]
    for o, folder in embedders[: 3 if guidance else 2]:
        f = f"time_text_embed.{folder}_embedder"
        rows += [(f"{o}.in_layer", f"{f}.linear_1"), (f"{o}.out_layer", f"{f}.linear_2")]
    norms = []  # (BFL, diffusers) QK norms, whose scales diffusers names weights
    # per stream: diffusers' suffix and names of q/k/v, output projection and QK norms
    streams = (("img", "", "to_{}", "to_out.0", "norm_{}"),
               ("txt", "_context", "add_{}_proj", "to_add_out", "norm_added_{}"))
    for i in range(depth):
        o, f = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for stream, suffix, qkv, out, norm in streams:
            s, a = f"{o}.{stream}", f"{f}.attn"
            rows += [(f"{s}_mod.lin", f"{f}.norm1{suffix}.linear"),
                     (f"{s}_attn.qkv", [f"{a}.{qkv.format(x)}" for x in "qkv"]),
                     (f"{s}_attn.proj", f"{a}.{out}"), (f"{s}_mlp.0", f"{f}.ff{suffix}.net.0.proj"),
                     (f"{s}_mlp.2", f"{f}.ff{suffix}.net.2")]
            norms.append((f"{s}_attn.norm", f"{a}.{norm}"))
    for i in range(depth_single):
        o, f = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        rows += [(f"{o}.linear1", [f"{f}.attn.to_{x}" for x in "qkv"] + [f"{f}.proj_mlp"]),
                 (f"{o}.linear2", f"{f}.proj_out"), (f"{o}.modulation.lin", f"{f}.norm.linear")]
        norms.append((f"{o}.norm", f"{f}.attn.norm_{{}}"))
    table = key_table(rows)
    for o, f in norms:
        table[f"{o}.query_norm.scale"] = ([f"{f.format('q')}.weight"], None)
        table[f"{o}.key_norm.scale"] = ([f"{f.format('k')}.weight"], None)
    return table
# --- END copy: Flux transformer ---


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

@dataclass
class SRPipeline:
    transformer: Flux
    vae: AutoEncoder
    txt: torch.Tensor
    y: torch.Tensor
    sigma: float
    guidance: float | None
    scale: float
    device: torch.device
    dtype: torch.dtype
    meta: dict

    @property
    def condition(self) -> dict:
        return {"txt": self.txt, "y": self.y}

def load_sr_pipeline(weights, flux=None, vae=None, device=None, dtype=None,
                     token=None) -> SRPipeline:
    """The checkpoint's bases with its LoRAs merged, RoPE base, sigma and prompt embeddings."""
    path, meta = read_op4ksr_metadata(weights, token)
    state = check_weights(load_safetensors(path, torch.float32), path)  # before the bases load
    c = json.loads(meta["flux_config"])
    for key, shape in (("prompt.txt", (1, "T", c.get("context_in_dim"))),
                       ("prompt.y", (1, c.get("vec_in_dim")))):
        found = tuple(state[key].shape) if key in state else None
        if found is None or len(found) != len(shape) or any(
                n not in ("T", m) for n, m in zip(shape, found)):
            shown = str(shape).replace("'", "")
            raise UserError(f"{path}: {key} is {'missing' if found is None else found}, the base "
                            f"Flux takes {shown}: a damaged file?")
    device, dtype = device_dtype(device, dtype)
    flux = flux or meta.get("base_flux", DEFAULT_FLUX)
    vae = vae or meta.get("base_vae", DEFAULT_VAE)
    transformer, autoencoder = load_bases(flux, vae, float(meta["theta"]), 2, device, dtype, token)
    check_base(meta, transformer, autoencoder, str(weights))
    loras = {k: v for k, v in state.items() if not k.startswith("prompt.")}
    merge_op4ksr_lora(loras, transformer, autoencoder, str(weights))
    guidance = float(meta["guidance"]) if transformer.config.guidance_embed else None
    txt, y = state["prompt.txt"].to(device, dtype), state["prompt.y"].to(device, dtype)
    return SRPipeline(transformer, autoencoder, txt, y, float(meta["sigma"]), guidance,
                      float(meta.get("scale", 4)), device, dtype, meta)

def load_bases(flux, vae, theta: float, stride: int, device, dtype, token):
    print(f"loading Flux from {flux} and the F{8 * stride} VAE from {vae}", file=sys.stderr)
    return (rescale_rope_base(load_flux(flux, dtype, device, token=token), theta),
            load_vae(vae, dtype, device, stride=stride, token=token))

@torch.inference_mode()
def super_resolve(pipe: SRPipeline, image: Image.Image, width: int, height: int,
                  color_fix: str = "none") -> torch.Tensor:
    """One LR image -> the (3, height, width) SR image in [-1, 1] on the CPU, in one pass."""
    lr = image_to_tensor(image)[None]
    up = F.interpolate(lr, size=(height, width), mode="bicubic", align_corners=False).clamp(-1, 1)
    token_px = 2 * pipe.vae.config.downsample_factor
    pad = (0, -width % token_px, 0, -height % token_px)
    up = F.pad(up, pad, mode="replicate").to(pipe.device, pipe.dtype)
    latent = sr_latent(pipe.transformer, pipe.vae, up, pipe.condition, pipe.sigma, pipe.guidance)
    out = pipe.vae.decode(latent)[..., :height, :width].float().cpu()
    fix = {"wavelet": wavelet_color_fix, "adain": adain_color_fix}.get(color_fix)
    return (fix(out, lr) if fix else out)[0].clamp(-1, 1)

# The checkpoint, one safetensors file: transformer.<diffusers module>.lora_A/B.weight (peft names,
# q/k/v split), vae.encoder.<diffusers module>.lora_A/B.weight (peft's Conv2d layout), the fixed
# prompt's prompt.txt (1, T, 4096) and prompt.y (1, 768), the LoRA scale folded into B; metadata:
# format, format_version, prompt, theta, flux_config / vae_config and train's settings. diffusers'
# `load_lora_adapter(state, prefix="transformer")` takes it as it is.
FORMAT_VERSION = 1
FLUX_CONFIG_KEYS = ("in_channels", "hidden_size", "num_heads", "depth", "depth_single_blocks",
                    "vec_in_dim", "context_in_dim", "guidance_embed")
VAE_CONFIG_KEYS = ("base_channels", "channel_multipliers", "num_res_blocks", "z_channels", "stride")
SETTING_RANGES = {"sigma": (0, 1), "theta": (0, math.inf), "scale": (0, math.inf),  # (low, high]
                  "guidance": (-math.inf, math.inf)}

def read_op4ksr_metadata(spec, token=None) -> tuple[Path, dict]:
    path = weight_file(spec, "--weights", token)
    meta = safetensors_metadata(path)
    if meta.get("format") != "op4ksr":
        raise UserError(f"{path}: not an OP4KSR checkpoint (no 'format: op4ksr' in its metadata)")
    version = meta.get("format_version", "0")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise UserError(f"{path}: OP4KSR format version {version} is not one this file reads "
                        f"(1 to {FORMAT_VERSION})")
    for key, (low, high) in SETTING_RANGES.items():
        if key not in meta and key != "scale":
            raise UserError(f"{path}: the OP4KSR metadata has no '{key}' (a damaged file?)")
        try:
            value = float(meta.get(key, 4))
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low < value <= high):
            raise UserError(f"{path}: the OP4KSR metadata has {key}={meta[key]!r}, "
                            f"not a number in ({low}, {high}]")
    for key in ("flux_config", "vae_config"):
        with contextlib.suppress(KeyError, ValueError):
            if isinstance(json.loads(meta[key]), dict):
                continue
        raise UserError(f"{path}: the OP4KSR metadata has no readable '{key}' (a damaged file?)")
    return path, meta

def check_base(meta: dict, transformer: Flux, vae: AutoEncoder, source: str):
    for what, ours, stored, base in (("Flux", transformer.config, "flux_config", "base_flux"),
                                     ("VAE", vae.config, "vae_config", "base_vae")):
        for key, value in json.loads(meta[stored]).items():
            mine = getattr(ours, key, None)
            if (list(mine) if isinstance(mine, tuple) else mine) != value:
                raise UserError(f"{source} was trained on the {what} {meta.get(base, '?')} with "
                                f"{key}={value}, but the {what} loaded has {key}={mine}: pass the "
                                "base it was trained on (--flux / --vae)")

def merge_op4ksr_lora(state: dict, transformer: Flux, vae: AutoEncoder, source: str):
    """Add every LoRA delta to the base weights, in place; a fused weight (qkv, linear1) takes each
    diffusers part's delta in its own rows."""
    c = transformer.config
    parts_of = {}  # diffusers module -> (model, our key, part index, part count, transform)
    for original, (parts, _) in flux_table(c).items():
        for i, part in enumerate(parts):
            module = "transformer." + part.removesuffix(".weight")
            parts_of[module] = (transformer, original, i, len(parts), None)
    for original, ((part,), transform) in vae_lora_table(vae).items():
        parts_of["vae." + part.removesuffix(".weight")] = (vae, original, 0, 1, transform)
    for name in sorted({k.rsplit(".lora_", 1)[0] for k in state}):
        a, b = state.get(f"{name}.lora_A.weight"), state.get(f"{name}.lora_B.weight")
        if a is None or b is None or name not in parts_of:
            raise UserError(f"{source}: LoRA {name} has no counterpart in this base model "
                            "(another model's?)")
        low_rank = a.ndim in (2, 4) and b.ndim == a.ndim and b.shape[2:] in ((), (1, 1))
        if not (low_rank and b.shape[1] == a.shape[0]):
            raise UserError(f"{source}: LoRA {name} has lora_A {tuple(a.shape)} and lora_B "
                            f"{tuple(b.shape)}, not a low-rank pair")
        model, original, i, n, transform = parts_of[name]
        weight = model.state_dict()[original]
        # B A, for linear and peft Conv2d (A: r x in x k x k, B: out x r x 1 x 1) LoRAs alike
        delta = (b.flatten(1).float() @ a.flatten(1).float()).view(b.shape[0], *a.shape[1:])
        delta = TRANSFORMS[transform][0](delta)
        rows = c.hidden_size if i < n - 1 else weight.shape[0] - c.hidden_size * (n - 1)
        first = c.hidden_size * i
        if delta.shape[0] != rows or delta.shape[1:] != weight.shape[1:]:
            raise UserError(f"{source}: LoRA {name} gives a {tuple(delta.shape)} update where "
                            f"{original} takes {(rows, *weight.shape[1:])}: another base model?")
        with torch.no_grad():
            weight[first : first + rows] += delta.to(weight.device, weight.dtype)

def flux_table(c: FluxConfig) -> dict:
    return flux_key_table(c.depth, c.depth_single_blocks, c.guidance_embed)

def vae_lora_table(vae: AutoEncoder) -> dict:
    table = vae_table_for({key.replace(".base.", "."): None for key in vae.state_dict()})
    return {k: v for k, v in table.items() if k.startswith("encoder.") and k.endswith(".weight")}

def lora_slots(model: nn.Module, table: dict, prefix: str, root: str = ""):
    """(key in OP4KSR's file, A or B block, layout transform, the scale folded into the file's B)
    of each block of each LoRA in `model`, named `root` in `table`."""
    for name, module in model.named_modules(prefix=root):
        if isinstance(module, (SplitLoRALinear, LoRAConv2d)):
            parts, transform = table[f"{name}.weight"]
            blocks = (zip(module.lora_A, module.lora_B) if isinstance(module, SplitLoRALinear)
                      else [(module.lora_A, module.lora_B)])
            for part, (a, b) in zip(parts, blocks):
                key = prefix + part.removesuffix(".weight")
                yield f"{key}.lora_A.weight", a, transform, 1.0
                yield f"{key}.lora_B.weight", b, transform, module.scale

def flux_lora_slots(transformer: Flux):
    return lora_slots(transformer, flux_table(transformer.config), "transformer.")

def encoder_lora_slots(encoder: nn.Module, vae: AutoEncoder):
    return lora_slots(encoder, vae_lora_table(vae), "vae.", "encoder")

def save_op4ksr(path, transformer: Flux, vae: AutoEncoder, prompt: dict, settings: dict):
    state = export_flux_lora(transformer) | export_vae_lora(vae.encoder, vae)
    state |= {f"prompt.{k}": prompt[k].float().cpu() for k in ("txt", "y")}
    flux_config = {k: getattr(transformer.config, k) for k in FLUX_CONFIG_KEYS}
    vae_config = {k: getattr(vae.config, k) for k in VAE_CONFIG_KEYS}
    metadata = {"format": "op4ksr", "format_version": str(FORMAT_VERSION),
                "prompt": prompt["text"], "theta": str(transformer.config.theta),
                "flux_config": json.dumps(flux_config), "vae_config": json.dumps(vae_config),
                **{k: str(v) for k, v in settings.items()}}
    save_safetensors(check_weights(state, path), Path(path), metadata)

def export_flux_lora(model: Flux) -> dict:
    """The SplitLoRALinear weights under peft names, the scale folded into B."""
    return export_lora(flux_lora_slots(model))

def export_vae_lora(encoder: nn.Module, vae: AutoEncoder) -> dict:
    return export_lora(encoder_lora_slots(encoder, vae))

def export_lora(slots) -> dict:
    return {key: TRANSFORMS[transform][1](value.detach().float().cpu() * scale).contiguous()
            for key, value, transform, scale in slots}


# ==== pipeline: OMGSR-F's public weights, and OMGSR-F's own tiled inference

# OMGSR-F (wuer5/OMGSR) publishes its LoRAs as two peft adapters, flux_adapter/ (Flux-dev) and
# vae_encoder_adapter/ (the F8 encoder), r = alpha = 64, merged under the names of OP4KSR's file.
OMGSR_F_ADAPTERS = {"flux_adapter": "transformer.", "vae_encoder_adapter": "vae.encoder."}
OMGSR_F_LABEL = "OMGSR-F's LoRAs (trained at 1024 px, tiled by OMGSR), not OP4KSR's trained weights"
PEFT_PREFIX = "base_model.model."
PEFT_PLAIN = {  # peft options, with the values besides None that keep a LoRA plain
    "use_rslora": (False,), "use_dora": (False,), "rank_pattern": ({},), "alpha_pattern": ({},),
    "fan_in_fan_out": (False,), "bias": ("none",), "modules_to_save": ([],),
    "layers_to_transform": (), "layers_pattern": ([], ""), "layer_replication": ([],),
    "exclude_modules": ([], ""), "lora_bias": (False,), "use_qalora": (False,),
    "target_parameters": ([],), "trainable_token_indices": ({},), "peft_type": ("LORA",),
}

def omgsr_f_folder(spec, token=None) -> Path | None:
    """The local folder of an OMGSR-F adapter (a folder or a Hub repo[/subfolder]), or None."""
    text, local = str(spec), Path(str(spec)).expanduser()
    if local.is_dir():
        return local
    if (local.exists() or text.endswith(".safetensors") or text.startswith((".", "/", "~"))
            or "/" not in text):
        return None
    parts = text.split("/")
    patterns = tuple(f"{half}/*" for half in OMGSR_F_ADAPTERS)
    return resolve_source("/".join(parts[:2]), "/".join(parts[2:]) or None, patterns, token)

def omgsr_f_halves(folder: Path) -> dict:
    """{adapter: (weights file, rank, alpha, target_modules)} of an OMGSR-F folder."""
    present = [half for half in OMGSR_F_ADAPTERS if (folder / half).is_dir()]
    if not present:
        raise UserError(f"{folder}: not an OMGSR-F adapter folder (it has neither flux_adapter/ "
                        "nor vae_encoder_adapter/)")
    halves = {}
    for half in OMGSR_F_ADAPTERS:
        if half not in present:
            raise UserError(f"{folder}: has {present[0]}/ but no {half}/; OMGSR-F's adapter needs "
                            "both halves")
        config = folder / half / "adapter_config.json"
        weights = folder / half / "adapter_model.safetensors"
        for file in (config, weights):
            if not file.is_file():
                raise UserError(f"{folder / half}: no {file.name}, not a peft LoRA folder")
        halves[half] = (weights, *peft_lora_config(read_json(config), config))
    return halves

def peft_lora_config(config: dict, path) -> tuple[int, float, object]:
    """(r, lora_alpha, target_modules) of a peft adapter_config.json; refuses every option that
    would make the LoRA other than W + (alpha / r) B A."""
    for option, plain in PEFT_PLAIN.items():
        if config.get(option) not in (None, *plain):
            raise UserError(f"{path}: {option}={config[option]!r} is a peft option this loader "
                            "does not implement (plain LoRA only)")
    rank, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if not is_count(rank) or not is_number(alpha):
        raise UserError(f"{path}: r={rank!r} and lora_alpha={alpha!r} must be a positive integer "
                        "and a number")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            raise UserError(f"{path}: target_modules={targets!r} is not a regular expression "
                            f"({error})") from None
    elif not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise UserError(f"{path}: target_modules={targets!r} is neither a list of module names "
                        "nor a pattern")
    return rank, float(alpha), targets

def read_omgsr_f_adapters(folder: Path) -> dict:
    """Both adapters' LoRAs under the names of OP4KSR's file, alpha / r folded into B."""
    state = {}
    for half, (weights, rank, alpha, targets) in omgsr_f_halves(folder).items():
        for key, value in check_weights(load_safetensors(weights, torch.float32), weights).items():
            module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            peft_key = key.startswith(PEFT_PREFIX) and kind in ("A.weight", "B.weight")
            if not peft_key or value.ndim not in (2, 4):
                raise UserError(f"{weights}: {key} {tuple(value.shape)} is not a peft LoRA weight")
            selected = (re.fullmatch(targets, module) if isinstance(targets, str)
                        else peft_selects(module, targets))
            if not selected:
                raise UserError(f"{weights}: a LoRA on {module}, which target_modules does not "
                                "select")
            if value.shape[0 if kind == "A.weight" else 1] != rank:
                raise UserError(f"{weights}: {key} is {tuple(value.shape)}, not of the rank "
                                f"r={rank}")
            scale = alpha / rank if kind == "B.weight" else 1.0
            state[f"{OMGSR_F_ADAPTERS[half]}{module}.lora_{kind}"] = value * scale
    return state

def omgsr_f_prompt(flux, device, dtype, token=None) -> dict:
    """OMGSR-F's empty prompt {"txt", "y"} (T5: 512 tokens), cached under a hash of the base."""
    source = source_name(flux)
    local = Path(source)
    stamps = sorted((str(f.relative_to(local)), f.stat().st_size, f.stat().st_mtime_ns)
                    for f in local.glob("t*/*") if f.is_file())  # none for a Hub repo
    key = json.dumps([source, stamps, "", 512, str(dtype)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = prompt_cache_folder() / f"prompt-{digest}.safetensors"
    if path.is_file():
        with contextlib.suppress(UserError):
            cached = load_safetensors(path, dtype, device)
            if {"txt", "y"} <= cached.keys() and all(t.isfinite().all() for t in cached.values()):
                return cached
    print(f"encoding OMGSR-F's fixed prompt with the text encoders of {flux} (once: cached in "
          f"{path})", file=sys.stderr)
    encoded = encode_fixed_prompt(flux, "", device, dtype, 512, token)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: encoded[k].float().cpu() for k in ("txt", "y")}, path,
                         {"base_flux": source})
    except OSError as error:
        warn(f"the prompt embeddings could not be cached in {path.parent} "
             f"({os_error_text(error)}); set OP4KSR_CACHE to a writable folder")
    return {"txt": encoded["txt"], "y": encoded["y"]}

def prompt_cache_folder() -> Path:
    if os.environ.get("OP4KSR_CACHE"):
        return Path(os.environ["OP4KSR_CACHE"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "op4ksr"

def load_omgsr_f_pipeline(folder: Path, flux=None, vae=None, device=None, dtype=None, token=None,
                          theta: float = 10000.0, stride: int = 1,
                          text_encoders=None) -> SRPipeline:
    """Flux and a VAE (F8: stride 1; F16: stride 2) with OMGSR-F's LoRAs, sigma and empty prompt."""
    loras = read_omgsr_f_adapters(folder)
    device, dtype = device_dtype(device, dtype)
    flux = flux or DEFAULT_FLUX
    vae = vae or (flux if stride == 1 else DEFAULT_VAE)
    prompt = omgsr_f_prompt(text_encoders or flux, device, dtype, token)  # T5 freed before Flux
    transformer, autoencoder = load_bases(flux, vae, theta, stride, device, dtype, token)
    c = transformer.config
    if prompt["txt"].shape[-1] != c.context_in_dim or prompt["y"].shape[-1] != c.vec_in_dim:
        raise UserError(f"the cached prompt embeddings do not fit {flux}: delete them from "
                        f"{prompt_cache_folder()}")
    merge_op4ksr_lora(loras, transformer, autoencoder, str(folder))
    guidance = 1.0 if c.guidance_embed else None
    meta = {"base_flux": str(flux), "base_vae": str(vae)}
    return SRPipeline(transformer, autoencoder, prompt["txt"], prompt["y"], OMGSR_SIGMA, guidance,
                      4.0, device, dtype, meta)

def init_loras_from(transformer: Flux, vae: AutoEncoder, state: dict, source: str):
    """Start training from LoRAs in OP4KSR's names with the scale folded into B (OMGSR-F's)."""
    slots = [*flux_lora_slots(transformer), *encoder_lora_slots(vae.encoder, vae)]
    with torch.no_grad():
        for key, target, transform, scale in slots:
            value = state.get(key)
            value = None if value is None else TRANSFORMS[transform][0](value) / scale
            if value is None or value.shape != target.shape:
                found = "missing" if value is None else tuple(value.shape)
                raise UserError(f"--init {source}: {key} is {found} where the LoRA being trained "
                                f"takes {tuple(target.shape)} (--lora-rank must be the adapter's "
                                "rank)")
            target.copy_(value)
    unused = sorted(state.keys() - {slot[0] for slot in slots})
    if unused:
        raise UserError(f"--init {source}: its LoRA {unused[0]} is not on a module OP4KSR trains "
                        "(OMGSR-F's target lists)")

# OMGSR-F's inference (`infer/infer_omgsr_f.py`, wuer5/OMGSR@8996613). It encodes an unseeded
# posterior sample; we take the posterior's mode, which makes runs reproducible.
OMGSR_F_PROCESS_SIZE = 1024  # its --process_size: the training size; latent tiles of 1/8 of it

def omgsr_f_image(pipe: SRPipeline, image: Image.Image, upscale: int, color_fix: str,
                  process_size: int) -> Image.Image:
    lq = omgsr_f_input(image, upscale, process_size)
    x = (unit_tensor(lq)[None] * 2 - 1).to(pipe.device, pipe.dtype)
    with torch.inference_mode():
        decoded = pipe.vae.decode(omgsr_f_latent(pipe, x, process_size).to(pipe.dtype))
    size = omgsr_f_sizes(*image.size, upscale, process_size)[1]
    return omgsr_f_output(decoded, lq, color_fix, size)

def omgsr_f_sizes(width: int, height: int, upscale: int, process_size: int = OMGSR_F_PROCESS_SIZE):
    """(processed size, output size) by OMGSR-F's rules (`omgsr_f_input`)."""
    least, final = process_size // upscale, None
    if width < least or height < least:
        scale = least / min(width, height)
        final = (int(upscale * width), int(upscale * height))
        width, height = int(scale * width), int(scale * height)
    width, height = width * upscale, height * upscale
    process = (width - width % 8, height - height % 8)
    return process, final or process

def omgsr_f_input(image: Image.Image, upscale: int, process_size: int) -> Image.Image:
    """OMGSR-F's input: a side under process_size / upscale brings the shorter side to it, x upscale
    (both bicubic), cut to multiples of 8 (LANCZOS)."""
    least = process_size // upscale
    if image.width < least or image.height < least:
        scale = least / min(image.size)
        image = image.resize((int(scale * image.width), int(scale * image.height)), Image.BICUBIC)
    image = image.resize((image.width * upscale, image.height * upscale), Image.BICUBIC)
    return image.resize((image.width - image.width % 8, image.height - image.height % 8),
                        Image.LANCZOS)

@torch.inference_mode()
def omgsr_f_latent(pipe: SRPipeline, image: torch.Tensor, process_size: int):
    """OMGSR-F's one step, tiled above (process_size / 8)^2 latent pixels or at an odd side (which
    OMGSR-F's code fails to pack)."""
    z = pipe.vae.encode(image)
    h, w = z.shape[-2:]
    tile = process_size // 8
    if h * w <= tile * tile and h % 2 == w % 2 == 0:
        v = pipe.transformer.velocity(z, pipe.sigma, pipe.condition, pipe.guidance)
    else:
        v = omgsr_f_tiled_velocity(pipe, z, tile, tile // 2)
    return z - pipe.sigma * v

def omgsr_f_tiled_velocity(pipe: SRPipeline, z: torch.Tensor, tile: int,
                           overlap: int) -> torch.Tensor:
    """OMGSR-F's latent tiling: square even tiles, blended in float32."""
    h, w = z.shape[-2:]
    tile = min(tile, h, w) // 2 * 2
    weight = omgsr_f_tile_weights(tile).to(z.device)
    total = torch.zeros(z.shape, device=z.device)
    count = torch.zeros_like(total)
    for left in omgsr_f_tile_starts(w, tile, overlap):  # its order: tile columns outer
        for top in omgsr_f_tile_starts(h, tile, overlap):
            window = (..., slice(top, top + tile), slice(left, left + tile))
            part = z[window].contiguous()
            v = pipe.transformer.velocity(part, pipe.sigma, pipe.condition, pipe.guidance)
            total[window] += v * weight
            count[window] += weight
    return total / count

def omgsr_f_tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of as few tiles as cover `size` at a step of tile - overlap, the last flush with the
    far edge."""
    if overlap >= tile:
        raise UserError(f"a tile of {tile} latent pixels cannot overlap by {overlap}: use a larger "
                        "--process-size")
    stride = tile - overlap
    return [i * stride for i in range(math.ceil((size - tile) / stride))] + [size - tile]

def omgsr_f_tile_weights(tile: int) -> torch.Tensor:
    """OMGSR-F's tile weights: a Gaussian of variance 0.01 in tile sides, centred at (tile - 1) / 2
    across but tile / 2 down, as its code."""
    i = torch.arange(tile, dtype=torch.float64)

    def bell(mid):
        return torch.exp(-((i - mid) ** 2) / tile**2 / (2 * 0.01)) / math.sqrt(2 * math.pi * 0.01)

    return bell(tile / 2)[:, None] * bell((tile - 1) / 2)[None, :]

def omgsr_f_output(decoded: torch.Tensor, lq: Image.Image, color_fix: str, size) -> Image.Image:
    """OMGSR-F's output: 8 bits by truncation (as torchvision), the colour fix against the processed
    input, truncated again, resized (bicubic) to `size`."""
    out = truncated_image(decoded[0].float().cpu() * 0.5 + 0.5)
    if color_fix in ("adain", "wavelet"):
        fix = omgsr_adain if color_fix == "adain" else wavelet_color_fix
        out = truncated_image(fix(unit_tensor(out)[None], unit_tensor(lq)[None])[0])
    return out if out.size == tuple(size) else out.resize(tuple(size), Image.BICUBIC)

def truncated_image(x: torch.Tensor) -> Image.Image:
    if not torch.isfinite(x).all():
        raise UserError("the result holds NaN/Inf values (broken weights?); no image was written")
    array = (x.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, mode="RGB")

def unit_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


# ==== training

# --- BEGIN copy of diffusion4k.py: recipes ---
def option(default=None, help: str | None = None, factory=None, **cli):
    """A recipe field: its default (or `factory`) and argparse keywords."""
    value = {"default": default} if factory is None else {"default_factory": factory}
    return field(**value, metadata={"help": help, **cli})

def add_recipe(parser: argparse.ArgumentParser, kind, names=None):
    """One --option per field of the recipe class `kind` (or those in `names`)."""
    defaults = kind()
    for f in fields(kind):
        if names is None or f.name in names:
            parser.add_argument("--" + f.name.replace("_", "-"), default=getattr(defaults, f.name),
                                **f.metadata)
# --- END copy: recipes ---

@dataclass
class SRTrainRecipe:
    """`op4ksr.py train`'s options: the paper's loss and RFR on OMGSR-F's set-up."""
    data: str = option(None, "folder of HR images (recursive) or with a metadata.jsonl",
                       required=True)
    output: str = option(None, "output folder", required=True)
    vae: str = option(DEFAULT_VAE, "F16 VAE: Hub repo / folder with vae/, or a file")
    crop: int = option(4096, "square HR crop side", type=integer(1, MAX_SIDE))
    scale: int = option(4, "SR factor", type=integer(1, 16))
    flux: str = option(DEFAULT_FLUX, "base Flux: Hub repo, diffusers folder or BFL single file")
    f16_decode: str = option("partitioned", "F16 decoder's last stage: as Diffusion-4K's decode, "
                             "or centred", choices=["partitioned", "centred"])
    text_encoders: str = option(None, "Flux pipeline with the text encoders (default: --flux)")
    prompt: str = option(DEFAULT_PROMPT, "the fixed prompt (S3Diff's)")
    max_sequence_length: int = option(512, "T5 tokens of the prompt", type=integer(1, 512))
    sigma: float = option(OMGSR_SIGMA, f"noise level of the LR latent (OMGSR-F's t = "
                          f"{OMGSR_MID_TIMESTEP})", type=number(1e-3, 1))
    theta: float = option(RFR_THETA, "RoPE base (RFR 100; Flux 10000)", type=number(1))
    guidance: float = option(1.0, "Flux-dev's guidance input", type=number(0))
    lora_rank: int = option(64, "LoRA rank (OMGSR-F's)", type=integer(1))
    lora_alpha: float = option(None, "default: the rank", type=positive())
    init: str = option(None, "start from OMGSR-F's adapter folder")
    lr: float = option(2.5e-5, "AdamW learning rate", type=positive(1))
    weight_decay: float = option(1e-4, "AdamW weight decay (OMGSR-F's)", type=number(0))
    max_grad_norm: float = option(1.0, "gradient clipping norm (OMGSR-F's)", type=positive())
    batch_size: int = option(1, "images per process per step", type=integer(1))
    steps: int = option(10000, "optimizer steps", type=integer(1))
    mse_weight: float = option(LossWeights.pixel_mse, "pixel MSE", type=number(0))
    l1_weight: float = option(LossWeights.pixel_l1, "pixel L1", type=number(0))
    latent_weight: float = option(LossWeights.latent_mse,
                                  "MSE of x0 to the base encoder's HR latent", type=number(0))
    lpips_weight: float = option(LossWeights.perceptual, "LPIPS-VGG (OSEDiff's ratio to MSE)",
                                 type=number(0))
    lpips_linear: str = option(help="LPIPS VGG linear layers", factory=lambda: LPIPS_VGG_LINEAR)
    lpips_backbone: str = option(help="VGG16 weights", factory=lambda: LPIPS_VGG_BACKBONE)
    lpips_crop: int = option(512, "side of LPIPS's random crop", type=integer(1))
    periodicity_weight: float = option(LossWeights.periodicity, "lambda_AP", type=number(0))
    checkpoint_every: int = option(500, "steps per checkpoint", type=integer(1))
    keep_checkpoints: int = option(2, "0: all", type=integer(0))
    log_every: int = option(10, "steps per log line", type=integer(1))
    resume: str = option(None, "a checkpoint folder, or none for the newest in --output",
                         nargs="?", const="latest")
    seed: int = option(0, "seed of data order, crops, degradations, LoRA init", type=SEED)
    gradient_checkpointing: bool = option(True, "recompute activations (OMGSR-F's)",
                                          action=argparse.BooleanOptionalAction)
    # device_name is looked up at parse time
    device: str = option(None, "default: cuda when available", type=lambda t: device_name(t))
    dtype: str = option(None, "of the frozen bases (default: bf16 on CUDA)",
                        choices=["bf16", "fp32"])
    token: str = option(None, "Hugging Face token")

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(self.mse_weight, self.l1_weight, self.latent_weight, self.lpips_weight,
                           self.periodicity_weight)

    @property
    def run(self) -> dict:
        """What a checkpoint shares with the run that resumes it (`check_resumable`)."""
        return {"trainer": "op4ksr.py train", "flux": source_name(self.flux),
                "vae": source_name(self.vae), "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha or self.lora_rank, "theta": self.theta,
                "sigma": self.sigma, "scale": self.scale, "prompt": self.prompt}

class SRModels(NamedTuple):
    transformer: Flux
    vae: AutoEncoder
    prompt: dict
    lpips: nn.Module | None

def train_sr(r: SRTrainRecipe, resume_from: Path | None = None) -> list[tuple[int, float]]:
    """Train the OP4KSR LoRAs; returns this call's (step, loss) pairs. A resumed run takes lr and
    weight_decay from `r`."""
    ctx, output = setup_distributed(r.device), Path(r.output)
    files = vae_image_files(r.data, verbose=ctx.main)
    dtype = device_dtype(ctx.device, r.dtype)[1]  # the frozen bases; the LoRAs stay fp32
    m = load_training_models(r, ctx.device, dtype)
    trainable = nn.ModuleDict({"transformer": m.transformer, "encoder": m.vae.encoder}).train()
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
    if ctx.main:
        millions = sum(p.numel() for p in params) / 1e6
        print(f"training OP4KSR LoRAs (rank {r.lora_rank}, {millions:.2f}M parameters), "
              f"{ctx.world} process(es) x batch {r.batch_size}, crop {r.crop}, sigma {r.sigma}, "
              f"theta {r.theta}, L_AP periods {lap_periods(m.vae)}", file=sys.stderr)
    batches, step = Batches(len(files), r.seed), 0
    if resume_from is not None:
        step = load_checkpoint(resume_from, trainable, optimizer, batches, True, r.run)
        for group in optimizer.param_groups:
            group.update(lr=r.lr, weight_decay=r.weight_decay)
    losses, unreadable = [], set()
    output.mkdir(parents=True, exist_ok=True)
    update = progress_bar("train", r.steps, step) if ctx.main else None
    while step < r.steps:
        hr, lr_up, offset = training_pairs(files, batches, r.crop, r.scale, r.batch_size,
                                           unreadable, ctx)
        loss, parts = sr_training_loss(m, r, hr.to(ctx.device), lr_up.to(ctx.device, dtype), offset)
        step += 1
        value, norm = optimizer_step(loss, params, optimizer, r.max_grad_norm, ctx, step, output)
        losses.append((step, value))
        terms = {k: round(ctx.mean(v.float().cpu()).item(), 6) for k, v in parts.items()}
        if ctx.main:
            update(step, r.steps)
            log_step(output, step, r, value, terms, norm)
        if step % r.checkpoint_every == 0 or step == r.steps:
            save_checkpoint(output, step, trainable, optimizer, batches, True, ctx,
                            r.keep_checkpoints, r.run)
    if ctx.main:
        if unreadable:
            print(f"data: {len(unreadable)} of the {len(files)} training images could not be "
                  "decoded and were skipped", file=sys.stderr)
        save_trained(output, m, r, step)
    ctx.barrier()
    return losses

def lap_periods(vae: AutoEncoder) -> tuple[int, int]:
    """L_AP's periods: a latent pixel and a 2x2-packed token."""
    factor = vae.config.downsample_factor
    return factor, 2 * factor

def load_training_models(r: SRTrainRecipe, device, dtype) -> SRModels:
    lpips = None  # small, and the likeliest download to fail: before the large models
    if r.lpips_weight:
        lpips = load_lpips(r.lpips_linear, r.lpips_backbone, r.token).to(device)
    vae = load_vae(r.vae, dtype, device, stride=2, token=r.token)
    vae.decoder.partitioned = r.f16_decode == "partitioned"
    factor = vae.config.downsample_factor
    check_crop(r.crop, r.scale, factor)
    if r.periodicity_weight and r.crop // 2 <= 5 * factor + 1:  # `lattice_power`'s smallest
        raise UserError(f"--crop {r.crop}: L_AP's quadrants must be larger than "
                        f"{5 * factor + 1} px")
    prompt = encode_fixed_prompt(r.text_encoders or r.flux, r.prompt, device, dtype,
                                 r.max_sequence_length, r.token)
    transformer = rescale_rope_base(load_flux(r.flux, dtype, device, token=r.token), r.theta)
    add_flux_lora(transformer, r.lora_rank, r.lora_alpha, r.seed)
    add_encoder_lora(vae, r.lora_rank, r.lora_alpha, (r.seed + 1) % 2**64)
    if r.init:
        init_loras_from(transformer, vae, read_omgsr_f_adapters(Path(r.init)), r.init)
    vae.decoder.requires_grad_(False)
    for module in (transformer, vae.encoder, vae.decoder):
        module.gradient_checkpointing = r.gradient_checkpointing
    return SRModels(transformer, vae, prompt, lpips)

def sr_training_loss(m: SRModels, r: SRTrainRecipe, hr, lr_up, offset):
    """`sr_loss` of one batch, under bf16 autocast when the bases are bf16."""
    dtype, weights = lr_up.dtype, r.loss_weights
    bf16 = dtype == torch.bfloat16
    guidance = r.guidance if m.transformer.config.guidance_embed else None
    with torch.autocast(hr.device.type, dtype) if bf16 else contextlib.nullcontext():
        latent = sr_latent(m.transformer, m.vae, lr_up, m.prompt, r.sigma, guidance)
        pred = m.vae.decode(latent).float()
        target_latent = None
        if weights.latent_mse:
            with torch.no_grad(), lora_off(m.vae.encoder):
                target_latent = m.vae.encode(hr.to(dtype)).float()
        perceptual = None if m.lpips is None else lpips_on_crops(m.lpips, r.lpips_crop, offset)
        return sr_loss(pred, hr, weights, perceptual, latent.float(), target_latent,
                       lap_periods(m.vae))

def optimizer_step(loss, params, optimizer, max_norm: float, ctx: Distributed, step: int,
                   output: Path) -> tuple[float, float]:
    """One step: (loss, gradient norm). A non-finite loss, gradient or weight stops the run."""
    loss.backward()
    if ctx.world > 1:
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= ctx.world
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    value = ctx.mean(loss.detach().float().cpu()).item()
    for what, found in (("loss", value), ("gradient norm", norm)):
        if not math.isfinite(found):
            raise training_diverged(step, f"the {what} ({found})", output)
    optimizer.step()
    if not torch.stack([torch.isfinite(p).all() for p in params]).all():
        raise training_diverged(step, "a LoRA weight after the update", output)
    optimizer.zero_grad(set_to_none=True)
    return value, norm

def log_step(output: Path, step: int, r: SRTrainRecipe, value: float, terms: dict, norm: float):
    if step % r.log_every == 0 or step == r.steps:
        print(f"step {step}/{r.steps} loss {value:.5f} {terms} grad-norm {norm:.3f}",
              file=sys.stderr)
    with open(output / "train_log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "loss": value, **terms, "grad_norm": norm}) + "\n")

def save_trained(output: Path, m: SRModels, r: SRTrainRecipe, step: int):
    settings = {"sigma": r.sigma, "guidance": r.guidance, "scale": r.scale, "base_flux": r.flux,
                "base_vae": r.vae, "lora_rank": r.lora_rank,
                "lora_alpha": r.lora_alpha or r.lora_rank, "steps": step}
    final = output / "op4ksr.safetensors"
    save_op4ksr(final, m.transformer, m.vae, m.prompt, settings)
    print(f"wrote {final} (use: python op4ksr.py --input LR.png --weights {final})",
          file=sys.stderr)

def check_crop(crop: int, scale: int, factor: int | None = None):
    if crop % scale:
        raise UserError(f"--crop {crop}: must be a multiple of --scale {scale}")
    if factor is not None and crop % (2 * factor):
        raise UserError(f"--crop {crop}: must be a multiple of {2 * factor} px (one token)")

@torch.no_grad()
def encode_fixed_prompt(source, prompt: str, device, dtype, max_length: int, token) -> dict:
    """{"txt": T5's, "y": CLIP-L's pooled embedding, "text"} of the fixed prompt."""
    files = ("*.json", "*.txt", "*.model")
    clip_ids = CLIPTokenizer(resolve_source(source, "tokenizer", files, token))(prompt).to(device)
    t5_folder = resolve_source(source, "tokenizer_2", files, token)
    t5_ids = T5Tokenizer(t5_folder, max_length=max_length)(prompt).to(device)
    text_dtype = torch.float32 if dtype == torch.float16 else dtype
    y = load_clip(source, text_dtype, device, subfolder="text_encoder")(clip_ids).pooled
    txt = load_t5(source, text_dtype, device, subfolder="text_encoder_2")(t5_ids)
    return {"txt": txt.to(dtype), "y": y.to(dtype), "text": prompt}

def training_pairs(files, batches: Batches, crop: int, scale: int, batch_size: int,
                   unreadable: set, ctx: Distributed):
    """This rank's share of the next global batch (every rank draws all of it): HR crops, the LR
    input degrade(HR) bicubic back up (as OMGSR), and the LPIPS crop offset."""
    global_batch, g = batch_size * ctx.world, batches.generator
    mine = range(ctx.rank * batch_size, (ctx.rank + 1) * batch_size)
    picks = batches.indices(global_batch)
    offsets = torch.rand(global_batch, 2, generator=g)
    flips = torch.rand(global_batch, generator=g) < 0.5
    seeds = torch.randint(2**62, (global_batch,), generator=g)
    crop_offset = torch.rand(2, generator=g)
    hr = load_hr_crops(files, picks, mine, crop, offsets, flips, batches, unreadable, ctx)
    streams = [torch.Generator().manual_seed(int(seeds[i])) for i in mine]
    lr = torch.cat([degrade((image[None] + 1) / 2, DegradationConfig(), stream, scale)
                    for image, stream in zip(hr, streams)]) * 2 - 1
    lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False)
    return hr, lr_up.clamp(-1, 1), crop_offset

def load_hr_crops(files, picks, mine, crop, offsets, flips, batches: Batches, unreadable: set,
                  ctx: Distributed) -> torch.Tensor:
    """This rank's HR crops of the global batch `picks`. An undecodable file is skipped from then
    on, its slot taking the next index; the ranks share failures."""
    crops = {}
    while True:
        failed, errors = torch.zeros(len(picks)), []
        for i in (i for i in mine if i not in crops):
            if picks[i] in unreadable:  # met before, on any rank
                failed[i] = 1
                continue
            try:
                crops[i] = load_crop(files[picks[i]], crop, crop, offsets[i].tolist(),
                                     bool(flips[i]))
            except UserError as error:
                failed[i] = 1
                errors.append(str(error))
        slots = (ctx.mean(failed) > 0).nonzero().flatten().tolist()
        if not slots:
            return torch.stack([crops[i] for i in mine])
        unreadable.update(picks[i] for i in slots)
        for error in errors:
            warn(f"{error}; skipped ({len(unreadable)} undecodable so far)")
        if 2 * (len(files) - len(unreadable)) < len(files):
            raise UserError(f"{len(unreadable)} of the {len(files)} training images do not "
                            "decode: check --data")
        for i in slots:
            picks[i] = batches.indices(1)[0]

def lpips_on_crops(lpips: nn.Module, crop: int, offset: torch.Tensor):
    """LPIPS on one crop at a relative offset: a 4K image's VGG activations would not fit beside
    Flux."""
    def perceptual(pred, target):
        h, w = pred.shape[-2:]
        size_h, size_w = min(crop, h), min(crop, w)
        top, left = int(offset[0] * (h - size_h + 1)), int(offset[1] * (w - size_w + 1))
        window = (..., slice(top, top + size_h), slice(left, left + size_w))
        return lpips(pred[window].float(), target[window].float()).mean()
    return perceptual

@torch.no_grad()
def calibration_latents(files, vae: AutoEncoder, crop: int, scale: int, batch_size: int,
                        count: int, seed: int):
    """(HR, LR) latents of `train`'s first `count` pairs, posterior samples (as OMGSR)."""
    weight, c = vae.encoder.conv_in.weight, vae.config
    batches, unreadable, ctx = Batches(len(files), seed), set(), Distributed(device=weight.device)
    noise = torch.Generator().manual_seed((seed + 1) % 2**64)
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        hr, lr_up, _ = training_pairs(files, batches, crop, scale, size, unreadable, ctx)
        raw = [encode_raw(vae, x.to(weight.device, weight.dtype), noise) for x in (hr, lr_up)]
        yield tuple((z - c.shift_factor) * c.scale_factor for z in raw)


# ==== training data: Real-ESRGAN degradation

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")

@dataclass
class DegradationStage:
    """One order of the Real-ESRGAN degradation (defaults: its first)."""
    blur_prob: float = 1.0
    kernel_sizes: tuple[int, int] = (7, 21)  # odd sizes, uniform
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sinc_prob: float = 0.1  # a sinc (ringing) kernel instead
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)  # generalized Gaussian shape
    betap_range: tuple[float, float] = (1.0, 2.0)  # plateau shape
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    noise_prob: float = 1.0
    gaussian_noise_prob: float = 0.5  # otherwise Poisson
    noise_range: tuple[float, float] = (1.0, 30.0)  # 8-bit levels
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_prob: float = 1.0
    jpeg_range: tuple[float, float] = (30.0, 95.0)

@dataclass
class DegradationConfig:
    """Real-ESRGAN's second-order degradation with its published defaults."""
    first: DegradationStage = field(default_factory=DegradationStage)
    second: DegradationStage = field(default_factory=lambda: DegradationStage(
        blur_prob=0.8, blur_sigma=(0.2, 1.5), resize_probs=(0.3, 0.4, 0.3),
        resize_range=(0.3, 1.2), noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5)))
    final_sinc_prob: float = 0.8
    final_resize_modes: tuple[str, ...] = RESIZE_MODES

STEPS = ("blur1", "resize1", "noise1", "jpeg1", "blur2", "resize2", "noise2", "jpeg2", "final")

def degrade(hr: torch.Tensor, config: DegradationConfig, generator: torch.Generator,
            scale: int = 4) -> torch.Tensor:
    """Real-ESRGAN's second-order degradation, HR (B, 3, H, W) in [0, 1] -> LR at 1/scale: blur,
    resize, noise and JPEG twice, then the final resize, sinc and JPEG in random order. Unlike
    Real-ESRGAN, every image gets its own parameters and each step its own random stream."""
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"expected HR images of shape (B, 3, H, W), got {tuple(hr.shape)}")
    height, width = hr.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"HR size {height}x{width} is not divisible by the scale {scale}")
    lr_size = (height // scale, width // scale)
    lrs = []
    for image in hr:
        seeds = torch.randint(2**62, (len(STEPS),), generator=generator, device=generator.device)
        streams = {step: torch.Generator().manual_seed(seed)
                   for step, seed in zip(STEPS, seeds.tolist())}
        lrs.append(_degrade_one(image[None].float(), config, lr_size, streams))
    return torch.cat(lrs).to(hr.dtype)

def _degrade_one(image, config: DegradationConfig, lr_size, streams) -> torch.Tensor:
    second, final = config.second, streams["final"]
    for stage, order in ((config.first, "1"), (second, "2")):
        blur, resize, noise = (streams[step + order] for step in ("blur", "resize", "noise"))
        if _happens(blur, stage.blur_prob):
            image = filter2d(image, random_blur_kernel(stage, blur))
        image = _random_resize(image, stage, image.shape[-2:] if order == "1" else lr_size, resize)
        if _happens(noise, stage.noise_prob):
            image = _random_noise(image, stage, noise)
        if order == "1" and _happens(streams["jpeg1"], stage.jpeg_prob):
            image = _random_jpeg(image, stage, streams["jpeg1"])
    # Real-ESRGAN applies the final JPEG before or after the final resize + sinc, at random.
    for step in ("resize", "jpeg") if _happens(final, 0.5) else ("jpeg", "resize"):
        if step == "resize":
            image = _resize(image, lr_size, _pick(final, config.final_resize_modes))
            if _happens(final, config.final_sinc_prob):
                size = _odd_size(final, second.kernel_sizes)
                image = filter2d(image, sinc_kernel(size, _uniform(final, math.pi / 3, math.pi)))
        elif _happens(streams["jpeg2"], second.jpeg_prob):
            image = _random_jpeg(image, second, streams["jpeg2"])
    return (image.clamp(0, 1) * 255).round() / 255

def random_blur_kernel(stage: DegradationStage, generator) -> torch.Tensor:
    size = _odd_size(generator, stage.kernel_sizes)
    if _happens(generator, stage.sinc_prob):
        low = math.pi / 3 if size < 13 else math.pi / 5  # small kernels cannot hold wide ringing
        return sinc_kernel(size, _uniform(generator, low, math.pi))
    kind = _pick(generator, KERNEL_TYPES, stage.kernel_probs)
    sigma_x = _uniform(generator, *stage.blur_sigma)
    if not kind.endswith("aniso"):
        sigma_y, angle = sigma_x, 0.0
    else:
        sigma_y = _uniform(generator, *stage.blur_sigma)
        angle = _uniform(generator, -math.pi, math.pi)
    beta = 1.0
    if kind.startswith(("generalized", "plateau")):
        low, high = stage.betag_range if kind.startswith("generalized") else stage.betap_range
        heavy = _happens(generator, 0.5)
        beta = _uniform(generator, low, 1.0) if heavy else _uniform(generator, 1.0, high)
    return gaussian_family_kernel(size, sigma_x, sigma_y, angle, beta, kind.startswith("plateau"))

def gaussian_family_kernel(size, sigma_x, sigma_y, angle=0.0, beta=1.0,
                           plateau=False) -> torch.Tensor:
    """Gaussian (beta 1), generalized Gaussian or plateau kernel: with q = x^T Sigma^-1 x for Sigma
    rotated by `angle`, exp(-q^beta / 2), or 1 / (1 + q^beta)."""
    y, x = _kernel_grid(size)
    along = math.cos(angle) * x + math.sin(angle) * y  # coordinates on the kernel's own axes
    across = -math.sin(angle) * x + math.cos(angle) * y
    q = (along / sigma_x) ** 2 + (across / sigma_y) ** 2
    kernel = 1 / (1 + q**beta) if plateau else torch.exp(-0.5 * q**beta)
    return (kernel / kernel.sum()).float()

def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """Ideal circular low-pass filter, cutoff in radians per pixel."""
    y, x = _kernel_grid(size)
    r = torch.hypot(x, y).clamp_min(1e-12)
    kernel = cutoff * torch.special.bessel_j1(cutoff * r) / (2 * math.pi * r)
    kernel[size // 2, size // 2] = cutoff**2 / (4 * math.pi)  # the limit at r = 0
    return (kernel / kernel.sum()).float()

def _kernel_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(size, dtype=torch.float64) - size // 2
    return torch.meshgrid(r, r, indexing="ij")

def _odd_size(generator, sizes) -> int:
    return _pick(generator, list(range(sizes[0], sizes[1] + 1, 2)))

def filter2d(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    pad = kernel.shape[-1] // 2
    channels = image.shape[1]
    weight = kernel.to(image).expand(channels, 1, *kernel.shape)
    return F.conv2d(F.pad(image, (pad, pad, pad, pad), mode="replicate"), weight, groups=channels)

def _random_resize(image, stage: DegradationStage, base_size, generator) -> torch.Tensor:
    direction = _pick(generator, ("up", "down", "keep"), stage.resize_probs)
    low, high = (1.0, stage.resize_range[1]) if direction == "up" else (stage.resize_range[0], 1.0)
    factor = 1.0 if direction == "keep" else _uniform(generator, low, high)
    mode = _pick(generator, stage.resize_modes)
    return _resize(image, tuple(max(1, int(side * factor)) for side in base_size), mode)

def _resize(image, size, mode) -> torch.Tensor:
    corners = None if mode == "area" else False
    return F.interpolate(image, size=size, mode=mode, align_corners=corners)

def _random_noise(image, stage: DegradationStage, generator) -> torch.Tensor:
    gray = _happens(generator, stage.gray_noise_prob)  # one noise image shared by the channels
    if _happens(generator, stage.gaussian_noise_prob):
        sigma = _uniform(generator, *stage.noise_range) / 255
        shape = (image.shape[0], 1 if gray else 3, *image.shape[2:])
        noise = torch.randn(shape, generator=generator) * sigma
    else:  # shot noise: the 8-bit level of each pixel taken as a photon count
        scale = _uniform(generator, *stage.poisson_scale_range)
        counts = ((_luma(image) if gray else image).clamp(0, 1) * 255).round().cpu()
        noise = (torch.poisson(counts, generator=generator) - counts) / 255 * scale
    return (image + noise.to(image)).clamp(0, 1)

def _luma(image) -> torch.Tensor:
    r, g, b = image.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b)[:, None]

def _random_jpeg(image, stage: DegradationStage, generator) -> torch.Tensor:
    return jpeg_compress(image, round(_uniform(generator, *stage.jpeg_range)))

def jpeg_compress(image: torch.Tensor, quality: int) -> torch.Tensor:
    decoded = []
    for single in image:
        pixels = (single.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        buffer = BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
        array = np.array(Image.open(buffer).convert("RGB"))
        decoded.append(torch.from_numpy(array).permute(2, 0, 1))
    return torch.stack(decoded).to(image) / 255

def _uniform(generator, low, high) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()

def _happens(generator, probability) -> bool:
    return _uniform(generator, 0.0, 1.0) < probability

def _pick(generator, options, probs=None):
    weights = torch.tensor(probs or [1.0] * len(options), dtype=torch.float64)
    return options[torch.multinomial(weights, 1, generator=generator).item()]


# ==== training: its utilities and LPIPS from diffusion4k.py

# --- BEGIN copy of diffusion4k.py: training utilities ---
def vae_image_files(folder, verbose: bool = True) -> list[Path]:
    """The images metadata.jsonl lists, else all under the folder, but unreadable ones."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such data folder")
    metadata, usable, skipped = folder / "metadata.jsonl", [], 0
    if metadata.is_file():
        candidates, skipped = listed_files(metadata)
    else:
        candidates = sorted(p for p in folder.rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for path in candidates:
        try:
            verify_image(path)
            usable.append(path)
        except UserError as error:
            skipped += 1
            warn(f"{error}; skipped")
    if not usable:
        raise ValueError(f"{folder}: no usable images ({skipped} skipped)")
    if verbose:
        note = f", {skipped} skipped" if skipped else ""
        print(f"data: {len(usable)} images from {folder}{note}", file=sys.stderr)
    return usable

def listed_files(metadata: Path) -> tuple[list[Path], int]:
    """The files metadata.jsonl names, each once, and how many lines were skipped."""
    seen, skipped = {}, 0
    for line_number, line in enumerate(read_text(metadata, "captions file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            name = loads_unique(line)["file_name"]
            problem = None if isinstance(name, str) else "file_name is not a string"
        except (ValueError, KeyError, TypeError) as error:
            name, problem = None, f"{type(error).__name__}: {error}"
        if problem is None and name in seen:
            problem = f"file_name {name!r} repeats line {seen[name]}"
        if problem:
            skipped += 1
            warn(f"{metadata.name} line {line_number}: {problem}; skipped")
            continue
        seen[name] = line_number
    return [metadata.parent / name for name in seen], skipped

def load_crop(path: Path, height: int, width: int, offset: tuple, flip: bool) -> torch.Tensor:
    """The image resized to cover height x width, cropped at the relative offset: (3, H, W)."""
    image = load_image(path)
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BILINEAR)
    top, left = int(offset[0] * (size[1] - height + 1)), int(offset[1] * (size[0] - width + 1))
    image = image.crop((left, top, left + width, top + height))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image_to_tensor(image)

class Batches:
    """Seeded global batches: one CPU generator draws each epoch's order and every sample's crop,
    flip, sigma and noise, so a resumed run draws the same."""

    def __init__(self, size: int, seed: int):
        self.size, self.generator = size, torch.Generator().manual_seed(seed)
        self.order, self.cursor = [], 0

    def indices(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.cursor >= len(self.order):
                self.order = torch.randperm(self.size, generator=self.generator).tolist()
                self.cursor = 0
            out.append(self.order[self.cursor])
            self.cursor += 1
        return out

    def state(self) -> dict:
        order = torch.tensor(self.order, dtype=torch.long)
        return {"generator": self.generator.get_state(), "order": order, "cursor": self.cursor}

    def load(self, state: dict):
        self.generator.set_state(state["generator"])
        self.order, self.cursor = state["order"].tolist(), int(state["cursor"])

def save_safetensors(state: dict, path: Path, metadata: dict | None = None):
    from safetensors.torch import save_file

    with atomic_write(path) as temp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(temp), metadata=metadata)

@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over processes, on `device` (nccl takes CUDA tensors only)."""
        if self.world > 1:
            value = value.to(self.device, copy=True)
            dist.all_reduce(value)  # gloo has no AVG
            value /= self.world
        return value

    def barrier(self):
        if self.world > 1:
            dist.barrier()

def setup_distributed(device_name: str | None) -> Distributed:
    """One process, or one per GPU under `torchrun`."""
    device = device_dtype(device_name)[0]
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(0, 1, device)
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed: run without torchrun")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device)

def save_checkpoint(output: Path, step: int, model, optimizer, batches: Batches, lora: bool,
                    ctx: Distributed, keep: int, run: dict):
    """checkpoints/step-N/: trainable.safetensors (with the `run` record), then state.pt."""
    from torch.distributed.checkpoint import state_dict as dcp

    weights = trainable_state(model, lora)
    optim = dcp.get_optimizer_state_dict(model, optimizer, options=state_options(lora))
    if ctx.main:
        if any(not torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()):
            raise training_diverged(step, "a weight after the update", output)
        folder = output / "checkpoints" / f"step-{step:08d}"
        try:
            save_safetensors(weights, folder / "trainable.safetensors", {"run": json.dumps(run)})
            save_torch({"step": step, "optimizer": optim, "batches": batches.state()},
                       folder / "state.pt")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        for old in sorted((output / "checkpoints").glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()

def trainable_state(model, lora: bool) -> dict:
    from torch.distributed.checkpoint import state_dict as dcp

    state = dcp.get_model_state_dict(model, options=state_options(lora))
    return {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))} if lora else state

def state_options(lora: bool):
    from torch.distributed.checkpoint import state_dict as dcp

    return dcp.StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora,
                                strict=not lora)

def training_diverged(step: int, what: str, output: Path) -> ValueError:
    last = latest_checkpoint(output)
    kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was written"
    return ValueError(f"step {step}: {what} is not finite, so training stopped ({kept}); lower --lr"
                      + (" and --resume" if last else " and start again"))

def load_checkpoint(folder: Path, model, optimizer, batches: Batches, lora: bool, run: dict) -> int:
    """Resume from `folder`, or the newest intact checkpoint before it; returns the step."""
    from torch.distributed.checkpoint import state_dict as dcp

    def read(candidate):
        weights = candidate / "trainable.safetensors"
        state = load_state_file(candidate / "state.pt", ("step", "optimizer", "batches"))
        if not weights.is_file():
            raise ValueError(f"{weights}: missing")
        return state, check_weights(load_safetensors(weights), weights)

    folder, (state, weights) = read_checkpoint(folder, read)
    check_resumable(folder, run)
    expected = {key: value.shape for key, value in model.state_dict().items()
                if not lora or key.endswith((".lora_A", ".lora_B"))}
    if report := shape_mismatch(weights, expected):
        raise ValueError(f"{folder}: does not fit this model: {report}")
    try:
        options = state_options(lora)
        dcp.set_model_state_dict(model, weights, options=options)
        dcp.set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
        batches.load(state["batches"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:120]
        raise ValueError(f"{folder}: does not fit this model ({reason}); resume with the run's own "
                         "settings") from None
    print(f"resumed from {folder} at step {state['step']}", file=sys.stderr)
    return state["step"]

def check_resumable(folder: Path, run: dict):
    """Refuse another run's checkpoint (a damaged one is left to `load_checkpoint`)."""
    try:
        recorded = safetensors_metadata(folder / "trainable.safetensors").get("run")
    except UserError:
        return
    check_run(folder, recorded, run)

def check_run(folder: Path, recorded: str | None, run: dict):
    """Refuse a checkpoint whose run record differs from `run`, naming what differs."""
    try:
        theirs = json.loads(recorded) if recorded else None
    except ValueError:
        theirs = None
    if not isinstance(theirs, dict):
        raise ValueError(f"{folder}: holds no record of the run that wrote it, so it cannot be "
                         "resumed safely; start a new --output")
    for key, value in json.loads(json.dumps(run)).items():  # tuples become lists, as in the record
        if theirs.get(key) != value:
            there, here = json.dumps(theirs.get(key)), json.dumps(value)
            raise ValueError(f"{folder}: a checkpoint of another run ({key} {there} there, {here} "
                             "here); resume with its settings, or start a new --output")

def read_checkpoint(folder: Path, read):
    """(folder, read(folder)), or after a warning, the newest intact checkpoint before it."""
    older = [f.parent for f in folder.parent.glob("step-*/state.pt") if f.parent.name < folder.name]
    for candidate in [folder, *sorted(older, reverse=True)]:
        try:
            return candidate, read(candidate)
        except (UserError, ValueError) as error:
            warn(f"{error}; trying the checkpoint before it")
    raise ValueError(f"--resume: no intact checkpoint left in {folder.parent}")

def load_state_file(path: Path, keys: tuple) -> dict:
    check_regular_file(path, "checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except Exception as error:  # zip and pickle raise many types
        kind = type(error).__name__
        raise ValueError(f"{path}: damaged or truncated checkpoint file ({kind})") from None
    if not isinstance(state, dict) or not set(keys) <= state.keys():
        raise ValueError(f"{path}: not a checkpoint of this trainer")
    return state
# --- END copy: training utilities ---

# --- BEGIN copy of diffusion4k.py: LPIPS ---
LPIPS_VGG_LINEAR = "chaofengc/IQA-PyTorch-Weights/LPIPS_v0.1_vgg-a78928a0.pth"
LPIPS_VGG_BACKBONE = "timm/vgg16.tv_in1k/model.safetensors"  # torchvision's VGG16 weights
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)

class LPIPS(nn.Module):
    """LPIPS v0.1 with VGG16 (Zhang et al., 2018): at five ReLU outputs the squared difference of
    unit-normalised channel vectors is weighted by the 1x1 `lins`, averaged and summed."""

    TAPS = (3, 8, 15, 22, 29)  # ReLU outputs after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3

    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for item in VGG16_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(width, item, 3, padding=1), nn.ReLU()]
                width = item
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(self.features[i - 1].out_channels, 1, 1, bias=False)
                                  for i in self.TAPS)
        for name, value in (("shift", [-0.030, -0.088, -0.188]), ("scale", [0.458, 0.448, 0.450])):
            self.register_buffer(name, torch.tensor(value)[:, None, None], persistent=False)

    def forward(self, a, b):  # (B, 3, H, W) in [-1, 1] -> (B,)
        pairs = zip(self.lins, self.taps(a), self.taps(b))
        return sum(lin((fa - fb) ** 2).mean((1, 2, 3)) for lin, fa, fb in pairs)

    def taps(self, x):
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

def load_lpips(linear=LPIPS_VGG_LINEAR, backbone=LPIPS_VGG_BACKBONE, token=None) -> LPIPS:
    """LPIPS-vgg from lpips' linear layers and torchvision / timm VGG16 weights."""
    hint = (" (give local files with --lpips-linear / --lpips-backbone, or turn LPIPS off with "
            "--lpips-weight 0)")

    def read(spec, what):
        try:
            path = weight_file(spec, what, token)
        except (UserError, ValueError) as error:
            raise ValueError(f"{error}{hint}") from None
        if path.suffix == ".safetensors":
            return check_weights(load_safetensors(path, torch.float32), path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle raises many types
            raise ValueError(f"{what}: {path} is not a readable weights file "
                             f"({type(error).__name__})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        return check_weights(state, path)

    model = LPIPS()
    raw = read(backbone, "LPIPS backbone")
    state = {k[k.index("features.") :]: v.float() for k, v in raw.items() if "features." in k}
    state = {k: v for k, v in state.items() if int(k.split(".")[1]) < len(model.features)}
    lins = read(linear, "LPIPS linear layers")
    state |= {f"lins.{k[3]}.weight": v.float() for k, v in lins.items() if re.match(r"lin\d\.", k)}
    return assign_state_dict(model, state, "LPIPS-vgg weights").eval().requires_grad_(False)

def weight_file(spec, what: str, token=None) -> Path:
    """A local file, or `owner/repo/path/in/repo` on the Hub."""
    local = check_regular_file(Path(spec).expanduser(), "weights file")  # a FIFO would never end
    if local.is_file():
        return local
    parts = str(spec).split("/", 2)
    if local.exists() or len(parts) < 3 or str(spec).startswith((".", "/", "~")):
        raise ValueError(f"{what}: {spec} is neither a file nor a Hub spec owner/repo/path/in/repo")
    name = parts[2]
    path = resolve_source("/".join(parts[:2]), allow_patterns=(name,), token=token) / name
    if not path.is_file():
        raise ValueError(f"{what}: {spec} not found")
    return path
# --- END copy: LPIPS ---


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

NO_WEIGHTS = (
    "OP4KSR needs a LoRA checkpoint (--weights FILE.safetensors or owner/repo/path.safetensors); "
    "the authors have published none, so train one: `python op4ksr.py train --data HR_DIR "
    "--output runs/op4ksr` (FLUX.1-dev is gated: accept its licence and `huggingface-cli login`). "
    "Or run OMGSR-F's public LoRAs (--weights omgsr-f-1024-adapter/; see --recipe).")
RAW = argparse.RawDescriptionHelpFormatter
SR_EXAMPLES = """Examples:
  python op4ksr.py --input lr.png --weights op4ksr.safetensors         (4x, writes lr_op4ksr.png)
  python op4ksr.py --input photos/ --size 4096 --weights ... --output sr/   (longer side 4096)
  python op4ksr.py --input lr.png --weights omgsr-f-1024-adapter/ [--recipe omgsr-f]  (OMGSR-F)
Training: python op4ksr.py train --help"""
TRAIN_EXAMPLES = """Examples:
  torchrun --nproc_per_node 8 op4ksr.py train --data hr4k/ --output runs/op4ksr
  python op4ksr.py train ... --resume      continue from the newest checkpoint in --output
Writes OUTPUT/op4ksr.safetensors, OUTPUT/checkpoints/ and OUTPUT/train_log.jsonl."""

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        return train_sr_command(sr_train_parser().parse_args(argv[1:]))
    if argv and argv[0] == "calibrate-sigma":
        return calibrate_command(calibrate_parser().parse_args(argv[1:]))
    sr_command(sr_parser().parse_args(argv))

def sr_command(args):
    if not args.weights:
        raise UserError(NO_WEIGHTS)
    folder = omgsr_f_folder(args.weights, args.token)
    check_recipe_options(args, folder is not None)
    if folder is not None:
        omgsr_f_halves(folder)  # a broken adapter is refused before any image is read
    pairs = sr_outputs(args)
    if not pairs:
        return print("nothing to do: every output exists (--skip-existing)", file=sys.stderr)
    if folder is not None:
        return omgsr_f_command(args, folder, pairs)
    _, meta = read_op4ksr_metadata(args.weights, args.token)
    scale = args.scale or float(meta.get("scale", 4))
    jobs = decodable_jobs(pairs, lambda width, height: sr_size(width, height, scale, args.size))
    pipe = prepare(load_sr_pipeline(args.weights, args.flux, args.vae, args.device,
                                    DTYPES.get(args.dtype), args.token), args)
    settings = {"weights": str(args.weights), "sigma": pipe.sigma,
                "theta": pipe.transformer.config.theta, "color_fix": args.color_fix,
                "f16_decode": args.f16_decode, "base_flux": pipe.meta.get("base_flux", "")}
    write_results(jobs, args, one_pass(pipe, args), "OP4KSR", settings)

def omgsr_f_command(args, folder: Path, pairs):
    """OMGSR-F's adapter: its own inference (--recipe omgsr-f), or OP4KSR's patch-free pass."""
    upstream = args.recipe == "omgsr-f"
    jobs = decodable_jobs(pairs, lambda width, height: omgsr_f_job_size(args, width, height))
    stride, theta = (1, 10000.0) if upstream else (2 if args.vae_mode == "f16" else 1, args.theta)
    pipe = prepare(load_omgsr_f_pipeline(folder, args.flux, args.vae, args.device,
                                         DTYPES.get(args.dtype), args.token, theta, stride,
                                         args.text_encoders), args)
    vae = f"F{8 * stride} {pipe.meta['base_vae']}"
    settings = {"weights": str(args.weights), "weights_are": OMGSR_F_LABEL, "recipe": args.recipe,
                "sigma": pipe.sigma, "theta": theta, "vae": vae, "color_fix": args.color_fix,
                "base_flux": pipe.meta["base_flux"]}
    if not upstream:
        method = "OP4KSR's patch-free pass with OMGSR-F's weights"
        return write_results(jobs, args, one_pass(pipe, args), method, settings)
    scale = int(args.scale or 4)
    settings.update(scale=scale, process_size=args.process_size, latent="posterior mode")

    def make(image, width, height):
        return omgsr_f_image(pipe, image, scale, args.color_fix, args.process_size)

    write_results(jobs, args, make, "OMGSR-F", settings)

def one_pass(pipe: SRPipeline, args):
    return lambda image, width, height: tensor_to_image(
        super_resolve(pipe, image, width, height, args.color_fix))

def decodable_jobs(pairs, size_of) -> list:
    """(input, (width, height), output) per pair; every input decodes before any model loads."""
    jobs = [(path, size_of(*image_size(path)), output) for path, output in pairs]
    for path, _ in pairs:
        load_image(path)
    return jobs

def prepare(pipe: SRPipeline, args) -> SRPipeline:
    pipe.vae.decoder.partitioned = args.f16_decode == "partitioned"
    if args.compile:
        compile_blocks(pipe.transformer)
    return pipe

def write_results(jobs, args, make, method: str, settings: dict):
    """`make`'s image of each input saved; without --overwrite an output another run wrote
    meanwhile stays."""
    update = progress_bar("super-resolve", len(jobs))
    for i, (path, (width, height), output) in enumerate(jobs, start=1):
        if args.skip_existing and output.exists():
            print(f"{output} appeared meanwhile (another run?); skipped", file=sys.stderr)
        else:
            start, image = time.perf_counter(), load_image(path)
            record = {"input": path.name, **settings, "size": f"{width}x{height}"}
            info = {"method": method, "settings": json.dumps(record)}
            save_image(make(image, width, height), output, info, overwrite=args.overwrite)
            print(f"wrote {output} ({image.width}x{image.height} -> {width}x{height}, "
                  f"{time.perf_counter() - start:.1f} s)", file=sys.stderr)
        update(i)

def omgsr_f_job_size(args, width: int, height: int) -> tuple[int, int]:
    if args.recipe == "op4ksr":
        return sr_size(width, height, args.scale or 4.0, args.size)
    process, final = omgsr_f_sizes(width, height, int(args.scale or 4), args.process_size)
    if max(*process, *final) > MAX_SIDE or min(process) < 16:
        shown = f"{process[0]}x{process[1]}"
        raise UserError(f"{width}x{height}: OMGSR-F would process it at {shown}; sides must be "
                        f"between 16 and {MAX_SIDE} px")
    return final

def check_recipe_options(args, omgsr_f: bool):
    """Refuse options the weights or the recipe do not take; fill in the defaults."""
    options = (("--theta", args.theta), ("--vae-mode", args.vae_mode),
               ("--process-size", args.process_size), ("--text-encoders", args.text_encoders))
    given = [option for option, value in options if value is not None]
    if not omgsr_f and (given or args.recipe != "op4ksr"):
        option = given[0] if given else f"--recipe {args.recipe}"
        raise UserError(f"{option} needs OMGSR-F's adapter folder as --weights; an OP4KSR "
                        "checkpoint fixes these")
    if args.recipe == "omgsr-f":
        refused = {"--size": args.size is not None, "--theta": args.theta is not None,
                   "--vae-mode f16": args.vae_mode == "f16",
                   "a --scale that is not an integer": args.scale is not None and args.scale % 1}
        for option, bad in refused.items():
            if bad:
                raise UserError(f"--recipe omgsr-f takes no {option}: it runs OMGSR-F's own "
                                "inference")
    elif args.process_size is not None:
        raise UserError("--process-size is --recipe omgsr-f's")
    args.theta = args.theta or RFR_THETA
    args.vae_mode = args.vae_mode or ("f8" if args.recipe == "omgsr-f" else "f16")
    args.process_size = args.process_size or OMGSR_F_PROCESS_SIZE
    fixes = {None: "adain" if args.recipe == "omgsr-f" else "none", "nofix": "none"}
    args.color_fix = fixes.get(args.color_fix, args.color_fix)

def sr_outputs(args) -> list[tuple[Path, Path]]:
    """(input, output) pairs to do, checked before anything is read."""
    source = Path(args.input)
    inputs, outputs = sr_inputs(source, args.output)
    images = {path.resolve() for path in inputs}
    for output in outputs:
        if output.resolve() in images:
            raise UserError(f"--output: {output} is an input image")
    given = [("--input", source), ("--weights", args.weights), ("--flux", args.flux),
             ("--vae", args.vae), ("--text-encoders", args.text_encoders)]
    check_apart([("--output", output) for output in outputs], given)
    first_input = {}
    for path, output in zip(inputs, outputs):
        if output in first_input:
            raise UserError(f"{first_input[output].name} and {path.name} would both be written "
                            f"to {output}: rename one of them")
        first_input[output] = path
    existing = [output for output in outputs if output.is_file()]
    if existing and not (args.overwrite or args.skip_existing):
        more = (f" (and {len(existing) - 1} more of the {len(outputs)} outputs)"
                if len(existing) > 1 else "")
        way = ("--skip-existing to keep them and do the rest, or --overwrite" if source.is_dir()
               else "--overwrite to replace it")
        raise UserError(f"{existing[0]} exists{more}; pass {way}")
    pairs = [(path, out) for path, out in zip(inputs, outputs)
             if not (args.skip_existing and out.is_file())]
    for _, output in pairs:
        check_output_file(output, args.overwrite)
    return pairs

def sr_inputs(source: Path, output) -> tuple[list[Path], list[Path]]:
    if not source.is_dir():
        if not source.exists():
            raise UserError(f"{source}: no such file or folder")
        return [source], [Path(output) if output else source.with_name(f"{source.stem}_op4ksr.png")]
    inputs = sorted(p for p in source.iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not inputs:
        raise UserError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)})")
    folder = Path(output or f"{source.resolve()}_op4ksr")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output {folder} is a file; a folder --input needs an output folder "
                        f"(default: {source.name}_op4ksr/)")
    return inputs, [folder / f"{path.stem}.png" for path in inputs]

def sr_size(width: int, height: int, scale: float | None, size: int | None) -> tuple[int, int]:
    factor = size / max(width, height) if size is not None else scale
    sides = f"target sides must be between 32 and {MAX_SIDE} px"
    if not factor * max(width, height) < MAX_SIDE + 1:  # before round(): it would overflow
        raise UserError(f"{width}x{height} x {factor:g}: {sides}")
    target = (round(width * factor), round(height * factor))
    shown = f"{target[0]}x{target[1]}"
    if max(target) > MAX_SIDE or min(target) < 32:
        raise UserError(f"{width}x{height} -> {shown}: {sides}")
    if width > target[0] or height > target[1]:
        raise UserError(f"the input ({width}x{height}) is already larger than the target {shown}")
    return target

def sr_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="op4ksr.py", epilog=SR_EXAMPLES, formatter_class=RAW,
                            description="OP4KSR: one-step, patch-free 4K super-resolution.")
    add = parser.add_argument
    add("--input", required=True, help="LR image, or a folder of images")
    add("--output", help="output image or folder (default: INPUT_op4ksr)")
    add("--weights", help="OP4KSR .safetensors (file or Hub), or OMGSR-F's adapter folder")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--scale", type=number(1), help="SR factor (default: the checkpoint's)")
    target.add_argument("--size", type=integer(32, MAX_SIDE), help="target longer side in px")
    add("--color-fix", choices=["none", "nofix", "wavelet", "adain"],
        help="match the LR colours (default: none; adain with --recipe omgsr-f)")
    add("--flux", help="base Flux (default: the checkpoint's)")
    add("--vae", help="F16 VAE (default: the checkpoint's)")
    add_recipe(parser, SRTrainRecipe, ["f16_decode", "text_encoders", "device", "dtype", "token"])
    add("--recipe", choices=["op4ksr", "omgsr-f"], default="op4ksr",
        help="with OMGSR-F's adapter: one patch-free pass, or OMGSR-F's own tiled inference")
    add("--theta", type=number(1), help="op4ksr recipe: RoPE base (default 100, RFR)")
    add("--vae-mode", choices=["f16", "f8"], help="op4ksr recipe: the VAE (default f16)")
    add("--process-size", type=integer(64, MAX_SIDE),
        help=f"omgsr-f recipe: its --process_size (default {OMGSR_F_PROCESS_SIZE})")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    existing.add_argument("--skip-existing", action="store_true", help="keep existing outputs")
    add("--compile", action="store_true", help="torch.compile each Flux block")
    return parser

def train_sr_command(args):
    r = SRTrainRecipe(**vars(args))
    check_crop(r.crop, r.scale)
    if r.init:  # a wrong folder is refused before anything loads
        folder = omgsr_f_folder(r.init, r.token)
        if folder is None:
            raise UserError(f"--init {r.init}: not a folder; give OMGSR-F's adapter folder")
        omgsr_f_halves(folder)
        r.init = str(folder)
    if not any(astuple(r.loss_weights)):
        raise UserError("every loss weight is 0: nothing to train")
    if not r.prompt.strip():
        raise UserError("--prompt is blank: give a prompt, or leave the option out")
    output, main = Path(r.output), int(os.environ.get("RANK", "0")) == 0
    inputs = ("data", "flux", "vae", "text_encoders", "lpips_linear", "lpips_backbone", "init")
    check_apart([("--output", output)],
                [("--" + name.replace("_", "-"), getattr(r, name)) for name in inputs])
    resume_from = check_train_output(output, r.resume, "op4ksr.safetensors")
    if resume_from is not None:  # before any weight is read: another run's checkpoint is refused
        check_resumable(resume_from, r.run)
    try:
        with undone_on_failure(output, main), folder_lock(output, main):
            train_sr(r, resume_from)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

def sr_train_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="op4ksr.py train", epilog=TRAIN_EXAMPLES, formatter_class=RAW,
                            description="Train the OP4KSR LoRAs on 4K HR images, degraded on the "
                                        "fly (Real-ESRGAN).")
    add_recipe(parser, SRTrainRecipe)
    return parser

def calibrate_command(args):
    check_crop(args.crop, args.scale)
    files = vae_image_files(args.data)
    count = min(args.max_images or len(files), len(files))
    device, dtype = device_dtype(args.device)
    vae = load_vae(args.vae, dtype, device, stride=2, token=args.token)
    check_crop(args.crop, args.scale, vae.config.downsample_factor)
    latents = calibration_latents(files, vae, args.crop, args.scale, args.batch_size, count,
                                  args.seed)
    t, sigma = matched_sigma(latents, update=progress_bar("calibrate-sigma", count))
    print(f"matched mid-timestep t = {t} of {OMGSR_STEPS}: sigma = {sigma:.6f} "
          f"({count} images, crop {args.crop}, scale {args.scale}, batch {args.batch_size})")
    print(f"the default --sigma is {OMGSR_SIGMA:.6f} (OMGSR-F's t = {OMGSR_MID_TIMESTEP}): this "
          f"is {sigma - OMGSR_SIGMA:+.6f} from it; train with --sigma {sigma:.6f}")

def calibrate_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="op4ksr.py calibrate-sigma", formatter_class=RAW,
        description="OMGSR's mid-timestep calibration: the sigma at which the noisy HR latent\n"
                    "has the LR latent's SNR.",
        epilog="Example:\n  python op4ksr.py calibrate-sigma --data hr4k/ --max-images 200")
    add_recipe(parser, SRTrainRecipe, ["data", "vae", "crop", "scale", "device", "token"])
    add = parser.add_argument
    add("--max-images", type=integer(1), help="at most this many images, one crop each")
    add("--batch-size", type=integer(1), default=1, help="images per SNR average")
    add("--seed", type=SEED, default=0, help="as train's: the same pairs")
    return parser


if __name__ == "__main__":
    hint = "try a smaller --size or --scale (training: a smaller --crop)"
    sys.exit(run_cli(main, memory_hint=hint))

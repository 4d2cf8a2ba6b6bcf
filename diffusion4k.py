"""Diffusion-4K: direct ultra-high-resolution (4096x4096) text-to-image with latent diffusion.

Zhang et al., "Diffusion-4K: Ultra-High-Resolution Image Synthesis for Latent Diffusion Models",
CVPR 2025, arXiv 2503.18352; the extension "Ultra-High-Resolution Image Synthesis: Data, Method and
Evaluation", arXiv 2506.01331 (SC-VAE). Released weights: `zhang0jhon/flux_wavelet` and
`zhang0jhon/flux_wavelet_v2_sc` (Flux fine-tunes; no SD3 weights are public).

With the F8 VAE and Flux's 2x2 patches a 4096^2 image is 65,536 tokens, too many to attend over.
Diffusion-4K (1) swaps in an F16 VAE: the same weights with a stride-2 `conv_in` and a nearest x2
upsample before `conv_out`, so 4096^2 is 16,384 tokens (`generate`); (2) fine-tunes Flux or SD3
at 4096^2 on Aesthetic-4K with Wavelet-based Latent Fine-tuning (WLF): for
z = (1 - sigma) x0 + sigma noise and predicted velocity v_hat,
    x0_hat = z - sigma v_hat,   L_WLF = mean_{b,i} w_b (DWT(x0_hat) - DWT(x0))_{b,i}^2
over the one-level Haar subbands b = LL, LH, HL, HH (equal weights upstream: the x0 MSE); (3) the
extension retrains the F16 decoder to decode like the F8 decoder it was cut from (SC-VAE): for
crops x, reconstructions x_hat, the decoders' last feature maps f (F16 student at H/2, F8 teacher
at H), a patch discriminator D and VQGAN's adaptive weight lambda,
    L_SC = MSE(x_hat, x) + 0.1 LPIPS(x_hat, x) + MSE(f_student, avgpool2(f_teacher))
           - 0.05 lambda D(x_hat)

Commands
    python diffusion4k.py --prompt "a lighthouse at dawn" --height 4096 --width 4096
    python diffusion4k.py --model stabilityai/stable-diffusion-3-medium-diffusers --prompt "..."
    python diffusion4k.py --prompts prompts.txt --output-dir out/ [--skip-existing]
    python diffusion4k.py train --model zhang0jhon/flux_wavelet_v2_sc --data 4k/train --output wlf
    torchrun --nproc_per_node 8 diffusion4k.py train ...                 # FSDP2 over 8 GPUs
    python diffusion4k.py train-vae --data 4k/train --output sc-vae      # SC-VAE decoder
    python diffusion4k.py [train | train-vae] --help

After the method: the models (Flux, SD3, the VAE, T5 and CLIP), the pipeline, training (WLF,
SC-VAE: each a recipe, a step function and a loop), weight loading, the command line. Code between
`# --- BEGIN kit` and `# --- END kit` is copied by op4ksr.py and cupscale.py (tests/sync_copies.py).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

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
    DIFFUSION_PREFIX,
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
    image_to_tensor,
    integer,
    is_repo_id,
    latest_checkpoint,
    load_image,
    load_safetensors,
    loads_unique,
    mismatch_report,
    number,
    positive,
    progress_bar,
    read_component,
    read_json,
    read_prefixed,
    read_text,
    resolve_source,
    run_cli,
    safetensors_keys,
    safetensors_metadata,
    save_image,
    save_torch,
    seed_everything,
    shape_mismatch,
    source_name,
    tensor_to_image,
    undone_on_failure,
    verify_image,
    warn,
)

# Sampling as Diffusion-4K runs it (its README for the Flux fine-tunes, its SD3 script).
DEFAULTS = {"flux": dict(steps=50, guidance=5.0), "flux-schnell": dict(steps=4, guidance=0.0),
            "sd3": dict(steps=28, guidance=7.0)}
MU_CAP_TOKENS = 16384  # Flux's timestep-shift rule stops at this token count (see flux_sigmas)
WHOLE_DECODE_MAX_SIDE = 4096  # larger images are decoded in tiles (see generate)
DECODE_TILE = 128  # latent pixels per decode tile: 2048 px with the F16 VAE
PROMPT_BATCH = 8  # prompts per text-encoder batch (T5-XXL's memory grows with it)
WLF_UPSTREAM = (1.0, 1.0, 1.0, 1.0)  # WLF subband weights (LL, LH, HL, HH): equal, as upstream


# ==== the method: sampling at 4K

@torch.no_grad()
def generate(pipe: Pipeline, condition: dict, height: int, width: int, steps: int, guidance: float,
             seed: int, negative: dict | None = None, mu: float | None = None, progress=None,
             vae_tile: int | None = None) -> torch.Tensor:
    """One image, (3, H, W) in [-1, 1] on the CPU. Above WHOLE_DECODE_MAX_SIDE the decoder's
    activations need tens of GB, so it decodes ramp-blended tiles of `vae_tile` latent pixels (0:
    whole): GroupNorm and attention then see one tile, close to the whole decode."""
    vae, device = pipe.vae.config, pipe.device
    h, w = height // vae.downsample_factor, width // vae.downsample_factor
    noise = torch.randn(1, vae.z_channels, h, w, generator=seed_everything(seed))  # any device
    condition = {key: value.to(device, pipe.dtype) for key, value in condition.items()}

    def resting(module, offloaded: bool):  # an offloaded module visits the GPU only to run
        return on_device(module, device, "cpu") if offloaded else contextlib.nullcontext()
    tokens = (h // 2) * (w // 2)
    velocity, sigmas = SAMPLING[pipe.kind](pipe, condition, negative, guidance, steps, tokens, mu)
    with resting(pipe.transformer, pipe.offload == "model"):
        z = euler_sample(velocity, noise.to(device), sigmas, progress)
    if vae_tile is None:
        vae_tile = 0 if max(height, width) <= WHOLE_DECODE_MAX_SIDE else DECODE_TILE
    with resting(pipe.vae, pipe.offload != "none"):
        image = tiled_vae(pipe.vae.decode, z, vae_tile or max(h, w), vae_tile // 4, device,
                          pipe.dtype)
    return image[0].clamp(-1, 1).cpu()

def flux_sampling(pipe, condition, negative, guidance, steps, tokens, mu):
    """Flux-dev is guidance-distilled (the scale is an input, no negative prompt); schnell takes
    no guidance and no shift."""
    distilled = None if pipe.schnell else guidance

    def velocity(z, sigma):
        return pipe.transformer.velocity(z.to(pipe.dtype), sigma, condition, distilled)
    return velocity, flux_sigmas(steps, tokens, mu, shift=not pipe.schnell)

def sd3_sampling(pipe, condition, negative, guidance, steps, tokens, mu):
    """Classifier-free guidance: unconditional (negative prompt, else zeros) and conditional
    predictions in one batch."""
    negative = negative or {key: torch.zeros_like(value) for key, value in condition.items()}
    both = {key: torch.cat([negative[key].to(value), value]) for key, value in condition.items()}

    def velocity(z, sigma):
        z = torch.cat([z, z]).to(pipe.dtype)
        uncond, cond = pipe.transformer.velocity(z, sigma, both).float().chunk(2)
        return uncond + guidance * (cond - uncond)
    return velocity, sd3_sigmas(steps)

SAMPLING = {"flux": flux_sampling, "sd3": sd3_sampling}  # (velocity, sigmas) of each model family

def euler_sample(velocity, z: torch.Tensor, sigmas: torch.Tensor, progress=None) -> torch.Tensor:
    """Euler steps z <- z + (sigma_next - sigma) v(z, sigma) of dz/dsigma = v = noise - x0."""
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        z = z + (sigma_next - sigma) * velocity(z, sigma).to(z.dtype)
        if progress is not None:
            if z.is_cuda:  # the bar then times the GPU, not the queueing of its kernels
                torch.cuda.synchronize(z.device)
            progress(i + 1, len(sigmas) - 1)
    return z

def flux_sigmas(steps: int, image_tokens: int, mu: float | None = None,
                shift: bool = True) -> torch.Tensor:
    """steps + 1 noise levels from 1 to 0, shifted by mu (default: `flux_mu` of the token count,
    capped at MU_CAP_TOKENS).

    Flux's rule was fitted up to 4096 tokens; Diffusion-4K applies it at the real count: 16,384
    tokens at 4096^2 with F16, mu = 3.23. With F8 the image has 65,536 tokens, mu = 11.55: every
    sigma but the last rounds to 1, one real step. The cap keeps upstream's value up to 4096^2
    with F16 and a sane one beyond."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    mu = flux_mu(min(image_tokens, MU_CAP_TOKENS)) if mu is None else mu
    return time_shift(sigmas, mu) if shift else sigmas

def flux_mu(image_tokens: int) -> float:
    """Flux's resolution-dependent shift: the line through (256 tokens, 0.5) and (4096, 1.15)."""
    return 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_tokens - 256)

# --- BEGIN kit: flow-matching schedule ---
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
# --- END kit: flow-matching schedule ---


# ==== the method: the F16 VAE

# --- BEGIN kit: F16 VAE ---
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
# --- END kit: F16 VAE ---


# ==== the method: Wavelet-based Latent Fine-tuning (WLF)

def training_loss(model, x0, noise, sigma, condition, guidance=None, subband_weights=WLF_UPSTREAM):
    """WLF as upstream runs it: z = (1 - sigma) x0 + sigma noise, x0_hat = z - sigma v_hat, and
    `wlf_loss` of x0_hat against x0."""
    s = sigma.view(-1, 1, 1, 1).to(x0)
    z = (1 - s) * x0 + s * noise
    v = model.velocity(z, sigma.to(x0), condition, guidance)
    return wlf_loss(z - s * v.float(), x0, subband_weights)

def wlf_loss(pred_x0: torch.Tensor, target_x0: torch.Tensor,
             subband_weights=WLF_UPSTREAM) -> torch.Tensor:
    """Mean of w_band (DWT(pred_x0) - DWT(target_x0))^2, weights for (LL, LH, HL, HH).

    With equal weights this is exactly the latent MSE: the one-level Haar DWT is an orthonormal
    2x2-block transform, keeping the sum of squares and the element count. As x0_hat - x0 =
    -sigma (v_hat - v), that is sigma^2 MSE(v_hat, noise - x0) per sample. Only unequal weights
    (`--wavelet-weights`, our extension) change the objective."""
    weights = torch.as_tensor(subband_weights, dtype=torch.float32, device=pred_x0.device)
    bands = haar_dwt(pred_x0.float() - target_x0.float())  # (B, C, 4, H/2, W/2); the DWT is linear
    return (weights.view(4, 1, 1) * bands.square()).mean()

# --- BEGIN kit: Haar wavelets ---
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
# --- END kit: Haar wavelets ---

def encode_latents(vae: AutoEncoder, images: torch.Tensor,
                   eps: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised fp32 latents (x - shift) * scale (for SD3 too; upstream's SD3 training omits the
    shift) of the posterior sample mean + std * eps, or of the mean when eps is None."""
    if eps is None:
        return vae.encode(images).float()
    mean, logvar = vae.encoder(images).float().chunk(2, dim=1)
    sample = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps.to(mean)
    return (sample - vae.config.shift_factor) * vae.config.scale_factor

def sample_sigmas(n: int, scheme: str, shift: float, generator: torch.Generator,
                  table: int = 1000) -> torch.Tensor:
    """Training noise levels as upstream draws them: u ~ U(0, 1) (Flux) or sigmoid(N(0, 1)) (SD3)
    picks sigma = 1 - floor(table u) / table of the scheduler's table, then the static shift
    sigma' = s sigma / (1 + (s - 1) sigma). Both laws of u are symmetric about 1/2, so sigma
    follows u's law."""
    if scheme == "uniform":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
    elif scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
    else:
        raise ValueError(f"unknown timestep sampling {scheme!r}")
    sigmas = 1 - torch.floor(u * table).clamp(max=table - 1) / table
    return time_shift(sigmas, math.log(shift)).float() if shift != 1 else sigmas.float()


# ==== the method: scale-consistent F16 decoder (SC-VAE)

def sc_vae_loss(x: torch.Tensor, student: AutoEncoder, teacher: AutoEncoder, posterior=None,
                lpips=None, disc=None, sc_weight: float = 1.0, lpips_weight: float = 0.1,
                gan_weight: float = 0.05):
    """L_SC of the module docstring for crops x in [-1, 1], with the given weights; the F8
    teacher's f comes from its own latent, lambda balances the reconstruction term (LPIPS, else
    MSE) against D's at the student's conv_out. lpips or disc None drops its term; latents are
    drawn with the generator `posterior` (None: the mean). Returns (terms, x_hat detached)."""
    with torch.no_grad():
        target = teacher.decoder.features(encode_raw(teacher, x, posterior))
        z = encode_raw(student, x, posterior)
    features = student.decoder.features(z)
    pred = student.decoder.head(features).float().clamp(-1, 1)
    losses = {"mse": F.mse_loss(pred, x), "sc": scale_consistency_loss(features, target)}
    if lpips is not None:
        losses["lpips"] = lpips(pred, x).float().mean()
    loss = losses["mse"] + sc_weight * losses["sc"] + lpips_weight * losses.get("lpips", 0.0)
    if disc is not None:
        losses["gen"] = -disc(pred).float().mean()
        reconstruction, last = losses.get("lpips", losses["mse"]), student.decoder.conv_out.weight
        losses["balance"] = adaptive_weight(reconstruction, losses["gen"], last)
        loss = loss + gan_weight * losses["balance"] * losses["gen"]
    return {"loss": loss, **losses}, pred.detach()

def scale_consistency_loss(student_features: torch.Tensor,
                           teacher_features: torch.Tensor) -> torch.Tensor:
    """MSE(f_student, avgpool2(f_teacher)) of the decoders' maps before the last upsample.

    Upstream upsamples the student's map (nearest x2) instead: MSE(up(s), t) = MSE(s, avgpool2(t))
    + the within-block variance of t, a constant: the same gradient at a quarter of the memory."""
    return F.mse_loss(student_features.float(), F.avg_pool2d(teacher_features.float(), 2))

class Discriminator(nn.Module):
    """Paella's patch discriminator, as SC-VAE uses it: (B, 1, H/64, W/64); crops need at least
    128 px (InstanceNorm needs 2x2 maps)."""

    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for i, out in enumerate((64, 128, 256, 512, 512, 512)):
            conv = nn.Conv2d(width, out, 3, stride=2, padding=1)
            layers += [nn.utils.parametrizations.spectral_norm(conv)]
            layers += [nn.InstanceNorm2d(out), nn.LeakyReLU(0.2)] if i else [nn.LeakyReLU(0.2)]
            width = out
        self.net = nn.Sequential(*layers, nn.Conv2d(width, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return self.net(x)

def discriminator_loss(disc: Discriminator, real: torch.Tensor, fake: torch.Tensor,
                       gp_weight: float = 10.0):
    """Hinge loss and gradient penalty gp_weight * mean_i (||grad_{x_i} sum D(x_i)|| - 1)^2 on the
    reals.

    D's sigmoid output lies in (0, 1), so the hinge never clips: a bounded critic held in check by
    the penalty. The penalty differentiates each map's sum (upstream's grad_outputs of ones), not
    its mean; images are independent (InstanceNorm), so one gradient of the total gives each's."""
    real = real.detach().requires_grad_(True)
    d_real, d_fake = disc(real), disc(fake.detach())
    hinge = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    (grad,) = torch.autograd.grad(d_real.float().sum(), real, create_graph=True)
    penalty = gp_weight * (grad.flatten(1).norm(dim=1) - 1).square().mean()
    return hinge, penalty

def adaptive_weight(reconstruction: torch.Tensor, generator_loss: torch.Tensor, last: torch.Tensor):
    """VQGAN's lambda ||grad reconstruction|| / max(||grad generator_loss||, 1e-8), at most 1e4."""
    (a,) = torch.autograd.grad(reconstruction, last, retain_graph=True)
    (b,) = torch.autograd.grad(generator_loss, last, retain_graph=True)
    return (a.norm() / b.norm().clamp(min=1e-8)).clamp(max=1e4).detach()


# ==== the models: transformers

# --- BEGIN kit: transformer blocks ---
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
# --- END kit: transformer blocks ---

# --- BEGIN kit: Flux transformer ---
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
# --- END kit: Flux transformer ---

# --- BEGIN kit: SD3 transformer ---
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
# --- END kit: SD3 transformer ---


# ==== the models: VAE

# --- BEGIN kit: VAE ---
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
# --- END kit: VAE ---


# ==== the models: text encoders and tokenizers

# --- BEGIN kit: text encoders ---
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
# --- END kit: text encoders ---


# ==== pipeline

def load_pipeline(model, vae="f16", device=None, dtype=None, text_source=None, vae_source=None,
                  offload="none", token=None) -> Pipeline:
    """A Flux or SD3 pipeline folder or Hub repo, or a transformer file with the text encoders of
    `text_source` and the VAE of `vae_source`."""
    device, dtype = device_dtype(device, dtype)
    kind, single_file = detect_kind(model, token), Path(model).expanduser().is_file()
    if kind == "flux" and dtype == torch.float16:
        raise UserError("Flux's activations overflow fp16: use bf16 (the default on CUDA) or fp32")
    text_source = text_source or (TEXT_SOURCES[kind] if single_file else model)
    vae_source = vae_source or (text_source if single_file and kind == "flux" else model)
    rest_device = "cpu" if offload != "none" else device  # model and VAE between uses
    # an unreachable tokenizer fails before 12B parameters load
    component_path(text_source, "tokenizer", token, ("*.json", "*.txt"))
    print(f"loading {kind} transformer from {model}", file=sys.stderr)
    load = load_flux if kind == "flux" else load_sd3
    transformer = load(model, dtype, rest_device, token=token)
    if offload == "blocks":
        stream_blocks(transformer, device)
    # a single file has no config: the family's factors
    factors = (FLUX_VAE if kind == "flux" else SD3_VAE) if Path(str(vae_source)).is_file() else None
    autoencoder = load_vae(vae_source, dtype, rest_device, stride={"f8": 1, "f16": 2}[vae],
                           token=token, scale_factor=getattr(factors, "scale_factor", None),
                           shift_factor=getattr(factors, "shift_factor", None))
    # Stability's all-in-one SD3 files carry the text encoders (not their tokenizers)
    keys = safetensors_keys(model) if single_file else []
    own = model if any(key.startswith("text_encoders.") for key in keys) else None
    encoders, tokenizers = load_text_encoders(kind, text_source, dtype, transformer, token, own)
    return Pipeline(kind, transformer, autoencoder, encoders, tokenizers, device, dtype, str(model),
                    offload)

def detect_kind(source, token=None) -> str:
    """"flux" or "sd3", from a folder's model_index.json or a file's keys."""
    path = Path(source).expanduser()
    if path.is_file():  # original (BFL / Stability) or diffusers key names
        keys = [key.split(DIFFUSION_PREFIX)[-1] for key in safetensors_keys(path)]
        if any(key.startswith(("double_blocks.", "single_transformer_blocks.")) for key in keys):
            return "flux"
        if any(key.startswith(("joint_blocks.", "pos_embed.pos_embed")) for key in keys):
            return "sd3"
        t5, vae = "a T5 text encoder", "a VAE, not a transformer"
        looks = {"encoder.block.": t5, "shared.": t5, "text_model.": "a CLIP text encoder",
                 "decoder.": vae, "encoder.": vae}
        guess = next((f"it looks like {what}" for start, what in looks.items()
                      if any(k.startswith(start) for k in keys)), None)
        what = guess or f"its first keys: {', '.join(keys[:3]) or 'none'}"
        raise UserError(f"{source}: not a Flux or SD3 transformer file; {what}")
    folder = resolve_source(source, allow_patterns=("model_index.json", "transformer/config.json"),
                            token=token)
    for index in ("model_index.json", "transformer/config.json", "config.json"):
        index = folder / index
        name = str(read_json(index).get("_class_name", "")) if index.exists() else ""
        if "Flux" in name:
            return "flux"
        if "StableDiffusion3" in name or "SD3" in name:
            return "sd3"
    raise UserError(f"{source}: no model_index.json naming a Flux or SD3 pipeline")

def stream_blocks(transformer: nn.Module, device):
    """Keep the transformer's blocks in CPU memory, each copied to `device` for its own forward:
    the 12B Flux then needs the GPU memory of two blocks. On CUDA the next block is copied from
    pinned memory on a side stream while the current one computes."""
    blocks = []
    for child in transformer.children():
        if isinstance(child, nn.ModuleList):
            blocks += child
        else:
            child.to(device)
    for name, buffer in list(transformer.named_buffers(recurse=False)):
        setattr(transformer, name, buffer.to(device))
    BlockStream(blocks, torch.device(device))

class BlockStream:
    """`stream_blocks`' hooks: block i waits for its copy and sends for block i + 1 (the last
    for the first); they stay eager under `compile_blocks`."""

    def __init__(self, blocks: list[nn.Module], device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.copier = torch.cuda.Stream(device) if self.cuda else None
        self.slots = [weight_slots(block) for block in blocks]
        self.host = [[held(slot).cpu() for slot in slots] for slots in self.slots]
        if self.cuda:  # copies from pinned memory run asynchronously, at the link's full speed
            self.host = [[t.pin_memory() for t in tensors] for tensors in self.host]
        for slots, tensors in zip(self.slots, self.host):
            place(slots, tensors)
        self.copies = {}  # block index -> (its tensors on `device`, their copy's event)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(functools.partial(self.arrive, i))
            block.register_forward_hook(functools.partial(self.leave, i))

    def send(self, i: int):
        if i in self.copies:
            return
        with torch.cuda.stream(self.copier) if self.cuda else contextlib.nullcontext():
            copies = [t.to(self.device, non_blocking=self.cuda) for t in self.host[i]]
            self.copies[i] = copies, self.copier.record_event() if self.cuda else None

    @torch.compiler.disable
    def arrive(self, i: int, block, args):
        self.send(i)
        copies, copied = self.copies.pop(i)
        if copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for copy in copies:
                copy.record_stream(compute)  # made on the copy stream: freed after this one used it
        place(self.slots[i], copies)
        self.send((i + 1) % len(self.slots))

    @torch.compiler.disable
    def leave(self, i: int, block, args, output):
        place(self.slots[i], self.host[i])

# --- BEGIN kit: pipeline ---
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
# --- END kit: pipeline ---

# --- BEGIN kit: tiled VAE ---
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
# --- END kit: tiled VAE ---


# ==== WLF training

# --- BEGIN kit: recipes ---
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
# --- END kit: recipes ---

def wavelet_weights(text: str) -> tuple:
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 4 or not all(0 <= w < math.inf for w in weights) or max(weights) == 0:
        raise UserError(f"--wavelet-weights {text!r}: give four weights >= 0 for LL,LH,HL,HH, "
                        "e.g. 1,2,2,2")
    return weights

def crop_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        height = width = 0
    if min(height, width) < 1:
        raise UserError(f"--crop {text!r}: give HEIGHTxWIDTH with positive sides, e.g. 4096x4096")
    return height, width

def accumulation_count(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return integer(1)(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (or auto)") from None

POSTERIOR = dict(choices=["sample", "mean"], help="latents: posterior sample or mean")

@dataclass
class WLFRecipe:
    """WLF fine-tuning as upstream runs it (train_flux.sh / train_sd3.sh): 20,000 steps of a global
    batch of 32 (Flux) or 64 (SD3), AdamW (0.9, 0.999), square crops, flips, posterior samples.

    bf16 is autocast over fp32 master weights without autocast's weight cache, which would hold a
    bf16 copy of every weight (under FSDP2: the whole model on every GPU) for no gain here. Unlike
    FSDP2's MixedPrecisionPolicy, every process count then runs the same arithmetic."""

    model: str = option("black-forest-labs/FLUX.1-dev", "base pipeline: Hub repo or folder")
    vae: str = option("f16", "Diffusion-4K's F16 VAE or the stock F8", choices=["f16", "f8"])
    resolution: int = option(4096, "images are resized to cover the crop", type=integer(1))
    crop: tuple | None = option(None, "HEIGHTxWIDTH (default: RESOLUTION square)", type=crop_size)
    batch_size: int = option(1, "images per process per micro-batch", type=integer(1))
    grad_accum: int | None = option(None, "micro-batches per step (auto: upstream's global batch)",
                                    type=accumulation_count, metavar="N|auto")
    steps: int = option(20000, "optimizer steps", type=integer(1))
    lr: float = option(1e-6, "AdamW learning rate, constant", type=positive(1.0))
    warmup_steps: int = option(0, "linear warm-up steps", type=integer(0))
    weight_decay: float = option(1e-4, "AdamW weight decay", type=number(0))
    max_grad_norm: float = option(1.0, "gradient clipping (total norm)", type=positive())
    lora_rank: int = option(0, "LoRA rank (0: train all weights)", type=integer(0))
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank)", type=positive())
    wavelet_weights: tuple = option(WLF_UPSTREAM, "weights of LL,LH,HL,HH", type=wavelet_weights)
    posterior: str = option("sample", **POSTERIOR)
    guidance: float = option(3.5, "Flux-dev: the distilled guidance fed", type=number(0, 100))
    timestep_sampling: str | None = option(None, "law of sigma (Flux uniform, SD3 logit_normal)",
                                           choices=["uniform", "logit_normal"])
    shift: float | None = option(None, "static sigma shift (Flux 1, SD3 3)", type=positive())
    max_sequence_length: int = option(77, "T5 tokens of the captions", type=integer(1, 512))
    gradient_checkpointing: bool = option(True, "recompute block activations in backward",
                                          action=argparse.BooleanOptionalAction)
    dtype: str | None = option(None, "bf16 autocast (CUDA default) or fp32",
                               choices=["bf16", "fp32"])
    seed: int = option(0, "seed of data order, crops, noise, LoRA init", type=SEED)
    checkpoint_every: int = option(1000, "steps per checkpoint", type=integer(1))
    keep_checkpoints: int = option(2, "checkpoints kept (0: all)", type=integer(0))
    log_every: int = option(10, "steps between log lines", type=integer(1))

UPSTREAM_GLOBAL_BATCH = {"flux": 32, "sd3": 64}  # 4 / 8 per GPU x 8 GPUs
UPSTREAM_SIGMAS = {"flux": ("uniform", 1.0), "sd3": ("logit_normal", 3.0)}  # law of u, shift

def train(r: WLFRecipe, data, output, resume=None, text_cache=None, device=None,
          token=None) -> list[tuple[int, float]]:
    """Fine-tune with WLF; returns this call's (step, loss) pairs."""
    ctx, output = setup_distributed(device), Path(output)
    check_apart([("--output", output), ("--text-cache", text_cache)],
                [("--data", data), ("--model", r.model)])
    check_train_output(output, resume)
    if resume:  # before any weight is read: a checkpoint of another run is refused now
        resume = latest_checkpoint(output) if resume == "latest" else Path(resume)
        check_resumable(resume, wlf_run(r))
    examples = read_dataset(data, verbose=ctx.main)
    cache = Path(text_cache) if text_cache else None
    if cache:
        check_output_file(cache, overwrite=True, suffixes=(".safetensors",))
        text_cache_key(cache)
    accumulation = accumulation_steps(r, ctx.world, token)
    with undone_on_failure(output, ctx.main), folder_lock(output, ctx.main):
        # everything rests on the CPU while the text is encoded; the encoders then leave
        dtype = device_dtype(ctx.device, r.dtype)[1]
        pipe = load_pipeline(r.model, r.vae, ctx.device, dtype, offload="model", token=token)
        pipe.tokenizers["t5"].max_length = r.max_sequence_length
        crop, side = r.crop or (r.resolution, r.resolution), pipe.size_multiple
        if any(length % side for length in crop):
            raise UserError(f"crop {crop[0]}x{crop[1]}: sides must be multiples of {side} here")
        data = Captioned(examples, encode_captions(pipe, [e.text for e in examples], cache), crop)
        losses = wlf_loop(r, ctx, output, pipe, data, accumulation, resume)
        save_result(r, pipe, output, ctx)
        return losses

def wlf_loop(r: WLFRecipe, ctx: Distributed, output: Path, pipe: Pipeline, data: Captioned,
             accumulation: int, resume: Path | None) -> list[tuple[int, float]]:
    vae, lora = pipe.vae.to(ctx.device), r.lora_rank > 0
    model, params = trainable_transformer(pipe, r, ctx)
    scheme, shift = UPSTREAM_SIGMAS[pipe.kind]
    scheme, shift = r.timestep_sampling or scheme, shift if r.shift is None else r.shift
    guidance = r.guidance if getattr(model.config, "guidance_embed", False) else None
    optimizer = torch.optim.AdamW(params, lr=r.lr, betas=(0.9, 0.999), weight_decay=r.weight_decay)
    micro, total = r.batch_size, r.batch_size * accumulation * ctx.world
    if ctx.main:
        count = sum(p.numel() for p in params) * ctx.world  # shards under FSDP
        print(f"training {pipe.kind} ({f'LoRA rank {r.lora_rank}' if lora else 'full'}, "
              f"~{count / 1e6:.2f}M trainable), global batch {total} = {ctx.world} process(es) x "
              f"{micro} x {accumulation}, latents {r.posterior}, sigma {scheme} shift {shift}, "
              f"wavelet weights {r.wavelet_weights}", file=sys.stderr)
    batches, losses, run = Batches(len(data.examples), r.seed), [], wlf_run(r)
    step = load_checkpoint(resume, model, optimizer, batches, lora, run) if resume else 0
    f = vae.config.downsample_factor
    latent_shape = (total, vae.config.z_channels, data.crop[0] // f, data.crop[1] // f)
    first = ctx.rank * accumulation  # this rank's micro-batches of the global batch
    shares = [range(k * micro, (k + 1) * micro) for k in range(first, first + accumulation)]
    autocast = functools.partial(torch.autocast, ctx.device.type, torch.bfloat16,
                                 enabled=pipe.dtype == torch.bfloat16, cache_enabled=False)
    output.mkdir(parents=True, exist_ok=True)
    update = progress_bar("train", r.steps, step) if ctx.main else None
    while step < r.steps:
        draws = draw_global_batch(batches, total, latent_shape, scheme, shift, r.posterior)
        lr = r.lr * min(1.0, (step + 1) / r.warmup_steps) if r.warmup_steps else r.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = (data.micro_batch(draws, share, ctx.device, pipe.dtype) for share in shares)
        loss, norm = wlf_step(model, vae, params, batch, guidance, r, autocast, accumulation)
        value = ctx.mean(loss.cpu()).item()
        record = {"step": step + 1, "loss": value, "grad_norm": norm, "lr": lr}
        step = finish_step(optimizer, record, {"loss": value, "gradient": norm}, output, ctx.main)
        losses.append((step, value))
        if ctx.main:
            update(step)
            if step % r.log_every == 0 or step == r.steps:
                print(f"step {step}/{r.steps} loss {value:.5f} grad-norm {norm:.3f} lr {lr:.2e}",
                      file=sys.stderr)
        if step % r.checkpoint_every == 0 or step == r.steps:
            save_checkpoint(output, step, model, optimizer, batches, lora, ctx, r.keep_checkpoints,
                            run)
    return losses

def wlf_step(model, vae, params, micro_batches, guidance, r: WLFRecipe, autocast,
             accumulation: int) -> tuple[torch.Tensor, float]:
    """Every micro-batch's forward and backward, then clipping: (mean loss, gradient norm)."""
    losses = [wlf_micro_step(model, vae, *batch, guidance, r.wavelet_weights, autocast,
                             accumulation) for batch in micro_batches]
    norm = torch.nn.utils.clip_grad_norm_(params, r.max_grad_norm)
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP2: DTensor
    return torch.stack(losses).float().mean(), norm

def wlf_micro_step(model, vae, images, noise, sigma, eps, condition, guidance, subband_weights,
                   autocast, accumulation: int = 1) -> torch.Tensor:
    """Forward and backward of one micro-batch (loss / accumulation: the gradients add up to the
    batch mean's); returns its loss."""
    with torch.no_grad(), autocast():
        x0 = encode_latents(vae, images, eps)
    with autocast():
        loss = training_loss(model, x0, noise, sigma, condition, guidance, subband_weights)
    (loss / accumulation).backward()
    return loss.detach()

def trainable_transformer(pipe: Pipeline, r: WLFRecipe, ctx: Distributed) -> tuple:
    """(model, trainable parameters): a LoRA on the frozen model, or fp32 weights, sharded."""
    model = pipe.transformer
    if r.lora_rank > 0:
        add_lora(model, pipe.kind, r.lora_rank, r.lora_alpha, r.seed)
    else:
        model.float().requires_grad_(True)
    model.train().gradient_checkpointing = r.gradient_checkpointing
    if ctx.world > 1:
        shard_model(model, pipe.kind, ctx)
    model.to(ctx.device)
    return model, [p for p in model.parameters() if p.requires_grad]

def shard_model(model: nn.Module, kind: str, ctx: Distributed):
    """FSDP2: each transformer block a shard group, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    blocks = [*model.double_blocks, *model.single_blocks] if kind == "flux" else model.joint_blocks
    for module in [*blocks, model]:
        fully_shard(module, mesh=mesh)

def draw_global_batch(batches: Batches, n: int, latent_shape: tuple, scheme: str, shift: float,
                      posterior: str) -> dict:
    """A step's random numbers for the whole global batch: every rank draws them all and keeps
    its share, so they do not depend on how the batch is split."""
    g = batches.generator
    return {"picks": batches.indices(n), "offsets": torch.rand(n, 2, generator=g),
            "flips": torch.rand(n, generator=g) < 0.5, "sigma": sample_sigmas(n, scheme, shift, g),
            "noise": torch.randn(latent_shape, generator=g),
            "eps": torch.randn(latent_shape, generator=g) if posterior == "sample" else None}

def wlf_run(r: WLFRecipe) -> dict:
    return {"trainer": "diffusion4k.py train", "model": source_name(r.model),
            "lora_rank": r.lora_rank, "lora_alpha": r.lora_alpha or r.lora_rank, "vae": r.vae}

def accumulation_steps(r: WLFRecipe, world: int, token=None) -> int:
    """r.grad_accum, or what makes processes x batch size x it upstream's global batch."""
    if r.grad_accum is not None:
        return r.grad_accum
    target, share = UPSTREAM_GLOBAL_BATCH[detect_kind(r.model, token)], world * r.batch_size
    if target % share:
        raise UserError(f"{world} process(es) x --batch-size {r.batch_size} does not divide "
                        f"upstream's global batch of {target}: pass --grad-accum N")
    return target // share

def read_dataset(folder, verbose: bool = True) -> list[Example]:
    """The (image, caption) pairs of a folder's metadata.jsonl; bad lines, repeats and
    unreadable images are skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such data folder")
    metadata, examples, skipped, seen = folder / "metadata.jsonl", [], 0, {}
    for line_no, line in enumerate(read_text(metadata, "captions file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = loads_unique(line)
            name, text = record["file_name"], record["text"]
            if not isinstance(name, str) or not isinstance(text, str):
                raise ValueError("file_name and text must be strings")
            if name in seen:
                raise ValueError(f"file_name {name!r} repeats line {seen[name]}")
            verify_image(folder / name)  # header + integrity check; pixels are decoded when used
            seen[name] = line_no
            examples.append(Example(folder / name, text))
        except (ValueError, KeyError, TypeError, UserError) as error:
            skipped += 1
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            if verbose:
                reason = f"missing {error}" if isinstance(error, KeyError) else reason
                warn(f"{metadata.name} line {line_no}: {reason}; skipped")
    if not examples:
        raise UserError(f"{folder}: no usable images in metadata.jsonl ({skipped} entries skipped)")
    if verbose:
        skips = f", {skipped} entries skipped" if skipped else ""
        print(f"data: {len(examples)} images from {folder}{skips}", file=sys.stderr)
    return examples

class Example(NamedTuple):
    path: Path
    text: str

@dataclass
class Captioned:
    examples: list[Example]
    conditions: dict
    crop: tuple[int, int]
    unreadable: set = field(default_factory=set)

    def micro_batch(self, draws: dict, share: range, device, dtype) -> tuple:
        """(images, noise, sigma, eps, condition): entries `share` of `draws`."""
        loaded = [self.readable_crop(draws["picks"][i], draws["offsets"][i].tolist(),
                                     bool(draws["flips"][i])) for i in share]
        texts = [self.examples[index].text for index, _ in loaded]
        condition = {name: torch.stack([self.conditions[text][name] for text in texts]).to(device)
                     for name in self.conditions[texts[0]]}
        images = torch.stack([image for _, image in loaded]).to(device, dtype)
        noise, sigma, eps = (None if draws[key] is None else draws[key][share].to(device)
                             for key in ("noise", "sigma", "eps"))
        return images, noise, sigma, eps, condition

    def readable_crop(self, index: int, offset, flip: bool) -> tuple[int, torch.Tensor]:
        """(index, crop) of example `index` or of the next one that decodes."""
        n, bad = len(self.examples), self.unreadable
        for candidate in [(index + k) % n for k in range(n)]:
            if candidate not in bad:
                try:
                    return candidate, load_crop(self.examples[candidate].path, *self.crop, offset,
                                                flip)
                except UserError as error:
                    bad.add(candidate)
                    warn(f"{error}; skipped ({len(bad)} of {n} images unreadable)")
        raise UserError(f"none of the {n} training images could be decoded")

def text_cache_key(path: Path) -> str | None:
    """The key of a text cache (None: no file); any other file is refused, never replaced."""
    if not path.exists():
        return None
    try:
        key = safetensors_metadata(path).get("key")
    except UserError:
        key = None
    if key is None:
        raise UserError(f"{path}: not a text cache of `train`; delete it or choose another "
                        "--text-cache")
    return key

def encode_captions(pipe: Pipeline, texts: list[str], cache: Path | None = None) -> dict:
    """caption -> {name: tensor} on the CPU, each distinct caption encoded once, or read from
    `cache` if made for these model, captions and lengths; frees the encoders."""
    unique = sorted(set(texts))
    lengths = {name: tokenizer.max_length for name, tokenizer in pipe.tokenizers.items()}
    key = json.dumps({"model": pipe.source, "texts": unique, "lengths": lengths})
    stored = {}
    if cache is not None and text_cache_key(cache) == key:
        stored = check_weights(load_safetensors(cache), cache)
    if stored:
        print(f"text embeddings: {len(unique)} captions read from {cache}", file=sys.stderr)
    else:
        for tokenizer in pipe.tokenizers.values():  # one note per encoder for all captions
            tokenizer(unique)
            tokenizer.name = None
        for start in range(0, len(unique), PROMPT_BATCH):
            conditions = encode_prompts(pipe, unique[start : start + PROMPT_BATCH])
            stored.update({f"{i}.{name}": value[0].to(pipe.dtype)
                           for i, condition in enumerate(conditions, start)
                           for name, value in condition.items()})
        if cache is not None:
            save_safetensors(stored, cache, {"key": key})
    pipe.text_encoders.clear()  # free their memory before the transformer trains
    conditions = {text: {} for text in unique}
    for name, value in stored.items():
        index, part = name.split(".")
        conditions[unique[int(index)]][part] = value
    return conditions

# the attention and MLP linears: fused qkv, output projections, MLPs (Flux: double-block streams
# and the single blocks' fused linear1 / linear2; SD3: both streams of every joint block)
LORA_TARGETS = {
    "flux": r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])"
            r"|single_blocks\.\d+\.linear[12]",
    "sd3": r"joint_blocks\.\d+\.(x|context)_block\.(attn\.(qkv|proj)|mlp\.fc[12])"}

def add_lora(model: nn.Module, kind: str, rank: int, alpha: float | None = None,
             seed: int = 0) -> nn.Module:
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in lora_targets(model, kind):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha or rank, generator))
    return model

def lora_targets(model: nn.Module, kind: str) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and re.fullmatch(LORA_TARGETS[kind], name)]

class LoRALinear(nn.Module):
    """y = W x + b + (alpha / r) B A x, W and b frozen; B starts at zero, A and B stay fp32."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as nn.Linear and peft
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        low_rank = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.base(x) + low_rank * self.scale

def save_result(r: WLFRecipe, pipe: Pipeline, output: Path, ctx: Distributed):
    """OUTPUT becomes a diffusers pipeline, or holds the LoRA in our and in diffusers' names."""
    model, kind, lora = pipe.transformer, pipe.kind, r.lora_rank > 0
    state = trainable_state(model, lora)
    if lora and ctx.main:
        scale = r.lora_alpha / r.lora_rank if r.lora_alpha else 1.0
        meta = {"kind": kind, "rank": str(r.lora_rank), "scale": str(scale), "base": str(r.model)}
        save_safetensors(state, output / "lora.safetensors", meta)
        save_safetensors(export_lora_diffusers(state, kind, model.config, scale),
                         output / "pytorch_lora_weights.safetensors", meta)
        print(f"wrote {output / 'lora.safetensors'} and pytorch_lora_weights.safetensors",
              file=sys.stderr)
    elif ctx.main:
        save_transformer(state, model, kind, output, pipe.dtype)
        copy_base_components(r.model, output)
        print(f"wrote {output} (a pipeline folder: `diffusion4k.py --model {output}`)",
              file=sys.stderr)
    ctx.barrier()

def save_transformer(state: dict, model: nn.Module, kind: str, output: Path, dtype):
    table, folder = transformer_key_table(kind, model.config), output / "transformer"
    state = to_folder_layout({k: v.to(dtype) for k, v in state.items()}, table,
                             model.config.hidden_size)
    save_safetensors(state, folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    write_json(diffusers_config(model.config, kind), folder / "config.json")

def export_lora_diffusers(lora: dict, kind: str, config, scale: float) -> dict:
    """Our LoRA in diffusers / peft names. A fused projection's LoRA splits exactly: rows of B A
    are those rows of B times A. B carries the scale (peft's alpha: the rank)."""
    table, out = transformer_key_table(kind, config), {}
    for module in sorted({key.rsplit(".", 1)[0] for key in lora}):
        a, b = lora[f"{module}.lora_A"], lora[f"{module}.lora_B"] * scale
        parts, transform = table[f"{module}.weight"]
        assert transform is None, f"{module}: LoRA export needs a plain weight"
        for part, rows in zip(parts, b.split(fused_sizes(len(parts), len(b), config.hidden_size))):
            name = part.removesuffix(".weight")
            out[f"transformer.{name}.lora_A.weight"] = a.clone()  # no storage shared on disk
            out[f"transformer.{name}.lora_B.weight"] = rows.clone()
    return out

def fused_sizes(parts: int, rows: int, hidden: int) -> list[int]:
    return [hidden] * (parts - 1) + [rows - hidden * (parts - 1)]

def transformer_key_table(kind: str, config) -> dict:
    if kind == "flux":
        return flux_key_table(config.depth, config.depth_single_blocks, config.guidance_embed)
    return sd3_key_table(config.depth)

def to_folder_layout(state: dict, table: dict, hidden_size: int = 0) -> dict:
    out = {}
    for original, (parts, transform) in table.items():
        tensor = TRANSFORMS[transform][1](state[original])
        out.update(zip(parts, tensor.split(fused_sizes(len(parts), len(tensor), hidden_size))))
    return out

def diffusers_config(c: FluxConfig | SD3Config, kind: str) -> dict:
    if c.mlp_ratio != 4.0:
        raise UserError(f"mlp_ratio {c.mlp_ratio}: diffusers' {kind} transformer is fixed at 4")
    heads = dict(num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads)
    if kind == "flux":
        if c.theta != 10000.0:
            raise UserError(f"RoPE theta {c.theta}: diffusers' Flux transformer is fixed at 10000")
        return dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=c.in_channels,
                    out_channels=None, num_layers=c.depth, num_single_layers=c.depth_single_blocks,
                    **heads, joint_attention_dim=c.context_in_dim,
                    pooled_projection_dim=c.vec_in_dim, guidance_embeds=c.guidance_embed,
                    axes_dims_rope=list(c.axes_dim))
    return dict(_class_name="SD3Transformer2DModel", sample_size=min(128, c.pos_embed_max_size),
                patch_size=c.patch_size, in_channels=c.in_channels, num_layers=c.depth, **heads,
                joint_attention_dim=c.context_dim, caption_projection_dim=c.hidden_size,
                pooled_projection_dim=c.adm_in_channels, out_channels=c.out_channels,
                pos_embed_max_size=c.pos_embed_max_size, dual_attention_layers=[], qk_norm=None)

def write_json(data, path: Path):
    with atomic_write(path) as temp:
        temp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

def copy_base_components(base, output: Path):
    """Hard-link (else copy) the base pipeline's files but its transformer/."""
    if Path(str(base)).expanduser().is_file():
        print(f"note: {base} is a single file; {output} holds the transformer only",
              file=sys.stderr)
        return
    patterns = ("model_index.json", "scheduler/*", "vae/*", "text_encoder*/*", "tokenizer*/*")
    folder = resolve_source(base, allow_patterns=patterns)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if relative.parts[0] in ("transformer", ".cache") or relative.name.startswith("."):
            continue
        target = output / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(path.resolve(), target)  # the same file as the base's, with its mode
        except OSError:
            shutil.copyfile(path.resolve(), target)  # a new file: the umask's mode, as every output


# ==== SC-VAE training

@dataclass
class SCVAERecipe:
    """SC-VAE as upstream trains it (sc-vae/train_vae.py, train_vae.sh): only the student's decoder
    trains, so the latent space and its factors stay the base VAE's. From gan_start the decoder
    and the discriminator take turns (`discriminator_turn`), D on fresh real crops against the
    decoder's last fakes; the EMA follows every step. AdamW (0.9, 0.999) for both, flips."""

    base: str = option("black-forest-labs/FLUX.1-schnell", "base VAE: Hub repo, folder or file")
    resolution: int = option(512, "square crop side", type=integer(16))
    batch_size: int = option(32, "crops per micro-batch", type=integer(1))
    grad_accum: int = option(8, "micro-batches per step", type=integer(1, 4096))
    steps: int = option(10000, "optimizer steps, both models'", type=integer(1))
    lr: float = option(1e-5, "AdamW learning rate, constant", type=positive(1.0))
    weight_decay: float = option(1e-4, "AdamW weight decay", type=number(0))
    max_grad_norm: float = option(1.0, "gradient clipping per model", type=positive())
    sc_weight: float = option(1.0, "scale-consistency weight", type=number(0))
    lpips_weight: float = option(0.1, "LPIPS weight (0: off)", type=number(0))
    gan_weight: float = option(0.05, "adversarial weight (0: no discriminator)", type=number(0))
    gan_start: int = option(0, "first step of the GAN turns", type=integer(0))
    gp_weight: float = option(10.0, "gradient penalty weight", type=number(0))
    disc_lr: float | None = option(None, "discriminator learning rate (default: --lr)",
                                   type=positive(1.0))
    ema: float = option(0.9999, "EMA decay of the saved decoder (0: off)", type=number(0, 1))
    posterior: str = option("sample", **POSTERIOR)
    f16_decode: str = option("partitioned", "the student's last stage",
                             choices=["partitioned", "centred"])
    gradient_checkpointing: bool = option(True, "recompute decoder activations in backward",
                                          action=argparse.BooleanOptionalAction)
    dtype: str = option("fp32", "fp32, or bf16 autocast", choices=["fp32", "bf16"])
    seed: int = option(0, "seed of crops, noise, discriminator", type=SEED)
    workers: int = option(4, "image decoding threads", type=integer(1, 64))
    save_every: int = option(1000, "steps per checkpoint", type=integer(1))
    keep_checkpoints: int = option(2, "checkpoints kept", type=integer(1))
    save_dtype: str = option("fp32", "dtype of the saved weights", choices=["fp32", "bf16"])
    ae_file: bool = option(False, "also write BFL's OUTPUT/ae.safetensors", action="store_true")

def train_vae(r: SCVAERecipe, data, output, resume: bool = False, lpips: tuple | None = None,
              device=None, token=None) -> VAETraining:
    """Train the F16 decoder with L_SC into OUTPUT/vae/."""
    linear, backbone = lpips or (LPIPS_VGG_LINEAR, LPIPS_VGG_BACKBONE)
    if r.resolution % 16:
        raise UserError(f"--resolution {r.resolution}: must be a multiple of 16")
    if r.gan_weight > 0 and r.resolution < 128:
        raise UserError(f"--resolution {r.resolution}: the discriminator needs 128 or more (its "
                        "last map must be 2x2); --gan-weight 0 trains without it")
    if r.ema == 1:
        raise UserError("--ema 1: the decay must be below 1 (0 turns EMA off)")
    lpips_files = [("--lpips-linear", linear), ("--lpips-backbone", backbone)]
    check_apart([("--output", output)], [("--data", data), ("--base", r.base), *lpips_files])
    output = Path(output)
    check_train_output(output, resume)
    files = vae_image_files(data)
    with undone_on_failure(output), folder_lock(output):
        run = sc_vae_setup(r, files, (linear, backbone), device_dtype(device)[0], token)
        sc_vae_loop(run, r, output, resume_vae(run, r, output) if resume else 0)
        final = run.student
        if run.ema is not None:  # the EMA decoder is the result; the raw one stays in checkpoints
            final = copy.deepcopy(run.student)
            final.decoder.load_state_dict(run.ema)  # parameters only: EMA covers its whole state
        base_config = folder_config(component_path(r.base, "vae", token))
        save_vae(final, output, base_config, DTYPES[r.save_dtype], r.ae_file)
        return run

@dataclass
class VAETraining:  # an SC-VAE run
    student: AutoEncoder  # F16; its decoder trains
    teacher: AutoEncoder  # F8, frozen
    optimizer: torch.optim.Optimizer
    stream: CropStream
    noise: torch.Generator  # posterior samples
    device: torch.device
    ema: dict | None = None  # the decoder's EMA
    lpips: LPIPS | None = None
    disc: Discriminator | None = None
    disc_optimizer: torch.optim.Optimizer | None = None
    fakes: torch.Tensor | None = None  # the decoder's last output, shown to D's next step
    history: list = field(default_factory=list)

    def parts(self) -> dict:  # what a checkpoint's state_dicts hold
        return {"decoder": self.student.decoder, "optimizer": self.optimizer, "disc": self.disc,
                "disc_optimizer": self.disc_optimizer}

def sc_vae_setup(r: SCVAERecipe, files: list[Path], lpips: tuple, device, token) -> VAETraining:
    teacher, student = (load_vae(r.base, torch.float32, device, stride=stride, token=token)
                        .requires_grad_(False) for stride in (1, 2))
    decoder = student.decoder.train().requires_grad_(True)
    decoder.gradient_checkpointing = r.gradient_checkpointing
    decoder.partitioned = r.f16_decode == "partitioned"
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=r.lr, betas=(0.9, 0.999),
                                  weight_decay=r.weight_decay)
    stream = CropStream(files, r.resolution, r.seed, r.workers)
    noise = torch.Generator().manual_seed(r.seed + 1)
    run = VAETraining(student, teacher, optimizer, stream, noise, device)
    if r.ema > 0:
        run.ema = {name: p.detach().clone() for name, p in decoder.named_parameters()}
    if r.lpips_weight > 0:
        run.lpips = load_lpips(*lpips, token).to(device)
    torch.manual_seed(r.seed)  # the discriminator's initialisation
    if r.gan_weight > 0:
        run.disc = Discriminator().to(device)
        run.disc_optimizer = torch.optim.AdamW(run.disc.parameters(), r.disc_lr or r.lr,
                                               weight_decay=r.weight_decay)
    return run

def sc_vae_loop(run: VAETraining, r: SCVAERecipe, output: Path, step: int):
    output.mkdir(parents=True, exist_ok=True)
    update = progress_bar("train-vae", r.steps, step)
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=r.dtype == "bf16")
    params = list(run.student.decoder.parameters())
    while step < r.steps:
        optimizer, totals = sc_vae_step(run, r, step, autocast)
        turn = "decoder" if optimizer is run.optimizer else "discriminator"
        record = {"step": step + 1, "turn": turn, **{k: v.item() for k, v in totals.items()}}
        whose = "" if turn == "decoder" else "discriminator "
        finite = {whose + "loss": totals["loss"], whose + "gradient": totals["grad_norm"]}
        step = finish_step(optimizer, record, finite, output)
        if run.ema is not None:
            ema_update(run.ema, params, step - 1, r.ema)
        run.history.append(record)
        shown = ("loss", "mse", "sc", "lpips", "gen", "gp")
        update(step, postfix={key: f"{record[key]:.4g}" for key in shown if key in record})
        if step % r.save_every == 0 or step == r.steps:
            save_vae_checkpoint(output, step, vae_state(run, r, step), r.keep_checkpoints)

def sc_vae_step(run: VAETraining, r: SCVAERecipe, step: int, autocast) -> tuple:
    """Step `step` (0-based) up to the update: the decoder's L_SC or, on D's turns, D's loss on
    fresh crops against the last fakes. Returns (the optimizer to step, mean losses and norm)."""
    disc, posterior = run.disc, run.noise if r.posterior == "sample" else None
    disc_turn = disc is not None and discriminator_turn(step, r.gan_start)
    if disc is not None:
        disc.requires_grad_(disc_turn)  # the decoder's turn only needs gradients through D
    model, optimizer = run.student.decoder, run.optimizer
    if disc_turn:
        model, optimizer = disc, run.disc_optimizer
    gan = disc if step >= r.gan_start else None
    totals = {}
    for _ in range(r.grad_accum):
        x = run.stream.batch(r.batch_size).to(run.device)
        with autocast:
            if disc_turn:
                hinge, penalty = discriminator_loss(disc, x, run.fakes, r.gp_weight)
                losses = {"loss": hinge + penalty, "hinge": hinge, "gp": penalty}
            else:
                losses, run.fakes = sc_vae_loss(x, run.student, run.teacher, posterior, run.lpips,
                                                gan, r.sc_weight, r.lpips_weight, r.gan_weight)
        (losses["loss"] / r.grad_accum).backward()
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + value.detach().float() / r.grad_accum
    totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), r.max_grad_norm)
    return optimizer, totals

def discriminator_turn(step: int, gan_start: int) -> bool:
    """Whether 0-based step `step` trains D: from gan_start the two alternate, decoder first."""
    return step >= gan_start and (step - gan_start) % 2 == 1

def ema_update(ema: dict, params, step: int, decay: float):
    """diffusers' EMAModel after step n: decay_n = min(decay, (1 + n) / (10 + n)), 0 at n = 0."""
    rate = 1 - (min(decay, (1 + step) / (10 + step)) if step > 0 else 0.0)
    for average, p in zip(ema.values(), params):
        average.lerp_(p.detach(), rate)

class CropStream:
    """Seeded square crops (`Batches` draws the order, offsets and flips), decoded in threads;
    files that fail to decode are dropped with one warning."""

    def __init__(self, files: list[Path], size: int, seed: int, workers: int):
        self.files, self.size, self.workers = files, size, workers
        self.batches, self.bad = Batches(len(files), seed), set()

    def draw(self) -> tuple[int, tuple[float, float], bool]:
        while True:
            index = self.batches.indices(1)[0]
            top, left, flip = torch.rand(3, generator=self.batches.generator).tolist()
            if index not in self.bad:
                return index, (top, left), flip < 0.5

    def load(self, spec) -> torch.Tensor | UserError:
        index, offset, flip = spec
        try:
            return load_crop(self.files[index], self.size, self.size, offset, flip)
        except UserError as error:
            return error

    def batch(self, n: int) -> torch.Tensor:
        crops, total = [], len(self.files)
        with ThreadPoolExecutor(self.workers) as pool:  # PIL decodes without the GIL
            while len(crops) < n:
                specs = [self.draw() for _ in range(n - len(crops))]
                for (index, _, _), crop in zip(specs, pool.map(self.load, specs)):
                    if isinstance(crop, torch.Tensor):
                        crops.append(crop)
                    elif index not in self.bad:
                        self.bad.add(index)
                        warn(f"{crop}; skipped ({len(self.bad)} of {total} images unreadable)")
                if len(self.bad) == total:
                    raise UserError("none of the training images could be decoded")
        return torch.stack(crops)

    def state(self) -> dict:
        return {**self.batches.state(), "bad": torch.tensor(sorted(self.bad), dtype=torch.long)}

    def load_state(self, state: dict):
        self.batches.load(state)
        self.bad = set(state["bad"].tolist())

def read_vae_checkpoint(folder: Path) -> dict:
    keys = "step decoder optimizer ema disc disc_optimizer fakes stream noise torch_rng".split()
    state = load_state_file(folder / "state.pt", keys)
    for part in ("decoder", "ema", "disc"):
        check_weights(state[part] or {}, folder / "state.pt")
    return state

def vae_run(r: SCVAERecipe) -> dict:
    return {"trainer": "diffusion4k.py train-vae", "base": source_name(r.base),
            "f16_decode": r.f16_decode}

def vae_state(run: VAETraining, r: SCVAERecipe, step: int) -> dict:
    """All a resumed run needs to go on identically."""
    next_needs_fakes = run.disc is not None and discriminator_turn(step, r.gan_start)
    state = {key: None if part is None else part.state_dict() for key, part in run.parts().items()}
    state.update(step=step, ema=run.ema, fakes=run.fakes.cpu() if next_needs_fakes else None,
                 stream=run.stream.state(), noise=run.noise.get_state(),
                 torch_rng=torch.get_rng_state(), run=json.dumps(vae_run(r)))
    return state

def resume_vae(run: VAETraining, r: SCVAERecipe, output: Path) -> int:
    """Load the newest intact checkpoint if it is this run's; returns its step."""
    if (latest := latest_checkpoint(output)) is None:
        print(f"note: no checkpoint in {output}; starting from the base VAE", file=sys.stderr)
        return 0
    folder, state = read_checkpoint(latest, read_vae_checkpoint)
    check_run(folder, state.get("run"), vae_run(r))
    ema, gan = ("off" if state[part] is None else "on" for part in ("ema", "disc"))
    if (ema == "on", gan == "on") != (run.ema is not None, run.disc is not None):
        raise UserError(f"{folder}: saved with EMA {ema} and the GAN {gan}; resume with the same "
                        "--ema / --gan-weight")
    try:
        for key, part in run.parts().items():
            if part is not None:
                part.load_state_dict(state[key])
    except (RuntimeError, ValueError, KeyError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1].strip()[:120]
        raise UserError(f"{folder}: does not fit this model ({reason})") from None
    if run.ema is not None:
        run.ema = {name: tensor.to(run.device) for name, tensor in state["ema"].items()}
    run.fakes = None if state["fakes"] is None else state["fakes"].to(run.device)
    run.stream.load_state(state["stream"])
    run.noise.set_state(state["noise"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resumed from {folder} at step {state['step']}", file=sys.stderr)
    return state["step"]

def save_vae_checkpoint(output: Path, step: int, state: dict, keep: int):
    """checkpoints/step-N/state.pt if its weights are finite; prunes."""
    for part in ("decoder", "ema", "disc"):
        if any(not torch.isfinite(value).all() for value in (state[part] or {}).values()):
            raise training_diverged(step, f"a {part} weight after the update", output)
    save_torch(state, output / "checkpoints" / f"step-{step:08d}" / "state.pt")  # atomic
    for old in sorted((output / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)

def save_vae(vae: AutoEncoder, output: Path, base_config: dict | None = None, dtype=torch.float32,
             ae_file: bool = False):
    """OUTPUT/vae/ in the diffusers layout ("stride": 2), and with ae_file OUTPUT/ae.safetensors
    in BFL's (configless: `load_vae(path, stride=2)`)."""
    state = {key: value.detach().to("cpu", dtype) for key, value in vae.state_dict().items()}
    folder, meta = output / "vae", {"format": "pt"}
    save_safetensors(to_folder_layout(state, vae_table_for(state)),
                     folder / "diffusion_pytorch_model.safetensors", meta)
    write_json(diffusers_vae_config(vae.config, base_config), folder / "config.json")
    if ae_file:
        meta["stride"] = str(vae.config.stride)
        save_safetensors(state, output / "ae.safetensors", meta)

def diffusers_vae_config(c: VAEConfig, base: dict | None = None) -> dict:
    """config.json for diffusers' AutoencoderKL (which ignores `stride`)."""
    levels = len(c.channel_multipliers)
    return {**(base or {}), "_class_name": "AutoencoderKL", "in_channels": c.in_channels,
            "out_channels": c.out_channels, "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [c.base_channels * m for m in c.channel_multipliers],
            "layers_per_block": c.num_res_blocks, "act_fn": "silu", "latent_channels": c.z_channels,
            "norm_num_groups": 32, "scaling_factor": c.scale_factor,
            "shift_factor": c.shift_factor, "use_quant_conv": False, "use_post_quant_conv": False,
            "mid_block_add_attention": True, "stride": c.stride}


# ==== training utilities

# --- BEGIN kit: training step ---
def finish_step(optimizer, record: dict, checked: dict, output: Path, main: bool = True) -> int:
    """Stop at a non-finite value of `checked` before the update; update, log; return the step."""
    for name, value in checked.items():
        if not math.isfinite(float(value)):
            raise training_diverged(record["step"], f"the {name}", output)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if main:  # a resumed run may repeat steps in the log
        with open(output / "train_log.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
    return record["step"]
# --- END kit: training step ---

# --- BEGIN kit: training utilities ---
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
# --- END kit: training utilities ---

# --- BEGIN kit: LPIPS ---
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
# --- END kit: LPIPS ---


# ==== weight loading

# --- BEGIN kit: weight loading ---
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
# --- END kit: weight loading ---


# ==== command line

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        return train_command(train_parser().parse_args(argv[1:]))
    if argv and argv[0] == "train-vae":
        return train_vae_command(train_vae_parser().parse_args(argv[1:]))
    generate_command(generate_parser().parse_args(argv))

def generate_command(args):
    prompts, stems = read_prompt_file(args.prompts) if args.prompts else ([args.prompt], None)
    if not prompts[0].strip():
        raise UserError("give --prompt TEXT or --prompts FILE (the prompt is empty or blank)")
    if args.seed_per_prompt == "increment" and args.seed + len(prompts) - 1 >= 2**64:
        raise UserError(f"--seed {args.seed}: prompt {len(prompts)} would need a seed beyond "
                        "2**64 - 1")
    sources = [("--" + option.replace("_", "-"), getattr(args, option))
               for option in ("prompts", "model", "text_encoders", "vae_weights")]
    for option, value in sources[1:]:
        check_source(value, option)
    outputs = batch_outputs(args, len(prompts), stems)
    check_apart([("--output-dir" if args.prompts else "--output", path) for path in outputs],
                sources)
    metadata = outputs.pop() if args.prompts else None
    records = {i: image_record(path, prompt) for i, (path, prompt)
               in enumerate(zip(outputs, prompts)) if args.skip_existing and path.exists()}
    for i in records:
        print(f"{outputs[i]} exists; skipped", file=sys.stderr)
    todo = [i for i in range(len(prompts)) if i not in records]
    if todo:
        pipe = load_pipeline(args.model, args.vae, args.device, DTYPES.get(args.dtype),
                             args.text_encoders, args.vae_weights, args.offload, args.token)
        if args.compile:
            compile_blocks(pipe.transformer)
        pipe.vae.decoder.partitioned = args.f16_decode == "partitioned"
        generate_images(args, pipe, [prompts[i] for i in todo], [outputs[i] for i in todo], todo,
                        records, metadata)
    if metadata is not None:
        write_metadata(metadata, records)

def read_prompt_file(path) -> tuple[list[str], list[str] | None]:
    """(prompts, output stems) of --prompts: one prompt per line (stems None), or a .jsonl file
    of {"file_name", "text"} (upstream's generate_and_eval_fid.py). A bad line stops the batch."""
    lines = [(n, line) for n, line in enumerate(read_text(path, "prompt file").splitlines(), 1)
             if line.strip()]
    if Path(path).suffix.lower() != ".jsonl":
        if not lines:
            raise UserError(f"{path}: no prompts (one per line; blank lines are skipped)")
        return [line.strip() for _, line in lines], None
    seen = {}  # stem -> (line number, prompt)
    for n, line in lines:
        where = f"{path} line {n}"
        try:
            record = loads_unique(line)
        except ValueError as error:
            raise UserError(f"{where}: not JSON ({error})") from None
        name, text = (record.get(key) if isinstance(record, dict) else None
                      for key in ("file_name", "text"))
        if not (isinstance(name, str) and isinstance(text, str) and text.strip()):
            raise UserError(f"{where}: expected an object with a file_name and a non-empty text")
        stem = Path(name).stem
        if not stem or "\0" in stem:
            raise UserError(f"{where}: file_name {name!r} gives no usable output name")
        if stem in seen:
            raise UserError(f"{where}: file_name {name!r} gives the output name {stem}.png of "
                            f"line {seen[stem][0]}")
        seen[stem] = n, text
    if not seen:
        raise UserError(f"{path}: no prompts (one JSON object with file_name and text per line)")
    return [text for _, text in seen.values()], list(seen)

def check_source(value, option: str):
    """Refuse a missing local path, a FIFO or a device before anything loads."""
    if value is None:
        return
    if not (Path(value).expanduser().exists() or is_repo_id(value)):
        raise UserError(f"{option} {value}: no such file or folder, nor a Hub repo id (owner/name)")
    check_regular_file(Path(value).expanduser(), f"{option} file or folder")

def batch_outputs(args, count: int, stems: list[str] | None = None) -> list[Path]:
    """The outputs, checked before anything loads; with --prompts, metadata.jsonl last."""
    if not args.prompts:
        return [check_output_file(args.output, args.overwrite or args.skip_existing)]
    folder = Path(args.output_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output-dir {folder} is a file, not a folder")
    stems = stems or [f"{i:05d}" for i in range(count)]
    outputs = [folder / f"{stem}.png" for stem in stems] + [folder / "metadata.jsonl"]
    for path in outputs:
        if path.exists() and not (args.overwrite or args.skip_existing):
            raise UserError(f"{path} exists; pass --overwrite to replace, or --skip-existing to "
                            "finish")
        check_output_file(path, True, None)  # a folder in the way, or an unwritable one
    return outputs

def image_record(path: Path, prompt: str, settings: dict | None = None) -> dict:
    """An image's metadata.jsonl line: `settings`, else the PNG's text chunks, else the prompt."""
    if settings is None:
        try:
            with Image.open(path) as image:
                prompt, settings = image.text["prompt"], json.loads(image.text["settings"])
        except (OSError, ValueError, SyntaxError, KeyError, AttributeError):
            settings = {}
    return {"file_name": path.name, "text": prompt, **settings}

def generate_images(args, pipe: Pipeline, prompts: list[str], outputs: list[Path],
                    numbers: list[int], records: dict, metadata: Path | None):
    """Sample and save each image, rewriting metadata.jsonl after each (so that it matches the
    images of an interrupted batch)."""
    family = DEFAULTS["flux-schnell" if pipe.schnell else pipe.kind]
    steps = args.steps or family["steps"]
    guidance = family["guidance"] if args.guidance is None else args.guidance
    height, width = check_size(pipe, args.height, args.width)
    sd3 = pipe.kind == "sd3"
    if not sd3 and args.negative_prompt:
        print("note: Flux is guidance-distilled and takes no negative prompt; ignoring it",
              file=sys.stderr)
    negative = encode_prompts(pipe, [args.negative_prompt])[0] if sd3 else None
    settings = dict(model=args.model, vae=args.vae,
                    f16_decode=args.f16_decode if args.vae == "f16" else None, height=height,
                    width=width, steps=steps, guidance=guidance, seed=None, mu=args.mu,
                    negative_prompt=args.negative_prompt if sd3 else "")
    for n, (i, prompt, output) in enumerate(zip(numbers, prompts, outputs)):
        if n % PROMPT_BATCH == 0:
            conditions = encode_prompts(pipe, prompts[n : n + PROMPT_BATCH])
        seed = args.seed + i if args.seed_per_prompt == "increment" else args.seed
        settings["seed"] = seed
        start = time.perf_counter()
        image = generate(pipe, conditions[n % PROMPT_BATCH], height, width, steps, guidance, seed,
                         negative, args.mu, progress_bar(f"{n + 1}/{len(prompts)}"), args.vae_tile)
        text = {"prompt": prompt, "settings": json.dumps(settings)}
        save_image(tensor_to_image(image), output, text, overwrite=args.overwrite)
        print(f"wrote {output} ({width}x{height}, {time.perf_counter() - start:.1f} s)",
              file=sys.stderr)
        records[i] = image_record(output, prompt, settings)
        if metadata is not None:
            write_metadata(metadata, records)

def check_size(pipe: Pipeline, height: int, width: int) -> tuple[int, int]:
    """Round the sides to the model's multiple (saying so); refuse sizes SD3 cannot sample."""
    multiple = pipe.size_multiple
    rounded = [max(multiple, round(side / multiple) * multiple) for side in (height, width)]
    if rounded != [height, width]:
        print(f"note: {height}x{width} is not a multiple of {multiple}; generating "
              f"{rounded[0]}x{rounded[1]}", file=sys.stderr)
    if pipe.kind == "sd3":
        limit = pipe.transformer.config.pos_embed_max_size * multiple
        if max(rounded) > limit:
            hint = " (use --vae f16)" if pipe.vae.config.stride == 1 else ""
            raise UserError(f"{height}x{width}: SD3's position table covers at most {limit} px "
                            f"per side with this VAE{hint}")
    return tuple(rounded)

def write_metadata(path: Path, records: dict):
    lines = "".join(json.dumps(records[i]) + "\n" for i in sorted(records))
    with atomic_write(path) as temp:
        temp.write_text(lines, encoding="utf-8")

def generate_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="diffusion4k.py", description="Diffusion-4K: 4096x4096 text-to-image, Flux or SD3.",
        epilog="Training: `diffusion4k.py train --help` (WLF), `train-vae --help` (SC-VAE).")
    add = parser.add_argument
    add("--prompt", default="", help="the text prompt")
    add("--prompts", help="text file, one prompt per line, or .jsonl with file_name and text")
    add("--output", default="diffusion4k.png", help="output image")
    add("--output-dir", default="diffusion4k_outputs", help="folder for the --prompts images")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    existing.add_argument("--skip-existing", action="store_true", help="keep existing images")
    add("--model", default="zhang0jhon/flux_wavelet_v2_sc",
        help="Flux or SD3 pipeline (Hub repo or folder) or transformer file")
    for side in ("--height", "--width"):
        add(side, type=integer(1, 16384), default=4096, help="in px")
    add("--steps", type=integer(1), help="denoising steps (Flux 50, schnell 4, SD3 28)")
    add("--guidance", type=number(0, 100), help="Flux-dev: distilled guidance; SD3: CFG scale")
    add("--negative-prompt", default="", help="SD3 only")
    add("--seed", type=SEED, default=0, help="the first image's seed")
    add("--seed-per-prompt", choices=["increment", "same"], default="increment",
        help="prompt i gets --seed + i, or --seed")
    add("--vae", choices=["f16", "f8"], default="f16", help="Diffusion-4K's F16 VAE or the F8")
    add("--f16-decode", choices=["partitioned", "centred"], default="partitioned",
        help="F16 last stage: upstream's or centred")
    add("--vae-tile", type=integer(0), help="decode tile in latent pixels (0: whole)")
    add("--mu", type=number(-15, 15), help="Flux timestep shift (default: Flux's rule, capped)")
    add("--offload", choices=["none", "model", "blocks"], default="none", help="GPU memory saving")
    add("--compile", action="store_true", help="torch.compile each transformer block")
    add("--text-encoders", help="source of the text encoders (for single-file models)")
    add("--vae-weights", help="VAE folder, file or Hub repo (default: the model's)")
    add("--device", type=device_name, help="default: cuda when available")
    add("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    add("--token", help="Hugging Face token")
    return parser

def recipe(kind, args):
    return kind(**{f.name: getattr(args, f.name) for f in fields(kind)})

def train_command(args) -> list[tuple[int, float]]:
    try:
        return train(recipe(WLFRecipe, args), args.data, args.output, args.resume,
                     args.text_cache, args.device, args.token)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

def train_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="diffusion4k.py train", description="WLF fine-tuning of a Flux or SD3 pipeline on "
        "images + metadata.jsonl; upstream's defaults.")
    add = parser.add_argument
    add("--data", required=True, help="folder of images and metadata.jsonl")
    add("--output", required=True, help="output folder")
    add("--text-cache", help="safetensors file caching the caption embeddings")
    add("--resume", nargs="?", const="latest", help="a checkpoint (default: the newest)")
    add("--device", type=device_name, help="default: cuda when available")
    add("--token", help="Hugging Face token")
    add_recipe(parser, WLFRecipe)
    return parser

def train_vae_command(args) -> VAETraining:
    result = train_vae(recipe(SCVAERecipe, args), args.data, args.output, args.resume,
                       (args.lpips_linear, args.lpips_backbone), args.device, args.token)
    last = next((record for record in reversed(result.history) if record["turn"] == "decoder"), {})
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("mse", "sc", "lpips", "gen") if k in last)
    summary = f"; last decoder step: {summary}" if summary else ""
    print(f"wrote {Path(args.output) / 'vae'} (F16 SC-VAE){summary}", file=sys.stderr)
    return result

def train_vae_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="diffusion4k.py train-vae", description="SC-VAE: retrain the F16 decoder to decode "
        "like the F8 one; writes OUTPUT/vae/. Upstream's defaults.")
    add = parser.add_argument
    add("--data", required=True, help="image folder")
    add("--output", required=True, help="output folder")
    add("--resume", action="store_true", help="continue from the newest checkpoint")
    add("--lpips-linear", default=LPIPS_VGG_LINEAR, help="LPIPS vgg linears")
    add("--lpips-backbone", default=LPIPS_VGG_BACKBONE, help="VGG16 weights")
    add("--device", type=device_name, help="default: cuda when available")
    add("--token", help="Hugging Face token")
    add_recipe(parser, SCVAERecipe)
    return parser

if __name__ == "__main__":
    hint = "try a smaller size or --offload model / blocks (training: a smaller --crop)"
    sys.exit(run_cli(main, memory_hint=hint))

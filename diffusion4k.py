"""Diffusion-4K: direct ultra-high-resolution (4096x4096) text-to-image with latent diffusion.

Papers
    Zhang et al., "Diffusion-4K: Ultra-High-Resolution Image Synthesis for Latent Diffusion
    Models", CVPR 2025, arXiv 2503.18352; and the extension "Ultra-High-Resolution Image
    Synthesis: Data, Method and Evaluation", arXiv 2506.01331 (SC-VAE).

What this file holds (top to bottom)
    1. Configs: dataclasses whose defaults are the real checkpoints (FLUX.1-dev, SD3-Medium,
       their 16-channel VAEs).
    2. Building blocks: RoPE with a tunable base theta, timestep embedding, modulation,
       RMSNorm, the one-level Haar wavelet transform.
    3. Models: the Flux transformer (double + single stream blocks), the SD3 MMDiT, the
       AutoencoderKL in its F8 form and its F16 form (stride-2 `conv_in`, nearest x2
       upsample before `conv_out`; same weights), and the T5 / CLIP text encoders with
       their tokenizers.
    4. Weight loading: the original single-file layouts (BFL `flux1-dev.safetensors`,
       `ae.safetensors`; Stability `sd3_medium*.safetensors`) and the diffusers /
       transformers folder layouts, converted by explicit key tables; every dimension is
       read from the tensors.

Status
    The models and loaders above are complete and proven against diffusers/transformers
    (tests/test_models.py, tests/test_text_encoders.py). The Diffusion-4K method itself
    (4K sampling pipeline, Wavelet-based Latent Fine-tuning, SC-VAE training and the CLI)
    is not written yet: `python diffusion4k.py` says so and exits.

Public API (models)
    FluxConfig, Flux, load_flux, pack_latents, unpack_latents, latent_image_ids
    SD3Config, MMDiT, load_sd3
    VAEConfig, AutoEncoder, load_vae
    rope_frequencies, haar_dwt, haar_idwt
"""

import math
import re
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common.attention import attention
from common.io import UserError, load_safetensors, read_json, resolve_source

# =============================================================================== configs


@dataclass(frozen=True)
class FluxConfig:
    """Flux.1 transformer. Defaults: FLUX.1-dev (11.9B parameters)."""

    in_channels: int = 64  # 16 latent channels x 2x2 packing
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    mlp_ratio: float = 4.0
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL
    axes_dim: tuple = (16, 56, 56)  # RoPE dims per position axis (unused, row, column)
    theta: float = 10000.0  # RoPE base; OP4KSR's RFR lowers it to 100
    guidance_embed: bool = True  # dev: distilled guidance input; schnell: none

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.hidden_size // self.num_heads}")


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance_embed=False)


@dataclass(frozen=True)
class SD3Config:
    """SD3 MMDiT. Defaults: SD3-Medium (2B parameters)."""

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    hidden_size: int = 1536
    num_heads: int = 24
    depth: int = 24
    mlp_ratio: float = 4.0
    adm_in_channels: int = 2048  # pooled CLIP-L + CLIP-G
    context_dim: int = 4096  # T5-XXL width; CLIP features are zero-padded to it
    pos_embed_max_size: int = 192  # the stored position grid: 192 patches = 3072 px with F8, 6144 px with F16

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


SD3_MEDIUM = SD3Config()


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL with 16 latent channels (Flux and SD3 share the architecture).

    stride=1 is the usual F8 VAE. stride=2 is Diffusion-4K's F16 VAE: the same weights with a
    stride-2 `conv_in` and a nearest x2 upsample before `conv_out`, so a 4096^2 image becomes a
    256^2 latent (16,384 Flux tokens instead of 65,536).
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_multipliers: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    stride: int = 1

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1) * self.stride


FLUX_VAE = VAEConfig()
SD3_VAE = VAEConfig(scale_factor=1.5305, shift_factor=0.0609)


# ======================================================================= building blocks


def rope_frequencies(dim: int, theta: float) -> torch.Tensor:
    """The dim/2 rotation speeds (radians per position) of one RoPE axis: theta^(-2j/dim)."""
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rope_angles(ids: torch.Tensor, axes_dim, theta: float) -> torch.Tensor:
    """Rotation angles (B, L, head_dim/2) for positions ids (B, L, n_axes): each axis owns a slice
    of the head dim (Flux: 16 for the unused axis 0, 56 for rows, 56 for columns)."""
    return torch.cat(
        [ids[..., i, None].double() * rope_frequencies(dim, theta).to(ids.device) for i, dim in enumerate(axes_dim)],
        dim=-1,
    )


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of x (B, H, L, D) by angles (B, L, D/2), in fp32."""
    cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2).type_as(x)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of t (B,) -> (B, dim), as in both Flux and SD3."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """Per-head RMS normalisation of queries and keys (statistics in fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def split_heads(qkv: torch.Tensor, num_heads: int):
    """(B, L, 3*H*D) -> q, k, v each (B, H, L, D)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D)."""
    return x.transpose(1, 2).flatten(2)


def haar_dwt(x: torch.Tensor) -> torch.Tensor:
    """One level of the orthonormal 2-D Haar transform over the last two dims.

    (..., H, W) -> (..., 4, H/2, W/2) holding the subbands LL, LH, HL, HH, equal to pywt's
    dwt2(x, "haar") = cA, (cH, cV, cD). Orthonormal: the sum of squares is preserved.
    """
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return torch.stack([a + b + c + d, a + b - c - d, a - b + c - d, a - b - c + d], dim=-3) / 2


def haar_idwt(bands: torch.Tensor) -> torch.Tensor:
    """Inverse of `haar_dwt`: (..., 4, H/2, W/2) -> (..., H, W)."""
    ll, lh, hl, hh = bands.unbind(-3)
    x = bands.new_empty(*ll.shape[:-2], 2 * ll.shape[-2], 2 * ll.shape[-1])
    x[..., 0::2, 0::2] = (ll + lh + hl + hh) / 2
    x[..., 0::2, 1::2] = (ll + lh - hl - hh) / 2
    x[..., 1::2, 0::2] = (ll - lh + hl - hh) / 2
    x[..., 1::2, 1::2] = (ll - lh - hl + hh) / 2
    return x


# ========================================================================== Flux model


class SelfAttention(nn.Module):
    """Parameter holder for one stream's attention: fused qkv, QK RMSNorm, output projection."""

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
    """adaLN: vec -> (shift, scale, gate) once (single blocks) or twice (double blocks)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.lin = nn.Linear(dim, (6 if double else 3) * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec)).chunk(self.lin.out_features // vec.shape[-1], dim=-1)


def attention_with_rope(q, k, v, angles):
    return merge_heads(attention(apply_rope(q, angles), apply_rope(k, angles), v))


class DoubleStreamBlock(nn.Module):
    """Text and image keep their own weights but attend jointly over [text, image]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp_hidden = int(dim * mlp_ratio)
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(dim, double=True))
            self.add_module(f"{stream}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            self.add_module(f"{stream}_attn", SelfAttention(dim, num_heads))
            self.add_module(f"{stream}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            self.add_module(f"{stream}_mlp", feed_forward(dim, mlp_hidden))

    def forward(self, img, txt, vec, angles):
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        # joint attention over the concatenated sequence, text first
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(self.img_norm1(img), img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), txt_shift1, txt_scale1))
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention_with_rope(q, k, v, angles)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        # gated residual attention and MLP, per stream
        img = img + img_gate1[:, None] * self.img_attn.proj(img_attn)
        img = img + img_gate2[:, None] * self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2))
        txt = txt + txt_gate1[:, None] * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2[:, None] * self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One weight set over [text, image]: attention and MLP in parallel from one fused matmul."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x, vec, angles):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split([x.shape[-1] * 3, self.mlp_hidden], -1)
        q, k, v = split_heads(qkv, self.num_heads)
        attn = attention_with_rope(self.norm.query_norm(q), self.norm.key_norm(k), v, angles)
        return x + gate[:, None] * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to the output features (Flux and SD3 alike)."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Flux(nn.Module):
    """The Flux.1 rectified-flow transformer; parameter names are BFL's checkpoint keys."""

    def __init__(self, config: FluxConfig = FLUX_DEV):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(config.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if config.guidance_embed else None
        self.txt_in = nn.Linear(config.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth_single_blocks)
        )
        self.final_layer = FinalLayer(dim, config.in_channels)
        self.gradient_checkpointing = False

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        """img (B, L, 64) packed latents; img_ids (B or 1, L, 3); txt (B, T, 4096) T5 features;
        txt_ids (B or 1, T, 3); timesteps (B,) sigma in [0, 1]; y (B, 768) CLIP pooled;
        guidance (B,) the distilled guidance scale (dev only). Returns the velocity (B, L, 64)."""
        vec = self.time_in(timestep_embedding(timesteps * 1000).to(img.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this Flux model is guidance-distilled (dev): pass a guidance scale")
            vec = vec + self.guidance_in(timestep_embedding(guidance * 1000).to(img.dtype))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        ids = torch.cat([txt_ids, img_ids], dim=-2)
        angles = rope_angles(ids if ids.ndim == 3 else ids[None], self.config.axes_dim, self.config.theta)

        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, angles)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, angles)
        return self.final_layer(x[:, txt.shape[1] :], vec)

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens; feature order (c, row, col) in each 2x2 patch."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent of height x width."""
    b, _, features = x.shape
    x = x.view(b, height // 2, width // 2, features // 4, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, features // 4, height, width)


def latent_image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """RoPE positions (1, H/2 * W/2, 3) of the packed tokens of a height x width latent: (0, row, col)."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return ids.reshape(1, -1, 3).float().to(device)


# =========================================================================== SD3 model


class StreamBlock(nn.Module):
    """One stream (image or context) of an SD3 joint block: adaLN-Zero, qkv, projection, MLP.

    The last block's context stream is `pre_only`: it only supplies keys and values.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))
        if not pre_only:
            self.attn.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = nn.Module()
            self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
            self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def pre_attention(self, x, c):
        """Returns (q, k, v) of this stream and the modulation still to be applied."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1)
        return split_heads(self.attn.qkv(modulate(self.norm1(x), mods[0], mods[1])), self.num_heads), mods

    def post_attention(self, x, attn, mods):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa[:, None] * self.attn.proj(attn)
        mlp = self.mlp.fc2(F.gelu(self.mlp.fc1(modulate(self.norm2(x), shift_mlp, scale_mlp)), approximate="tanh"))
        return x + gate_mlp[:, None] * mlp


class JointBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, last: bool):
        super().__init__()
        self.context_block = StreamBlock(dim, num_heads, mlp_ratio, pre_only=last)
        self.x_block = StreamBlock(dim, num_heads, mlp_ratio)

    def forward(self, context, x, c):
        (ctx_q, ctx_k, ctx_v), ctx_mods = self.context_block.pre_attention(context, c)
        (x_q, x_k, x_v), x_mods = self.x_block.pre_attention(x, c)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((ctx_q, x_q), (ctx_k, x_k), (ctx_v, x_v)))
        attn = merge_heads(attention(q, k, v))
        ctx_attn, x_attn = attn[:, : context.shape[1]], attn[:, context.shape[1] :]
        if not self.context_block.pre_only:
            context = self.context_block.post_attention(context, ctx_attn, ctx_mods)
        return context, self.x_block.post_attention(x, x_attn, x_mods)


class TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x):
        return self.mlp(x)


class MMDiT(nn.Module):
    """SD3's multimodal diffusion transformer; parameter names are Stability's checkpoint keys
    (without the `model.diffusion_model.` prefix)."""

    def __init__(self, config: SD3Config = SD3_MEDIUM):
        super().__init__()
        self.config = config
        dim, p = config.hidden_size, config.patch_size
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(config.in_channels, dim, kernel_size=p, stride=p)
        # A fixed sin-cos table stored in the checkpoint; positions are its centre crop.
        self.register_buffer("pos_embed", torch.zeros(1, config.pos_embed_max_size**2, dim))
        self.t_embedder = TimestepMLP(256, dim)
        self.y_embedder = TimestepMLP(config.adm_in_channels, dim)
        self.context_embedder = nn.Linear(config.context_dim, dim)
        self.joint_blocks = nn.ModuleList(
            JointBlock(dim, config.num_heads, config.mlp_ratio, last=i == config.depth - 1) for i in range(config.depth)
        )
        self.final_layer = FinalLayer(dim, p * p * config.out_channels)
        self.gradient_checkpointing = False

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        size = self.config.pos_embed_max_size
        if h > size or w > size:
            raise ValueError(f"{h}x{w} patches exceed the stored {size}x{size} position grid")
        top, left = (size - h) // 2, (size - w) // 2
        grid = self.pos_embed.view(1, size, size, -1)[:, top : top + h, left : left + w]
        return grid.reshape(1, h * w, -1)

    def forward(self, x, timesteps, context, y):
        """x (B, C, H, W) latents; timesteps (B,) = sigma * 1000; context (B, T, 4096); y (B, 2048).
        Returns the velocity (B, C, H, W)."""
        b, _, height, width = x.shape
        p = self.config.patch_size
        h, w = height // p, width // p
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.cropped_pos_embed(h, w)
        c = self.t_embedder(timestep_embedding(timesteps).to(x.dtype)) + self.y_embedder(y)
        context = self.context_embedder(context)
        for block in self.joint_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                context, tokens = checkpoint(block, context, tokens, c, use_reentrant=False)
            else:
                context, tokens = block(context, tokens, c)
        out = self.final_layer(tokens, c)  # (B, h*w, p*p*C), channels last inside each patch
        out = out.view(b, h, w, p, p, self.config.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.config.out_channels, height, width)


# ================================================================================= VAE


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels of the lowest-resolution feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        hidden = self.norm(x)
        q, k, v = (conv(hidden).view(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        # torch convolutions pad symmetrically; the trained weights expect right/bottom padding only
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)
    return mid


def run_mid(mid, x):
    return mid.block_2(mid.attn_1(mid.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, mults = config.base_channels, config.channel_multipliers
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, stride=config.stride, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(mults):
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            if level < len(mults) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = mid_block(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        return self.conv_out(F.silu(self.norm_out(run_mid(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, mults = config.base_channels, config.channel_multipliers
        self.stride = config.stride
        block_in = ch * mults[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = mid_block(block_in)
        up_levels = []
        for level in reversed(range(len(mults))):  # built lowest resolution first, stored in level order
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, ch * mults[level]))
                block_in = ch * mults[level]
            if level > 0:
                up.upsample = Upsample(block_in)
            up_levels.insert(0, up)
        self.up = nn.ModuleList(up_levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, 3, padding=1)

    def forward(self, z):
        h = run_mid(self.mid, self.conv_in(z))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        h = F.silu(self.norm_out(h))
        if self.stride > 1:  # F16: the extra factor of 2 is a plain nearest upsample before conv_out
            h = F.interpolate(h, scale_factor=float(self.stride), mode="nearest")
        return self.conv_out(h)


class AutoEncoder(nn.Module):
    """AutoencoderKL; parameter names are the LDM / BFL `ae.safetensors` keys."""

    def __init__(self, config: VAEConfig = FLUX_VAE):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (the posterior mean)."""
        mean = self.encoder(x).chunk(2, dim=1)[0]
        return (mean - self.config.shift_factor) * self.config.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1] (not clipped)."""
        return self.decoder(z / self.config.scale_factor + self.config.shift_factor)


# ======================================================================== weight loading
#
# Our modules carry the original single-file names (BFL for Flux and its VAE, Stability for
# SD3), so those files load as they are. The diffusers folder layout is converted with one
# explicit table per model: {original key: ([folder keys], transform)}. Several folder keys
# mean a fused tensor (Flux's qkv, its single blocks' linear1) concatenated along dim 0.


def assign_state_dict(model: nn.Module, state: dict, what: str) -> nn.Module:
    """Load `state` into a model built on the meta device, refusing any mismatch by name."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = [
        f"{len(keys)} {kind} (first: {', '.join(keys[:3])})"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", wrong))
        if keys
    ]
    if problems:
        raise UserError(f"{what}: the weights do not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def swap_halves(t):
    """BFL/SAI store final adaLN outputs as (shift, scale), diffusers as (scale, shift)."""
    return torch.cat(t.chunk(2)[::-1])


TRANSFORMS = {  # (folder -> original, original -> folder)
    None: (lambda t: t, lambda t: t),
    "swap": (swap_halves, swap_halves),
    "conv1x1": (lambda t: t[..., None, None] if t.ndim == 2 else t, lambda t: t.flatten(1) if t.ndim == 4 else t),
}


def to_original_layout(state: dict, table: dict, what: str) -> dict:
    """Folder-layout tensors -> original keys, following `table` (see above)."""
    state, out, missing = dict(state), {}, []
    for original, (parts, transform) in table.items():
        if not all(part in state for part in parts):
            missing += [part for part in parts if part not in state]
            continue
        tensors = [state.pop(part) for part in parts]
        out[original] = TRANSFORMS[transform][0](torch.cat(tensors) if len(tensors) > 1 else tensors[0])
    if missing or state:
        found = [f"{len(missing)} missing (first: {', '.join(missing[:3])})"] if missing else []
        found += [f"{len(state)} unexpected (first: {', '.join(list(state)[:3])})"] if state else []
        raise UserError(f"{what}: not a checkpoint of this model: {'; '.join(found)}")
    return out


def to_folder_layout(state: dict, table: dict, hidden_size: int = 0) -> dict:
    """Original keys -> folder layout. Fused tensors split as [hidden]*(n-1) + [rest]."""
    out = {}
    for original, (parts, transform) in table.items():
        tensor = TRANSFORMS[transform][1](state[original])
        if len(parts) == 1:
            out[parts[0]] = tensor
        else:
            sizes = [hidden_size] * (len(parts) - 1) + [tensor.shape[0] - hidden_size * (len(parts) - 1)]
            out.update(zip(parts, tensor.split(sizes)))
    return out


def linear_entries(original: str, folder, transform=None) -> dict:
    """Table rows for a layer with weight and bias."""
    folder = [folder] if isinstance(folder, str) else folder
    return {f"{original}.{p}": ([f"{f}.{p}" for f in folder], transform) for p in ("weight", "bias")}


def count_blocks(keys, pattern: str) -> int:
    indices = {int(m.group(1)) for key in keys if (m := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


def flux_key_table(depth: int, depth_single: int, guidance: bool) -> dict:
    table = {
        **linear_entries("img_in", "x_embedder"),
        **linear_entries("txt_in", "context_embedder"),
        **linear_entries("final_layer.linear", "proj_out"),
        **linear_entries("final_layer.adaLN_modulation.1", "norm_out.linear", "swap"),
    }
    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if guidance:
        embedders["guidance_in"] = "guidance_embedder"
    for original, folder in embedders.items():
        table.update(linear_entries(f"{original}.in_layer", f"time_text_embed.{folder}.linear_1"))
        table.update(linear_entries(f"{original}.out_layer", f"time_text_embed.{folder}.linear_2"))
    for i in range(depth):
        o, f = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
        for stream, suffix, prefix in (("img", "", "to_"), ("txt", "_context", "add_")):
            projections = [f"{f}.{prefix}{x}" + ("" if stream == "img" else "_proj") for x in "qkv"]
            table.update(linear_entries(f"{o}.{stream}_mod.lin", f"transformer_blocks.{i}.norm1{suffix}.linear"))
            table.update(linear_entries(f"{o}.{stream}_attn.qkv", projections))
            table.update(linear_entries(f"{o}.{stream}_attn.proj", f"{f}.to_out.0" if stream == "img" else f"{f}.to_add_out"))
            table.update(linear_entries(f"{o}.{stream}_mlp.0", f"transformer_blocks.{i}.ff{suffix}.net.0.proj"))
            table.update(linear_entries(f"{o}.{stream}_mlp.2", f"transformer_blocks.{i}.ff{suffix}.net.2"))
            norm = "norm_" if stream == "img" else "norm_added_"
            table[f"{o}.{stream}_attn.norm.query_norm.scale"] = ([f"{f}.{norm}q.weight"], None)
            table[f"{o}.{stream}_attn.norm.key_norm.scale"] = ([f"{f}.{norm}k.weight"], None)
    for i in range(depth_single):
        o, f = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        table.update(linear_entries(f"{o}.linear1", [f"{f}.attn.to_q", f"{f}.attn.to_k", f"{f}.attn.to_v", f"{f}.proj_mlp"]))
        table.update(linear_entries(f"{o}.linear2", f"{f}.proj_out"))
        table.update(linear_entries(f"{o}.modulation.lin", f"{f}.norm.linear"))
        table[f"{o}.norm.query_norm.scale"] = ([f"{f}.attn.norm_q.weight"], None)
        table[f"{o}.norm.key_norm.scale"] = ([f"{f}.attn.norm_k.weight"], None)
    return table


def flux_table_for(state: dict, layout: str) -> dict:
    keys = list(state)
    if layout == "original":
        return flux_key_table(
            count_blocks(keys, r"double_blocks\.(\d+)\."),
            count_blocks(keys, r"single_blocks\.(\d+)\."),
            "guidance_in.in_layer.weight" in state,
        )
    return flux_key_table(
        count_blocks(keys, r"transformer_blocks\.(\d+)\."),
        count_blocks(keys, r"single_transformer_blocks\.(\d+)\."),
        "time_text_embed.guidance_embedder.linear_1.weight" in state,
    )


def flux_config_from_state(state: dict, folder_config: dict | None = None, axes_dim=None, theta=10000.0) -> FluxConfig:
    """Read every dimension off the (original-layout) tensors; only the RoPE split of the head
    dim is not in them: it comes from `axes_dim`, the folder's config.json, or Flux's (16, 56, 56)."""
    folder_config = folder_config or {}
    hidden = state["img_in.weight"].shape[0]
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    axes_dim = tuple(axes_dim or folder_config.get("axes_dims_rope") or ((16, 56, 56) if head_dim == 128 else ()))
    if not axes_dim:
        raise UserError(f"Flux checkpoint with head dim {head_dim}: pass the RoPE axes_dim (it is not stored in the weights)")
    return FluxConfig(
        in_channels=state["img_in.weight"].shape[1],
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=count_blocks(state, r"double_blocks\.(\d+)\."),
        depth_single_blocks=count_blocks(state, r"single_blocks\.(\d+)\."),
        mlp_ratio=state["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
        vec_in_dim=state["vector_in.in_layer.weight"].shape[1],
        context_in_dim=state["txt_in.weight"].shape[1],
        axes_dim=axes_dim,
        theta=theta,
        guidance_embed="guidance_in.in_layer.weight" in state,
    )


# Prefixes of the other components inside all-in-one checkpoints (ComfyUI, Stability).
OTHER_COMPONENTS = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.", "vae.", "text_encoder")
DIFFUSION_PREFIX = "model.diffusion_model."


def read_component(path, dtype, device, prefix=DIFFUSION_PREFIX) -> dict:
    """The tensors of one component: keys under `prefix` (stripped), or, in a file without that
    prefix, every key that belongs to no other component."""
    state = load_safetensors(path, dtype, device, key_filter=lambda key: not key.startswith(OTHER_COMPONENTS) or key.startswith(prefix))
    if any(key.startswith(prefix) for key in state):
        state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return state


def folder_config(path) -> dict:
    config = path / "config.json" if path.is_dir() else None
    return read_json(config) if config is not None and config.exists() else {}


def load_flux(source, dtype=torch.bfloat16, device="cpu", axes_dim=None, theta=10000.0, token=None) -> Flux:
    """A Flux transformer from a BFL single file (`flux1-dev.safetensors`, bare or with the
    `model.diffusion_model.` prefix), a diffusers `transformer/` folder, a pipeline folder, or
    a Hub repo id (only its `transformer/` files are downloaded)."""
    path = resolve_source(source, subfolder="transformer", token=token)
    state = read_component(path, dtype, device)
    if "double_blocks.0.img_attn.qkv.weight" not in state:
        if "transformer_blocks.0.attn.to_q.weight" not in state:
            raise UserError(f"{source}: not a Flux transformer checkpoint (first keys: {', '.join(list(state)[:3])})")
        state = to_original_layout(state, flux_table_for(state, "folder"), f"{source} (diffusers Flux)")
    config = flux_config_from_state(state, folder_config(path), axes_dim, theta)
    with torch.device("meta"):
        model = Flux(config)
    return assign_state_dict(model, state, f"{source} (Flux)").eval()


def sd3_key_table(depth: int) -> dict:
    table = {
        "pos_embed": (["pos_embed.pos_embed"], None),
        **linear_entries("x_embedder.proj", "pos_embed.proj"),
        **linear_entries("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        **linear_entries("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        **linear_entries("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        **linear_entries("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
        **linear_entries("context_embedder", "context_embedder"),
        **linear_entries("final_layer.linear", "proj_out"),
        **linear_entries("final_layer.adaLN_modulation.1", "norm_out.linear", "swap"),
    }
    for i in range(depth):
        o, f = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == depth - 1
        table.update(linear_entries(f"{o}.x_block.attn.qkv", [f"{f}.attn.to_{x}" for x in "qkv"]))
        table.update(linear_entries(f"{o}.x_block.attn.proj", f"{f}.attn.to_out.0"))
        table.update(linear_entries(f"{o}.x_block.mlp.fc1", f"{f}.ff.net.0.proj"))
        table.update(linear_entries(f"{o}.x_block.mlp.fc2", f"{f}.ff.net.2"))
        table.update(linear_entries(f"{o}.x_block.adaLN_modulation.1", f"{f}.norm1.linear"))
        table.update(linear_entries(f"{o}.context_block.attn.qkv", [f"{f}.attn.add_{x}_proj" for x in "qkv"]))
        # the last context stream has only (shift, scale): diffusers makes it an AdaLayerNormContinuous
        table.update(linear_entries(f"{o}.context_block.adaLN_modulation.1", f"{f}.norm1_context.linear", "swap" if last else None))
        if not last:
            table.update(linear_entries(f"{o}.context_block.attn.proj", f"{f}.attn.to_add_out"))
            table.update(linear_entries(f"{o}.context_block.mlp.fc1", f"{f}.ff_context.net.0.proj"))
            table.update(linear_entries(f"{o}.context_block.mlp.fc2", f"{f}.ff_context.net.2"))
    return table


def sd3_config_from_state(state: dict, folder_config: dict | None = None) -> SD3Config:
    """Dimensions from the tensors; the head count from config.json, else SD3's head dim of 64."""
    if any(".ln_q." in key or ".attn2." in key for key in state):
        raise UserError("this is an SD3.5 checkpoint (QK norm / dual attention); only SD3-Medium is supported")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    out_features = state["final_layer.linear.weight"].shape[0]
    return SD3Config(
        in_channels=in_channels,
        out_channels=out_features // patch**2,
        patch_size=patch,
        hidden_size=hidden,
        num_heads=(folder_config or {}).get("num_attention_heads", hidden // 64),
        depth=count_blocks(state, r"joint_blocks\.(\d+)\."),
        mlp_ratio=state["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / hidden,
        adm_in_channels=state["y_embedder.mlp.0.weight"].shape[1],
        context_dim=state["context_embedder.weight"].shape[1],
        pos_embed_max_size=math.isqrt(state["pos_embed"].shape[1]),
    )


def load_sd3(source, dtype=torch.bfloat16, device="cpu", token=None) -> MMDiT:
    """An SD3 MMDiT from a Stability single file (`sd3_medium*.safetensors`), a diffusers
    `transformer/` folder, a pipeline folder, or a Hub repo id."""
    path = resolve_source(source, subfolder="transformer", token=token)
    state = read_component(path, dtype, device)
    if "joint_blocks.0.x_block.attn.qkv.weight" not in state:
        if "transformer_blocks.0.attn.to_q.weight" not in state or "pos_embed.pos_embed" not in state:
            raise UserError(f"{source}: not an SD3 transformer checkpoint (first keys: {', '.join(list(state)[:3])})")
        table = sd3_key_table(count_blocks(state, r"transformer_blocks\.(\d+)\."))
        state = to_original_layout(state, table, f"{source} (diffusers SD3)")
    with torch.device("meta"):
        model = MMDiT(sd3_config_from_state(state, folder_config(path)))
    return assign_state_dict(model, state, f"{source} (SD3)").eval()


def vae_key_table(num_levels: int, num_res_blocks: int) -> dict:
    table = {}

    def add(original, folder, transform=None):
        table.update(linear_entries(original, folder, transform))

    def resnet(original, folder, shortcut):
        for name in ("norm1", "conv1", "norm2", "conv2"):
            add(f"{original}.{name}", f"{folder}.{name}")
        if shortcut:
            add(f"{original}.nin_shortcut", f"{folder}.conv_shortcut")

    for part in ("encoder", "decoder"):
        add(f"{part}.conv_in", f"{part}.conv_in")
        add(f"{part}.conv_out", f"{part}.conv_out")
        add(f"{part}.norm_out", f"{part}.conv_norm_out")
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", False)
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", False)
        add(f"{part}.mid.attn_1.norm", f"{part}.mid_block.attentions.0.group_norm")
        for original, folder in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            add(f"{part}.mid.attn_1.{original}", f"{part}.mid_block.attentions.0.{folder}", "conv1x1")
    for level in range(num_levels):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", True)
        if level < num_levels - 1:
            add(f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv")
        up = num_levels - 1 - level  # diffusers numbers decoder blocks from the lowest resolution
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", True)
        if level > 0:
            add(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv")
    return table


def vae_table_for(state: dict) -> dict:
    """The VAE table for this checkpoint (either layout). A resnet has a shortcut convolution
    only where it changes width, so shortcut rows are kept only where the state has them."""
    folder = any(key.startswith("encoder.down_blocks.") for key in state)
    levels = count_blocks(state, r"encoder\.down_blocks\.(\d+)\." if folder else r"encoder\.down\.(\d+)\.")
    res_blocks = count_blocks(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\." if folder else r"encoder\.down\.0\.block\.(\d+)\.")
    return {
        original: (parts, transform)
        for original, (parts, transform) in vae_key_table(levels, res_blocks).items()
        if "nin_shortcut" not in original or (parts[0] if folder else original) in state
    }


def vae_config_from_state(state: dict, scale_factor: float, shift_factor: float, stride: int) -> VAEConfig:
    base = state["encoder.conv_in.weight"].shape[0]
    levels = count_blocks(state, r"encoder\.down\.(\d+)\.")
    return VAEConfig(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        base_channels=base,
        channel_multipliers=tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // base for i in range(levels)),
        num_res_blocks=count_blocks(state, r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=state["decoder.conv_in.weight"].shape[1],
        scale_factor=scale_factor,
        shift_factor=shift_factor,
        stride=stride,
    )


def load_vae(source, dtype=torch.float32, device="cpu", stride=None, scale_factor=None, shift_factor=None, token=None) -> AutoEncoder:
    """A 16-channel AutoencoderKL from BFL's `ae.safetensors`, an SD3 single file (its
    `first_stage_model.` part), a diffusers `vae/` folder, a pipeline folder or a Hub repo id.

    Latent scale and shift come from the arguments, else the folder's config.json, else Flux's.
    stride 2 gives the F16 VAE (Diffusion-4K's config.json may say `"stride": 2`)."""
    path = resolve_source(source, subfolder="vae", token=token)
    state = read_component(path, dtype, device, prefix="first_stage_model.")
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in state:
        state = to_original_layout(state, vae_table_for(state), f"{source} (diffusers VAE)")
    if "encoder.down.0.block.0.conv1.weight" not in state or any(key.startswith(("quant_conv", "post_quant_conv")) for key in state):
        raise UserError(f"{source}: not a 16-channel Flux/SD3 VAE checkpoint (first keys: {', '.join(list(state)[:3])})")
    config = folder_config(path)

    def setting(given, key, default):
        return next(value for value in (given, config.get(key), default) if value is not None)

    vae_config = vae_config_from_state(
        state,
        setting(scale_factor, "scaling_factor", FLUX_VAE.scale_factor),
        setting(shift_factor, "shift_factor", FLUX_VAE.shift_factor),
        setting(stride, "stride", 1),
    )
    with torch.device("meta"):
        model = AutoEncoder(vae_config)
    return assign_state_dict(model, state, f"{source} (VAE)").eval()


# ======================================================================================= CLI


def main(argv=None):
    raise UserError(
        "the Diffusion-4K pipeline (4K sampling, WLF training, SC-VAE training) is not implemented yet; "
        "this file currently provides the models and loaders only"
    )


if __name__ == "__main__":
    from common.io import run_cli

    sys.exit(run_cli(main))

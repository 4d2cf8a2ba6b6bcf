"""OP4KSR: One-Step Patch-Free 4K Super-Resolution with Periodic Artifact Suppression.

Deng, Yu, Chen, Shen, Zhang, Li, Yuan, Zhou and Yu, arXiv 2605.13457 (2026).

The method super-resolves a whole image to 4096x4096 in one Flux step, without patches: the
LR image is upsampled to the target size, encoded by an F16 VAE encoder (with a LoRA), Flux
(with a LoRA) predicts the velocity once, x0 = z - sigma * v, and the frozen F16 decoder
decodes it (16,384 tokens at 4096^2). One step at that size shows periodic artifacts, which the
paper suppresses in two ways: RoPE base-frequency rescaling (RFR, theta 10000 -> 100 on the
spatial axes) and an autocorrelation periodicity loss L_AP. No official code or weights exist;
everything here is written from the paper's text.

Status
    In this file now: the method parts that need no diffusion model, in paper order:
      - L_AP and the periodicity score (`periodicity_loss`, `periodicity_score`);
      - the Real-ESRGAN-style second-order degradation that makes training LR inputs (`degrade`);
      - the training-loss assembly (`LossWeights`, `training_loss`);
      - the optional colour fixes (`wavelet_color_fix`, `adain_color_fix`).
    To come (not in this file yet, so nothing here super-resolves an image): the models
    (Flux transformer with RFR, F16 VAE, LoRA layers) copied from diffusion4k.py, the
    checkpoint format, the inference pipeline, the training loop and the CLI.

Choices the paper leaves open, and ours
    L_AP (the paper gives only: Q = 4 quadrants, autocorrelation per quadrant, periodic peaks
    penalised):
      - Input: the decoded pixel image in [-1, 1] (not the latent), each RGB channel on its own
        (a chroma-only grid would be invisible in luma); the loss averages over channels.
      - Quadrants: a 2x2 split (Q = side^2 for any square Q); an odd last row/column is dropped.
      - What is autocorrelated: the quadrant's horizontal and vertical pixel differences, not the
        pixels. Natural images have a ~1/f amplitude spectrum, so their differences are nearly
        white; on raw pixels the smooth content's autocorrelation wobbles enough to hide a faint
        grid (in our trials on a 1/f test texture, a faint planted 32-px pattern scored ~3x the
        clean image on raw pixels, ~11x on differences). The price: the loss weighs a pattern's harmonics by
        frequency^2, so smooth (sinusoidal) 16/32-px modulations are seen weakly.
      - Autocorrelation: Wiener-Khinchin on an FFT zero-padded by the largest lag read (linear,
        not circular); mean removed; each lag divided by its overlap area (unbiased).
      - Lags: for each period p in (16, 32) px (one F16 latent pixel; one 2x2-packed token), the
        lattice points (k p, l p) with 0 <= k <= 2, -2 <= l <= 2 in the half plane (the
        autocorrelation is symmetric), 12 per period, 24 in all (largest lag read: 80 px).
      - Peak: the autocovariance at a lattice lag minus its mean over the p x p lags centred
        there. A p-periodic pattern averages to exactly 0 over one period, so this counts all of
        its power (every harmonic), while content without that period gives ~0.
      - Normalisation: peaks divided by the lag-0 variance (+1e-5, about the variance of 8-bit
        quantisation noise in [-1, 1], so flat quadrants score ~0); the two difference
        directions averaged. The normaliser carries no gradient, and in the relative form it is
        the ground truth's: otherwise the cheapest way to lower a normalised peak would be to
        add noise to the output.
      - Relative form: mean over batch, quadrants, channels and lags of
        relu(peak_pred - peak_target), the target's side without gradient. At pred == target
        loss and gradient are exactly zero, so real periodic texture (fabric, tiles) is kept at
        its ground-truth strength. Without a target it is the absolute form relu(peak_pred),
        which is also the per-image `periodicity_score` (a metric).
      - Caveat: L_AP is a second-order statistic; minimised alone it can also be lowered by
        decorrelating the pattern between periods rather than erasing it. It is meant to be
        used with the reconstruction terms, which forbid that.
    Degradation: Real-ESRGAN's second-order pipeline with its published defaults (kernel sizes
        7..21 were set for ~256-px crops; at 4K one may want larger blurs). Differences: every
        image of a batch gets its own parameters; each step draws from its own random stream, so
        switching one step off leaves the others' draws unchanged; Poisson noise counts 255
        photon levels; JPEG goes through Pillow with an integer quality; blur pads by
        replication (works at any size).
    Loss weights: not published. Ours: pixel MSE 1, perceptual 2 (OSEDiff's ratio), L_AP 1,
        pixel L1 and latent MSE off.
    Colour fix: off by default (the paper does not mention one); wavelet = 5 a-trous levels.

Public API (so far)
    periodicity_loss(pred, target=None, periods=(16, 32), quadrants=4, harmonics=2) -> scalar
    periodicity_score(image, periods=(16, 32), quadrants=4, harmonics=2) -> (B,)
    degrade(hr, config, generator, scale=4) -> lr          # (B,3,H,W) in [0,1] -> (B,3,H/s,W/s)
    training_loss(pred, target, weights, perceptual=None, pred_latent=None, target_latent=None)
    wavelet_color_fix(image, reference, levels=5), adain_color_fix(image, reference)
"""

import math
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ----------------------------------------------------------------------------- configs

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass
class DegradationStage:
    """One order of the Real-ESRGAN degradation (defaults: its first order).

    A probability of 0 switches a step off; `resize_probs=(0, 0, 1)` keeps the size.
    Noise sigmas are in 8-bit levels (sigma 30 means 30/255).
    """

    blur_prob: float = 1.0
    kernel_sizes: tuple[int, int] = (7, 21)  # odd sizes from..to, uniform
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sinc_prob: float = 0.1  # a sinc (ringing) kernel instead of a Gaussian-family one
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)  # generalized Gaussian shape
    betap_range: tuple[float, float] = (1.0, 2.0)  # plateau shape
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    noise_prob: float = 1.0  # Real-ESRGAN always adds noise
    gaussian_noise_prob: float = 0.5  # otherwise Poisson
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_prob: float = 1.0
    jpeg_range: tuple[float, float] = (30.0, 95.0)


def _second_order_defaults() -> DegradationStage:
    return DegradationStage(
        blur_prob=0.8, blur_sigma=(0.2, 1.5), resize_probs=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
        noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5),
    )


@dataclass
class DegradationConfig:
    """Real-ESRGAN's second-order degradation with its published defaults.

    The second order's resize is relative to the LR size; its JPEG is the final one, applied
    before or after (coin flip) the final resize to the LR size and the final sinc filter.
    """

    first: DegradationStage = field(default_factory=DegradationStage)
    second: DegradationStage = field(default_factory=_second_order_defaults)
    final_sinc_prob: float = 0.8
    final_resize_modes: tuple[str, ...] = RESIZE_MODES


@dataclass
class LossWeights:
    """Weights of the training loss terms (the paper publishes none; 0 switches a term off)."""

    pixel_mse: float = 1.0
    pixel_l1: float = 0.0
    latent_mse: float = 0.0  # MSE between the predicted x0 latent and the HR latent
    perceptual: float = 2.0  # a callable (e.g. LPIPS on crops) supplied by the training loop
    periodicity: float = 1.0  # lambda_AP


# ---- models: copied from diffusion4k.py (Flux, RoPE, F16 VAE), kept identical by tests/test_copies.py ----


# ----------------------------------------------------------------------------- L_AP: periodicity loss

VARIANCE_FLOOR = 1e-5  # about the variance of 8-bit quantisation noise for images in [-1, 1]


def split_into_quadrants(image: torch.Tensor, quadrants: int = 4) -> torch.Tensor:
    """(B, C, H, W) -> (B, Q, C, H/side, W/side) with Q = side^2; an odd remainder is dropped."""
    side = math.isqrt(quadrants)
    if side * side != quadrants:
        raise ValueError(f"quadrants must be a square number (1, 4, 9, ...), got {quadrants}")
    b, c, height, width = image.shape
    h, w = height // side, width // side
    tiles = image[..., : side * h, : side * w].reshape(b, c, side, h, side, w)
    return tiles.permute(0, 2, 4, 1, 3, 5).reshape(b, quadrants, c, h, w)


def _fast_fft_length(n: int) -> int:
    """The smallest length >= n with no prime factor above 5 (fast for every FFT library)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def autocovariance(x: torch.Tensor, max_lag: int) -> torch.Tensor:
    """Autocovariance of each (h, w) map of `x` for lags -max_lag..max_lag in y and x.

    Returns (..., 2 max_lag + 1, 2 max_lag + 1) with lag (dy, dx) at [max_lag + dy, max_lag + dx].
    Wiener-Khinchin: the inverse FFT of the power spectrum of the mean-removed map, zero-padded
    by max_lag so that no lag wraps around (the linear, not circular, autocorrelation); each lag
    is divided by its overlap area (unbiased). Lag (0, 0) is the variance.
    """
    h, w = x.shape[-2:]
    if max_lag >= min(h, w):
        raise ValueError(f"lags up to {max_lag} px need quadrants larger than {max_lag} px, got {h}x{w}")
    x = x.float()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    size = (_fast_fft_length(h + max_lag), _fast_fft_length(w + max_lag))
    spectrum = torch.fft.rfft2(x, s=size)
    sums = torch.fft.irfft2(spectrum.real.square() + spectrum.imag.square(), s=size)  # [dy, dx]: sum x(p) x(p + (dy, dx))
    lags = torch.arange(-max_lag, max_lag + 1, device=x.device)
    sums = sums[..., (lags % size[0])[:, None], (lags % size[1])[None, :]]  # negative lags sit at the end
    overlap = (h - lags.abs())[:, None] * (w - lags.abs())[None, :]  # pixel pairs behind each lag
    return sums / overlap


def lattice_lags(period: int, harmonics: int = 2) -> list[tuple[int, int]]:
    """Lags (dy, dx) on the period lattice, up to `harmonics` periods, one of each +-pair."""
    steps = range(-harmonics, harmonics + 1)
    return [(k * period, l * period) for k in range(harmonics + 1) for l in steps if k > 0 or l > 0]


def lattice_peaks(image: torch.Tensor, periods=(16, 32), quadrants: int = 4, harmonics: int = 2):
    """Peaks of the autocovariance on the period lattices, per quadrant and channel.

    Returns (peaks, variance): peaks (B, Q, C, 2, n_lags) is how far the autocovariance at each
    lattice lag (`lattice_lags`, period by period) rises above its mean over the period x period
    lags centred there; variance (B, Q, C, 2, 1) is the lag-0 value that normalises it. Both are
    of the quadrant's horizontal and vertical pixel differences (the 2): natural images have a
    ~1/f amplitude spectrum, so their differences are nearly white and only a periodic pattern
    leaves peaks away from lag 0.
    """
    tiles = split_into_quadrants(image, quadrants)
    differences = torch.stack(
        [tiles[..., 1:, 1:] - tiles[..., 1:, :-1], tiles[..., 1:, 1:] - tiles[..., :-1, 1:]], dim=-3
    )  # (B, Q, C, 2, h-1, w-1)
    max_lag = max(harmonics * p + p // 2 for p in periods)
    covariance = autocovariance(differences, max_lag)
    lattice = [(period, dy, dx) for period in periods for dy, dx in lattice_lags(period, harmonics)]
    period, dy, dx = torch.tensor(lattice, device=image.device).unbind(-1)
    y, x = max_lag + dy, max_lag + dx
    # The mean over one period of lags around each peak (from an integral image): a p-periodic
    # pattern averages to exactly 0 there, so peak - mean counts all of its power, in every harmonic.
    integral = F.pad(covariance.cumsum(-2).cumsum(-1), (1, 0, 1, 0))  # [i, j]: sum of [:i, :j]
    top, left = y - period // 2, x - period // 2
    bottom, right = top + period, left + period
    window_sum = integral[..., bottom, right] - integral[..., top, right] - integral[..., bottom, left] + integral[..., top, left]
    peaks = covariance[..., y, x] - window_sum / period**2
    variance = covariance[..., max_lag, max_lag, None]
    return peaks, variance


def _normalised(peaks, variance) -> torch.Tensor:
    """Peaks in units of the variance (an autocorrelation coefficient), averaged over the two
    difference directions -> (B, Q, C, n_lags)."""
    return (peaks / (variance + VARIANCE_FLOOR)).mean(dim=-2)


def periodicity_loss(pred, target=None, periods=(16, 32), quadrants: int = 4, harmonics: int = 2) -> torch.Tensor:
    """L_AP: mean relu(peak_pred - peak_target) over batch, quadrants, channels and lattice lags.

    With `target` (the ground truth) it is the relative form: only periodicity stronger than the
    ground truth's is penalised, both measured in units of the ground truth's variance. Without
    it every peak above zero is penalised (the absolute form), in units of pred's own variance.
    The normalising variance carries no gradient: otherwise the cheapest way to lower a
    normalised peak would be to add noise to the output.
    """
    peaks, variance = lattice_peaks(pred, periods, quadrants, harmonics)
    if target is None:
        return F.relu(_normalised(peaks, variance.detach())).mean()
    with torch.no_grad():
        target_peaks, target_variance = lattice_peaks(target, periods, quadrants, harmonics)
    return F.relu(_normalised(peaks - target_peaks, target_variance)).mean()


@torch.no_grad()
def periodicity_score(image, periods=(16, 32), quadrants: int = 4, harmonics: int = 2) -> torch.Tensor:
    """Per-image periodicity (B,): the absolute form of L_AP. Near 0 for natural images."""
    return F.relu(_normalised(*lattice_peaks(image, periods, quadrants, harmonics))).mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- training data: degradation


def _uniform(generator, low, high) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _happens(generator, probability) -> bool:
    return torch.rand((), generator=generator, dtype=torch.float64).item() < probability


def _pick(generator, options, probs=None):
    weights = torch.tensor(probs if probs is not None else [1.0] * len(options), dtype=torch.float64)
    return options[torch.multinomial(weights, 1, generator=generator).item()]


def _odd_size(generator, sizes) -> int:
    return _pick(generator, list(range(sizes[0], sizes[1] + 1, 2)))


def _kernel_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(size, dtype=torch.float64) - size // 2
    return torch.meshgrid(r, r, indexing="ij")


def gaussian_family_kernel(size, sigma_x, sigma_y, angle=0.0, beta=1.0, plateau=False) -> torch.Tensor:
    """Anisotropic Gaussian (beta 1), generalized Gaussian or plateau kernel, summing to 1.

    With q = x^T Sigma^-1 x for Sigma rotated by `angle`: exp(-q^beta / 2), or 1 / (1 + q^beta).
    """
    y, x = _kernel_grid(size)
    along = math.cos(angle) * x + math.sin(angle) * y  # coordinates on the kernel's own axes
    across = -math.sin(angle) * x + math.cos(angle) * y
    q = (along / sigma_x) ** 2 + (across / sigma_y) ** 2
    kernel = 1 / (1 + q**beta) if plateau else torch.exp(-0.5 * q**beta)
    return (kernel / kernel.sum()).float()


def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """Ideal circular low-pass filter (cutoff in radians per pixel), cut to size x size, summing to 1."""
    y, x = _kernel_grid(size)
    r = torch.hypot(x, y).clamp_min(1e-12)
    kernel = cutoff * torch.special.bessel_j1(cutoff * r) / (2 * math.pi * r)
    kernel[size // 2, size // 2] = cutoff**2 / (4 * math.pi)  # the limit at r = 0
    return (kernel / kernel.sum()).float()


def random_blur_kernel(stage: DegradationStage, generator) -> torch.Tensor:
    size = _odd_size(generator, stage.kernel_sizes)
    if _happens(generator, stage.sinc_prob):
        # Small kernels cannot hold a low cutoff's wide ringing.
        low = math.pi / 3 if size < 13 else math.pi / 5
        return sinc_kernel(size, _uniform(generator, low, math.pi))
    kind = _pick(generator, KERNEL_TYPES, stage.kernel_probs)
    sigma_x = _uniform(generator, *stage.blur_sigma)
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, angle = sigma_x, 0.0
    else:
        sigma_y, angle = _uniform(generator, *stage.blur_sigma), _uniform(generator, -math.pi, math.pi)
    beta = 1.0
    if kind.startswith(("generalized", "plateau")):
        low, high = stage.betag_range if kind.startswith("generalized") else stage.betap_range
        # Half the draws below 1 (heavier tails), half above (flatter top).
        beta = _uniform(generator, low, 1.0) if _happens(generator, 0.5) else _uniform(generator, 1.0, high)
    return gaussian_family_kernel(size, sigma_x, sigma_y, angle, beta, plateau=kind.startswith("plateau"))


def filter2d(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each channel of (B, C, H, W) with one (k, k) kernel; edges replicated."""
    pad = kernel.shape[-1] // 2
    channels = image.shape[1]
    weight = kernel.to(image).expand(channels, 1, *kernel.shape)
    return F.conv2d(F.pad(image, (pad, pad, pad, pad), mode="replicate"), weight, groups=channels)


def _resize(image, size, mode) -> torch.Tensor:
    corners = None if mode == "area" else False
    return F.interpolate(image, size=size, mode=mode, align_corners=corners)


def _random_resize(image, stage: DegradationStage, base_size, generator) -> torch.Tensor:
    direction = _pick(generator, ("up", "down", "keep"), stage.resize_probs)
    factor = {"up": lambda: _uniform(generator, 1.0, stage.resize_range[1]),
              "down": lambda: _uniform(generator, stage.resize_range[0], 1.0),
              "keep": lambda: 1.0}[direction]()
    mode = _pick(generator, stage.resize_modes)
    size = tuple(max(1, int(side * factor)) for side in base_size)
    return _resize(image, size, mode)


def _luma(image) -> torch.Tensor:
    r, g, b = image.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b)[:, None]


def _random_noise(image, stage: DegradationStage, generator) -> torch.Tensor:
    gray = _happens(generator, stage.gray_noise_prob)  # one noise image shared by the channels
    if _happens(generator, stage.gaussian_noise_prob):
        sigma = _uniform(generator, *stage.noise_range) / 255
        shape = (image.shape[0], 1 if gray else 3, *image.shape[2:])
        noise = torch.randn(shape, generator=generator) * sigma
    else:
        # Shot noise: the 8-bit level of each pixel taken as a photon count.
        scale = _uniform(generator, *stage.poisson_scale_range)
        counts = ((_luma(image) if gray else image).clamp(0, 1) * 255).round().cpu()
        noise = (torch.poisson(counts, generator=generator) - counts) / 255 * scale
    return (image + noise.to(image)).clamp(0, 1)


def jpeg_compress(image: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG-encode and decode each image of (B, 3, H, W) in [0, 1] with Pillow."""
    decoded = []
    for single in image:
        pixels = (single.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        buffer = BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
        array = np.array(Image.open(buffer).convert("RGB"))
        decoded.append(torch.from_numpy(array).permute(2, 0, 1))
    return torch.stack(decoded).to(image) / 255


def _random_jpeg(image, stage: DegradationStage, generator) -> torch.Tensor:
    return jpeg_compress(image, round(_uniform(generator, *stage.jpeg_range)))


STEPS = ("blur1", "resize1", "noise1", "jpeg1", "blur2", "resize2", "noise2", "jpeg2", "final")


def _degrade_one(image, config: DegradationConfig, lr_size, streams) -> torch.Tensor:
    first, second = config.first, config.second
    for stage, order in ((first, "1"), (second, "2")):
        if _happens(streams["blur" + order], stage.blur_prob):
            image = filter2d(image, random_blur_kernel(stage, streams["blur" + order]))
        base = image.shape[-2:] if order == "1" else lr_size
        image = _random_resize(image, stage, base, streams["resize" + order])
        if _happens(streams["noise" + order], stage.noise_prob):
            image = _random_noise(image, stage, streams["noise" + order])
        if order == "1" and _happens(streams["jpeg1"], first.jpeg_prob):
            image = _random_jpeg(image, first, streams["jpeg1"])

    def final_resize_and_sinc(image):
        image = _resize(image, lr_size, _pick(streams["final"], config.final_resize_modes))
        if _happens(streams["final"], config.final_sinc_prob):
            size = _odd_size(streams["final"], second.kernel_sizes)
            image = filter2d(image, sinc_kernel(size, _uniform(streams["final"], math.pi / 3, math.pi)))
        return image

    def final_jpeg(image):
        return _random_jpeg(image, second, streams["jpeg2"]) if _happens(streams["jpeg2"], second.jpeg_prob) else image

    # Real-ESRGAN applies the final JPEG before or after the final resize + sinc, at random.
    if _happens(streams["final"], 0.5):
        image = final_jpeg(final_resize_and_sinc(image))
    else:
        image = final_resize_and_sinc(final_jpeg(image))
    return (image.clamp(0, 1) * 255).round() / 255


def degrade(hr: torch.Tensor, config: DegradationConfig, generator: torch.Generator, scale: int = 4) -> torch.Tensor:
    """Real-ESRGAN second-order degradation: HR (B, 3, H, W) in [0, 1] -> LR (B, 3, H/scale, W/scale).

    Blur, resize, noise and JPEG twice, then the final resize to the LR size with a sinc filter
    and JPEG; the output is quantised to 8-bit levels. The same generator state gives the same
    LR. Every image gets its own parameters, and each step its own random stream.
    """
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"expected HR images of shape (B, 3, H, W), got {tuple(hr.shape)}")
    height, width = hr.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"HR size {height}x{width} is not divisible by the scale {scale}")
    lr_size = (height // scale, width // scale)
    lrs = []
    for image in hr:
        seeds = torch.randint(2**62, (len(STEPS),), generator=generator, device=generator.device).tolist()
        streams = {step: torch.Generator().manual_seed(seed) for step, seed in zip(STEPS, seeds)}
        lrs.append(_degrade_one(image[None].float(), config, lr_size, streams))
    return torch.cat(lrs).to(hr.dtype)


# ----------------------------------------------------------------------------- training loss


def training_loss(pred, target, weights: LossWeights, perceptual=None, pred_latent=None, target_latent=None):
    """Weighted sum of the training terms; returns (total, {term: detached value}).

    `pred`/`target`: decoded output and HR image (B, 3, H, W) in [-1, 1]. `perceptual(pred,
    target) -> scalar` is needed when weights.perceptual > 0 (LPIPS/DISTS, run on crops at 4K);
    the latents are needed when weights.latent_mse > 0. Terms with weight 0 are not computed.
    """
    terms = {
        "pixel_mse": lambda: F.mse_loss(pred, target),
        "pixel_l1": lambda: F.l1_loss(pred, target),
        "latent_mse": lambda: F.mse_loss(pred_latent, target_latent),
        "perceptual": lambda: perceptual(pred, target),
        "periodicity": lambda: periodicity_loss(pred, target),
    }
    if weights.perceptual and perceptual is None:
        raise ValueError("weights.perceptual > 0 needs a perceptual(pred, target) callable")
    if weights.latent_mse and (pred_latent is None or target_latent is None):
        raise ValueError("weights.latent_mse > 0 needs pred_latent and target_latent")
    parts = {name: term() for name, term in terms.items() if getattr(weights, name)}
    total = sum(getattr(weights, name) * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}


# ----------------------------------------------------------------------------- colour fix (optional, inference)


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Give each channel of `image` the mean and standard deviation of `reference`'s (any size)."""
    mean, std = image.mean(dim=(-2, -1), keepdim=True), image.std(dim=(-2, -1), keepdim=True)
    ref_mean, ref_std = reference.mean(dim=(-2, -1), keepdim=True), reference.std(dim=(-2, -1), keepdim=True)
    return (image - mean) / (std + 1e-6) * ref_std + ref_mean


def wavelet_lowpass(image: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Coarsest band of an a-trous wavelet decomposition: `levels` binomial 3x3 blurs with
    dilation 1, 2, 4, ... (edges replicated); what it removes is the detail bands."""
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=image.dtype, device=image.device) / 4
    kernel = (taps[:, None] * taps[None, :]).expand(image.shape[1], 1, 3, 3)
    for level in range(levels):
        step = 2**level
        padded = F.pad(image, (step, step, step, step), mode="replicate")
        image = F.conv2d(padded, kernel, dilation=step, groups=image.shape[1])
    return image


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Keep `image`'s detail bands and take the coarse band (colour, shading) from `reference`,
    usually the LR input, which is first resized (bicubic) to `image`'s size."""
    if reference.shape[-2:] != image.shape[-2:]:
        reference = F.interpolate(reference, size=image.shape[-2:], mode="bicubic", align_corners=False)
    return image - wavelet_lowpass(image, levels) + wavelet_lowpass(reference, levels)

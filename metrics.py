"""Metrics of 4K synthesis and super-resolution, computed as the papers that report them do.

name        needs          definition (reference implementation)                   4K protocol
----------  -------------  ------------------------------------------------------  -------------
glcm        pred           Diffusion-4K's GLCM Score: GLCM entropy (scikit-image)  64-px patches
cr          pred           Diffusion-4K's Compression Ratio: raw / JPEG-95 bytes   whole image
fid         pred, ref      FID on InceptionV3 pool3 (pytorch-fid, torch-fidelity)  whole, patches
clip        pred, prompts  CLIPScore: 100 cos (torchmetrics) or 2.5 max(cos, 0)    whole, 224 px
aesthetic   pred           LAION aesthetic predictor v2 on CLIP ViT-L/14           whole, 224 px
psnr, ssim  pred, ref      RGB or BT.601 Y, border crop (basicsr, scikit-image)    whole image
lpips       pred, ref      LPIPS v0.1, AlexNet or VGG16 (lpips)                    512-px tiles
niqe        pred           NIQE, MATLAB pristine model (pyiqa 'niqe')              whole image
clipiqa     pred           CLIP-IQA, RN50, 5 antonym prompt pairs (pyiqa)          512-px tiles
periodicity pred [, ref]   OP4KSR's L_AP (arXiv 2605.13457), relative to ref       2x2 quadrants

`--protocol diffusion4k|cupscale|op4ksr` presets a paper's options and columns (PROTOCOLS).
Images pair by file stem; the table goes to stdout, values and settings to --out.

    python metrics.py --pred out/ --ref gt/ --metrics psnr,ssim,lpips --y-channel --crop-border 4
    python metrics.py --pred out/ --prompts metadata.jsonl --metrics clip,aesthetic

Weights load in fp32 from the Hub or local files, pickles only with weights_only=True.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common.attention import attention
from common.io import (
    IMAGE_SUFFIXES,
    ArgumentParser,
    UserError,
    atomic_files,
    check_apart,
    check_output_file,
    check_weights,
    device_dtype,
    device_name,
    integer,
    load_image,
    load_safetensors,
    progress_bar,
    read_json,
    read_text,
    resolve_source,
    run_cli,
    shape_mismatch,
    warn,
)

# ==== GLCM Score and Compression Ratio (Diffusion-4K)

# scikit-image's offsets (round(sin(a) d), round(cos(a) d)), d = 1-4, a = 0/45/90/135 degrees; d=2
# at 45 degrees rounds to (1, 1) like d=1: 14 are distinct. GLCM_SLICE_OFFSET: slice -> distinct.
GLCM_OFFSETS = [(round(math.sin(a) * d), round(math.cos(a) * d))
                for d in (1, 2, 3, 4) for a in (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)]
GLCM_UNIQUE_OFFSETS = list(dict.fromkeys(GLCM_OFFSETS))
GLCM_SLICE_OFFSET = np.array([GLCM_UNIQUE_OFFSETS.index(o) for o in GLCM_OFFSETS])
GLCM_PROPS = ("entropy", "contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")

def glcm_score(rgb, patch=64, prop="entropy", chunk=4):
    """Diffusion-4K's GLCM Score (eval.py): OpenCV grey >> 2 (64 levels) in patch x patch tiles,
    per tile shannon_entropy(graycomatrix) at GLCM_OFFSETS (normed, not symmetric; another `prop`:
    mean graycoprops to 4 decimals), mean over tiles. `chunk` tiles keep the counts in L2 cache."""
    q = grey_opencv(rgb, shift=2)
    rows, cols = q.shape[0] // patch, q.shape[1] // patch
    if rows == 0 or cols == 0:
        raise ValueError(f"image {q.shape[1]}x{q.shape[0]} is smaller than one {patch}x{patch} "
                         "GLCM patch")
    tiles = q[: rows * patch, : cols * patch].reshape(rows, patch, cols, patch).swapaxes(1, 2)
    tiles = tiles.reshape(-1, patch, patch)
    scores = []
    for start in range(0, len(tiles), chunk):
        group = tiles[start : start + chunk]
        if prop == "entropy":
            scores.append(glcm_entropy(group))
        else:
            normed = glcm_counts(group) / glcm_pair_counts(patch, patch)[:, None, None]
            scores.append(glcm_props(normed, prop).round(4).mean(axis=1))
    return float(np.concatenate(scores).mean())

def grey_opencv(rgb, shift=0, band=64):
    """cv2.cvtColor(BGR2GRAY) bit for bit (Pillow's convert('L') moves a GLCM score), >> shift; by
    bands of rows: no 32-bit copy of a 4K image."""
    width, height = rgb.size if isinstance(rgb, Image.Image) else as_array(rgb).shape[1::-1]
    out = np.empty((height, width), np.uint8)
    for top in range(0, height, band):
        if isinstance(rgb, Image.Image):
            x = as_array(rgb.crop((0, top, width, min(top + band, height))))
        else:
            x = rgb[top : top + band]
        total = np.full(x.shape[:2], 16384, np.uint32)
        for channel, weight in enumerate((9798, 19235, 3735)):
            total += np.multiply(x[..., channel], weight, dtype=np.uint32)
        out[top : top + band] = total >> (15 + shift)
    return out

def glcm_counts(patches, levels=64):
    """(P, h, w) patches -> (P, 16, levels, levels) counts, as graycomatrix(symmetric=False)."""
    counts = glcm_offset_counts(patches, levels).reshape(len(patches), len(GLCM_UNIQUE_OFFSETS), -1)
    return counts[:, GLCM_SLICE_OFFSET].reshape(len(patches), len(GLCM_OFFSETS), levels, levels)

def glcm_offset_counts(patches, levels=64):
    """(P, h, w) -> (P * 14, L^2) counts: one bincount of (14 p + k) L^2 + L i + j."""
    count, h, w = patches.shape
    cells, offsets = levels * levels, len(GLCM_UNIQUE_OFFSETS)
    q = patches.astype(np.intp)
    first = q * levels + (np.arange(count) * offsets * cells)[:, None, None]
    keys, start = np.empty(count * glcm_pair_counts(h, w, GLCM_UNIQUE_OFFSETS).sum(), np.intp), 0
    for k, (dr, dc) in enumerate(GLCM_UNIQUE_OFFSETS):
        a = first[:, max(0, -dr) : h - max(0, dr), max(0, -dc) : w - max(0, dc)]
        b = q[:, max(0, dr) : h - max(0, -dr), max(0, dc) : w - max(0, -dc)]
        part = keys[start : start + a.size].reshape(a.shape)
        np.add(a, b, out=part)
        part += k * cells
        start += a.size
    return np.bincount(keys, minlength=count * offsets * cells).reshape(count * offsets, cells)

def glcm_pair_counts(h, w, offsets=GLCM_OFFSETS):
    """Pixel pairs per offset: the divisor of normed=True."""
    return np.array([(h - abs(dr)) * (w - abs(dc)) for dr, dc in offsets], dtype=np.int64)

def glcm_entropy(patches, levels=64):
    """shannon_entropy(graycomatrix(patch)) of (P, h, w) patches -> (P,): the base-2 entropy of the
    histogram of *distinct values* among the entries count / n_s (not Haralick's -sum p log p). Two
    such doubles are equal exactly when the fractions are, so each (offset, count) present maps
    through a fixed table to its value's index: no per-patch sort of 65,536 doubles."""
    count, h, w = patches.shape
    offsets = len(GLCM_UNIQUE_OFFSETS)
    counts = glcm_offset_counts(patches, levels)
    top = int(counts.max()) + 1
    counts += (np.arange(len(counts)) * top)[:, None]  # key: row * top + count
    per_row = np.bincount(counts.ravel(), minlength=len(counts) * top)
    present = np.flatnonzero(per_row)
    row, value = np.divmod(present, top)
    patch, offset = np.divmod(row, offsets)
    ids, distinct = _glcm_value_ids(h, w)
    keys, group = np.unique(patch * distinct + ids[offset, value], return_inverse=True)
    repeats = np.bincount(GLCM_SLICE_OFFSET, minlength=offsets)  # slices per distinct offset
    p = np.bincount(group, weights=per_row[present] * repeats[offset]) / (16 * levels**2)
    return -np.bincount(keys // distinct, weights=p * np.log(p), minlength=count) / np.log(2)

@functools.lru_cache(maxsize=8)
def _glcm_value_ids(h, w):
    """(14, max pairs + 1): the rank of count / n_k among all distinct values, and their number."""
    n = glcm_pair_counts(h, w, GLCM_UNIQUE_OFFSETS).astype(np.float64)
    values = np.arange(int(n.max()) + 1)[None, :] / n[:, None]
    ids = np.unique(values, return_inverse=True)[1].reshape(values.shape)
    return ids, int(ids.max()) + 1

def glcm_props(normed, prop):
    """graycoprops(glcm, prop) for (P, 16, L, L) normalised matrices -> (P, 16)."""
    p = normed / normed.sum(axis=(-2, -1), keepdims=True)  # graycoprops re-normalises; so do we
    i, j = np.ogrid[: normed.shape[-1], : normed.shape[-1]]
    total = functools.partial(np.sum, axis=(-2, -1))
    if prop in ("ASM", "energy"):
        asm = total(p**2)
        return asm if prop == "ASM" else np.sqrt(asm)
    if prop == "correlation":
        di = i - total(p * i)[..., None, None]
        dj = j - total(p * j)[..., None, None]
        std_i, std_j = np.sqrt(total(p * di**2)), np.sqrt(total(p * dj**2))
        flat = (std_i < 1e-15) | (std_j < 1e-15)  # a constant patch correlates perfectly
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(flat, 1.0, total(p * di * dj) / (std_i * std_j))
    d = i - j
    weights = {"contrast": d**2, "dissimilarity": np.abs(d), "homogeneity": 1.0 / (1.0 + d**2)}
    if prop not in weights:
        raise ValueError(f"unknown GLCM property {prop!r}; choose from {GLCM_PROPS}")
    return total(p * weights[prop])

def compression_ratio(jpeg_sizes, shapes):
    """Diffusion-4K's Compression Ratio: raw RGB bytes / JPEG-95 bytes over all images (not a mean
    of ratios). Lower: more high-frequency detail."""
    return sum(h * w * 3 for h, w in shapes) / sum(jpeg_sizes)

def jpeg95(image):
    """What Diffusion-4K's generator writes: Pillow JPEG quality 95, 4:2:0."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# ==== PSNR, SSIM and NIQE

NIQE_PARAMS = "chaofengc/IQA-PyTorch-Weights/niqe_modelparameters.mat"

NIQE_BLOCK = 96

NIQE_CONVENTIONS = ("pyiqa", "matlab")  # see niqe()

def psnr(pred, ref, crop_border=0, mode="rgb"):
    """PSNR in dB, peak 255 (inf for identical images), as basicsr's calculate_psnr."""
    a, b = _prepare_pair(pred, ref, crop_border, mode)
    if a.dtype == np.uint8:  # integer errors: their squares summed exactly in int64, one division
        d = np.subtract(a, b, dtype=np.int64).ravel(order="K")
        mse = int(np.dot(d, d)) / d.size
    else:
        d = np.subtract(a, b)
        mse = np.square(d, out=d).mean()
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))

def ssim(pred, ref, crop_border=0, mode="rgb"):
    """SSIM (Wang et al. 2004), Gaussian window (sigma 1.5), 'valid' region, mean over map and
    channels: basicsr's calculate_ssim = scikit-image's (gaussian_weights, sigma=1.5,
    use_sample_covariance=False), without ssim.m's downsampling (at 4K: by 16)."""
    a, b = _prepare_pair(pred, ref, crop_border, mode)
    h, w = a.shape[-2:]
    if min(h, w) < 11:
        raise ValueError(f"{w}x{h} px (after the crop border) is smaller than SSIM's 11x11 window")
    return float(np.mean([_ssim_mean(x, y) for x, y in zip(a, b)]))

def _ssim_mean(x, y):
    """((2 mx my + c1) (2 sxy + c2)) / ((mx^2 + my^2 + c1) (sxx + syy + c2)) averaged, in float64;
    the formula needs only sxx + syy, so four planes are blurred: x, y, x^2 + y^2, xy."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    planes = torch.empty((4, *x.shape), dtype=torch.float64)
    planes.numpy()[:2] = x, y
    x, y = planes[0], planes[1]
    torch.mul(x, x, out=planes[2]).addcmul_(y, y)
    torch.mul(x, y, out=planes[3])
    mx, my, squares, xy = gaussian_blur_valid(planes)
    means_squared = torch.addcmul(my * my, mx, mx)
    two_mxmy = mx.mul_(my).mul_(2)
    numerator = xy.mul_(2).sub_(two_mxmy).add_(c2).mul_(two_mxmy.add_(c1))
    denominator = squares.sub_(means_squared).add_(c2).mul_(means_squared.add_(c1))
    return numerator.div_(denominator).mean().item()

@functools.lru_cache(maxsize=4)
def _band_matrix(block, sigma=1.5, radius=5):
    """Column j: the normalised Gaussian at rows j..j+2r."""
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 / sigma**2 * d**2)
    band = torch.zeros(block + 2 * radius, block, dtype=torch.float64)
    for j in range(block):
        band[j : j + 2 * radius + 1, j] = g / g.sum()
    return band

def gaussian_blur_valid(x, block=32):
    """SSIM's Gaussian of (..., H, W) float64, 'valid' region: scipy's gaussian_filter(truncate=3.5)
    without its 5-px border. Each pass multiplies by a banded matrix (32 outputs from 42 inputs):
    more work than 11 taps, but torch's BLAS beats scipy and a float64 conv2d on the CPU."""
    band = _band_matrix(block)

    def rows(x):  # (..., H, W) -> (..., W, H - 10): filtered along H, written transposed
        h = x.shape[-2] - 10
        out = x.new_empty(x.shape[:-2] + (h, x.shape[-1]))
        for r in range(0, h, block):
            n = min(block, h - r)
            window = x[..., r : r + n + 10, :]
            torch.matmul(band[: n + 10, :n].T, window, out=out[..., r : r + n, :])
        return out.transpose(-1, -2)

    return rows(rows(x))

def _prepare_pair(pred, ref, crop_border, mode):
    pred, ref = as_array(pred), as_array(ref)
    if pred.shape != ref.shape:
        (h, w), (h_ref, w_ref) = pred.shape[:2], ref.shape[:2]
        raise ValueError(f"sizes differ: {w}x{h} vs {w_ref}x{h_ref}")
    return tuple(remove_border(_channels(x, mode), crop_border) for x in (pred, ref))

def _channels(rgb, mode):
    if mode == "rgb":
        return rgb.transpose(2, 0, 1)
    if mode == "y":
        return y_channel(rgb)[None]
    if mode == "gray":
        return grey_matlab(rgb)[None]
    raise ValueError(f"unknown channel mode {mode!r}; use rgb, y or gray")

def y_channel(rgb):
    """Unrounded Y of BT.601 YCbCr in [16, 235]: basicsr's test_y_channel (pyiqa's YIQ differs)."""
    x = rgb.astype(np.float64) / 255.0
    return (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) + 16.0

def grey_matlab(rgb):
    x = rgb.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return np.round(0.298936021293775 * r + 0.587043074451121 * g + 0.114020904255103 * b)

def remove_border(x, border):
    h, w = x.shape[-2:]
    if border and 2 * border >= min(h, w):
        raise ValueError(f"crop border {border} leaves nothing of the {w}x{h} image "
                         f"(at most {(min(h, w) - 1) // 2})")
    return x[..., border : h - border, border : w - border]

def niqe(rgb, params=None, convention="pyiqa", crop_border=0):
    """NIQE (Mittal et al. 2013), lower is better: the MATLAB release's pristine model, 96-px blocks
    from the top-left, two scales, 36 features, over the whole image.

    sigma comes from E[x^2] - mu^2 and alpha is a nearest-grid-point choice, so one float32 rounding
    moves NIQE by up to a few percent. Hence the conventions: 'pyiqa' (what SR papers report)
    follows pyiqa 0.1.16's arithmetic (float32 window, grid and resize, float64 elsewhere);
    'matlab' runs float64 on rounded rgb2gray, close to MATLAB but not bit-faithful."""
    grey = remove_border(niqe_grey(rgb, convention), crop_border)
    h, w = grey.shape
    if (h // NIQE_BLOCK) * (w // NIQE_BLOCK) < 2:
        blocks = f"two {NIQE_BLOCK}x{NIQE_BLOCK} blocks"
        raise ValueError(f"image {w}x{h} too small for NIQE (needs {blocks})")
    features = niqe_features(grey, pyiqa=convention == "pyiqa")
    return niqe_distance(features, *(params or niqe_params()))

def niqe_params(source=NIQE_PARAMS):
    """The pristine model's mean (36,) and covariance (36, 36): pyiqa's .mat or basicsr's .npz."""
    what = "NIQE parameters"
    path = resolve_weights(source, what)
    npz = path.suffix == ".npz"
    if not npz:
        try:
            from scipy.io import loadmat
        except ImportError:
            raise UserError(f"{what}: reading {path.name} needs scipy (pip install scipy), "
                            "or pass basicsr's niqe_pris_params.npz") from None
    try:
        if npz:
            with np.load(path, allow_pickle=False) as data:
                mu, cov = data["mu_pris_param"], data["cov_pris_param"]
        else:
            data = loadmat(str(path))
            mu, cov = data["mu_prisparam"], data["cov_prisparam"]
        mu, cov = np.asarray(mu, np.float64).ravel(), np.asarray(cov, np.float64)
    except Exception as error:  # numpy, zipfile and scipy raise many types for a broken file
        kind = type(error).__name__
        raise UserError(f"{what}: {path} is not a NIQE model file ({kind}); expected basicsr's "
                        ".npz or pyiqa's .mat") from None
    if mu.shape != (36,) or cov.shape != (36, 36):
        shapes = f"shapes {mu.shape} and {cov.shape}, expected (36,) and (36, 36)"
        raise UserError(f"{what}: {path} holds {shapes}")
    if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
        raise UserError(f"{what}: {path} holds NaN or Inf values; this model file is broken")
    return mu, cov

def niqe_grey(rgb, convention="pyiqa"):
    """The rounded grey image each convention scores: pyiqa's Y of YIQ in float32, or rgb2gray."""
    rgb = as_array(rgb)
    if convention == "pyiqa":
        x = torch.tensor(rgb).float() / 255
        yiq = torch.tensor([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213],
                            [0.2115, -0.5227, 0.3112]])
        return torch.round((x @ yiq.T)[..., 0] * 255).double().numpy()
    if convention == "matlab":
        return grey_matlab(rgb)
    choices = ", ".join(NIQE_CONVENTIONS)
    raise ValueError(f"unknown NIQE convention {convention!r}; choose from {choices}")

def niqe_features(grey, block=NIQE_BLOCK, pyiqa=True):
    """(N, 36) block features: 18 at full scale, 18 at half scale (MATLAB bicubic), same tiles."""
    grid = "float32" if pyiqa else "float64"
    rows, cols = grey.shape[0] // block, grey.shape[1] // block
    x = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float64))
    x = x[: rows * block, : cols * block]
    full = niqe_block_features(mscn(x, pyiqa), block, grid)
    half = imresize_half(x / 255) * 255
    return torch.cat([full, niqe_block_features(mscn(half, pyiqa), block // 2, grid)], 1)

def mscn(grey, window32=False):
    """MSCN coefficients (x - mu) / (sigma + 1), 7x7 Gaussian window, borders replicated."""
    window = _niqe_window(window32).to(grey.device)
    h, w = grey.shape
    padded = F.pad(torch.stack([grey, grey * grey])[None], (3, 3, 3, 3), mode="replicate")[0]
    sums = torch.zeros_like(padded[:, :h, :w])
    for i in range(7):  # 49 shifted multiply-adds: faster than a float64 conv2d on a CPU
        for j in range(7):
            sums += window[i, j] * padded[:, i : i + h, j : j + w]
    mu, second = sums
    sigma = (second - mu * mu).abs().sqrt()
    return (grey - mu) / (sigma + 1)

def _niqe_window(float32=False):
    """fspecial('gaussian', 7, 7/6); pyiqa rounds it to float32, which flips AGGD grid choices."""
    x = torch.arange(7, dtype=torch.float64) - 3
    g = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * (7 / 6) ** 2))
    g = g / g.sum()
    return g.float().double() if float32 else g

def niqe_block_features(coefficients, block, grid="float64"):
    """(N, 18) per block: AGGD (alpha, mean scale) of the coefficients, then of their products with
    the neighbour at 4 shifts (circular in the block) (alpha, mean, left, right)."""
    h, w = coefficients.shape
    blocks = coefficients.reshape(h // block, block, w // block, block).transpose(1, 2)
    blocks = blocks.reshape(-1, block, block)
    alpha, left, right = aggd_fit(blocks.flatten(1), grid)
    features = [alpha, (left + right) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        product = blocks * torch.roll(blocks, shift, dims=(1, 2))
        alpha, left, right = aggd_fit(product.flatten(1), grid)
        mean = (right - left) * (torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha)).exp()
        features += [alpha, mean, left, right]
    return torch.stack(features, 1)

def aggd_fit(x, grid="float64", chunk=256):
    """Moment-matching AGGD fit of each row of x (N, P): the grid alpha whose r(alpha) is nearest to
    the moment ratio, and the left / right scales (NaN for a one-signed row, as the references)."""
    gam, r = (t.to(x.device) for t in _aggd_table(grid))
    neg, pos = x < 0, x > 0
    sq = x * x
    left = ((sq * neg).sum(1) / neg.sum(1)).sqrt()
    right = ((sq * pos).sum(1) / pos.sum(1)).sqrt()
    g = left / right
    rhat = x.abs().mean(1) ** 2 / sq.mean(1)
    rnorm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    chunks = range(0, len(x), chunk)
    index = torch.cat([(r - rnorm[i : i + chunk, None]).abs().argmin(1) for i in chunks])
    index[torch.isnan(rnorm)] = 0
    alpha = gam[index]
    ratio = (torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)).exp().sqrt()
    return alpha, left * ratio, right * ratio

@functools.lru_cache(maxsize=2)
def _aggd_table(grid):
    """The grid 0.2:0.001:10 (pyiqa's float32 or float64), r(g) = G(2/g)^2 / (G(1/g) G(3/g))."""
    if grid == "float32":
        gam = torch.arange(0.2, 10 + 0.001, 0.001, dtype=torch.float32).double()
    else:
        gam = torch.from_numpy(np.arange(0.2, 10 + 0.001, 0.001))
    r = (2 * torch.lgamma(2 / gam) - torch.lgamma(1 / gam) - torch.lgamma(3 / gam)).exp()
    return gam, r

def imresize_half(x):
    """MATLAB imresize(x, 0.5), H and W even: antialiased bicubic (a = -0.5), 8 taps 0.5 k(d / 2)
    around u = 2 i - 0.5 (1-based), borders mirrored; in float32 as the references."""

    def cubic(d):
        d = d.abs()
        outer = torch.where(d <= 2, -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2, 0.0)
        return torch.where(d <= 1, 1.5 * d**3 - 2.5 * d**2 + 1, outer)

    def along_rows(x):
        n = x.shape[0]
        u = 2 * torch.arange(1, n // 2 + 1, dtype=torch.float64) - 0.5
        taps = torch.floor(u - 4)[:, None] + torch.arange(10, dtype=torch.float64)
        weights = 0.5 * cubic(0.5 * (u[:, None] - taps))
        weights = weights / weights.sum(1, keepdim=True)
        keep = (weights != 0).any(0)  # drop the candidate columns that are zero for every output
        taps, weights = taps[:, keep].long() - 1, weights[:, keep]
        taps = torch.where(taps < 0, -taps - 1, torch.where(taps >= n, 2 * n - 1 - taps, taps))
        return (x[taps] * weights.to(x.dtype)[..., None]).sum(1)

    x = x.float()
    return along_rows(along_rows(x).T).T.double()

def niqe_distance(features, mu_pris, cov_pris):
    """sqrt(d pinv((S_p + S_d) / 2) d^T), d = mu_p - nanmean(features), S_d = nancov(features)."""
    f = features.numpy()
    clean = f[~np.isnan(f).any(1)]
    if len(clean) < 2:
        blocks = f"{NIQE_BLOCK}x{NIQE_BLOCK} blocks"
        raise ValueError(f"NIQE needs at least two {blocks} with finite features, got {len(clean)}")
    diff = np.asarray(mu_pris, np.float64).ravel() - np.nanmean(f, axis=0)
    inverse = np.linalg.pinv((np.asarray(cov_pris, np.float64) + np.cov(clean, rowvar=False)) / 2)
    return float(np.sqrt(diff @ inverse @ diff))


# ==== FID

INCEPTION_WEIGHTS = "chaofengc/IQA-PyTorch-Weights/pt_inception-2015-12-05-6726825d.pth"

# torch-fidelity and torchmetrics<=1.5 (Diffusion-4K), pytorch-fid, torchmetrics>=1.6, clean-fid
FID_RESIZE = ("tf1", "pytorch-fid", "antialias", "clean")

@torch.no_grad()
def fid_features(model, rgb, resize="tf1", patch=0, half_shift=False, size=0, batch=16):
    """pool3 features (N, 2048) of the image (N = 1) or of its patches."""
    device = next(model.parameters()).device
    rgb = as_array(rgb)
    x = to_float_tensor(resize_center_crop(rgb, size) if size else rgb, device)
    samples = (fid_crops(x, patch, half_shift) if patch else x).split(batch)
    return torch.cat([model(fid_input(group, resize)) for group in samples])

def resize_center_crop(rgb, size):
    """Diffusion-4K's FID preprocessing of both sets: torchvision's resize(uint8, size) (shorter
    side to `size`, antialiased bilinear in float32, rounded), then center_crop."""
    h, w = rgb.shape[:2]
    (new_w, new_h), (left, top) = shorter_side_to(size, w, h)
    if (new_h, new_w) != (h, w):
        x = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
        x = F.interpolate(x, (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        rgb = x.round()[0].permute(1, 2, 0).to(torch.uint8).numpy()
    return rgb[top : top + size, left : left + size]

def shorter_side_to(size, w, h):
    """(width, height) with the shorter side `size`, and the top-left of the centred square."""
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return new, (int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0)))

def fid_crops(x, patch, half_shift):
    """Patch FID's samples: the grid from the top-left, and with `half_shift` the grid moved by
    patch/2 (HiFiC's FID/256)."""
    h, w = x.shape[-2:]
    if patch > min(h, w):
        raise ValueError(f"FID patch {patch} is larger than the {w}x{h} image")
    starts = [(0, 0)] + ([(patch // 2, patch // 2)] if half_shift else [])
    return torch.cat([x[..., r : r + patch, c : c + patch] for r0, c0 in starts
                      for r in range(r0, h - patch + 1, patch)
                      for c in range(c0, w - patch + 1, patch)])

def fid_input(x, resize="tf1"):
    """(B, 3, H, W) with values 0..255 -> the network's (B, 3, 299, 299) input."""
    if resize == "tf1":
        return (resize_tf1_bilinear(x, 299) - 128) / 128
    if resize == "pytorch-fid":
        return 2 * F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    if resize == "antialias":
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        return (x - 128) / 128
    if resize == "clean":
        planes = x.detach().cpu().numpy().astype(np.float32).reshape(-1, *x.shape[-2:])
        channels = [np.asarray(Image.fromarray(c, mode="F").resize((299, 299), Image.BICUBIC))
                    for c in planes]
        out = torch.from_numpy(np.stack(channels).reshape(x.shape[0], 3, 299, 299)).clamp(0, 255)
        return (out.to(x.device) - 128) / 128
    raise ValueError(f"unknown FID resize {resize!r}; choose from {', '.join(FID_RESIZE)}")

def resize_tf1_bilinear(x, size):
    """TF1 resize_bilinear: source = dest * in / out, no antialiasing (torch-fidelity's input)."""

    def taps(n_in):
        step = torch.tensor(n_in / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32, device=x.device) * step
        lo = src.floor().long().clamp(max=n_in - 1)
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).to(x.dtype)

    def along_width(rows):
        return rows[..., left] + (rows[..., right] - rows[..., left]) * fx

    (top, bottom, fy), (left, right, fx) = taps(x.shape[-2]), taps(x.shape[-1])
    upper, lower = along_width(x[..., top, :]), along_width(x[..., bottom, :])
    return upper + (lower - upper) * fy[:, None]

@dataclass
class FeatureStats:
    """Running float64 sums: a million 4K patches' features never sit in memory at once."""

    count: int = 0
    total: torch.Tensor | float = 0.0
    outer: torch.Tensor | float = 0.0

    def update(self, features):
        f = features.detach().double().cpu()
        self.total, self.outer = self.total + f.sum(0), self.outer + f.T @ f
        self.count += len(f)

    def mean_cov(self):
        if self.count < 2:
            raise ValueError(f"FID needs at least 2 samples, got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, cov

def fid_from_stats(pred, ref):
    """FID (Heusel et al. 2017), warning when a covariance is rank-deficient."""
    for name, stats in (("pred", pred), ("ref", ref)):
        dim = stats.total.numel()
        if stats.count <= dim:
            warn(f"FID: {name} has {stats.count} samples; a full-rank {dim}-d covariance needs "
                 f"at least {dim + 1}; the value is biased upwards (--fid-patch gives more "
                 "samples)")
    return frechet_distance(*pred.mean_cov(), *ref.mean_cov())

def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1^1/2 S2 S1^1/2) in float64: symmetric
    eigendecompositions instead of sqrtm(S1 S2), so no complex parts or eps retry when N < 2048."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, cov1, cov2))
    w, v = torch.linalg.eigh(cov1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt)

class ConvBN(nn.Sequential):
    """Conv (no bias) + BatchNorm (TF's eps 1e-3) + ReLU, keys as in torchvision."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.relu = nn.ReLU()

def avg_pool_3x3(x):
    """The TF graph's average pool ignores the zero padding."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

def conv_1xn(cin, cout, n=7):
    return ConvBN(cin, cout, (1, n), padding=(0, n // 2))

def conv_nx1(cin, cout, n=7):
    return ConvBN(cin, cout, (n, 1), padding=(n // 2, 0))

class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = ConvBN(cin, 48, 1), ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        five = self.branch5x5_2(self.branch5x5_1(x))
        return torch.cat([self.branch1x1(x), five, dbl, self.branch_pool(avg_pool_3x3(x))], 1)

class InceptionB(nn.Module):  # grid reduction 35 -> 17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, stride=2)], 1)

class InceptionC(nn.Module):  # factorised 7x7 convolutions
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1, self.branch_pool = ConvBN(cin, 192, 1), ConvBN(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = ConvBN(cin, c7, 1), conv_1xn(c7, c7)
        self.branch7x7_3 = conv_nx1(c7, 192)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = ConvBN(cin, c7, 1), conv_nx1(c7, c7)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = conv_1xn(c7, c7), conv_nx1(c7, c7)
        self.branch7x7dbl_5 = conv_1xn(c7, 192)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        return torch.cat([self.branch1x1(x), seven, dbl, self.branch_pool(avg_pool_3x3(x))], 1)

class InceptionD(nn.Module):  # grid reduction 17 -> 8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = ConvBN(cin, 192, 1), ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = ConvBN(cin, 192, 1), conv_1xn(192, 192)
        self.branch7x7x3_3 = conv_nx1(192, 192)
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

class InceptionE(nn.Module):
    """The last two blocks; the TF graph pools Mixed_7b with an average and Mixed_7c with a *max*
    (a quirk of the 2015 graph that torchvision's Inception3 lacks)."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1, self.branch3x3_1 = ConvBN(cin, 320, 1), ConvBN(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = conv_1xn(384, 384, 3), conv_nx1(384, 384, 3)
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = conv_1xn(384, 384, 3), conv_nx1(384, 384, 3)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_3x3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                          self.branch_pool(pooled)], 1)

class InceptionV3(nn.Module):
    """The FID network: TF's 2015-12-05 InceptionV3 graph as ported by pytorch-fid, [-1, 1] input ->
    2048-d pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = ConvBN(3, 32, 3, stride=2), ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = ConvBN(32, 64, 3, padding=1), ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c = InceptionA(192, 32), InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, "avg"), InceptionE(2048, "max")

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    @classmethod
    def from_pretrained(cls, source=INCEPTION_WEIGHTS):
        state = load_state(source, "FID Inception weights")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        model = load_strict(cls(), state, "FID Inception weights")
        return model.to(memory_format=torch.channels_last)  # oneDNN's fastest layout on the CPU


# ==== CLIPScore and aesthetics

CLIP_MODELS = {
    "b16": "openai/clip-vit-base-patch16",  # Diffusion-4K (through torchmetrics)
    "l14": "openai/clip-vit-large-patch14",  # torchmetrics' default; the aesthetic predictor's
    "b32": "openai/clip-vit-base-patch32",  # Hessel et al.'s CLIPScore
}

AESTHETIC_WEIGHTS = "chaofengc/IQA-PyTorch-Weights/sac+logos+ava1-l14-linearMSE.pth"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# max(100 cos, 0) per image (Diffusion-4K); 2.5 max(cos, 0) on 'A photo depicts ' + caption
# (Hessel et al. 2021); that with pyiqa's tensor resize (pyiqa 'clipscore', C-Upscale)
CLIP_FORMS = ("torchmetrics", "hessel", "pyiqa")

CLIP_BATCH = 32  # images per call of the CLIP towers in a folder run: a busy GPU, under 20 MB

def clip_score(model, images, captions, form="torchmetrics"):
    """Per-image CLIPScore (Hessel et al. 2021): the cosine of CLIP image and caption embeddings,
    scaled as CLIP_FORMS says. C-Upscale's "CLIP" of 0.455-0.894 fits 2.5 cos, and its other
    columns are pyiqa's: hence pyiqa's 'clipscore' (ViT-B/32) in --protocol cupscale."""
    pixels = torch.stack([model.preprocess(image, clip_resize(form)) for image in images])
    return clip_score_pixels(model, pixels, captions, form)

def clip_score_pixels(model, pixels, captions, form="torchmetrics"):
    if form not in CLIP_FORMS:
        raise ValueError(f"unknown CLIPScore form {form!r}; choose from {', '.join(CLIP_FORMS)}")
    if form != "torchmetrics":
        captions = ["A photo depicts " + c for c in captions]
    cos = (model.encode_pixels(pixels) * model.encode_texts(captions)).sum(-1)
    return (100 * cos).clamp(min=0) if form == "torchmetrics" else 2.5 * cos.clamp(min=0)

def clip_resize(form):
    return "tensor" if form == "pyiqa" else "pil"

@torch.no_grad()
def aesthetic_score(clip, mlp, images):
    return mlp(clip.encode_images(images))  # L2-normalised embeddings, as the original

class ClipBatches:
    """A CLIP metric's scores over a folder in batches: add() preprocesses an image when read
    (memory stays flat), a full batch or the `last` image runs the towers, flush() the rest."""

    def __init__(self, score, preprocess, size=None):
        self.score, self.preprocess, self.size = score, preprocess, size or CLIP_BATCH
        self.names, self.pixels, self.captions, self.values = [], [], [], {}

    @classmethod
    def clip(cls, model, form="torchmetrics", size=None):
        preprocess = functools.partial(model.preprocess, resize=clip_resize(form))
        return cls(functools.partial(clip_score_pixels, model, form=form), preprocess, size)

    @classmethod
    def aesthetic(cls, clip, mlp, size=None):
        return cls(lambda pixels, _: mlp(clip.encode_pixels(pixels)), clip.preprocess, size)

    def add(self, name, image, caption=None, last=False):
        self.names.append(name)
        self.pixels.append(self.preprocess(image))
        self.captions.append(caption)
        if last or len(self.names) == self.size:
            self.flush()

    @torch.no_grad()
    def flush(self):
        if self.names:
            scores = self.score(torch.stack(self.pixels), self.captions).tolist()
            self.values.update(zip(self.names, scores))
            self.names, self.pixels, self.captions = [], [], []
        return self.values

def clip_preprocess(image, size=224, resize="pil"):
    """Shorter side to `size`, centre crop, mean/std; 'pil': Pillow bicubic (openai-clip,
    transformers), 'tensor': float bicubic (pyiqa's)."""
    w, h = image.size
    new, (left, top) = shorter_side_to(size, w, h)
    if resize not in ("pil", "tensor"):
        raise ValueError(f"unknown CLIP resize {resize!r}; use pil or tensor")
    if resize == "pil" and new != (w, h):
        image = image.resize(new, Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    if resize == "tensor" and new != (w, h):
        x = F.interpolate(x[None], new[::-1], mode="bicubic", antialias=True)[0]
    return clip_normalize(x[:, top : top + size, left : left + size])

def clip_normalize(x):
    mean, std = (torch.tensor(t, device=x.device)[:, None, None] for t in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std

class AestheticMLP(nn.Module):
    """LAION's aesthetic predictor v2: linear layers, *no* activations (commented out in the
    original), on the CLIP L/14 embedding."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1),
                                    nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding):
        return self.layers(embedding).squeeze(-1)

    @classmethod
    def from_pretrained(cls, source=AESTHETIC_WEIGHTS):
        what = "aesthetic MLP weights"
        state = load_state(source, what)
        return load_strict(cls(state["layers.0.weight"].shape[1]), state, what)

@dataclass
class ClipTowerConfig:
    width: int
    layers: int
    heads: int
    act: str = "quick_gelu"  # OpenAI's x * sigmoid(1.702 x)
    eps: float = 1e-5

class ClipBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = cfg.width
        self.heads, self.act = cfg.heads, cfg.act
        self.ln1, self.ln2 = nn.LayerNorm(w, eps=cfg.eps), nn.LayerNorm(w, eps=cfg.eps)
        self.q, self.k, self.v, self.proj = (nn.Linear(w, w) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(w, 4 * w), nn.Linear(4 * w, w)

    def forward(self, x, mask=None, rows=None):
        """`rows`: only the first rows' outputs (the vision tower's last block reads one)."""
        b, n, w = x.shape
        h = self.ln1(x)
        k, v = (f(h).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.k, self.v))
        x, h = x[:, :rows], h[:, :rows]
        q = self.q(h).view(b, x.shape[1], self.heads, -1).transpose(1, 2)
        x = x + self.proj(attention(q, k, v, mask=mask).transpose(1, 2).reshape(x.shape))
        h = self.fc1(self.ln2(x))
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return x + self.fc2(h)

class ClipVisionTower(nn.Module):
    def __init__(self, cfg, patch, image_size, embed_dim):
        super().__init__()
        self.image_size = image_size
        self.patch = nn.Conv2d(3, cfg.width, patch, patch, bias=False)
        self.cls = nn.Parameter(torch.zeros(cfg.width))
        self.pos = nn.Parameter(torch.zeros((image_size // patch) ** 2 + 1, cfg.width))
        self.ln_pre, self.ln_post = (nn.LayerNorm(cfg.width, eps=cfg.eps) for _ in range(2))
        self.blocks = nn.ModuleList(ClipBlock(cfg) for _ in range(cfg.layers))
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    def forward(self, pixels):  # (B, 3, S, S) normalised -> (B, embed_dim)
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), 1, -1), x], 1) + self.pos
        x = self.ln_pre(x)
        for block in self.blocks[:-1]:
            x = block(x)
        x = self.blocks[-1](x, rows=1)  # only the class token is read
        return self.proj(self.ln_post(x[:, 0]))

class ClipTextTower(nn.Module):
    def __init__(self, cfg, vocab, context, embed_dim):
        super().__init__()
        self.token = nn.Embedding(vocab, cfg.width)
        self.pos = nn.Parameter(torch.zeros(context, cfg.width))
        self.blocks = nn.ModuleList(ClipBlock(cfg) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    @classmethod
    def from_state(cls, state, config=None):
        """Sized by our `text.` keys; heads and activation from a transformers config."""
        (vocab, width), context = state["text.token.weight"].shape, len(state["text.pos"])
        cfg = _clip_tower_config(config or {}, state, "text", width)
        return cls(cfg, vocab, context, len(state["text.proj.weight"]))

    def forward(self, ids, lengths):
        """Pools at the end token (lengths - 1); the causal mask keeps the padding after it out."""
        n = ids.shape[1]
        x = self.token(ids) + self.pos[:n]
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        for block in self.blocks:
            x = block(x, mask=causal)
        x = self.ln_final(x)
        return self.proj(x[torch.arange(len(x)), lengths - 1])

class ClipViT(nn.Module):
    """OpenAI CLIP ViT (Radford et al. 2021) from a transformers folder (openai/clip-vit-*)."""

    def __init__(self, vision, text, tokenizer=None):
        super().__init__()
        self.vision, self.text, self.tokenizer = vision, text, tokenizer

    @classmethod
    def from_pretrained(cls, source, towers=("vision", "text")):
        source = CLIP_MODELS.get(source, source)
        files = ("model.safetensors", "config.json", "tokenizer.json")
        root = resolve_source(source, allow_patterns=files)
        config = read_json(root / "config.json")
        wanted = {"vision": ("vision_model.", "visual_projection."),
                  "text": ("text_model.", "text_projection.")}
        prefixes = tuple(p for tower in towers for p in wanted[tower])
        raw = load_safetensors(root, torch.float32, key_filter=lambda k: k.startswith(prefixes))
        check_weights({k: v for k, v in raw.items() if not k.endswith("position_ids")}, root)
        state = clip_state_from_transformers(raw)
        vision = text = tokenizer = None
        if "vision" in towers:
            patch = state["vision.patch.weight"]
            size = math.isqrt(len(state["vision.pos"]) - 1) * patch.shape[-1]
            cfg = _clip_tower_config(config, state, "vision", len(patch))
            vision = ClipVisionTower(cfg, patch.shape[-1], size, len(state["vision.proj.weight"]))
        if "text" in towers:
            text = ClipTextTower.from_state(state, config)
            tokenizer = ClipScoreTokenizer(root / "tokenizer.json", context=len(text.pos))
        return load_strict(cls(vision, text, tokenizer), state, f"CLIP weights {source}")

    def encode_images(self, images, resize="pil"):
        return self.encode_pixels(torch.stack([self.preprocess(image, resize) for image in images]))

    def preprocess(self, image, resize="pil"):
        return clip_preprocess(image, self.vision.image_size, resize)

    @torch.no_grad()
    def encode_pixels(self, pixels):
        return F.normalize(self.vision(pixels.to(self.device)), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts):
        ids, lengths = self.tokenizer(texts)
        return F.normalize(self.text(ids.to(self.device), lengths.to(self.device)), dim=-1)

    @property
    def device(self):
        return next(self.parameters()).device

def _clip_tower_config(config, state, tower, width):
    sub = config.get(f"{tower}_config", {})
    return ClipTowerConfig(width, depth(state, f"{tower}.blocks."),
                           sub.get("num_attention_heads", width // 64),
                           sub.get("hidden_act", "quick_gelu"), sub.get("layer_norm_eps", 1e-5))

def depth(state, prefix):
    """The number of blocks `prefix`0., `prefix`1., ... in a state dict."""
    return 1 + max((int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)),
                   default=-1)

# transformers' CLIPModel names -> ours, applied in order to every key
_CLIP_RENAMES = [
    ("vision_model.", "vision."), ("visual_projection.", "vision.proj."), ("text_model.", "text."),
    ("text_projection.", "text.proj."), (".embeddings.patch_embedding.", ".patch."),
    (".embeddings.class_embedding", ".cls"), (".embeddings.position_embedding.weight", ".pos"),
    (".embeddings.token_embedding.", ".token."), (".encoder.layers.", ".blocks."),
    (".pre_layrnorm.", ".ln_pre."), (".post_layernorm.", ".ln_post."),
    (".final_layer_norm.", ".ln_final."), (".self_attn.q_proj.", ".q."),
    (".self_attn.k_proj.", ".k."), (".self_attn.v_proj.", ".v."),
    (".self_attn.out_proj.", ".proj."), (".layer_norm1.", ".ln1."), (".layer_norm2.", ".ln2."),
    (".mlp.fc1.", ".fc1."), (".mlp.fc2.", ".fc2."),
]

def clip_state_from_transformers(state):
    renamed = {}
    for key, value in state.items():
        if key == "logit_scale" or key.endswith("position_ids"):
            continue
        for old, new in _CLIP_RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    return renamed

class ClipScoreTokenizer:
    """CLIP's BPE, truncated as openai-clip's tokenize(truncate=True): <start>, at most context-2
    tokens, <end> (torchmetrics drops the end token of long captions and pools at argmax(ids))."""

    def __init__(self, path, context=77):
        from tokenizers import Tokenizer

        if not Path(path).is_file():
            raise UserError(f"{path}: missing CLIP tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_truncation()
        self.context = context
        ends = ("<|startoftext|>", "<|endoftext|>")
        self.start, self.end = (self.tokenizer.token_to_id(t) for t in ends)
        if self.start is None or self.end is None:
            raise UserError(f"{path}: no {' / '.join(ends)} tokens; not a CLIP tokenizer")

    def __call__(self, texts):
        encode = functools.partial(self.tokenizer.encode, add_special_tokens=False)
        rows = [torch.tensor([self.start, *encode(t).ids[: self.context - 2], self.end])
                for t in texts]
        ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.end)
        return ids, torch.tensor([len(r) for r in rows])


# ==== LPIPS and CLIP-IQA, on tiles

LPIPS_LINEAR = {
    "alex": "chaofengc/IQA-PyTorch-Weights/LPIPS_v0.1_alex-df73285e.pth",
    "vgg": "chaofengc/IQA-PyTorch-Weights/LPIPS_v0.1_vgg-a78928a0.pth",
}

LPIPS_BACKBONE = {"alex": None, "vgg": "timm/vgg16.tv_in1k/model.safetensors"}

CLIPIQA_WEIGHTS = "timm/resnet50_clip.openai/open_clip_model.safetensors"

# pyiqa's 'clipiqa' antonym pairs (positive first); the score is the mean over pairs of P(positive).
CLIPIQA_PROMPTS = (
    ("Good image", "bad image"), ("Sharp image", "blurry image"), ("sharp edges", "blurry edges"),
    ("High resolution image", "low resolution image"), ("Noise-free image", "noisy image"),
)

# Their CLIP BPE ids (<start> ... <end>) from OpenAI's clip.tokenize: no tokenizer file needed.
CLIPIQA_PROMPT_IDS = (
    (49406, 886, 2867, 49407), (49406, 2103, 2867, 49407), (49406, 8157, 2867, 49407),
    (49406, 21977, 2867, 49407), (49406, 8157, 20938, 49407), (49406, 21977, 20938, 49407),
    (49406, 1400, 9977, 2867, 49407), (49406, 1042, 9977, 2867, 49407),
    (49406, 9307, 268, 1139, 2867, 49407), (49406, 33495, 2867, 49407),
)

@torch.inference_mode()
def lpips_tiled(model, pred, ref, tile=512, batch=8):
    """Mean LPIPS over the `tiles` of a pair; tile 0: the whole image at once."""
    device = next(model.parameters()).device
    a, b = (to_float_tensor(x, device) / 127.5 - 1 for x in (pred, ref))
    if a.shape != b.shape:
        raise ValueError(f"sizes differ: {tuple(a.shape[-2:])} vs {tuple(b.shape[-2:])}")
    pairs = zip(tile_batches(a, tile, batch), tile_batches(b, tile, batch))
    return torch.cat([model(x, y) for x, y in pairs]).mean().item()

@torch.no_grad()
def clipiqa_tiled(model, rgb, tile=512, batch=4):
    """Mean CLIPIQA over `tiles`; tile 0: the whole image, as pyiqa at any size (GBs at 4K)."""
    x = to_float_tensor(rgb, model.logit_scale.device) / 255
    return torch.cat([model(group) for group in tile_batches(x, tile, batch)]).mean().item()

def tile_batches(x, size, batch):
    """The crops of x's `tiles` (size 0: the whole image), `batch` at a time."""
    boxes = tiles(*x.shape[-2:], size or max(x.shape[-2:]))
    for i in range(0, len(boxes), batch):
        yield torch.cat([x[..., r : r + h, c : c + w] for r, c, h, w in boxes[i : i + batch]])

def tiles(h, w, size):
    """The networks' 4K protocol: size x size tiles covering the image, the last row and column
    flush with the border (overlapping rather than dropping pixels)."""
    if h <= size and w <= size:
        return [(0, 0, h, w)]
    th, tw = min(size, h), min(size, w)
    rows = sorted({*range(0, h - th + 1, th), h - th})
    cols = sorted({*range(0, w - tw + 1, tw), w - tw})
    return [(r, c, th, tw) for r in rows for c in cols]

class LPIPSMetric(nn.Module):
    """LPIPS v0.1 (Zhang et al., CVPR 2018), AlexNet or VGG16: at five ReLU taps the unit-normalised
    features' squared difference, weighted by the learned 1x1 `lins`, spatial mean, summed."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, net="alex"):
        super().__init__()
        self.features, self.taps = lpips_backbone(net)
        widths = [self.features[i - 1].out_channels for i in self.taps]  # the tapped ReLU's conv
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        for name, value in (("shift", self.SHIFT), ("scale", self.SCALE)):
            self.register_buffer(name, torch.tensor(value).view(1, 3, 1, 1), persistent=False)

    def tap(self, x):
        """The five unit-normalised maps (channels-last: oneDNN's fastest layout on the CPU)."""
        x, out = ((x - self.shift) / self.scale).contiguous(memory_format=torch.channels_last), []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a, b):  # (B, 3, H, W) in [-1, 1] -> (B,)
        taps = zip(self.lins, self.tap(a), self.tap(b))
        return sum(lin((fa - fb) ** 2).mean((1, 2, 3)) for lin, fa, fb in taps)

    @classmethod
    def from_pretrained(cls, net="alex", linear=None, backbone=None):
        linear, backbone = linear or LPIPS_LINEAR[net], backbone or LPIPS_BACKBONE[net]
        if backbone is None:
            raise UserError(f"LPIPS-{net} needs ImageNet backbone weights and no Hub copy is "
                            "known: pass --lpips-backbone PATH to torchvision's "
                            "alexnet-owt-7be5be79.pth (https://download.pytorch.org/models/)")
        model = cls(net)
        raw = load_state(backbone, f"LPIPS {net} backbone")
        state = {k[k.index("features.") :]: v for k, v in raw.items() if "features." in k}
        state = {k: v for k, v in state.items() if int(k.split(".")[1]) <= model.taps[-1]}
        lins = load_state(linear, f"LPIPS {net} linear layers")
        state |= {f"lins.{k[3]}.weight": v for k, v in lins.items() if k.startswith("lin")}
        model = load_strict(model, state, f"LPIPS-{net} weights")
        return model.to(memory_format=torch.channels_last)

def lpips_backbone(net):
    """torchvision's `features` (VGG16's 0: a max pool) and the indices of the tapped ReLUs."""
    relu = functools.partial(nn.ReLU, inplace=True)
    if net == "alex":
        layers = [
            nn.Conv2d(3, 64, 11, 4, 2), relu(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), relu(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), relu(), nn.Conv2d(384, 256, 3, padding=1), relu(),
            nn.Conv2d(256, 256, 3, padding=1), relu(),
        ]
        return nn.Sequential(*layers), [1, 4, 7, 9, 11]
    if net == "vgg":
        layers, cin = [], 3
        for item in (64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512):
            layers += [nn.Conv2d(cin, item, 3, padding=1), relu()] if item else [nn.MaxPool2d(2, 2)]
            cin = item or cin
        return nn.Sequential(*layers), [3, 8, 15, 22, 29]
    raise ValueError(f"unknown LPIPS network {net!r}; use alex or vgg")

class CLIPIQA(nn.Module):
    """CLIP-IQA (Wang, Chan & Loy, AAAI 2023) as pyiqa's 'clipiqa', what SR papers report: CLIP RN50
    on the image at its own size; per antonym pair softmax(logit_scale.exp() cos) of the positive
    prompt, averaged. In (0, 1), higher is better."""

    def __init__(self, visual, text):
        super().__init__()
        self.visual, self.text = visual, text
        self.register_buffer("logit_scale", torch.zeros(()))

    @classmethod
    def from_state(cls, state, what="CLIPIQA weights"):
        visual = {k[7:]: v for k, v in state.items() if k.startswith("visual.")}
        layers = tuple(depth(visual, f"layer{i}.") for i in range(1, 5))
        if "conv1.weight" not in visual or min(layers) < 1:
            raise UserError(f"{what}: not a CLIP ResNet (no visual.conv1 / visual.layer1-4 keys)")
        grid = math.isqrt(visual["attnpool.positional_embedding"].shape[0] - 1)
        resnet = ClipResNet(layers, visual["layer1.0.conv1.weight"].shape[0],
                            visual["attnpool.c_proj.weight"].shape[0], grid)
        full = {"visual." + k: v for k, v in visual.items()} | clip_text_state_from_openai(state)
        model = cls(resnet, ClipTextTower.from_state(full))
        full["logit_scale"] = state["logit_scale"].reshape(())
        # BatchNorm counters: unused, often unsaved
        counters = {k: v for k, v in model.state_dict().items() if k.endswith("batches_tracked")}
        return load_strict(model, counters | full, what)

    @classmethod
    def from_pretrained(cls, source=CLIPIQA_WEIGHTS):
        return cls.from_state(load_state(source, "CLIPIQA weights"))

    @torch.no_grad()
    def text_features(self):
        device = self.logit_scale.device
        rows = [torch.tensor(ids) for ids in CLIPIQA_PROMPT_IDS]
        ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=49407).to(device)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        return F.normalize(self.text(ids, lengths), dim=-1)

    @torch.no_grad()
    def forward(self, x):  # (B, 3, H, W) RGB in [0, 1] -> (B,)
        image = F.normalize(self.visual(clip_normalize(x)), dim=-1)
        logits = self.logit_scale.exp() * image @ self.text_features().T
        return logits.view(len(x), -1, 2).softmax(-1)[..., 0].mean(1)

def clip_text_state_from_openai(state):
    """OpenAI text-tower keys -> ClipTextTower's: in_proj split in q, k, v; text_projection^T."""
    out = {"text.token.weight": state["token_embedding.weight"],
           "text.pos": state["positional_embedding"],
           "text.ln_final.weight": state["ln_final.weight"],
           "text.ln_final.bias": state["ln_final.bias"],
           "text.proj.weight": state["text_projection"].T.contiguous()}
    renames = {"ln_1.": "ln1.", "ln_2.": "ln2.", "attn.out_proj.": "proj.", "mlp.c_fc.": "fc1.",
               "mlp.c_proj.": "fc2."}
    for key, value in state.items():
        if not key.startswith("transformer.resblocks."):
            continue
        _, _, index, rest = key.split(".", 3)
        prefix = f"text.blocks.{index}."
        if rest.startswith("attn.in_proj_"):  # in_proj_weight / in_proj_bias
            kind = rest.rsplit("_", 1)[1]
            out.update({f"{prefix}{q}.{kind}": part for q, part in zip("qkv", value.chunk(3))})
        for old, new in renames.items():
            if rest.startswith(old):
                out[prefix + new + rest[len(old) :]] = value
    return out

class ClipBottleneck(nn.Module):
    """CLIP's ResNet block: 1x1, 3x3, average pool when strided, 1x1; a pooled 1x1 shortcut."""

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.downsample = None
        if stride > 1 or cin != 4 * planes:  # keys downsample.0 (conv) / downsample.1 (bn)
            conv = nn.Conv2d(cin, 4 * planes, 1, bias=False)
            self.downsample = nn.Sequential(conv, nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(self.pool(out)))
        return F.relu(out + (x if self.downsample is None else self.downsample(self.pool(x))))

class ClipResNet(nn.Module):
    """OpenAI CLIP's 'ModifiedResNet' (RN50: 3-4-6-3), its attention pool queried by the mean token
    alone (exact, linear in the tokens); no positional embedding (pyiqa's pos_embedding=False)."""

    def __init__(self, layers=(3, 4, 6, 3), width=64, embed_dim=1024, grid=7):
        super().__init__()
        half = width // 2
        for i, (cin, cout) in enumerate(((3, half), (half, half), (half, width)), 1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, 3, 2 if i == 1 else 1, 1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
        cin = width
        for i, count in enumerate(layers):
            planes = width * 2**i
            blocks = [ClipBottleneck(cin if j == 0 else 4 * planes, planes, 2 if i and not j else 1)
                      for j in range(count)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = 4 * planes
        self.attnpool = pool = nn.Module()
        pool.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, cin))
        pool.q_proj, pool.k_proj, pool.v_proj = (nn.Linear(cin, cin) for _ in range(3))
        pool.c_proj = nn.Linear(cin, embed_dim)
        self.heads = cin // 64  # OpenAI's rule: width * 32 // 64

    def forward(self, x):  # (B, 3, H, W) CLIP-normalised -> (B, embed_dim)
        for i in range(1, 4):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        x = F.avg_pool2d(x, 2)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1)
        pool, (b, n, c) = self.attnpool, tokens.shape
        q = pool.q_proj(tokens[:, :1]).view(b, 1, self.heads, -1).transpose(1, 2)
        k, v = (f(tokens).view(b, n, self.heads, -1).transpose(1, 2)
                for f in (pool.k_proj, pool.v_proj))
        return pool.c_proj(attention(q, k, v).transpose(1, 2).reshape(b, c))


# ==== periodicity (OP4KSR's L_AP)

PERIODS = (16, 32)  # one F16 latent pixel; one 2x2-packed Flux token (OP4KSR's lattice)

def periodicity_input(rgb, device="cpu"):
    """HWC uint8 -> (1, 3, H, W) in [-1, 1], the range L_AP and VARIANCE_FLOOR assume."""
    return to_float_tensor(rgb, device) / 127.5 - 1

@torch.no_grad()
def periodicity(pred, ref=None, periods=PERIODS, quadrants=4):
    """OP4KSR's L_AP as a metric (B,) of images in [-1, 1]: without `ref` the share of the pixel
    differences' variance that repeats on the period lattices, with `ref` relative to it (texture
    periodic in the ground truth does not count). The noise floor falls with size."""
    if ref is not None and ref.shape != pred.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and ref {tuple(ref.shape)} differ in shape")
    try:
        if ref is None:
            return periodicity_score(pred, periods, quadrants)
        return torch.stack([periodicity_loss(p[None], r[None], periods, quadrants)
                            for p, r in zip(pred, ref)])
    except ValueError as error:  # quadrants too small: name the image's size
        if "square number" in str(error):
            raise
        size = f"image {pred.shape[-1]}x{pred.shape[-2]} too small for periods {tuple(periods)}"
        raise ValueError(f"{size} with {quadrants} quadrants ({error})") from None

def periodicity_score(image, periods=PERIODS, quadrants=4):
    """L_AP's absolute form per image: ~1 for a pure pattern, 1 / (p x p tiles) for white noise."""
    power, variance = lattice_power(image, periods, quadrants)
    return (power / (variance + VARIANCE_FLOOR)).sum(dim=-1).mean(dim=(1, 2)) / len(periods)

def log_spectrum(rgb):
    """Centred log power spectrum of the pixel differences: period p shows as dots W/p apart."""
    x = periodicity_input(rgb)[0]
    power = torch.zeros(x.shape[-2:])
    for d in _pixel_differences(x).flatten(0, 1):  # one map at a time: 4K spectra are large
        power += torch.fft.fft2(d - d.mean(), s=x.shape[-2:]).abs().square() / 6
    spectrum = torch.fft.fftshift(power).log1p()
    return _to_grey_image(spectrum, spectrum.min().item(), spectrum.max().item())

def autocorrelation_image(rgb, periods=PERIODS, quadrants=4, harmonics=2):
    """The quadrants' mean autocorrelation of pixel differences, lags up to harmonics * p + p // 2,
    lag 0 centred, 0 mid-grey, scaled to the largest value outside the central 3x3: period p shows
    as bright points p px apart."""
    array = as_array(rgb)
    max_lag = max(harmonics * p + p // 2 for p in periods)
    differences = _pixel_differences(split_into_quadrants(periodicity_input(array), quadrants))
    try:
        covariance = autocovariance(differences, max_lag)
    except ValueError as error:
        size = f"image {array.shape[1]}x{array.shape[0]} too small for periods {tuple(periods)}"
        raise ValueError(f"{size} ({error})") from None
    variance = covariance[..., max_lag, max_lag, None, None]
    correlation = (covariance / (variance + VARIANCE_FLOOR)).mean(dim=(0, 1, 2, 3))
    outer = correlation.clone()
    outer[max_lag - 1 : max_lag + 2, max_lag - 1 : max_lag + 2] = 0
    scale = outer.abs().max().item()
    return _to_grey_image(correlation, -scale, scale)

def autocovariance(x, max_lag):
    """Unbiased autocovariance of each map, lags -max_lag..max_lag, lag 0 centred: Wiener-Khinchin
    on the map zero-padded by max_lag (no lag wraps around), / each overlap."""
    h, w = x.shape[-2:]
    if max_lag >= min(h, w):
        raise ValueError(f"lags up to {max_lag} px need quadrants larger than {max_lag} px, "
                         f"got {h}x{w}")
    x = x.float()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    size = (_fast_fft_length(h + max_lag), _fast_fft_length(w + max_lag))
    spectrum = torch.fft.rfft2(x, s=size)
    sums = torch.fft.irfft2(spectrum.real.square() + spectrum.imag.square(), s=size)
    lags = torch.arange(-max_lag, max_lag + 1, device=x.device)
    sums = sums[..., (lags % size[0])[:, None], (lags % size[1])[None, :]]  # negative: at the end
    overlap = (h - lags.abs())[:, None] * (w - lags.abs())[None, :]
    return sums / overlap

def _fast_fft_length(n):
    """The smallest n' >= n without a prime factor above 5."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1

def _pixel_differences(x):
    return torch.stack([x[..., 1:, 1:] - x[..., 1:, :-1], x[..., 1:, 1:] - x[..., :-1, 1:]], dim=-3)

def _to_grey_image(values, low, high):
    scaled = ((values - low) / max(high - low, 1e-12)).clamp(0, 1)
    return Image.fromarray((scaled * 255).round().byte().cpu().numpy(), mode="L")

# --- BEGIN copy of op4ksr.py: periodicity loss ---
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
# --- END copy: periodicity loss ---


# ==== evaluation over folders

NETWORKS = {"fid", "clip", "aesthetic", "lpips", "clipiqa"}

READS_REF = {"psnr", "ssim", "lpips", "periodicity"}  # metrics that read each image's own ref

NEEDS = {"ref": "--ref", "fid_ref": "--ref or --fid-ref", "prompts": "--prompts"}

# The options of each paper's table. Sources:
# diffusion4k: zhang0jhon/diffusion-4k@9bea802 generate_and_eval_fid.py (torchmetrics 1.5.1) and
#   eval.py on the JPEG q95 files it saves.
# cupscale: arXiv 2505.16976 Sec. 5.2, no code; its column names point to pyiqa's defaults. LPIPS is
#   "between input low-resolution images and output higher-resolution images": --ref holds the
#   inputs, each output resized to its input (bicubic: not stated).
# op4ksr: arXiv 2605.13457 beside Fig. 8: PSNR and NIQE on whole images, LPIPS and CLIPIQA on
#   patches (512 px here: the size is left to its supplement), PSNR / SSIM on Y as S3Diff.
PROTOCOLS = {
    "diffusion4k": dict(fid_size="pred", fid_resize="tf1", clip_model="b16",
                        clip_form="torchmetrics", glcm_input="jpeg95", glcm_prop="entropy"),
    "cupscale": dict(fid_resize="clean", clip_model="b32", clip_form="pyiqa", lpips_net="alex",
                     tile=0, resize_to_ref=True, clipiqa_tile=0),
    "op4ksr": dict(y_channel=True, crop_border=0, lpips_net="alex", tile=512,
                   niqe_convention="pyiqa", clipiqa_tile=512),
}

PROTOCOL_COLUMNS = {
    None: ["glcm", "cr", "psnr", "ssim"],
    "diffusion4k": ["fid", "clip", "aesthetic", "glcm", "cr"],
    "cupscale": ["clipiqa", "fid", "lpips", "clip"],
    "op4ksr": ["psnr", "ssim", "lpips", "niqe", "clipiqa"],
}

@dataclass
class Item:
    """One pred image as the metrics see it."""

    name: str
    path: Path
    image: Image.Image
    paired: Image.Image  # as the ref-based metrics see it (--resize-to-ref)
    target: Image.Image | None  # its ref
    prompt: str | None
    last: bool  # batches are scored now
    jpeg_size: int | None = None  # bytes of its JPEG-95 file, once GLCM has read it

@dataclass
class FolderRun:
    """What the metrics share over a folder."""

    opts: types.SimpleNamespace
    models: dict
    fid_size: int | str
    fid: dict = field(default_factory=lambda: {"pred": FeatureStats(), "ref": FeatureStats()})
    jpeg: list = field(default_factory=list)  # per image: (JPEG-95 bytes, (H, W))

# Each metric's step on one image: (run, item, its model) -> its value, or None where the summary
# is not a mean over images (CR and FID sums grow in `run`, CLIP batches in theirs).
def score_glcm(run, item, _):
    item.jpeg_size, pixels = jpeg95_view(item.path, item.image, run.opts.glcm_input == "jpeg95")
    return glcm_score(pixels, prop=run.opts.glcm_prop)

def score_cr(run, item, _):
    size = item.jpeg_size or jpeg95_view(item.path, item.image, decode=False)[0]
    run.jpeg.append((size, (item.image.height, item.image.width)))

def score_fid(run, item, _):
    add_fid(run, item.image, "pred")

def add_fid(run, image, which):
    """One image into FID's `which` set; fid_size 'pred': the first image's shorter side."""
    opts, side = run.opts, min(image.size)
    if run.fid_size == "pred":
        run.fid_size = side
    elif opts.fid_size == "pred" and which == "pred" and side != run.fid_size:
        sides = f"{run.fid_size} and {side} px"
        raise UserError(f"pred images differ in size (shorter sides {sides}); pass --fid-size")
    resize = (opts.fid_resize, opts.fid_patch, opts.fid_half_shift, run.fid_size)
    run.fid[which].update(fid_features(run.models["fid"], image, *resize))

def score_batched(run, item, batches):
    batches.add(item.name, item.image, item.prompt, last=item.last)

def score_paired(run, item, _, metric):
    mode = "y" if run.opts.y_channel else "rgb"
    return metric(item.paired, item.target, run.opts.crop_border, mode)

def score_lpips(run, item, model):
    return lpips_tiled(model, item.paired, item.target, run.opts.tile)

def score_niqe(run, item, params):
    return niqe(item.image, params, run.opts.niqe_convention, run.opts.crop_border)

def score_clipiqa(run, item, model):
    return clipiqa_tiled(model, item.image, run.opts.clipiqa_tile)

def score_periodicity(run, item, _):
    device = run.opts.device
    x = periodicity_input(item.paired, device)
    y = None if item.target is None else periodicity_input(item.target, device)
    return periodicity(x, y, run.opts.periods, run.opts.quadrants).item()

def inception(opts):
    return InceptionV3.from_pretrained(opts.inception).to(opts.device)

def clip_batches(opts):
    model = ClipViT.from_pretrained(opts.clip_model).to(opts.device)
    return ClipBatches.clip(model, opts.clip_form)

def aesthetic_batches(opts):
    mlp = AestheticMLP.from_pretrained(opts.aesthetic_mlp).to(opts.device)
    clip = ClipViT.from_pretrained(opts.aesthetic_clip, towers=("vision",)).to(opts.device)
    return ClipBatches.aesthetic(clip, mlp)

def lpips_metric(opts):
    model = LPIPSMetric.from_pretrained(opts.lpips_net, opts.lpips_linear, opts.lpips_backbone)
    return model.to(opts.device)

def clipiqa_model(opts):
    return CLIPIQA.from_pretrained(opts.clipiqa_weights).to(opts.device)

METRICS = {  # name -> (what it needs besides --pred, loader of its model, score of one image)
    "glcm": (None, None, score_glcm),
    "cr": (None, None, score_cr),
    "fid": ("fid_ref", inception, score_fid),
    "clip": ("prompts", clip_batches, score_batched),
    "aesthetic": (None, aesthetic_batches, score_batched),
    "psnr": ("ref", None, functools.partial(score_paired, metric=psnr)),
    "ssim": ("ref", None, functools.partial(score_paired, metric=ssim)),
    "lpips": ("ref", lpips_metric, score_lpips),
    "niqe": (None, lambda opts: niqe_params(opts.niqe_params), score_niqe),
    "clipiqa": (None, clipiqa_model, score_clipiqa),
    "periodicity": (None, None, score_periodicity),
}

def evaluate(pred_dir, ref_dir, prompts_file, opts, fid_ref_dir=None, spectra_dir=None):
    """`opts.metrics` over folders (opts: the settings), spectra into `spectra_dir`: the result
    JSON, which records vars(opts) and what the run resolved."""
    metrics = [m for m in METRICS if m in opts.metrics]  # the order in which they share work
    pred, ref, fid_ref, prompts = read_inputs(pred_dir, ref_dir, fid_ref_dir, prompts_file,
                                              opts.metrics)
    if NETWORKS.intersection(metrics):
        opts.precision = set_network_precision(opts.device)
    models = {m: METRICS[m][1](opts) for m in metrics if METRICS[m][1]}
    run = FolderRun(opts, models, opts.fid_size)
    names, skipped, count = sorted(pred), [], 0
    per_image = {m: {} for m in metrics if m not in ("fid", "cr")}
    with_ref = ref if READS_REF.intersection(metrics) else {}
    for name, show in progress(names, "metrics", getattr(opts, "precision", None)):
        try:
            images = open_pair(name, pred[name], with_ref.get(name), opts, skipped)
            if images is None:
                continue
            item = Item(name, pred[name], *images, prompts.get(name), name == names[-1])
            for m in metrics:
                show(m)
                value = METRICS[m][2](run, item, models.get(m))
                if value is not None:
                    per_image[m][name] = value
            if spectra_dir:
                show("spectra")
                save_spectra(spectra_dir, item, opts)
            count += 1
        except ValueError as error:  # a metric's precondition on this image (size, shape)
            raise UserError(f"{name}: {error}") from None
    per_image.update((m, models[m].flush()) for m in ("clip", "aesthetic") if m in metrics)
    if "fid" in metrics:  # the reference set: every image in --fid-ref or --ref, matched or not
        for name, _ in progress(sorted(fid_ref), "fid ref"):
            image = open_image(fid_ref[name], opts.on_error, skipped)
            if image is not None:
                add_fid(run, image, "ref")
    if count == 0:
        raise UserError("no readable image pairs left to evaluate")
    summary = {m: summarize(run, m, per_image.get(m)) for m in opts.metrics}
    if "fid" in metrics:
        opts.fid_samples = {k: stats.count for k, stats in run.fid.items()}
        opts.fid_size = run.fid_size  # 'pred' resolved
    return {"metrics": summary, "count": count, "skipped": skipped, "per_image": per_image,
            "settings": vars(opts)}

def summarize(run, metric, values):
    """CR and FID from their sums, any other metric the mean of its finite values."""
    if metric == "cr":
        sizes, shapes = zip(*run.jpeg)
        return compression_ratio(sizes, shapes)
    if metric == "fid":
        return fid_from_stats(run.fid["pred"], run.fid["ref"])
    finite = [v for v in values.values() if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("inf")

def read_inputs(pred_dir, ref_dir, fid_ref_dir, prompts_file, metrics):
    """stem -> path of pred, ref and FID's reference set, stem -> caption; all checked first."""
    given = {None: True, "ref": ref_dir, "fid_ref": fid_ref_dir or ref_dir, "prompts": prompts_file}
    for m in metrics:
        if given[METRICS[m][0]] is None:
            raise UserError(f"{m} needs {NEEDS[METRICS[m][0]]}")
    pred = list_images(pred_dir)
    ref = list_images(ref_dir) if ref_dir else {}
    fid_ref = list_images(fid_ref_dir) if fid_ref_dir else ref
    if ref and READS_REF.intersection(metrics):
        only_pred, only_ref = sorted(set(pred) - set(ref)), sorted(set(ref) - set(pred))
        sides = [f"only in {side}: " + ", ".join(xs[:10])
                 + f" and {len(xs) - 10} more" * (len(xs) > 10)
                 for side, xs in (("pred", only_pred), ("ref", only_ref)) if xs]
        if sides:
            raise UserError("pred and ref file names do not match: " + "; ".join(sides))
    prompts = read_prompts(prompts_file) if prompts_file else {}
    missing = [n for n in sorted(pred) if n not in prompts] if "clip" in metrics else []
    if missing:
        more = " ..." * (len(missing) > 10)
        raise UserError(f"{prompts_file}: no caption for {', '.join(missing[:10])}{more}")
    return pred, ref, fid_ref, prompts

def open_pair(name, path, ref_path, opts, skipped):
    """(pred image, pred as the ref-based metrics see it, its ref or None), or None when skipped."""
    image = open_image(path, opts.on_error, skipped)
    if image is None or ref_path is None:
        return None if image is None else (image, image, None)
    target = open_image(ref_path, opts.on_error, skipped)
    if target is None:
        return None
    paired = image
    if opts.resize_to_ref and target.size != image.size:
        paired = image.resize(target.size, Image.BICUBIC)
    if target.size != paired.size:
        sizes = f"pred is {image.width}x{image.height} but ref is {target.width}x{target.height}"
        raise UserError(f"{name}: {sizes}; paired metrics need equal sizes (or --resize-to-ref)")
    return image, paired, target

def save_spectra(folder, item, opts):
    spectrum_file, autocorrelation_file = spectra_files(folder, item.name)
    log_spectrum(item.image).save(spectrum_file)
    try:
        picture = autocorrelation_image(item.image, opts.periods, opts.quadrants, opts.harmonics)
        picture.save(autocorrelation_file)
    except ValueError as error:  # too small for the lags: the spectrum is still written
        warn(f"{item.name}: no autocorrelation image: {error}")

def set_network_precision(device):
    """The networks' arithmetic, set explicitly: on a GPU with TF32, TF32 convolutions and float32
    matrix products (PyTorch's defaults, so what the references compute); else fp32."""
    device = torch.device(device)
    tf32 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    return "tf32" if tf32 else "fp32"

def list_images(folder):
    """stem -> path of the images in a folder (not recursive)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; a folder of images is expected")
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    found = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in found:
                names = f"{found[path.stem].name}, {path.name}"
                raise UserError(f"{folder}: two images share the name {path.stem!r} ({names})")
            found[path.stem] = path
    if not found:
        raise UserError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found

def read_prompts(path):
    """stem -> caption from metadata.jsonl lines (file_name / image / filename, text / prompt /
    caption)."""
    prompts = {}
    for number, line in enumerate(read_text(path, "prompts file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = next(row[k] for k in ("file_name", "image", "filename") if k in row)
            text = next(row[k] for k in ("text", "prompt", "caption") if k in row)
        except (json.JSONDecodeError, StopIteration, TypeError):
            expected = "expected a JSON object with file_name and text"
            raise UserError(f"{path}:{number}: {expected}") from None
        prompts[Path(name).stem] = str(text)
    return prompts

def open_image(path, on_error, skipped):
    """load_image, or None (the path added to `skipped`) for a corrupt file with --on-error skip."""
    try:
        return load_image(path)
    except UserError as error:
        if on_error == "fail":
            raise UserError(f"{error} (pass --on-error skip to leave it out)") from None
        warn(f"skipping {error}")
        skipped.append(str(path))
        return None

def spectra_files(folder, name):
    return Path(folder) / f"{name}_spectrum.png", Path(folder) / f"{name}_autocorrelation.png"

def progress(items, label, precision=None):
    """(item, show) under a progress bar; show(metric) names the metric now computed (a network
    with its `precision`)."""

    def show(i, metric):
        suffix = f" ({precision})" if precision and metric in NETWORKS else ""
        update(i, postfix={"metric": metric + suffix})

    update = progress_bar(label, total=len(items))
    for i, item in enumerate(items):
        yield item, functools.partial(show, i)
        update(i + 1)

def jpeg95_view(path, image, decode=True):
    """The size of the image's JPEG-95 file and (`decode`) its pixels; a JPEG file counts as is."""
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        return Path(path).stat().st_size, image
    encoded = jpeg95(image)
    if not decode:
        return len(encoded), image
    decoded = Image.open(io.BytesIO(encoded))
    decoded.load()
    return len(encoded), decoded if decoded.mode == "RGB" else decoded.convert("RGB")


# ==== weights and images

def load_state(spec, what):
    """A float32 state dict from .safetensors or a .pth/.pt pickle (weights_only: no code runs)."""
    path = resolve_weights(spec, what)
    if path.suffix == ".safetensors":
        return check_float_weights(load_safetensors(path, dtype=torch.float32), path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors come in many types; the file is the problem
        kind = type(error).__name__
        raise UserError(f"{what}: {path} is not a readable weights file ({kind})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{what}: {path} does not hold a state dict")
    check_float_weights(state, path)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

def check_float_weights(state, path):
    """check_weights on all but BatchNorm's step counters, integers by nature and unused."""
    check_weights({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    return state

def resolve_weights(spec, what):
    """A local file, or `owner/repo/path/in/repo` fetched from the Hub."""
    local = Path(spec).expanduser()
    if local.is_file():
        return local
    parts = str(spec).split("/")
    if local.exists() or len(parts) < 3 or str(spec).startswith((".", "/", "~")):
        raise UserError(f"{what}: {spec} is neither a file nor a Hub spec owner/repo/path/in/repo")
    repo, name = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        path = resolve_source(repo, allow_patterns=(name,)) / name
    except UserError as error:
        raise UserError(f"{what}: {error}") from None
    if not path.is_file():
        raise UserError(f"{what}: {repo} has no file {name}")
    return path

def load_strict(module, state, what):
    """load_state_dict naming the first offending keys instead of a wall of text; eval mode."""
    if report := shape_mismatch(state, {k: v.shape for k, v in module.state_dict().items()}):
        raise UserError(f"{what}: weights do not match the model: {report}")
    module.load_state_dict(state)
    return module.eval()

def as_array(image):
    """PIL image or HWC array -> HWC uint8 RGB array."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image, got {array.dtype} {array.shape}")
    return array

def to_float_tensor(image, device="cpu"):
    """as_array -> (1, 3, H, W) float32 with values 0..255 (each metric states its own scale)."""
    x = torch.from_numpy(np.array(as_array(image), dtype=np.float32))
    return x.to(device).permute(2, 0, 1)[None]


# ==== command line

EPILOG = """\
protocols (options given explicitly override theirs):
  diffusion4k  FID, CLIPScore ViT-B/16, aesthetics, GLCM and CR on JPEG q95
  cupscale     CLIPIQA, FID (clean), LPIPS against the --ref inputs, CLIP B/32
  op4ksr       PSNR / SSIM on Y, LPIPS and CLIPIQA on 512-px tiles, NIQE

Diffusion-4K's Aesthetic-Eval@2048 table:
  python diffusion4k.py --prompts Aesthetic-4K/eval/size_2048/metadata.jsonl \\
      --output-dir eval2048/ --height 2048 --width 2048 --guidance 7.0 --seed 0 \\
      --seed-per-prompt same
  python metrics.py --protocol diffusion4k --pred eval2048/ --ref Aesthetic-4K/eval/size_2048 \\
      --prompts eval2048/metadata.jsonl
"""

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass

def main(argv=None):
    args = parse_args(argv)
    metrics = args.metrics or default_metrics(args.protocol, args.ref, args.fid_ref, args.prompts)
    # Every output is checked before any image or weight is read: no long run ends on a clash.
    out = Path(args.out) if args.out else Path(args.pred) / "metrics.json"
    check_output_file(out, args.overwrite, (".json",))
    spectra = Path(args.save_spectra) if args.save_spectra else None
    inputs = [("--pred", args.pred), ("--ref", args.ref), ("--fid-ref", args.fid_ref),
              ("--prompts", args.prompts)]
    check_apart([("--save-spectra", spectra)], inputs)
    if spectra:
        for name in list_images(args.pred):
            for path in spectra_files(spectra, name):
                check_output_file(path, args.overwrite, (".png",))
    excluded = ("pred", "ref", "fid_ref", "prompts", "out", "overwrite")  # not settings
    settings = {k: v for k, v in vars(args).items() if k not in excluded} | {"metrics": metrics}
    settings = types.SimpleNamespace(**settings)
    # The spectra are staged and published with the JSON at the end: all of them or none.
    with staging_folder(spectra) as staged:
        result = evaluate(args.pred, args.ref, args.prompts, settings, args.fid_ref, staged)
        images = sorted(staged.iterdir()) if staged else []
        outputs = [out, *(spectra / image.name for image in images)]
        with atomic_files(outputs, args.overwrite) as (temp, *temps):
            temp.write_text(json.dumps(finite_or_none(result), indent=2))
            for image, image_temp in zip(images, temps):
                shutil.move(image, image_temp)
    print(format_table(result))
    wrote = f" and {len(images)} images into {spectra}" if images else ""
    print(f"wrote {out}{wrote}", file=sys.stderr)
    return result

def parse_args(argv=None):
    p = ArgumentParser(prog="metrics.py", epilog=EPILOG, formatter_class=HelpFormatter,
                       description="Metrics for 4K synthesis and super-resolution.")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), help="a paper's settings and columns")
    p.add_argument("--pred", required=True, type=local_path("folder"), help="images to score")
    p.add_argument("--ref", type=local_path("folder"), help="reference images, paired by stem")
    p.add_argument("--prompts", type=local_path("file"), help="metadata.jsonl (clip)")
    p.add_argument("--metrics", type=metric_names, help=f"comma list from {','.join(METRICS)}")
    p.add_argument("--out", help="JSON output (default PRED/metrics.json)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--device", type=device_name, default=str(device_dtype()[0]))
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail", help="corrupt images")
    weights = local_path("file", must_exist=False, alternative=" (or a Hub spec owner/repo/path)")
    add_pixel_options(p, weights)
    add_network_options(p, weights)
    args = p.parse_args(argv)
    if args.protocol:  # parse again with the protocol's values as defaults: what was typed wins
        p.set_defaults(**PROTOCOLS[args.protocol])
        args = p.parse_args(argv)
    return args

def add_pixel_options(p, weights):
    g = p.add_argument_group("GLCM / CR")
    g.add_argument("--glcm-prop", choices=GLCM_PROPS, default="entropy", help="GLCM property")
    g.add_argument("--glcm-input", choices=("jpeg95", "raw"), default="jpeg95", help="its pixels")
    g = p.add_argument_group("PSNR / SSIM / LPIPS")
    g.add_argument("--crop-border", type=integer(0), default=0, help="px off each side (and NIQE)")
    g.add_argument("--y-channel", action=argparse.BooleanOptionalAction, default=False,
                   help="PSNR / SSIM on BT.601 Y")
    g.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex", help="LPIPS network")
    g.add_argument("--lpips-linear", type=weights, help="LPIPS linear layers .pth")
    g.add_argument("--lpips-backbone", type=weights, help="torchvision-named backbone")
    g.add_argument("--tile", type=tile_or_zero, default=512, help="LPIPS tile (0: whole image)")
    g.add_argument("--resize-to-ref", action=argparse.BooleanOptionalAction, default=False,
                   help="resize pred to its ref (bicubic)")
    g = p.add_argument_group("FID")
    g.add_argument("--fid-ref", type=local_path("folder"), help="FID's reference set")
    g.add_argument("--fid-size", type=size_or_pred, default=0, help="resize and centre-crop")
    g.add_argument("--fid-resize", choices=FID_RESIZE, default="tf1", help="resize to 299 px")
    g.add_argument("--fid-patch", type=integer(0), default=0, help="patch FID's crop size")
    g.add_argument("--fid-half-shift", action="store_true", help="add the half-shifted grid")
    g.add_argument("--inception", type=weights, default=INCEPTION_WEIGHTS, help="FID weights")

def add_network_options(p, weights):
    clip = local_path("folder", must_exist=False, alternative=" (or b16, l14, b32, a Hub repo id)")
    g = p.add_argument_group("CLIPScore / aesthetics")
    g.add_argument("--clip-model", type=clip, default="b16", help="b16, l14, b32 or a repo/folder")
    g.add_argument("--clip-form", choices=CLIP_FORMS, default="torchmetrics", help="its scale")
    g.add_argument("--aesthetic-clip", type=clip, default="l14", help="CLIP ViT-L/14")
    g.add_argument("--aesthetic-mlp", type=weights, default=AESTHETIC_WEIGHTS, help="LAION's MLP")
    g = p.add_argument_group("NIQE / CLIPIQA")
    g.add_argument("--niqe-params", type=weights, default=NIQE_PARAMS, help=".mat or .npz")
    g.add_argument("--niqe-convention", choices=NIQE_CONVENTIONS, default="pyiqa", help="rounding")
    g.add_argument("--clipiqa-weights", type=weights, default=CLIPIQA_WEIGHTS, help="CLIP RN50")
    g.add_argument("--clipiqa-tile", type=tile_or_zero, default=512, help="0: whole image")
    g = p.add_argument_group("periodicity")
    g.add_argument("--periods", type=periods_list, default=",".join(map(str, PERIODS)),
                   help="lattice periods in px")
    g.add_argument("--quadrants", type=square_number, default=4, help="a square number")
    g.add_argument("--harmonics", type=integer(1), default=2, help="autocorrelation lags")
    g.add_argument("--save-spectra", type=local_path("folder", must_exist=False),
                   help="folder for NAME_spectrum.png and NAME_autocorrelation.png")

def default_metrics(protocol, ref=None, fid_ref=None, prompts=None):
    """The protocol's columns that the folders allow (FID's reference: --fid-ref, else --ref except
    under cupscale, whose --ref holds the low-resolution inputs)."""
    fid_ref = fid_ref if protocol == "cupscale" else fid_ref or ref
    given = {None: True, "ref": ref, "fid_ref": fid_ref, "prompts": prompts}
    return [m for m in PROTOCOL_COLUMNS[protocol] if given[METRICS[m][0]] is not None]

def metric_names(text):
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        what = f"unknown metric {', '.join(unknown)}" if unknown else "no metric given"
        raise argparse.ArgumentTypeError(f"{what}; choose from {', '.join(METRICS)}")
    return names

def periods_list(text):
    try:
        return tuple(integer(2)(p) for p in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError("expected comma-separated integers >= 2, "
                                         f"got {text!r}") from None

def square_number(text):
    value = integer(1, 10_000)(text)
    if math.isqrt(value) ** 2 != value:
        raise argparse.ArgumentTypeError(f"must be a square number (1, 4, 9, ...), got {value}")
    return value

def tile_or_zero(text):
    value = integer(0)(text)
    if 0 < value < 32:
        raise argparse.ArgumentTypeError(f"must be 0 (whole image) or >= 32, got {value}")
    return value

def local_path(expected, must_exist=True, alternative=""):
    """argparse type: a path that, where it exists, is a `expected` ('file' or 'folder')."""

    def parse(text):
        path = Path(text).expanduser()
        if path.exists() and path.is_dir() != (expected == "folder"):
            wrong = "folder" if expected == "file" else "file"
            expected_kind = f"a {expected}{alternative} is expected"
            raise argparse.ArgumentTypeError(f"{text} is a {wrong}; {expected_kind}")
        if must_exist and not path.exists():
            raise argparse.ArgumentTypeError(f"{text}: no such {expected}")
        return text

    return parse

def size_or_pred(text):
    if text == "pred":
        return text
    try:
        return integer(0)(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (or pred: the generated images' size)") from None

@contextlib.contextmanager
def staging_folder(folder):
    """A temporary folder beside `folder` (files move in by renaming), removed at the end."""
    if folder is None:
        yield None
        return
    while not folder.exists():
        folder = folder.parent
    with tempfile.TemporaryDirectory(dir=folder, prefix=".metrics-") as temp:
        yield Path(temp)

def finite_or_none(value):
    """JSON has no inf/nan: an identical pair's PSNR (inf) is written as null."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value

def format_table(result):
    rows = [("metric", "value")] + [(k, f"{v:.4f}") for k, v in result["metrics"].items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>12}" for a, b in rows]
    lines.insert(1, "-" * (width + 14))
    skipped = f", {len(result['skipped'])} skipped" if result["skipped"] else ""
    lines.append(f"({result['count']} images{skipped})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_cli(main, memory_hint="try --device cpu"))

"""C-Upscale on Stable Diffusion 3: tuning-free creative upscaling with global-regional priors.

Paper: Qian, Cai, Pan, Yao, Mei, "Creatively Upscaling Images with Global-Regional Priors",
arXiv 2505.16976 (IJCV 2025). No official code is public; this file is a reconstruction from
the paper's text. The paper's main experiments use SDXL (a UNet with cross-attention); it
reports SD3 results only as pictures. Everything below is adapted to SD3-Medium (MMDiT, joint
attention, flow matching), and every adaptation is stated.

STATUS. This file holds the method-specific parts that do not need the diffusion models:
region tiling and blending, the Haar wavelet, the Global Structure Prior, the noise-level
arithmetic, and the regional-prompt inputs (JSON file or an external captioning command).
Still to come, and NOT in this file yet: the SD3 MMDiT, VAE and text encoders (to be copied
from diffusion4k.py), the Regional Attention Prior's attention hook, the Attention Composer,
the pipeline and the command line. Nothing here upscales an image yet.

The method (diffuse-then-denoise with regional denoising)
---------------------------------------------------------
1. Resize the low-resolution (LR) image to the target size and VAE-encode it: z_L.
2. Noise z_L to a middle noise level (the paper's strength 0.45 on SDXL) and denoise it with the
   reduced number of steps. At every step the latent is cut into overlapping regions of the
   model's native size (1024 px, overlap 512 px), each region is denoised, and the results are
   blended back so that every latent pixel's weights sum to one (MultiDiffusion).
3. Three priors guide each step:
   * Global Structure Prior (GSP, paper Sec. 4.3): the predicted clean latent's low-frequency
     Haar band is pulled towards z_L's by a gradient step on the noisy latent.
   * Regional Attention Prior (RAP, Sec. 4.4): the noised LR latent goes through the model
     with the global prompt; its image-to-text attention, interpolated to the high-resolution
     token grid and cropped to each region, replaces the region's own image-to-text attention,
     so a region does not paint objects that the prompt places elsewhere.
   * Regional Semantic Prior (RSP, Sec. 4.5): a multimodal LLM (LLaVA-1.6 in the paper) writes a
     prompt for each region from the region's crop and the global prompt; the features attended
     with the regional prompt are averaged with the RAP-attended ones (the Attention Composer).

Adaptation from SDXL to SD3, and the choices the paper leaves open
------------------------------------------------------------------
Regions (`plan_regions`, `blend_weights`, `merge_regions`). Region 1024 px = 128 latent px
(VAE factor 8), overlap 512 px, so the stride is 64 latent px (paper Sec. 5.1: region = the
model's training size, overlap = half of it); both settable. Open choice: where the regions
start. Ours: every `stride` from the top-left corner, and the last region moved back to end
exactly on the border, so no region is partial and all have one size (one batch). Regions are
numbered (row, col) from the top left. Open choice: the blending window. Ours: uniform
averaging, as MultiDiffusion and as the paper says it follows; with the default 50 % overlap
the weights are 1, 1/2 or 1/4, exact in binary. Gaussian or ramp windows hide seams better on
flat colour (users of tiled upscalers report seams with uniform weights), but the paper finds no
seams at overlap 512, and uniform weights are constant on every 2x2 block, which makes GSP on
the merged canvas identical to GSP per region (below). Offsets and sizes must be even: SD3
patchifies 2x2 latent pixels into one token, and RAP crops on that token grid.

Haar DWT (`haar_dwt`, `haar_idwt`). One level, orthonormal (filters 1/sqrt 2), bands ordered
LL, LH, HL, HH with the signs of pywt.dwt2(x, 'haar'): LL = cA, LH = cH, HL = cV, HH = cD.
The paper says "Haar" but not how many levels; one level is our choice (on a 128x128 region
it constrains the 64x64 structure; the RAP and RSP priors act at the region scale anyway).

GSP (`global_structure_prior`, `gsp_weight`). Paper Eqs. 4-5: L = MSE(DWT_LL(x0_hat),
DWT_LL(R(z_L))), z_t <- z_t - lambda_t * dL/dz_t, lambda = 0.2 under a decreasing cosine
schedule (linear decreasing and increasing schedules in the ablation, Fig. 8).
* Through the model or not: we do not backpropagate through the network (the prediction is
  treated as a constant, as the paper's cost analysis implies: "GSP only involves simple tensor
  transformation"). With flow matching x0_hat = x_sigma - sigma * v_hat, so dx0_hat/dx_sigma is
  the identity and the gradient with respect to the noisy latent equals the gradient with
  respect to x0_hat. (On SDXL the same step carries a factor 1/sqrt(alpha_bar_t).)
* Reduction: a mean over coefficients would make lambda = 0.2 move the LL band by
  2 * 0.2 / (number of LL coefficients), 6.1e-6 of the gap for one 16-channel 128x128 region:
  no visible effect, unlike the paper's Fig. 8, where 0.2 already reduces repetition and 1.0
  overshoots into artifacts. We use L = 1/2 * sum of squares. Then one step moves the LL band
  exactly a fraction lambda of the way to the target and leaves LH, HL, HH unchanged:
  lambda = 1 is DiffuseHigh's hard replacement of the low band, which the paper criticises,
  matching its Fig. 8 artifacts at 1.0.
* Schedule: lambda_i = 0.2 * w(i), with progress p = i / (n - 1) over the n denoising steps
  actually taken: cosine w = (1 + cos(pi p)) / 2, linear w = 1 - p, increasing w = p. The
  first step gets the full step size, the last none. Over 12 steps the cosine schedule leaves
  27 % of the initial low-band gap (product of (1 - lambda_i)), if the model did not move it.
* Where: on the merged canvas, once per step, after the regions' velocities are blended (one
  DWT instead of one per region). With even region offsets and uniform weights this equals
  applying GSP inside every region. R(z_L) is then z_L itself: the paper's resize is already
  done by encoding the LR image resized to the target.

Noise level (`flow_sigma_for_sdxl_strength`, `start_sigmas`). The paper noises the input to
t = 0.45 T on SDXL's DDPM schedule (scaled-linear betas 0.00085..0.012, T = 1000) and runs
0.45 of the model's default steps (SDXL 50 -> 22; SD3 28 -> 12). At t = 450, alpha_bar =
0.3470. A flow-matching latent x = (1 - sigma) x0 + sigma * eps carries the same
signal-to-noise ratio when (1 - sigma) / sigma = sqrt(alpha_bar / (1 - alpha_bar)), i.e.
sigma = 0.578; matching only the noise's standard deviation, sigma = sqrt(1 - alpha_bar), gives
0.808. We match the SNR: x / (1 - sigma) and x_t / sqrt(alpha_bar) are then the same random
variable, so the SD3 model starts from exactly the corruption SDXL started from. (diffusers'
SD3 img2img with strength 0.45 would instead cut its shifted 28-step schedule at sigma = 0.707
and run 13 steps: much noisier. diffusers' SDXL img2img, with "leading" spacing, actually
starts at t = 421, sigma_equivalent 0.555.) The reduced schedule has the shape of SD3's own
(shift 3) from that sigma down to SD3's last non-zero sigma, then 0, stepped with Euler.

Regional prompts (`parse_region_prompts`, `load_region_prompts`, `caption_regions`).
`--region-prompts FILE.json`: {"row,col": "prompt", ...}, one entry per region, rows and
columns counted from 0 at the top left (a 2048x2048 target has rows and columns 0..2). A file
that names unknown regions or misses some is refused in one line naming them.
`--caption-cmd "CMD ... {image} ... {prompt}"`: run once per region, without a shell, with
{image} replaced by a PNG of the region's crop of the resized LR image (1024 px square) and
{prompt} by the global prompt; its standard output is the regional prompt. The paper's LLaVA
instruction text did not survive in the available text, so the instruction is the command's
business. A command that fails, times out or prints nothing is named; the run then stops, or
goes on with RSP off when asked to.

Planned (not implemented yet): RAP and the Composer on joint attention
-----------------------------------------------------------------------
SD3 has no cross-attention: each layer runs one softmax over [text keys; image keys]. For the
image-token queries of a region, the probabilities split into a mass m on the text keys and
1 - m on the image keys. RAP will keep the region's own m and its image-to-image part, and
replace only the distribution over text tokens (p / m) by the LR pass's, taken per head and
per layer, interpolated to the high-resolution token grid and cropped to the region; this is
what SDXL's cross-attention (a softmax over text only) would see. Conditional branch only.
RSP will run the region a second time with its regional prompt (tokens and pooled vector),
and the Composer will average the two image-token attention outputs.

Public API (so far): CUpscaleConfig, Region, plan_regions, blend_weights, crop_regions,
merge_regions, region_batches, haar_dwt, haar_idwt, gsp_weight, global_structure_prior,
sdxl_alpha_bar, flow_sigma_for_sdxl_strength, flow_sigmas, start_sigmas, parse_region_prompts,
load_region_prompts, caption_regions.
"""

import math
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from common.io import UserError, read_json


@dataclass
class CUpscaleConfig:
    """The paper's settings (Sec. 5.1), with SD3-Medium's sampler defaults."""

    vae_scale: int = 8  # SD3's VAE: 8 image px per latent px
    region_px: int = 1024  # the model's training resolution
    overlap_px: int = 512  # half the region
    strength: float = 0.45  # SDXL-equivalent: noise to t = 0.45 T, run 0.45 of the steps
    num_steps: int = 28  # SD3's default full schedule
    shift: float = 3.0  # SD3's flow-matching time shift
    gsp_step_size: float = 0.2
    gsp_schedule: str = "cosine"
    caption_timeout_s: float = 300.0  # per region; a local LLaVA loads its weights every call

    @property
    def region(self) -> int:  # in latent px
        return self.region_px // self.vae_scale

    @property
    def stride(self) -> int:  # in latent px
        return (self.region_px - self.overlap_px) // self.vae_scale


# ---- models: copied from diffusion4k.py (SD3 MMDiT, VAE, CLIP, T5), kept identical by tests/test_copies.py ----


# ----------------------------------------------------------------------------- regional denoising


class Region(NamedTuple):
    """One window of the latent canvas, in latent px, with its (row, col) place in the grid."""

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


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts every `stride`, plus one final window flush with the end, so none is partial."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def plan_regions(latent_height: int, latent_width: int, region: int, stride: int) -> list[Region]:
    """Overlapping `region`-square windows covering a latent canvas, row by row.

    A side shorter than `region` gets one window of that side's length. All sizes and offsets
    must be even (2x2 latent px make one SD3 token) and stride <= region (no gaps).
    """
    if min(latent_height, latent_width, region, stride) <= 0 or stride > region:
        raise ValueError(f"need positive sizes and stride <= region, got region {region}, stride {stride}")
    if any(n % 2 for n in (latent_height, latent_width, region, stride)):
        raise ValueError(
            f"canvas {latent_height}x{latent_width}, region {region} and stride {stride} must be even (latent px)"
        )
    height, width = min(region, latent_height), min(region, latent_width)
    rows = _window_starts(latent_height, height, stride)
    cols = _window_starts(latent_width, width, stride)
    return [Region(r, c, top, left, height, width) for r, top in enumerate(rows) for c, left in enumerate(cols)]


def blend_weights(regions: list[Region], latent_height: int, latent_width: int) -> torch.Tensor:
    """Uniform MultiDiffusion weights, (N, region h, region w): 1 / (number of regions covering the pixel).

    For every latent pixel, the weights of the regions covering it sum to one.
    """
    count = torch.zeros(latent_height, latent_width, dtype=torch.float64)  # 1/3 must stay exact in fp64 outputs
    for region in regions:
        count[region.slices] += 1
    if (count == 0).any():
        raise ValueError("the regions leave latent pixels uncovered")
    return torch.stack([1 / count[region.slices] for region in regions])


def crop_regions(canvas: torch.Tensor, regions: list[Region]) -> torch.Tensor:
    """(..., H, W) -> (N, ..., region h, region w): the regions stacked as one batch."""
    return torch.stack([canvas[(..., *region.slices)] for region in regions])


def merge_regions(region_outputs: torch.Tensor, regions: list[Region], shape) -> torch.Tensor:
    """Blend (N, ..., h, w) outputs of *all* the planned regions into one (..., H, W) canvas."""
    weights = blend_weights(regions, shape[-2], shape[-1]).to(region_outputs)
    canvas = region_outputs.new_zeros(shape)
    for output, weight, region in zip(region_outputs, weights, regions):
        canvas[(..., *region.slices)] += weight * output
    return canvas


def region_batches(regions: list[Region], batch_size: int):
    """Yield the regions in lists of at most `batch_size`, to bound memory at 8192^2 (225 regions)."""
    for start in range(0, len(regions), batch_size):
        yield regions[start : start + batch_size]


# ----------------------------------------------------------------------------- Haar wavelet


def haar_dwt(x: torch.Tensor) -> torch.Tensor:
    """One level of the orthonormal 2-D Haar transform over the last two dims.

    (..., H, W) -> (..., 4, H/2, W/2) holding the subbands LL, LH, HL, HH, equal to pywt's
    dwt2(x, "haar") = cA, (cH, cV, cD). Orthonormal: the sum of squares is preserved.
    """
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"haar_dwt needs an even height and width, got {tuple(x.shape[-2:])}")
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]  # top-left, top-right of each 2x2 block
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]  # bottom-left, bottom-right
    return torch.stack([a + b + c + d, a + b - c - d, a - b + c - d, a - b - c + d], dim=-3) / 2


def haar_idwt(bands: torch.Tensor) -> torch.Tensor:
    """Inverse of `haar_dwt`: (..., 4, H/2, W/2) -> (..., H, W)."""
    ll, lh, hl, hh = bands.unbind(-3)
    a, b = (ll + lh + hl + hh) / 2, (ll + lh - hl - hh) / 2
    c, d = (ll - lh + hl - hh) / 2, (ll - lh - hl + hh) / 2
    blocks = torch.stack([torch.stack([a, b], dim=-1), torch.stack([c, d], dim=-1)], dim=-3)  # (..., h, 2, w, 2)
    return blocks.reshape(*ll.shape[:-2], 2 * ll.shape[-2], 2 * ll.shape[-1])


# ----------------------------------------------------------------------------- Global Structure Prior

GSP_SCHEDULES = ("cosine", "linear", "increasing")


def gsp_weight(step: int, num_steps: int, schedule: str) -> float:
    """The GSP schedule factor in [0, 1] for step `step` (0-based) of the `num_steps` taken.

    cosine (the paper's) and linear decrease from 1 at the first step to 0 at the last;
    increasing rises from 0 to 1 (the ablation's alternatives, paper Fig. 8).
    """
    progress = step / (num_steps - 1) if num_steps > 1 else 0.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1 - progress
    if schedule == "increasing":
        return progress
    raise ValueError(f"unknown GSP schedule {schedule!r}; choose from {', '.join(GSP_SCHEDULES)}")


def global_structure_prior(x0_pred: torch.Tensor, lr_latent: torch.Tensor, step_size: float) -> torch.Tensor:
    """The GSP update -step_size * dL/dz (paper Eq. 5), to add to the noisy latent.

    L = 1/2 * sum (LL(x0_pred) - LL(lr_latent))^2 over the one-level Haar low band. The
    prediction is a constant (no backpropagation through the model) and, with flow matching,
    dx0_pred/dz is the identity, so dL/dz = dL/dx0_pred = IDWT(LL difference, 0, 0, 0). Adding
    the update moves the low band of x0_pred (and of z) a fraction `step_size` of the way to
    the LR latent's and leaves the three detail bands exactly as they were.
    """
    if x0_pred.shape != lr_latent.shape:
        raise ValueError(f"prediction {tuple(x0_pred.shape)} and LR latent {tuple(lr_latent.shape)} differ in shape")
    low_band_gap = haar_dwt(x0_pred.float())[..., :1, :, :] - haar_dwt(lr_latent.float())[..., :1, :, :]
    details = low_band_gap.new_zeros(*low_band_gap.shape[:-3], 3, *low_band_gap.shape[-2:])
    gradient = haar_idwt(torch.cat([low_band_gap, details], dim=-3))
    return (-step_size * gradient).to(x0_pred.dtype)


# ----------------------------------------------------------------------------- noise level

SDXL_TRAIN_STEPS = 1000
SD3_TRAIN_STEPS = 1000


def sdxl_alpha_bar(timestep: int) -> float:
    """alpha_bar_t of SDXL's DDPM schedule: scaled-linear betas from 0.00085 to 0.012 over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, SDXL_TRAIN_STEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)[timestep].item()


def flow_sigma_for_sdxl_strength(strength: float, match: str = "snr") -> float:
    """The flow-matching sigma equivalent to noising an SDXL latent to t = strength * T.

    match="snr": the same signal-to-noise ratio, sigma = sqrt(1-a) / (sqrt(a) + sqrt(1-a));
    0.578 for strength 0.45 (our choice: the same corruption up to a scale).
    match="std": the same noise standard deviation, sigma = sqrt(1-a); 0.808 for 0.45.
    """
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    alpha_bar = sdxl_alpha_bar(min(round(strength * SDXL_TRAIN_STEPS), SDXL_TRAIN_STEPS - 1))
    if match == "snr":
        return math.sqrt(1 - alpha_bar) / (math.sqrt(alpha_bar) + math.sqrt(1 - alpha_bar))
    if match == "std":
        return math.sqrt(1 - alpha_bar)
    raise ValueError(f"match must be 'snr' or 'std', got {match!r}")


def _shift(t, shift: float):
    """SD3's time shift: sigma = shift * t / (1 + (shift - 1) * t)."""
    return shift * t / (1 + (shift - 1) * t)


def _unshift(sigma: float, shift: float) -> float:
    return sigma / (shift - (shift - 1) * sigma)


def flow_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """SD3's full sampling schedule, num_steps + 1 sigmas from 1 to 0 (as diffusers and the SD3.5 reference).

    Uniform in unshifted time from 1 down to the shifted first training sigma, then shifted
    (the reference code shifts that end point twice: it ends at 0.0089 for shift 3, not 0.003).
    """
    t_last = _shift(1 / SD3_TRAIN_STEPS, shift)
    sigmas = _shift(torch.linspace(1.0, t_last, num_steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def start_sigmas(strength: float, num_steps: int, shift: float, match: str = "snr") -> torch.Tensor:
    """The reduced schedule for diffuse-then-denoise: int(strength * num_steps) Euler steps.

    Starts at `flow_sigma_for_sdxl_strength(strength, match)` and follows the shape of SD3's
    own schedule (uniform in unshifted time) down to its last non-zero sigma, then 0.
    """
    steps = int(strength * num_steps)  # the paper's count: SDXL 50 -> 22, SD3 28 -> 12
    if steps < 1:
        raise ValueError(f"strength {strength} of {num_steps} steps leaves no step to take")
    t_first = _unshift(flow_sigma_for_sdxl_strength(strength, match), shift)
    t_last = _shift(1 / SD3_TRAIN_STEPS, shift)
    sigmas = _shift(torch.linspace(t_first, t_last, steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


# ----------------------------------------------------------------------------- regional prompts (RSP input)


def _describe_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def parse_region_prompts(data, regions: list[Region], source: str = "region prompts") -> dict[str, str]:
    """Check a {"row,col": prompt} mapping against the planned regions; return it with normalised keys.

    Every region needs exactly one non-empty string; unknown and missing regions are named
    in one UserError line.
    """
    rows, cols = regions[-1].row + 1, regions[-1].col + 1
    grid = f"expected one entry per region, keys 'row,col' with row 0..{rows - 1} and col 0..{cols - 1}"
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
    missing = [region.key for region in regions if region.key not in prompts and region.key not in not_text]
    problems = [
        f"{label} {_describe_keys(keys)}"
        for label, keys in (
            ("unknown regions", unknown),
            ("missing regions", missing),
            ("empty or not text", not_text),
            ("given twice", repeated),
        )
        if keys
    ]
    if problems:
        raise UserError(f"{source} does not match the {rows}x{cols} regions: {'; '.join(problems)} ({grid})")
    return prompts


def load_region_prompts(path, regions: list[Region]) -> dict[str, str]:
    """Read and check a --region-prompts JSON file."""
    return parse_region_prompts(read_json(path), regions, source=str(path))


def _run_caption_command(command: list[str], timeout_s: float) -> str:
    """Run one captioning command; return its standard output as one line, or raise UserError naming the failure."""
    shown = shlex.join(command)
    try:
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except FileNotFoundError:
        raise UserError(f"caption command not found: {command[0]}") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"caption command timed out after {timeout_s:g} s: {shown}") from None
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or ["no error output"])[-1]
        raise UserError(f"caption command failed with exit code {done.returncode}: {shown}: {last_line}")
    caption = " ".join(done.stdout.split())
    if not caption:
        raise UserError(f"caption command printed nothing: {shown}")
    return caption


def caption_regions(
    image: Image.Image,
    regions: list[Region],
    command: str,
    global_prompt: str,
    vae_scale: int,
    timeout_s: float,
    rsp_off_on_failure: bool = False,
) -> dict[str, str] | None:
    """Regional prompts from an external captioning command, run once per region.

    `image` is the LR image resized to the target size. `command` is split like a shell line
    (no shell runs it); in each argument {image} becomes the path of the region's crop (PNG)
    and {prompt} the global prompt. On a failure, raise a UserError naming it, or, with
    `rsp_off_on_failure`, say so on stderr and return None (RSP off).
    """
    template = shlex.split(command)
    if not any("{image}" in argument for argument in template):
        raise UserError(f"--caption-cmd must contain the placeholder {{image}}: {command}")
    prompts = {}
    with tempfile.TemporaryDirectory(prefix="cupscale-regions-") as folder:
        for region in regions:
            top, left = region.top * vae_scale, region.left * vae_scale
            crop = image.crop((left, top, left + region.width * vae_scale, top + region.height * vae_scale))
            crop_path = Path(folder) / f"region_{region.row}_{region.col}.png"
            crop.save(crop_path)
            arguments = [a.replace("{image}", str(crop_path)).replace("{prompt}", global_prompt) for a in template]
            try:
                prompts[region.key] = _run_caption_command(arguments, timeout_s)
            except UserError as error:
                if not rsp_off_on_failure:
                    raise UserError(f"region {region.key}: {error}") from None
                print(f"warning: region {region.key}: {error}; regional semantic prior off", file=sys.stderr)
                return None
    return prompts

"""C-Upscale's model-free parts: region tiling, Haar DWT, GSP, noise-level arithmetic, regional prompts."""

import json
import math
import sys

import numpy as np
import pytest
import pywt
import torch
from PIL import Image

from common.io import UserError
from cupscale import (
    CUpscaleConfig,
    blend_weights,
    caption_regions,
    crop_regions,
    flow_sigma_for_sdxl_strength,
    global_structure_prior,
    gsp_step_scale,
    gsp_weight,
    haar_dwt,
    haar_idwt,
    load_region_prompts,
    merge_regions,
    parse_region_prompts,
    plan_regions,
    region_batches,
    sdxl_alpha_bar,
    sd3_sigmas,
    start_sigmas,
)

CONFIG = CUpscaleConfig()

# ----------------------------------------------------------------------------- regions

# By hand, one side of L image px: L/8 latent px, windows of 128 every 64, the last flush with
# the border: 1 + ceil((L/8 - 128) / 64) windows. 2048 -> 256 -> 3; 4096 -> 512 -> 7;
# 8192 -> 1024 -> 15; 1536 -> 192 -> 2.
EXPECTED_GRIDS = {  # (height px, width px): (rows, cols)
    (2048, 2048): (3, 3),
    (4096, 4096): (7, 7),
    (8192, 8192): (15, 15),
    (2048, 4096): (3, 7),
    (4096, 2048): (7, 3),
    (1536, 2048): (2, 3),
}


def test_default_region_is_1024_px_with_512_px_overlap():
    assert (CONFIG.region, CONFIG.stride) == (128, 64)


@pytest.mark.parametrize("size", list(EXPECTED_GRIDS))
def test_region_counts_coverage_and_weights(size):
    height, width = size[0] // CONFIG.vae_scale, size[1] // CONFIG.vae_scale
    regions = plan_regions(height, width, CONFIG.region, CONFIG.stride)
    rows, cols = EXPECTED_GRIDS[size]
    assert len(regions) == rows * cols
    assert (regions[-1].row + 1, regions[-1].col + 1) == (rows, cols)
    assert {(r.height, r.width) for r in regions} == {(128, 128)}  # no partial regions
    assert max(r.top + r.height for r in regions) == height and max(r.left + r.width for r in regions) == width

    coverage = torch.zeros(height, width)
    weight_sum = torch.zeros(height, width, dtype=torch.float64)
    for region, weight in zip(regions, blend_weights(regions, height, width)):
        coverage[region.slices] += 1
        weight_sum[region.slices] += weight.double()
    assert coverage.min() >= 1
    deviation = (weight_sum - 1).abs().max().item()
    print(f"[tiling] {size[0]}x{size[1]}: {len(regions)} regions, max |sum of weights - 1| = {deviation:.1e}")
    assert deviation == 0  # 1, 1/2, 1/4: exact in binary at 50 % overlap


def test_uneven_canvas_weights_sum_to_one_and_merge_is_a_partition_of_unity():
    # 200 = 0, 64 and a last window at 72: pixels 72..127 are covered three times (weight 1/3).
    height, width = 200, 330
    regions = plan_regions(height, width, 128, 64)
    assert sorted({r.top for r in regions}) == [0, 64, 72]
    canvas = torch.randn(2, 16, height, width, dtype=torch.float64)
    crops = crop_regions(canvas, regions)
    assert crops.shape == (len(regions), 2, 16, 128, 128)
    merged = merge_regions(crops, regions, canvas.shape)
    error = (merged - canvas).abs().max().item()
    print(f"[tiling] merge(crop(x)) - x, 200x330 latent: max abs {error:.1e}")
    assert error < 1e-12


def test_small_canvas_gets_one_region_per_short_side():
    regions = plan_regions(96, 256, 128, 64)
    assert [(r.height, r.width) for r in regions] == [(96, 128)] * 3


def test_region_batches_keep_order_and_cover_all():
    regions = plan_regions(512, 512, 128, 64)
    batches = list(region_batches(regions, 16))
    assert [len(b) for b in batches] == [16, 16, 16, 1]
    assert [r for b in batches for r in b] == regions


@pytest.mark.parametrize("args", [(256, 256, 128, 0), (256, 256, 128, 130), (256, 256, 127, 64), (255, 256, 128, 64)])
def test_bad_region_settings_are_refused(args):
    with pytest.raises(ValueError):
        plan_regions(*args)


# ----------------------------------------------------------------------------- Haar


def test_haar_matches_pywt_and_reconstructs():
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    bands = haar_dwt(x)
    assert bands.shape == (2, 3, 4, 4, 6)
    cA, (cH, cV, cD) = pywt.dwt2(x.numpy(), "haar")  # over the last two axes
    reference = torch.from_numpy(np.stack([cA, cH, cV, cD], axis=-3))
    error = (bands - reference).abs().max().item()
    reconstruction = (haar_idwt(bands) - x).abs().max().item()
    print(f"[haar] vs pywt: {error:.1e}; reconstruction: {reconstruction:.1e}")
    assert error < 1e-12 and reconstruction < 1e-12
    assert torch.allclose(bands.square().sum(), x.square().sum())  # orthonormal: energy kept


def test_haar_refuses_odd_sizes():
    with pytest.raises(ValueError):
        haar_dwt(torch.zeros(4, 5))


# ----------------------------------------------------------------------------- GSP


def _region_pair():
    return torch.randn(1, 16, 128, 128), torch.randn(1, 16, 128, 128)


def test_gsp_step_moves_only_the_low_band_by_the_step_size():
    x0, lr = _region_pair()
    guided = x0 + global_structure_prior(x0, lr, 0.2)
    before, after, target = haar_dwt(x0), haar_dwt(guided), haar_dwt(lr)
    detail_change = (after[..., 1:, :, :] - before[..., 1:, :, :]).abs().max().item()
    gap_before = (before[..., 0, :, :] - target[..., 0, :, :]).norm()
    gap_ratio = ((after[..., 0, :, :] - target[..., 0, :, :]).norm() / gap_before).item()
    print(f"[gsp] detail bands change {detail_change:.1e}; low-band gap kept {gap_ratio:.6f} (expected 0.8)")
    assert detail_change < 1e-6
    assert gap_ratio == pytest.approx(0.8, abs=1e-6)


def test_gsp_is_the_gradient_of_half_the_summed_squares_wrt_the_noisy_latent():
    x0, lr = _region_pair()
    sigma, velocity = 0.6, torch.randn_like(x0)  # flow matching: x0 = z - sigma * v, v held constant
    z = (x0 + sigma * velocity).requires_grad_()
    predicted = z - sigma * velocity
    loss = 0.5 * (haar_dwt(predicted)[..., 0, :, :] - haar_dwt(lr)[..., 0, :, :]).square().sum()
    (gradient,) = torch.autograd.grad(loss, z)
    assert torch.allclose(global_structure_prior(x0, lr, 0.2), -0.2 * gradient, atol=1e-5)


def test_gsp_mean_normalisation_is_the_literal_mse_step_and_negligible():
    # F.mse_loss (a mean over the 16 * 64 * 64 = 65,536 low-band coefficients of an SD3 region at
    # 1024 px) makes step size 0.2 close 2 * 0.2 / 65,536 = 6.1e-6 of the gap (the documented number).
    x0, lr = (tensor.double() for tensor in _region_pair())
    x = x0.clone().requires_grad_()
    loss = torch.nn.functional.mse_loss(haar_dwt(x)[..., 0, :, :], haar_dwt(lr)[..., 0, :, :])
    (gradient,) = torch.autograd.grad(loss, x)
    ours = global_structure_prior(x0, lr, 0.2 * gsp_step_scale("mean", 0.7, 16 * 64 * 64))
    assert torch.allclose(ours, -0.2 * gradient, rtol=1e-5, atol=1e-12)  # GSP computes in fp32
    gap = haar_dwt(x0)[..., 0, :, :] - haar_dwt(lr)[..., 0, :, :]
    closed = 1 - ((haar_dwt(x0 - 0.2 * gradient)[..., 0, :, :] - haar_dwt(lr)[..., 0, :, :]).norm() / gap.norm()).item()
    print(f"[gsp] mean reduction closes {closed:.2e} of the gap; sum (the default) closes 0.2")
    assert closed == pytest.approx(2 * 0.2 / 65536, rel=1e-2)
    assert f"{2 * 0.2 / 65536:.1e}" == "6.1e-06"
    assert gsp_step_scale("sum", 0.7, 65536) == 1


@pytest.mark.parametrize("sigma", [0.3, 0.5784, 0.7073])
def test_gsp_sdxl_normalisation_moves_x0_as_eq5_does_on_an_sdxl_latent_of_equal_snr(sigma):
    # SDXL: z_t = sqrt(a) x0 + sqrt(1 - a) eps; Eq. 5 differentiates x0_hat = (z_t - sqrt(1 - a) eps)
    # / sqrt(a) with eps fixed, steps z_t, and x0_hat moves by lambda / a of the gap. Ours moves x0_hat
    # (= z - sigma v, v fixed) by lambda * gsp_step_scale("sdxl", sigma): the same change when a has
    # the SNR of sigma.
    x0, lr = torch.randn(2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)
    assert a / (1 - a) == pytest.approx(((1 - sigma) / sigma) ** 2)  # equal SNR
    eps = torch.randn_like(x0)
    z = (math.sqrt(a) * x0 + math.sqrt(1 - a) * eps).requires_grad_()
    x0_hat = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
    loss = 0.5 * (haar_dwt(x0_hat)[..., 0, :, :] - haar_dwt(lr)[..., 0, :, :]).square().sum()
    (gradient,) = torch.autograd.grad(loss, z)
    sdxl_x0_after = (z.detach() - 0.2 * gradient - math.sqrt(1 - a) * eps) / math.sqrt(a)
    ours_after = x0 + global_structure_prior(x0, lr, 0.2 * gsp_step_scale("sdxl", sigma, 65536))
    assert torch.allclose(ours_after, sdxl_x0_after, atol=1e-5)  # GSP computes in fp32


def test_gsp_sdxl_normalisation_numbers():
    sdxl = lambda sigma: 0.2 * gsp_step_scale("sdxl", sigma, 65536)  # noqa: E731
    # documented: 0.58 at the SNR-matched start, exactly 1 at sigma 2/3, overshooting above (1.37 at 0.707)
    assert sdxl(flow_sigma_for_sdxl_strength(0.45)) == pytest.approx(0.2 / sdxl_alpha_bar(450), rel=1e-9)
    assert sdxl(flow_sigma_for_sdxl_strength(0.45)) == pytest.approx(0.576, abs=1e-3)
    assert sdxl(2 / 3) == pytest.approx(1.0)
    assert sdxl(start_sigmas(0.45, 28, 3.0)[0].item()) == pytest.approx(1.368, abs=1e-3)
    assert sdxl(1.0) == pytest.approx(0.2 / sdxl_alpha_bar(999))  # floored at SDXL's last level, not infinite
    with pytest.raises(ValueError):
        gsp_step_scale("l2", 0.5, 65536)


def test_gsp_step_size_zero_leaves_the_latent_unchanged():
    x0, lr = _region_pair()
    assert torch.equal(x0 + global_structure_prior(x0, lr, 0.0), x0)


def test_gsp_keeps_dtype_and_refuses_mismatched_shapes():
    x0, lr = _region_pair()
    assert global_structure_prior(x0.bfloat16(), lr.bfloat16(), 0.2).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        global_structure_prior(x0, lr[..., :64], 0.2)


def test_gsp_schedules():
    n = 13  # SD3 at the default noise level: 13 of 28 steps
    cosine = [gsp_weight(i, n, "cosine") for i in range(n)]
    assert cosine[0] == 1 and cosine[-1] == pytest.approx(0, abs=1e-15)
    assert all(a > b for a, b in zip(cosine, cosine[1:]))
    # by hand: (1 + cos(pi * 3/12)) / 2 at step 3 of 13
    assert cosine[3] == pytest.approx((1 + math.cos(math.pi * 3 / 12)) / 2)
    assert [gsp_weight(i, 5, "linear") for i in range(5)] == [1, 0.75, 0.5, 0.25, 0]
    assert [gsp_weight(i, 5, "increasing") for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert gsp_weight(0, 1, "cosine") == 1
    # documented: the cosine schedule at 0.2 leaves 24 % of the initial low-band gap over 13 steps
    assert math.prod(1 - 0.2 * w for w in cosine) == pytest.approx(0.2434, abs=1e-4)
    with pytest.raises(ValueError):
        gsp_weight(0, 12, "exponential")


# ----------------------------------------------------------------------------- noise level


def test_sdxl_alpha_bar_by_hand():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    assert sdxl_alpha_bar(450) == pytest.approx(np.prod(1 - betas[:451]), rel=1e-12)
    assert sdxl_alpha_bar(450) == pytest.approx(0.34704, abs=1e-5)


def test_flow_sigma_for_the_papers_strength():
    a = 0.3470447  # alpha_bar at t = 450
    by_snr = math.sqrt(1 - a) / (math.sqrt(a) + math.sqrt(1 - a))  # (1-s)/s = sqrt(a/(1-a))
    assert flow_sigma_for_sdxl_strength(0.45) == pytest.approx(by_snr, abs=1e-6)
    assert flow_sigma_for_sdxl_strength(0.45) == pytest.approx(0.5784, abs=1e-4)
    assert math.sqrt(1 - a) == pytest.approx(0.8081, abs=1e-4)  # documented: matching the std instead
    sigma = flow_sigma_for_sdxl_strength(0.45)
    assert ((1 - sigma) / sigma) ** 2 == pytest.approx(a / (1 - a), rel=1e-5)  # equal SNR
    # documented: diffusers' SDXL img2img really starts at t = 421 ("leading" spacing)
    a421 = sdxl_alpha_bar(421)
    assert math.sqrt(1 - a421) / (math.sqrt(a421) + math.sqrt(1 - a421)) == pytest.approx(0.555, abs=1e-3)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            flow_sigma_for_sdxl_strength(bad)


def test_sd3_sigmas_by_hand():
    sigmas = sd3_sigmas(28, 3.0)
    shift = lambda t: 3 * t / (1 + 2 * t)  # noqa: E731
    t_last = shift(0.001)  # 0.002994
    assert len(sigmas) == 29 and sigmas[0] == 1 and sigmas[-1] == 0
    assert sigmas[-2].item() == pytest.approx(shift(t_last), abs=1e-7)  # 0.0089
    # documented: diffusers' SD3 img2img at strength 0.45 keeps int(28 - 12.6) = 15 -> starts at sigma[15]
    assert sigmas[15].item() == pytest.approx(shift(1 - 15 * (1 - t_last) / 27), abs=1e-6)
    assert sigmas[15].item() == pytest.approx(0.707, abs=1e-3)


def test_sd3_sigmas_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(28)
    assert torch.allclose(sd3_sigmas(28, 3.0).float(), scheduler.sigmas.float(), atol=1e-6)


@pytest.mark.parametrize("noise_level, first, steps", [
    ("diffusers-strength", 0.7073, 13),  # sd3_sigmas(28)[15]: int(28 - 12.6) = 15, 13 steps left
    ("snr-matched", 0.5784, 12),  # int(0.45 * 28) steps
    ("flow-sigma", 0.45, 12),
])
def test_start_sigmas_for_each_noise_level(noise_level, first, steps):
    sigmas = start_sigmas(0.45, 28, 3.0, noise_level)
    print(f"[noise] {noise_level}: sigma {sigmas[0].item():.4f}, {len(sigmas) - 1} steps")
    assert len(sigmas) == steps + 1
    assert sigmas[0].item() == pytest.approx(first, abs=1e-4)
    assert sigmas[-1] == 0 and sigmas[-2] == sd3_sigmas(28, 3.0).float()[-2]
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_start_sigmas_default_and_refusals():
    assert CONFIG.noise_level == "diffusers-strength"
    assert torch.equal(start_sigmas(0.45, 28, 3.0), start_sigmas(0.45, 28, 3.0, "diffusers-strength"))
    assert torch.equal(start_sigmas(0.45, 28, 3.0), sd3_sigmas(28, 3.0).float()[15:])
    assert len(start_sigmas(0.45, 50, 3.0, "snr-matched")) == 22 + 1  # the paper's SDXL count
    assert len(start_sigmas(0.02, 28, 3.0)) == 1 + 1  # diffusers keeps one step for any strength > 0
    for strength, noise_level in [(0.02, "snr-matched"), (0.02, "flow-sigma"), (0.0, "diffusers-strength")]:
        with pytest.raises(ValueError, match="leaves no step"):
            start_sigmas(strength, 28, 3.0, noise_level)
    with pytest.raises(ValueError, match="unknown noise level"):
        start_sigmas(0.45, 28, 3.0, "sdxl")


@pytest.mark.parametrize("steps, strength",
                         [(28, 0.45), (50, 0.45), (28, 0.3), (6, 0.45), (8, 0.1), (28, 1.0)])
def test_diffusers_strength_is_sd3_img2img_pipelines_schedule(steps, strength):
    diffusers = pytest.importorskip("diffusers")
    from types import SimpleNamespace

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3-Medium's scheduler config
    scheduler.set_timesteps(steps)
    pipeline = SimpleNamespace(scheduler=scheduler)  # get_timesteps reads only the scheduler
    get_timesteps = diffusers.StableDiffusion3Img2ImgPipeline.get_timesteps
    timesteps, count = get_timesteps(pipeline, steps, strength, "cpu")
    theirs = scheduler.sigmas[scheduler.begin_index :]
    ours = start_sigmas(strength, steps, 3.0, "diffusers-strength")
    assert len(ours) == len(theirs) == count + 1
    assert torch.allclose(ours, theirs.float(), atol=1e-6)
    assert torch.allclose(ours[:-1] * 1000, timesteps.float(), atol=1e-3)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers, numpy 2
def test_sdxl_schedule_and_the_papers_step_count_are_diffusers():
    # alpha_bar_450 from diffusers' DDPM scaled-linear schedule, and the paper's "22 steps" for SDXL:
    # diffusers' SDXL img2img at strength 0.45 of 50 runs int(22.5) = 22 steps, starting at t = 421
    # (SDXL's "leading" spacing).
    diffusers = pytest.importorskip("diffusers")
    from types import SimpleNamespace

    ddpm = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert sdxl_alpha_bar(450) == pytest.approx(ddpm.alphas_cumprod[450].item(), rel=1e-6)
    euler = diffusers.EulerDiscreteScheduler(  # SDXL's scheduler config
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    euler.set_timesteps(50)
    pipeline = SimpleNamespace(scheduler=euler)
    timesteps, count = diffusers.StableDiffusionXLImg2ImgPipeline.get_timesteps(pipeline, 50, 0.45, "cpu")
    assert count == 22 and timesteps[0].item() == 421


# ----------------------------------------------------------------------------- regional prompts


GRID_3x3 = plan_regions(256, 256, 128, 64)  # a 2048x2048 target


def _all_prompts():
    return {f"{r},{c}": f"region {r} {c}" for r in range(3) for c in range(3)}


def test_region_prompts_accepted_with_normalised_keys():
    data = _all_prompts()
    data["0, 1"] = data.pop("0,1")
    prompts = parse_region_prompts(data, GRID_3x3)
    assert prompts["0,1"] == "region 0 1" and len(prompts) == 9


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.pop("2,2"), "missing regions 2,2"),
        (lambda d: d.update({"3,0": "x"}), "unknown regions 3,0"),
        (lambda d: d.update({"sky": "x"}), "unknown regions sky"),
        (lambda d: d.update({"1,1": ""}), "empty or not text 1,1"),
        (lambda d: d.update({"1,1": 7}), "empty or not text 1,1"),
        (lambda d: d.update({"1, 1": "again"}), "given twice 1, 1"),
    ],
)
def test_region_prompts_mismatch_is_named_in_one_line(edit, expected):
    data = _all_prompts()
    edit(data)
    with pytest.raises(UserError) as error:
        parse_region_prompts(data, GRID_3x3, source="p.json")
    message = str(error.value)
    assert expected in message and "3x3 regions" in message and "\n" not in message


def test_region_prompts_lists_are_shortened_and_files_checked(tmp_path):
    with pytest.raises(UserError, match="missing regions 0,0, 0,1, .* and 1 more"):
        parse_region_prompts({}, GRID_3x3)
    with pytest.raises(UserError, match="JSON object"):
        parse_region_prompts(["a"], GRID_3x3)
    path = tmp_path / "prompts.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a readable JSON"):
        load_region_prompts(path, GRID_3x3)
    path.write_text(json.dumps(_all_prompts()))
    assert load_region_prompts(path, GRID_3x3) == _all_prompts()


# A 192x192 image, vae_scale 8 -> 24x24 latent, regions 16 every 8 -> 2x2 regions of 128 px.
CAPTION_REGIONS = plan_regions(24, 24, 16, 8)
PY = sys.executable


def _quadrant_image():
    image = Image.new("RGB", (192, 192))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        image.paste(colour, ((i % 2) * 96, (i // 2) * 96, (i % 2) * 96 + 96, (i // 2) * 96 + 96))
    return image


def test_caption_command_runs_once_per_region_with_its_crop():
    script = (
        "import sys; from PIL import Image; im = Image.open(sys.argv[1]); "
        "print('a', im.size[0], 'px crop, colour', im.getpixel((40, 40)), 'of:', sys.argv[2])"
    )
    command = f"{PY} -c {json.dumps(script)} {{image}} {{prompt}}"
    prompts = caption_regions(_quadrant_image(), CAPTION_REGIONS, command, "a quiet street", 8, timeout_s=60)
    assert list(prompts) == ["0,0", "0,1", "1,0", "1,1"]
    # region (row, col) starts at (64 col, 64 row) px: its pixel (40, 40) lies in quadrant (row, col)
    assert prompts["0,0"] == "a 128 px crop, colour (255, 0, 0) of: a quiet street"
    assert [prompts[key].split("colour ")[1].split(" of:")[0] for key in ("0,1", "1,0", "1,1")] == [
        "(0, 255, 0)",
        "(0, 0, 255)",
        "(255, 255, 0)",
    ]


def test_caption_command_failure_is_named_or_turns_rsp_off(capsys):
    command = f"{PY} -c \"import sys; sys.exit('llava: out of memory')\" {{image}}"
    with pytest.raises(UserError, match=r"region 0,0: caption command failed with exit code 1: .*llava: out of memory"):
        caption_regions(_quadrant_image(), CAPTION_REGIONS, command, "p", 8, timeout_s=60)
    assert caption_regions(_quadrant_image(), CAPTION_REGIONS, command, "p", 8, 60, rsp_off_on_failure=True) is None
    assert "RSP (regional semantic prior) off (--caption-failure rsp-off)" in capsys.readouterr().err


def test_caption_command_timeout_silence_and_bad_templates():
    slow = f"{PY} -c \"import time; time.sleep(10)\" {{image}}"
    with pytest.raises(UserError, match="timed out after 0.5 s"):
        caption_regions(_quadrant_image(), CAPTION_REGIONS, slow, "p", 8, timeout_s=0.5)
    silent = f"{PY} -c pass {{image}}"
    with pytest.raises(UserError, match="printed nothing"):
        caption_regions(_quadrant_image(), CAPTION_REGIONS, silent, "p", 8, timeout_s=60)
    with pytest.raises(UserError, match="not found: no-such-captioner"):
        caption_regions(_quadrant_image(), CAPTION_REGIONS, "no-such-captioner {image}", "p", 8, timeout_s=60)
    with pytest.raises(UserError, match=r"placeholder \{image\}"):
        caption_regions(_quadrant_image(), CAPTION_REGIONS, f"{PY} -c pass", "p", 8, timeout_s=60)

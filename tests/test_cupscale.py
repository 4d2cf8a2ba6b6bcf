"""C-Upscale end to end on a tiny random SD3 pipeline: copied models, RAP, composer, tiled VAE, CLI."""

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cupscale as cu
from common.io import run_cli
from tiny_pipelines import make_sd3_pipeline

PROMPT = "a photo of cat sitting on mat"
# Tiny pipeline: VAE factor 2, patch 2, so sizes are multiples of 4 px. Regions 64 px (32 latent px,
# 16x16 tokens) with 32 px overlap; VAE tiles of 128 px (64 in the 4x test); 6-step schedule, cut as
# diffusers does at strength 0.45: int(6 - 2.7) = 3, so 3 steps run.
TINY = ["--region-size", "64", "--region-overlap", "32", "--vae-tile", "128", "--vae-overlap", "16", "--steps", "6",
        "--region-batch", "16", "--device", "cpu", "--dtype", "fp32"]
CONFIG = cu.CUpscaleConfig(vae_scale=2, region_px=64, overlap_px=32, num_steps=6, region_batch=16, vae_tile_px=64, vae_overlap_px=16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def pipe(folder):
    return cu.load_sd3_pipeline(folder, "cpu", torch.float32)


@pytest.fixture(scope="module")
def lr_path(tmp_path_factory):
    """A smooth 64x64 input (random 8x8 colours, bicubic-upsampled)."""
    colours = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    image = F.interpolate(colours, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)[0]
    path = tmp_path_factory.mktemp("lr") / "lr.png"
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def conditions(pipe):
    return cu.encode_conditions(pipe, PROMPT, "")


def region_prompt_file(path, rows, cols, text="red rocket over tokyo at dawn"):
    path.write_text(json.dumps({f"{r},{c}": f"{text} {r} {c}" for r in range(rows) for c in range(cols)}))
    return path


def pixels(path):
    return torch.tensor(__import__("numpy").array(Image.open(path).convert("RGB")), dtype=torch.float32)


# ----------------------------------------------------------------------------- the copies


def test_copied_models_equal_diffusion4k(folder, pipe):
    import diffusion4k as d4k

    transformer = d4k.load_sd3(folder, torch.float32)
    vae = d4k.load_vae(folder, torch.float32, stride=1)
    encoders, tokenizers = d4k.load_text_encoders("sd3", folder, torch.float32, transformer)
    theirs = d4k.Pipeline("sd3", transformer, vae, encoders, tokenizers, torch.device("cpu"), torch.float32, str(folder))
    assert type(pipe.transformer) is not type(transformer)  # two separate definitions
    prompts = [PROMPT, "lighthouse at dawn", ""]
    ours_text, their_text = cu.encode_prompts(pipe, prompts), d4k.encode_prompts(theirs, prompts)
    for a, b in zip(ours_text, their_text):
        assert torch.equal(a["context"], b["context"]) and torch.equal(a["pooled"], b["pooled"])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 24, 16, generator=g), torch.tensor([500.0, 80.0])
    context, pooled = torch.cat([c["context"] for c in ours_text[:2]]), torch.cat([c["pooled"] for c in ours_text[:2]])
    assert torch.equal(pipe.transformer(x, t, context, pooled), transformer(x, t, context, pooled))
    image = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    assert torch.equal(pipe.vae.encode(image), vae.encode(image))
    assert torch.equal(pipe.vae.decode(x[:1]), vae.decode(x[:1]))


# ----------------------------------------------------------------------------- RAP


def full_grid_prior(lr_map, canvas_tokens, region, patch=2):
    """The reference: F.interpolate the whole LR map to the HR token grid, then crop the region."""
    grid = F.interpolate(lr_map.permute(0, 3, 1, 2), size=canvas_tokens, mode="bilinear", align_corners=False)
    crop = grid[..., region.top // patch : (region.top + region.height) // patch, region.left // patch : (region.left + region.width) // patch]
    return crop.permute(0, 2, 3, 1).flatten(1, 2)  # (H, tokens, T)


def test_interpolation_matrix_is_f_interpolate():
    x = torch.randn(7, 5, dtype=torch.float64)
    for size in (3, 7, 16, 29):
        expected = F.interpolate(x.T[None], size=size, mode="linear", align_corners=False)[0].T
        assert torch.allclose(cu.interpolation_matrix(size, 7) @ x, expected, atol=1e-12)


def test_lr_pass_keeps_each_blocks_text_distribution(pipe, conditions):
    model, lr = pipe.transformer, torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    maps = cu.capture_text_attention(model, lr, 0.6, conditions["global"])
    heads, text = model.config.num_heads, conditions["global"]["context"].shape[1]
    assert text == 333 and len(maps) == model.config.depth
    assert all(m.shape == (heads, 8, 12, text) for m in maps)
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in maps)
    seen = []  # the same pass with a hook that computes the softmax over text keys from scratch

    def make_attend(index):
        def attend(q, k, v, num_context):
            logits = q[0, :, num_context:] @ k[0, :, :num_context].transpose(-1, -2) / q.shape[-1] ** 0.5
            seen.append(torch.softmax(logits, -1).unflatten(1, (8, 12)))
            return cu.attention(q, k, v)
        return attend

    with cu.attention_hook(model, make_attend):
        model(lr, torch.tensor([600.0]), conditions["global"]["context"], conditions["global"]["pooled"])
    for mine, reference in zip(maps, seen):
        assert torch.allclose(mine, reference, atol=1e-6)
    assert "attend" not in vars(model.joint_blocks[0])  # the hook is gone


def test_region_prior_shapes_and_crop(pipe, conditions):
    maps = cu.capture_text_attention(pipe.transformer, torch.randn(1, 4, 16, 24), 0.6, conditions["global"])
    regions = cu.plan_regions(64, 48, 32, 16)  # a non-square canvas: 3x2 regions of 16x16 tokens
    interpolation = cu.region_interpolation(regions, (32, 24), (8, 12), 2)
    assert len(regions) == 6
    for region in regions:
        prior = cu.region_prior(maps[1], *interpolation[region.key])
        assert prior.shape == (2, 16 * 16, 333)
        assert torch.allclose(prior.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.allclose(prior, full_grid_prior(maps[1], (32, 24), region), atol=1e-6)


def brute_force(q, k, v, num_context, text_distribution=None):
    """Joint attention by explicit softmax; the image queries' text part replaced by m * A when given."""
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
    if text_distribution is not None:
        mass = probs[:, num_context:, :num_context].sum(-1, keepdim=True)
        probs = probs.clone()
        probs[:, num_context:, :num_context] = mass * text_distribution
    return probs @ v


def regional_setup(pipe, conditions, seed=3):
    g = torch.Generator().manual_seed(seed)
    canvas, lr = torch.randn(4, 64, 64, generator=g), torch.randn(1, 4, 32, 32, generator=g)
    regions = cu.plan_regions(64, 64, 32, 16)[2:5]  # three regions of a 3x3 grid, across two rows
    maps = cu.capture_text_attention(pipe.transformer, lr, 0.5, conditions["global"])
    return canvas, regions, maps, cu.region_interpolation(cu.plan_regions(64, 64, 32, 16), (32, 32), (16, 16), 2)


def recording(calls, function):
    """`function` (an attention) that also records each call's q, k, v, keyword arguments and output."""
    def run(q, k, v, *args, **kwargs):
        out = function(q, k, v, *args, **kwargs)
        calls.append(dict(q=q, k=k, v=v, kwargs=kwargs, out=out.clone()))
        return out
    return run


def test_rap_on_the_text_attention_used_is_the_cropped_interpolated_prior(pipe, conditions, monkeypatch):
    canvas, regions, maps, interpolation = regional_setup(pipe, conditions)
    calls, n, text = [], len(regions), 333
    monkeypatch.setattr(cu, "regional_attention", recording(calls, cu.regional_attention))
    with_rap = cu.denoise_regions(pipe.transformer, canvas, regions, 0.5, conditions, CONFIG, torch.float32, maps, interpolation)
    assert len(calls) == pipe.transformer.config.depth
    worst = 0.0
    for call in calls:
        for i, region in enumerate(regions):
            q, k, v = call["q"][n + i], call["k"][n + i], call["v"][n + i]  # region i's global-prompt row
            expected = full_grid_prior(maps[call["kwargs"]["block"]], (32, 32), region)
            own = torch.softmax(q[:, text:] @ k[:, :text].transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
            assert not torch.allclose(expected, own, atol=1e-3)  # RAP really changes something
            reference = brute_force(q, k, v, text, expected)
            worst = max(worst, (call["out"][n + i] - reference).abs().max().item())
    print(f"[rap] max |attention output - brute-force joint softmax with m*A| = {worst:.2e}")
    assert worst < 1e-5
    without = cu.denoise_regions(pipe.transformer, canvas, regions, 0.5, conditions, CONFIG, torch.float32)
    assert (with_rap - without).abs().max() > 1e-3


def test_rap_off_the_text_attention_used_is_the_regions_own(pipe, conditions, monkeypatch):
    canvas, regions, _, _ = regional_setup(pipe, conditions)
    plain = cu.denoise_regions(pipe.transformer, canvas, regions, 0.5, conditions, CONFIG, torch.float32)
    calls = []
    monkeypatch.setattr(cu, "attention", recording(calls, cu.attention))
    recorded = cu.denoise_regions(pipe.transformer, canvas, regions, 0.5, conditions, CONFIG, torch.float32)
    assert len(calls) == pipe.transformer.config.depth  # each joint block's plain attention, no regional hook
    for call in calls:
        for q, k, v, out in zip(call["q"], call["k"], call["v"], call["out"]):
            assert torch.allclose(out, brute_force(q, k, v, 333), atol=1e-5)
    assert torch.equal(recorded, plain)


# ----------------------------------------------------------------------------- composer


def test_composer_reduces_to_plain_regional_denoising(pipe, conditions):
    canvas, regions, _, _ = regional_setup(pipe, conditions)
    model = copy.deepcopy(pipe.transformer).double()  # in fp64 the batch layout's rounding cannot hide a real difference
    plain = cu.denoise_regions(model, canvas.double(), regions, 0.5, conditions, CONFIG, torch.float64)
    same = dict(conditions, regions={r.key: conditions["global"] for r in regions})
    composed = cu.denoise_regions(model, canvas.double(), regions, 0.5, same, CONFIG, torch.float64)
    error, size = (composed - plain).abs().max().item(), plain.abs().max().item()
    print(f"[composer] identical prompts, RAP off, fp64: max |composed - plain| = {error:.2e} (velocity magnitude {size:.1f})")
    assert error <= 1e-12 * size
    plain = cu.denoise_regions(pipe.transformer, canvas, regions, 0.5, conditions, CONFIG, torch.float32)
    other = cu.encode_conditions(pipe, PROMPT, "", {r.key: f"red rocket over tokyo {i}" for i, r in enumerate(regions)})
    assert (cu.denoise_regions(pipe.transformer, canvas, regions, 0.5, other, CONFIG, torch.float32) - plain).abs().max() > 1e-3


# ----------------------------------------------------------------------------- tiled VAE


@pytest.mark.parametrize("fn, ratio", [(lambda x: x, 1), (lambda x: F.avg_pool2d(x, 2), 0.5), (lambda x: F.interpolate(x, scale_factor=2.0), 2)])
def test_tiled_blending_is_exact_for_local_maps(fn, ratio):
    x = torch.randn(1, 3, 40, 72, generator=torch.Generator().manual_seed(4))
    tiled = cu.tiled_vae(fn, x, 16, 4, "cpu", torch.float32)
    assert tiled.shape[-2:] == (40 * ratio, 72 * ratio)
    assert torch.allclose(tiled, fn(x), atol=1e-6)  # weights sum to one everywhere, nothing is left out


def test_tiled_vae_on_the_real_decoder(pipe):
    z = torch.randn(1, 4, 48, 40, generator=torch.Generator().manual_seed(5))
    whole = pipe.vae.decode(z)
    assert torch.equal(cu.tiled_vae(pipe.vae.decode, z, 64, 8, "cpu", torch.float32), whole)  # fits one tile: plain
    tiled = cu.tiled_vae(pipe.vae.decode, z, 24, 8, "cpu", torch.float32)
    error = (tiled - whole).abs()
    print(f"[vae] tiled decode (24 latent px tiles, 8 overlap) vs whole: max {error.max():.3f}, mean {error.mean():.4f}, "
          f"output range {whole.abs().max():.2f}")
    assert tiled.shape == whole.shape


# ----------------------------------------------------------------------------- end to end (CLI)


def upscale_cli(folder, lr_path, output, *extra, scale=2, prompt=PROMPT):
    cu.main(["--input", str(lr_path), "--prompt", prompt, "--scale", str(scale), "--output", str(output), "--model", str(folder), *TINY, *extra])
    return output


def test_cli_2x_writes_the_png_and_the_same_seed_gives_the_same_bytes(folder, lr_path, tmp_path, capsys):
    output = upscale_cli(folder, lr_path, tmp_path / "hr.png")
    image = Image.open(output)
    assert image.size == (128, 128) and image.mode == "RGB"
    settings = json.loads(image.text["settings"])
    assert image.text["prompt"] == PROMPT and image.text["seed"] == "0" and settings["steps_run"] == 3
    assert settings["gsp"] and settings["rap"] and not settings["rsp"]
    assert settings["noise_level"] == "diffusers-strength" and settings["gsp_normalisation"] == "sum"
    assert settings["start_sigma"] == pytest.approx(cu.sd3_sigmas(6).float()[3].item(), abs=1e-6)
    regions = json.loads((tmp_path / "hr.regions.json").read_text())
    assert len(regions["regions"]) == 9 and regions["rsp"] is False
    err = capsys.readouterr().err
    assert "RSP (regional semantic prior) off: no --region-prompts or --caption-cmd" in err
    assert err.index("RSP (regional semantic prior)") < err.index("upscaling 64x64")  # said before the work
    assert upscale_cli(folder, lr_path, tmp_path / "again.png").read_bytes() == output.read_bytes()


def test_cli_4x_with_tiled_vae(folder, lr_path, tmp_path):
    output = upscale_cli(folder, lr_path, tmp_path / "hr.png", "--vae-tile", "64", scale=4)  # 25 VAE tiles in, 25 out
    assert Image.open(output).size == (256, 256)
    assert len(json.loads((tmp_path / "hr.regions.json").read_text())["regions"]) == 49


def test_each_ablation_switch_changes_the_output_and_gsp_step_zero_is_no_gsp(folder, lr_path, tmp_path):
    prompts = ["--region-prompts", str(region_prompt_file(tmp_path / "regions.json", 3, 3))]
    full = pixels(upscale_cli(folder, lr_path, tmp_path / "full.png", *prompts))
    assert json.loads((tmp_path / "full.regions.json").read_text())["regions"][4]["prompt"] == "red rocket over tokyo at dawn 1 1"
    outputs = {}
    for switch in (["--no-gsp"], ["--no-rap"], ["--no-rsp"], ["--mode", "multidiffusion"]):
        outputs[switch[-1]] = pixels(upscale_cli(folder, lr_path, tmp_path / f"{switch[-1]}.png", *prompts, *switch))
        difference = (outputs[switch[-1]] - full).abs()
        print(f"[ablation] {' '.join(switch)}: mean |difference| {difference.mean():.2f} of 255, max {difference.max():.0f}")
        assert difference.max() > 0
    assert not torch.equal(outputs["multidiffusion"], outputs["--no-gsp"])
    zero = pixels(upscale_cli(folder, lr_path, tmp_path / "zero.png", *prompts, "--gsp-step-size", "0"))
    assert torch.equal(zero, outputs["--no-gsp"])


def test_cli_noise_level_and_gsp_normalisation_are_used_recorded_and_said(folder, lr_path, tmp_path, capsys):
    prompts = ["--region-prompts", str(region_prompt_file(tmp_path / "regions.json", 1, 1))]  # scale 1: 1 region
    output = upscale_cli(folder, lr_path, tmp_path / "hr.png", *prompts, "--noise-level", "snr-matched",
                         "--gsp-normalisation", "sdxl", scale=1)
    settings = json.loads(Image.open(output).text["settings"])
    assert settings["noise_level"] == "snr-matched" and settings["gsp_normalisation"] == "sdxl"
    assert settings["steps_run"] == 2  # int(0.45 * 6)
    assert settings["start_sigma"] == pytest.approx(cu.flow_sigma_for_sdxl_strength(0.45), abs=2e-6)
    err = capsys.readouterr().err
    assert "RSP (regional semantic prior) on: 1 regional prompts from" in err
    assert "1 regions x 2 steps from sigma 0.578 (snr-matched; GSP on, RAP on, RSP on)" in err


def test_each_gsp_normalisation_scales_the_guidance_it_adds(pipe, conditions):
    # One region, 3 steps: the change GSP makes to the sampled latent, against no GSP, under each reading.
    lr = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(7))

    def sample(**changes):
        config = dataclasses.replace(CONFIG, rap=False, **changes)
        generator = torch.Generator().manual_seed(0)
        return cu.sample_regions(pipe.transformer, lr, lr, conditions, config, torch.float32, generator)

    none = sample(gsp=False)
    change = {name: (sample(gsp_normalisation=name) - none).norm().item() for name in cu.GSP_NORMALISATIONS}
    print(f"[gsp] |change| against no GSP: {change}")
    # mean: the step is 2 / (4 * 16 * 16) = 0.002 of the default's (the model's reaction bends it a little);
    # sdxl: larger than the default, by 1 / alpha_bar > 1 at every step
    assert 0.5 * 2 / 1024 < change["mean"] / change["sum"] < 2 * 2 / 1024 and change["sum"] < change["sdxl"]


# ----------------------------------------------------------------------------- bad input


def run(folder, lr_path, output, *extra, prompt=PROMPT, scale=2):
    argv = ["--input", str(lr_path), "--prompt", prompt, "--scale", str(scale), "--output", str(output), "--model", str(folder), *TINY, *extra]
    return run_cli(cu.main, argv)


def test_region_prompt_file_that_does_not_match_is_named(folder, lr_path, tmp_path, capsys):
    wrong = region_prompt_file(tmp_path / "wrong.json", 2, 3)  # the 2x target has 3x3 regions
    assert run(folder, lr_path, tmp_path / "hr.png", "--region-prompts", str(wrong)) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "missing regions 2,0, 2,1, 2,2" in error and str(wrong) in error
    assert not (tmp_path / "hr.png").exists()


def test_failing_caption_command_is_named_then_fatal_or_rsp_off_and_no_prompt_is_a_note(folder, lr_path, tmp_path, capsys):
    command = f"{__import__('sys').executable} -c \"import sys; sys.exit('no llava here: ' + sys.argv[1][-14:])\" {{image}}"
    assert run(folder, lr_path, tmp_path / "hr.png", "--caption-cmd", command) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: region 0,0: caption command failed with exit code 1") and "no llava here" in error
    assert not (tmp_path / "hr.png").exists()
    # and the run without a prompt is allowed, with a note
    assert run(folder, lr_path, tmp_path / "hr.png", "--caption-cmd", command, "--caption-failure", "rsp-off", prompt="") == 0
    err = capsys.readouterr().err
    assert "RSP (regional semantic prior) on: captioning 9 regions" in err and "no --prompt" in err
    assert "RSP (regional semantic prior) off (--caption-failure rsp-off)" in err
    assert json.loads((tmp_path / "hr.regions.json").read_text())["rsp"] is False


def test_caption_command_gives_the_regional_prompts(folder, lr_path, tmp_path):
    command = f"{__import__('sys').executable} -c \"import sys; print('lighthouse at dawn', sys.argv[1][-8:-4])\" {{image}}"
    assert run(folder, lr_path, tmp_path / "hr.png", "--caption-cmd", command) == 0
    record = json.loads((tmp_path / "hr.regions.json").read_text())
    assert record["rsp"] and record["regions"][5]["prompt"] == "lighthouse at dawn _1_2" and record["regions"][5]["box"] == [64, 32, 128, 96]


def test_model_geometry_from_configs_and_from_a_single_files_headers(folder, pipe, tmp_path):
    from safetensors.torch import save_file

    state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    state.update({f"first_stage_model.{k}": v.contiguous() for k, v in pipe.vae.state_dict().items()})
    save_file(state, tmp_path / "sd3_tiny.safetensors")
    expected = (pipe.vae.config.downsample_factor, 2, pipe.transformer.config.pos_embed_max_size)
    assert cu.model_geometry(folder) == cu.model_geometry(tmp_path / "sd3_tiny.safetensors") == expected == (2, 2, 32)


def test_overwrite_replaces_the_image_and_its_sidecar_together(folder, lr_path, tmp_path):
    (tmp_path / "hr.png").write_bytes(b"old image")
    (tmp_path / "hr.regions.json").write_text("old record")
    upscale_cli(folder, lr_path, tmp_path / "hr.png", "--overwrite", "--steps", "2", scale=1)  # 1 region, 1 step
    assert Image.open(tmp_path / "hr.png").size == (64, 64)
    assert json.loads((tmp_path / "hr.regions.json").read_text())["regions"][0]["box"] == [0, 0, 64, 64]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hr.png", "hr.regions.json"]  # no temporary file


def test_rap_pass_size_is_bounded_by_the_native_area_and_the_position_table():
    assert cu.rap_size(1024, 1024, 1024, 16, 3072) == (1024, 1024)
    assert cu.rap_size(2048, 2048, 1024, 16, 3072) == (1024, 1024)  # scale 2 from a 2K input: the native 1024^2
    assert cu.rap_size(512, 768, 1024, 16, 3072) == (512, 768)  # never enlarged
    assert cu.rap_size(4000, 250, 1024, 16, 3072) == (3072, 192)  # the long side fits SD3-Medium's 192 patches

"""Diffusion-4K sampling: schedules and whole pipelines against diffusers, and the CLI end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion4k as d4k
from conftest import report
from tiny_pipelines import make_flux_pipeline, make_sd3_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return make_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe")


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
    return make_flux_pipeline(tmp_path_factory.mktemp("schnell") / "pipe", guidance=False, seed=7)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return make_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


# ------------------------------------------------------------------------------ schedules


def test_flux_mu_matches_the_documented_values():
    assert d4k.flux_mu(256) == pytest.approx(0.5) and d4k.flux_mu(4096) == pytest.approx(1.15)
    assert d4k.flux_mu(16384) == pytest.approx(3.23, abs=0.005)  # 2048^2 F8, or 4096^2 with the F16 VAE
    assert d4k.flux_mu(65536) == pytest.approx(11.55, abs=0.005)  # 4096^2 with the F8 VAE
    # uncapped, the F8 4K schedule collapses: all but the last step stay at sigma ~ 1
    collapsed = d4k.flux_sigmas(28, 65536, mu=d4k.flux_mu(65536))
    assert (collapsed[:-2] > 0.999).all()
    capped = d4k.flux_sigmas(28, 65536)
    assert torch.allclose(capped, d4k.flux_sigmas(28, 16384)) and capped[-2] < 0.5 < collapsed[-2]


@pytest.mark.parametrize("tokens", [64, 1024, 4096, 16384])
def test_flux_sigmas_match_diffusers_dynamic_shift(tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    steps = 28
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = d4k.flux_sigmas(steps, tokens)
    assert mu == pytest.approx(d4k.flux_mu(tokens), abs=1e-9)
    assert (ours - scheduler.sigmas.double()).abs().max() < 1e-6


def test_schnell_and_sd3_sigmas_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    schnell = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    schnell.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    assert (d4k.flux_sigmas(4, 4096, shift=False) - schnell.sigmas.double()).abs().max() < 1e-7
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for steps in (4, 28, 50):
        sd3.set_timesteps(steps)
        assert (d4k.sd3_sigmas(steps) - sd3.sigmas.double()).abs().max() < 1e-6


def test_euler_integrates_a_straight_flow_exactly():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    velocity = lambda z, sigma: noise - x0  # noqa: E731  the exact rectified-flow velocity
    out = d4k.euler_sample(velocity, noise.clone(), d4k.flux_sigmas(7, 4096))
    assert torch.allclose(out, x0, atol=1e-5)


# --------------------------------------------------------------- pipelines vs diffusers


def diffusers_image(pipe, **kwargs):
    with torch.no_grad():
        return pipe(output_type="pt", **kwargs).images[0]


def test_flux_pipeline_matches_diffusers(flux_folder):
    from diffusers import FluxPipeline

    ours = d4k.load_pipeline(str(flux_folder), vae="f8", device="cpu", dtype=torch.float32)
    height, width, steps, guidance, seed, prompt = 64, 48, 4, 4.0, 3, "a photo of a cat on a mat"
    image = d4k.generate(ours, d4k.encode_prompts(ours, [prompt])[0], height, width, steps, guidance, seed)

    reference = FluxPipeline.from_pretrained(flux_folder, torch_dtype=torch.float32)
    noise = torch.randn(1, 4, height // 2, width // 2, generator=torch.Generator().manual_seed(seed))
    expected = diffusers_image(reference, prompt=prompt, height=height, width=width, num_inference_steps=steps,
                               guidance_scale=guidance, latents=d4k.pack_latents(noise))
    assert report("flux pipeline image", (image + 1) / 2, expected) < 1e-4


def test_schnell_pipeline_matches_diffusers(schnell_folder):
    from diffusers import FluxPipeline

    ours = d4k.load_pipeline(str(schnell_folder), vae="f8", device="cpu", dtype=torch.float32)
    assert ours.schnell and ours.tokenizers["t5"].max_length == 256
    image = d4k.generate(ours, d4k.encode_prompts(ours, ["red rocket over tokyo"])[0], 48, 64, 4, 0.0, 1)
    reference = FluxPipeline.from_pretrained(schnell_folder, torch_dtype=torch.float32)
    noise = torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(1))
    expected = diffusers_image(reference, prompt="red rocket over tokyo", height=48, width=64, num_inference_steps=4,
                               guidance_scale=0.0, max_sequence_length=256, latents=d4k.pack_latents(noise))
    assert report("flux schnell pipeline image", (image + 1) / 2, expected) < 1e-4


def test_sd3_pipeline_matches_diffusers(sd3_folder):
    from diffusers import StableDiffusion3Pipeline

    ours = d4k.load_pipeline(str(sd3_folder), vae="f8", device="cpu", dtype=torch.float32)
    prompt, negative = "a lighthouse at dawn", "cat"
    condition, uncondition = d4k.encode_prompts(ours, [prompt, negative])
    image = d4k.generate(ours, condition, 64, 48, 4, 5.0, 2, negative=uncondition)

    reference = StableDiffusion3Pipeline.from_pretrained(sd3_folder, torch_dtype=torch.float32)
    noise = torch.randn(1, 4, 32, 24, generator=torch.Generator().manual_seed(2))
    expected = diffusers_image(reference, prompt=prompt, negative_prompt=negative, height=64, width=48,
                               num_inference_steps=4, guidance_scale=5.0, latents=noise)
    assert report("sd3 pipeline image", (image + 1) / 2, expected) < 1e-4


def test_sd3_refuses_sizes_beyond_its_position_table(sd3_folder):
    pipe = d4k.load_pipeline(str(sd3_folder), vae="f8", device="cpu", dtype=torch.float32)
    limit = 32 * 2 * 2  # 32 stored positions x patch 2 x VAE factor 2
    assert d4k.check_size(pipe, limit, limit) == (limit, limit)
    with pytest.raises(d4k.UserError, match="position table"):
        d4k.check_size(pipe, limit + 4, limit)
    pipe16 = d4k.load_pipeline(str(sd3_folder), vae="f16", device="cpu", dtype=torch.float32)
    assert d4k.check_size(pipe16, 2 * limit, 2 * limit) == (2 * limit, 2 * limit)  # the F16 VAE doubles the reach


# ------------------------------------------------------------------------------ the CLI


def run_cli(*args):
    """The real command line, in a fresh interpreter."""
    return subprocess.run([sys.executable, str(ROOT / "diffusion4k.py"), *map(str, args)], capture_output=True, text=True)


def run_main(capsys, *args):
    """The same entry point in this process (fast): (exit code, stderr)."""
    code = d4k.run_cli(d4k.main, list(map(str, args)))
    return code, capsys.readouterr().err


def test_cli_writes_the_requested_size_reproducibly(flux_folder, tmp_path):
    common = ["--model", flux_folder, "--prompt", "a lighthouse at dawn", "--height", 64, "--width", 96, "--steps", 2, "--seed", 5]
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    assert run_cli(*common, "--output", first).returncode == 0
    result = run_cli(*common, "--output", second)
    assert result.returncode == 0, result.stderr
    assert first.read_bytes() == second.read_bytes()
    image = Image.open(first)
    assert image.size == (96, 64) and image.mode == "RGB"
    settings = json.loads(image.text["settings"])
    assert image.text["prompt"] == "a lighthouse at dawn" and settings["seed"] == 5 and settings["vae"] == "f16"
    assert run_cli(*common, "--output", first).returncode == 2  # exists, no --overwrite


def test_cli_prompt_file_writes_numbered_images_and_metadata(sd3_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse at dawn\n\nred rocket over tokyo\n")
    out = tmp_path / "out"
    code, err = run_main(capsys, "--model", sd3_folder, "--prompts", prompts, "--output-dir", out, "--height", 64, "--width", 64, "--steps", 2,
                     "--negative-prompt", "cat")
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == ["00000.png", "00001.png"]
    assert [r["text"] for r in records] == ["a lighthouse at dawn", "red rocket over tokyo"]
    assert [r["seed"] for r in records] == [0, 1] and records[0]["negative_prompt"] == "cat"
    assert all(Image.open(out / r["file_name"]).size == (64, 64) for r in records)


def test_cli_jsonl_prompts_are_named_after_their_file_names(flux_folder, tmp_path, capsys):
    """Aesthetic-4K's metadata.jsonl as --prompts: <stem of file_name>.png; --seed-per-prompt same
    gives every prompt --seed (upstream's evaluation), so one prompt written twice gives one image twice."""
    lines = [{"file_name": "eval/0001.jpg", "text": "a lighthouse at dawn"},
             {"file_name": "0002.JPEG", "text": "a cat"},
             {"file_name": "0003.jpg", "text": "a lighthouse at dawn"}]
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    common = ["--model", flux_folder, "--prompts", metadata, "--output-dir", out,
              "--height", 32, "--width", 32, "--steps", 1]
    code, err = run_main(capsys, *common, "--seed", 7, "--seed-per-prompt", "same")
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(r["file_name"], r["text"], r["seed"]) for r in records] == [
        ("0001.png", "a lighthouse at dawn", 7), ("0002.png", "a cat", 7),
        ("0003.png", "a lighthouse at dawn", 7)]
    assert (out / "0001.png").read_bytes() == (out / "0003.png").read_bytes()
    # increment (the default): the i-th prompt gets seed + i; --skip-existing finishes a named batch
    (out / "0003.png").unlink()
    code, err = run_main(capsys, *common, "--seed", 7, "--skip-existing")
    assert code == 0 and "0001.png exists; skipped" in err, err
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [7, 7, 9]
    assert (out / "0001.png").read_bytes() != (out / "0003.png").read_bytes()


def test_f16_decode_option_reaches_the_decoder(flux_folder, tmp_path, capsys, monkeypatch):
    """--f16-decode sets Decoder.partitioned for the decode and is recorded in the PNG; the
    partitioned image is the centred one moved one pixel down and right."""
    seen = []
    real = d4k.generate

    def spy(pipe, *args, **kwargs):
        seen.append(pipe.vae.decoder.partitioned)
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(d4k, "generate", spy)
    images = {}
    for mode in ("partitioned", "centred"):
        output = tmp_path / f"{mode}.png"
        code, err = run_main(capsys, "--model", flux_folder, "--prompt", "a red rocket", "--height", 48,
                             "--width", 64, "--steps", 1, "--f16-decode", mode, "--output", output)
        assert code == 0, err
        assert json.loads(Image.open(output).text["settings"])["f16_decode"] == mode
        images[mode] = np.asarray(Image.open(output)).astype(int)
    assert seen == [True, False]
    moved = np.abs(images["partitioned"][1:, 1:] - images["centred"][:-1, :-1])
    assert moved.max() <= 1 and np.abs(images["partitioned"] - images["centred"]).mean() > 10 * moved.mean()


def test_cli_bad_input(flux_folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, err = run_main(capsys, "--model", flux_folder, "--prompts", empty)
    assert code == 2 and "no prompts" in err and err.count("\n") == 1

    code, err = run_main(capsys, "--model", tmp_path / "nothing-here", "--prompt", "x")
    assert code == 2 and "nothing-here" in err

    output = tmp_path / "odd.png"
    code, err = run_main(capsys, "--model", flux_folder, "--prompt", "cat", "--height", 70, "--width", 50, "--steps", 1, "--output", output)
    assert code == 0 and "not a multiple of 8" in err
    assert Image.open(output).size == (48, 72)

    code, err = run_main(capsys, "--model", flux_folder, "--prompt", "cat", "--height", 99999, "--width", 64)
    assert code == 2 and "16384" in err

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    code, err = run_main(capsys, "--model", flux_folder, "--prompt", "cat", "--height", 32, "--width", 32, "--steps", 1,
                         "--output", blocked / "x.png")
    assert code == 2 and "cannot write" in err and not list(tmp_path.glob("**/*.tmp"))


def test_offload_modes_give_the_same_image(flux_folder, tmp_path, capsys):
    """On the CPU the moves are no-ops, but every offloading code path runs and must not change a pixel."""
    outputs = []
    for mode in ("none", "model", "blocks"):
        output = tmp_path / f"{mode}.png"
        code, err = run_main(capsys, "--model", flux_folder, "--prompt", "cat at dawn", "--height", 32, "--width", 48,
                             "--steps", 2, "--offload", mode, "--output", output)
        assert code == 0, err
        outputs.append(output.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_tiled_decode_is_close_to_the_whole_decode_and_covers_the_image(flux_folder, tmp_path, capsys):
    pipe = d4k.load_pipeline(str(flux_folder), vae="f8", device="cpu", dtype=torch.float32)
    condition = d4k.encode_prompts(pipe, ["a photo of a cat"])[0]
    whole = d4k.generate(pipe, condition, 64, 96, 2, 3.5, 0, vae_tile=0)
    tiled = d4k.generate(pipe, condition, 64, 96, 2, 3.5, 0, vae_tile=16)  # 16 latent px = 32 px tiles, 3 x 2 of them
    assert tiled.shape == whole.shape == (3, 64, 96)
    error = report("tiled vs whole decode", tiled, whole)
    assert error < 0.05 and (tiled - whole).abs().mean() < 0.005  # measured 0.010 / 0.0015; GroupNorm / attention see one tile at a time
    code, err = run_main(capsys, "--model", flux_folder, "--prompt", "cat", "--height", 64, "--width", 96, "--steps", 1,
                         "--vae-tile", 16, "--output", tmp_path / "tiled.png")
    assert code == 0, err


def test_single_file_layouts_give_the_same_image_as_the_folders(tmp_path, capsys):
    """BFL `flux1-*.safetensors` + `ae.safetensors`, and Stability's all-in-one SD3 file (MMDiT, VAE
    and text encoders under their prefixes), written from the same weights as a diffusers
    folder, must give the same bytes as that folder."""
    from safetensors.torch import save_file

    def original(module):
        return {key: value.contiguous() for key, value in module.state_dict().items()}

    flux = make_flux_pipeline(tmp_path / "flux", real_heads=True, seed=3)
    save_file(original(d4k.load_flux(flux, torch.float32)), tmp_path / "flux1-tiny.safetensors")
    save_file(original(d4k.load_vae(flux, torch.float32)), tmp_path / "ae.safetensors")

    sd3 = make_sd3_pipeline(tmp_path / "sd3", real_heads=True, seed=4)
    everything = {f"model.diffusion_model.{k}": v for k, v in original(d4k.load_sd3(sd3, torch.float32)).items()}
    everything.update({f"first_stage_model.{k}": v for k, v in original(d4k.load_vae(sd3, torch.float32)).items()})
    for name, subfolder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        encoder = d4k.load_clip(sd3, torch.float32, subfolder=subfolder)
        everything.update({f"text_encoders.{name}.transformer.{k}": v for k, v in original(encoder).items()})
    t5 = d4k.load_t5(sd3, torch.float32, subfolder="text_encoder_3")
    everything.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in original(t5).items()})
    save_file(everything, tmp_path / "sd3_tiny_incl_clips_t5.safetensors")
    empty = tmp_path / "tokenizers-only"  # the tokenizers come from a folder without any weights
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        (empty / name).mkdir(parents=True)
        for file in (sd3 / name).iterdir():
            (empty / name / file.name).write_bytes(file.read_bytes())

    common = ["--prompt", "a red rocket", "--height", 64, "--width", 64, "--steps", 2, "--seed", 9]
    runs = {
        "flux folder": ["--model", flux],
        "flux files": ["--model", tmp_path / "flux1-tiny.safetensors", "--text-encoders", flux, "--vae-weights", tmp_path / "ae.safetensors"],
        "sd3 folder": ["--model", sd3],
        "sd3 file": ["--model", tmp_path / "sd3_tiny_incl_clips_t5.safetensors", "--text-encoders", empty],
    }
    images = {}
    for name, args in runs.items():
        output = tmp_path / f"{name.replace(' ', '_')}.png"
        code, err = run_main(capsys, *args, *common, "--output", output)
        assert code == 0, f"{name}: {err}"
        images[name] = np.asarray(Image.open(output))
    # The layouts run different code (fused vs split projections, swapped halves), so float sums
    # are ordered differently: a rounding step can move a pixel by one level of 255, no more.
    for folder, single in (("flux folder", "flux files"), ("sd3 folder", "sd3 file")):
        worst = np.abs(images[folder].astype(int) - images[single].astype(int)).max()
        assert worst <= 1, f"{single} differs from {folder} by {worst} levels (> 1: not float rounding)"

"""Bad input for the three diffusion4k.py CLIs (generate, train, train-vae): each case must exit
with its code and one clear message (at most 3 lines, no traceback), write no output and leave
every existing file byte-identical. Tiny pipelines are built once; every case runs in process
through `run_cli(main, argv)`, and most fail before any weight is read."""

import io
import json
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffusion4k as d4k
from test_diffusion4k_train import write_dataset
from tiny_pipelines import make_flux_pipeline, make_sd3_pipeline, tiny_vae

INFO = ("loading ", "data: ", "training ", "resumed ")  # progress lines, not part of the message


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second OpenMP thread only slows them down on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny pipelines, and broken variants of the Flux one."""
    root = tmp_path_factory.mktemp("models")
    flux, sd3 = make_flux_pipeline(root / "flux"), make_sd3_pipeline(root / "sd3")

    def variant(name, change):
        shutil.copytree(flux, root / name)
        change(root / name)
        return root / name

    def edit_json(path, **changes):
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    def poison(folder):
        file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        state = load_file(file)
        state["proj_out.weight"][0, 0] = float("nan")
        save_file(state, file)

    tiny_vae(1, 0.3611, 0.1159).save_pretrained(root / "vae")
    shutil.copytree(root / "vae", root / "vae_groups16")
    edit_json(root / "vae_groups16" / "config.json", norm_num_groups=16)
    shutil.copytree(root / "vae", root / "vae_nan")
    vae_file = root / "vae_nan" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.fill_(float("inf")) if k.endswith("conv_out.bias") else v for k, v in load_file(vae_file).items()}, vae_file)
    (root / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    return {
        "flux": flux, "sd3": sd3, "vae": root / "vae", "vae_groups16": root / "vae_groups16", "vae_nan": root / "vae_nan",
        "junk": root / "junk.safetensors", "vae_file": flux / "vae" / "diffusion_pytorch_model.safetensors",
        "not_utf8": variant("not_utf8", lambda f: (f / "model_index.json").write_bytes(b'{"_class_name": "\xff"}')),
        "no_transformer": variant("no_transformer", lambda f: shutil.rmtree(f / "transformer")),
        "groups16": variant("groups16", lambda f: edit_json(f / "vae" / "config.json", norm_num_groups=16)),
        "nan": variant("nan", poison),
    }


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def message_lines(err: str) -> list[str]:
    """stderr without progress bars and progress lines."""
    parts = (part.strip() for part in re.split(r"[\r\n]", err))
    return [part for part in parts if part and not part.startswith(INFO) and not re.search(r"\d+%\||step/s|\?step", part)]


def expect_failure(capsys, argv, expected, work: Path, code=2):
    """Run `argv`; check the exit code, the message and that `work` is exactly as before."""
    before = snapshot(work)
    result = d4k.run_cli(d4k.main, [str(a) for a in argv])
    err = capsys.readouterr().err
    lines = message_lines(err)
    assert "Traceback" not in err, err
    assert result == code, err
    assert lines and len(lines) <= 3 and lines[-1].startswith("error: "), err
    assert expected in lines[-1], (expected, lines)
    assert snapshot(work) == before, "files were written, changed or removed"
    return lines


# ------------------------------------------------------------------------------ generate


def write_prompts(tmp, text="a cat\na red rocket\n"):
    (tmp / "prompts.txt").write_text(text)


JSONL, CAT = ["--prompts", "{tmp}/prompts.jsonl"], {"file_name": "a.jpg", "text": "a cat"}


def write_jsonl(*lines):
    """Set-up: prompts.jsonl from raw lines (dicts are written as JSON)."""
    text = "".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines)
    return lambda tmp: (tmp / "prompts.jsonl").write_text(text)


def no_cuda_device():
    return "cuda:99"


GENERATE = {  # name: (arguments, expected text of the error line, files to create first)
    "height 0": (["--height", 0], "argument --height: must be in [1, 16384], got 0", None),
    "height negative": (["--height", -64], "argument --height", None),
    "width too large": (["--width", 99999], "16384", None),
    "height not a number": (["--height", "tall"], "expected an integer", None),
    "steps 0": (["--steps", 0], "argument --steps: must be >= 1", None),
    "steps negative": (["--steps", -1], "argument --steps", None),
    "guidance nan": (["--guidance", "nan"], "argument --guidance: must be a finite number", None),
    "guidance inf": (["--guidance", "inf"], "finite", None),
    "guidance negative": (["--guidance", -1], "argument --guidance", None),
    "mu nan": (["--mu", "nan"], "argument --mu: must be a finite number", None),
    "mu huge": (["--mu", 1e9], "argument --mu", None),
    "seed too large": (["--seed", 99999999999999999999999], "argument --seed", None),
    "seed negative": (["--seed", -1], "argument --seed", None),
    "seed + prompts beyond 2**64": (["--seed", 2**64 - 1, "--prompts", "{tmp}/prompts.txt", "--output-dir", "{tmp}/out"],
                                    "beyond 2**64", write_prompts),
    "vae tile negative": (["--vae-tile", -1], "argument --vae-tile: must be >= 0", None),
    "unknown vae": (["--vae", "f32"], "argument --vae: invalid choice", None),
    "device banana": (["--device", "banana"], "'banana' is not a device", None),
    "device cuda unavailable": (["--device", no_cuda_device()], "argument --device", None),
    "overwrite and skip-existing": (["--overwrite", "--skip-existing"], "not allowed with", None),
    "no prompt": (["--prompt", ""], "give --prompt TEXT or --prompts FILE", None),
    "output exists": (["--output", "{tmp}/taken.png"], "exists; pass --overwrite",
                      lambda tmp: (tmp / "taken.png").write_bytes(b"keep me")),
    "output extension": (["--output", "{tmp}/image.gif"], "unsupported extension .gif", None),
    "output is a folder": (["--output", "{tmp}/folder"], "is a folder", lambda tmp: (tmp / "folder").mkdir()),
    "output under a file": (["--output", "{tmp}/blocker/x.png"], "is a file, not a folder",
                            lambda tmp: (tmp / "blocker").write_text("x")),
    "batch image exists": (["--prompts", "{tmp}/prompts.txt", "--output-dir", "{tmp}/out"], "00001.png exists",
                           lambda tmp: (write_prompts(tmp), (tmp / "out").mkdir(), (tmp / "out" / "00001.png").write_bytes(b"x"))),
    "batch metadata exists": (["--prompts", "{tmp}/prompts.txt", "--output-dir", "{tmp}/out"], "metadata.jsonl exists",
                              lambda tmp: (write_prompts(tmp), (tmp / "out").mkdir(), (tmp / "out" / "metadata.jsonl").write_text("{}"))),
    "output dir is a file": (["--prompts", "{tmp}/prompts.txt", "--output-dir", "{tmp}/prompts.txt"], "is a file",
                             write_prompts),
    "prompt file empty": (["--prompts", "{tmp}/prompts.txt"], "no prompts", lambda tmp: write_prompts(tmp, "\n  \n")),
    "prompt file not UTF-8": (["--prompts", "{tmp}/prompts.txt"], "not UTF-8",
                              lambda tmp: (tmp / "prompts.txt").write_bytes("café".encode("latin-1"))),
    "prompt file missing": (["--prompts", "{tmp}/missing.txt"], "missing.txt", None),
    "seed per prompt unknown": (["--seed-per-prompt", "random"], "argument --seed-per-prompt: invalid choice",
                                None),
    "f16 decode unknown": (["--f16-decode", "shifted"], "argument --f16-decode: invalid choice", None),
    "jsonl line not JSON": (JSONL, "prompts.jsonl line 2: not JSON", write_jsonl(CAT, "{not json")),
    "jsonl line without text": (JSONL, "line 1: expected an object with a file_name and a non-empty text",
                                write_jsonl({"file_name": "a.jpg"})),
    "jsonl line an array": (JSONL, "line 1: expected an object", write_jsonl("[1, 2]")),
    "jsonl file_name not a string": (JSONL, "line 1: expected an object",
                                     write_jsonl({"file_name": 7, "text": "x"})),
    "jsonl file_name empty": (JSONL, "gives no usable output name",
                              write_jsonl({"file_name": "", "text": "x"})),
    "jsonl two names, one output": (JSONL, "line 3: file_name 'x/a.png' gives the output name a.png of line",
                                    write_jsonl(CAT, "", {"file_name": "x/a.png", "text": "a dog"})),
    "jsonl without prompts": (JSONL, "no prompts", write_jsonl("", "  ")),
    "jsonl image exists": (JSONL + ["--output-dir", "{tmp}/out"], "b.png exists",
                           lambda tmp: (write_jsonl(CAT, {"file_name": "b.jpg", "text": "y"})(tmp),
                                        (tmp / "out").mkdir(), (tmp / "out" / "b.png").write_bytes(b"x"))),
    "model missing": (["--model", "{tmp}/nothing-here"], "no such file or folder", None),
    "text encoders missing": (["--text-encoders", "./no-encoders"], "--text-encoders ./no-encoders", None),
    "vae weights missing": (["--vae-weights", "{tmp}/no-vae"], "--vae-weights", None),
    # these read files
    "model_index.json not UTF-8": (["--model", "{not_utf8}"], "not UTF-8", None),
    "pipeline without transformer/": (["--model", "{no_transformer}"], "has no transformer/ folder", None),
    "VAE config it cannot represent": (["--model", "{groups16}"], "norm_num_groups 16", None),
    "NaN in the weights": (["--model", "{nan}"], "proj_out.weight holds NaN", None),
    "a VAE file as the model": (["--model", "{vae_file}"], "looks like a VAE", None),
    "a broken safetensors file": (["--model", "{junk}"], "not a readable safetensors file", None),
    "SD3 beyond its table with f8": (["--model", "{sd3}", "--vae", "f8", "--height", 256], "(use --vae f16)", None),
    "SD3 beyond its table with f16": (["--model", "{sd3}", "--height", 512], "covers at most 256 px", None),
}


@pytest.mark.parametrize("name", GENERATE)
def test_generate_refuses(name, models, tmp_path, capsys):
    arguments, expected, setup = GENERATE[name]
    if setup is not None:
        setup(tmp_path)
    places = {key: str(value) for key, value in models.items()} | {"tmp": str(tmp_path)}
    argv = ["--model", models["flux"], "--prompt", "a cat", "--height", 32, "--width", 32, "--steps", 1,
            "--output", tmp_path / "out.png", "--device", "cpu", *[str(a).format(**places) for a in arguments]]
    expect_failure(capsys, argv, expected, tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_generate_refuses_an_unwritable_folder(models, tmp_path, capsys):
    (tmp_path / "locked").mkdir(mode=0o555)
    argv = ["--model", models["flux"], "--prompt", "cat", "--output", tmp_path / "locked" / "x.png"]
    expect_failure(capsys, argv, "is not writable", tmp_path)


def test_batch_is_checked_before_loading_and_skip_existing_finishes_it(models, tmp_path, capsys):
    """An existing 00001.png stops the batch before any image is made; --skip-existing then makes
    the others, and metadata.jsonl describes every image (the kept one from its PNG text)."""
    write_prompts(tmp_path, "a cat\na red rocket\na lighthouse\n")
    out = tmp_path / "out"
    common = ["--model", models["flux"], "--prompts", tmp_path / "prompts.txt", "--output-dir", out,
              "--height", 32, "--width", 32, "--steps", 1, "--device", "cpu"]
    assert d4k.run_cli(d4k.main, [str(a) for a in common + ["--seed", 3]]) == 0
    capsys.readouterr()
    kept = (out / "00001.png").read_bytes()
    (out / "00000.png").unlink()
    (out / "metadata.jsonl").unlink()
    expect_failure(capsys, common, "00001.png exists", tmp_path)
    assert d4k.run_cli(d4k.main, [str(a) for a in common + ["--skip-existing", "--seed", 3]]) == 0
    assert "00001.png exists; skipped" in capsys.readouterr().err
    assert (out / "00001.png").read_bytes() == kept
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(r["file_name"], r["text"], r["seed"]) for r in records] == [
        ("00000.png", "a cat", 3), ("00001.png", "a red rocket", 4), ("00002.png", "a lighthouse", 5)]


def test_long_prompts_get_a_note_with_the_tokens_dropped(models, tmp_path, capsys):
    prompt = " ".join(["a photo of a cat sitting on a mat"] * 40)
    argv = ["--model", models["flux"], "--prompt", prompt, "--height", 32, "--width", 32, "--steps", 1,
            "--output", tmp_path / "long.png", "--device", "cpu"]
    assert d4k.run_cli(d4k.main, [str(a) for a in argv]) == 0
    notes = [line for line in message_lines(capsys.readouterr().err) if line.startswith("note:")]
    assert len(notes) == 2 and "CLIP, which reads 77 tokens" in notes[0] and "T5, which reads 512 tokens" in notes[1]
    assert all(re.search(r": \d+ dropped$", note) for note in notes)


def test_a_diffusers_transformer_file_is_recognised_and_loads(models, tmp_path, capsys):
    files = {kind: models[kind] / "transformer" / "diffusion_pytorch_model.safetensors" for kind in ("flux", "sd3")}
    assert {kind: d4k.detect_kind(file) for kind, file in files.items()} == {"flux": "flux", "sd3": "sd3"}
    argv = ["--model", files["flux"], "--text-encoders", models["flux"], "--vae-weights", models["flux"], "--prompt", "cat",
            "--height", 32, "--width", 32, "--steps", 1, "--output", tmp_path / "x.png", "--device", "cpu"]
    assert d4k.run_cli(d4k.main, [str(a) for a in argv]) == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "x.png").size == (32, 32)


def test_unreachable_text_encoders_fail_before_the_transformer_loads(models, tmp_path, capsys, monkeypatch):
    """A single transformer file takes its text encoders from the Hub by default: when they cannot be read
    the run stops before it spends minutes loading 12B weights."""
    monkeypatch.setitem(d4k.TEXT_SOURCES, "flux", str(tmp_path / "no-such-pipeline"))
    file = models["flux"] / "transformer" / "diffusion_pytorch_model.safetensors"
    argv = ["--model", file, "--vae-weights", models["flux"], "--prompt", "cat", "--height", 32, "--width", 32,
            "--steps", 1, "--output", tmp_path / "x.png", "--device", "cpu"]
    assert d4k.run_cli(d4k.main, [str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "no-such-pipeline" in err and "loading flux transformer" not in err, err
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "data")


def truncated_jpeg() -> bytes:
    """A JPEG cut in half: Pillow's verify() accepts it, decoding fails."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def undecodable_data(tmp):
    (tmp / "bad").mkdir()
    (tmp / "bad" / "a.jpg").write_bytes(truncated_jpeg())
    (tmp / "bad" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "a cat"}) + "\n")


def live_lock(folder: Path):
    """The lock a running training run holds (this very process: it is alive)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}")


def fake_checkpoint(tmp, state=b""):
    folder = tmp / "run" / "checkpoints" / "step-00000002"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(state)
    (folder / "trainable.safetensors").write_bytes(b"junk")


TRAIN = {
    "lr 0": (["--lr", 0], "argument --lr: must be in (0, 1], got 0", None),
    "lr inf": (["--lr", "inf"], "argument --lr: must be a finite number", None),
    "lr nan": (["--lr", "nan"], "argument --lr", None),
    "lr huge": (["--lr", 1e30], "argument --lr: must be in (0, 1]", None),
    "steps 0": (["--steps", 0], "argument --steps: must be >= 1", None),
    "batch size 0": (["--batch-size", 0], "argument --batch-size", None),
    "resolution negative": (["--resolution", -1], "argument --resolution", None),
    "warmup negative": (["--warmup-steps", -5], "argument --warmup-steps", None),
    "shift 0": (["--shift", 0], "argument --shift: must be > 0", None),
    "seed negative": (["--seed", -1], "argument --seed", None),
    "device banana": (["--device", "banana"], "argument --device", None),
    "wavelet weights nan": (["--wavelet-weights", "nan,1,1,1"], "--wavelet-weights", None),
    "grad accum 0": (["--grad-accum", 0], "argument --grad-accum: must be >= 1, got 0 (or auto)", None),
    "grad accum not a number": (["--grad-accum", "many"], "argument --grad-accum: expected an integer", None),
    "batch that does not divide upstream's": (["--grad-accum", "auto", "--batch-size", 3],
                                              "1 process(es) x --batch-size 3 does not divide upstream's "
                                              "global batch of 32", None),
    "posterior unknown": (["--posterior", "mode"], "argument --posterior: invalid choice", None),
    "T5 length 0": (["--max-sequence-length", 0], "argument --max-sequence-length: must be in [1, 512]",
                    None),
    "T5 length beyond 512": (["--max-sequence-length", 1024], "argument --max-sequence-length", None),
    "crop 0": (["--crop", "0x32"], "--crop '0x32'", None),
    "output is a file": (["--output", "{tmp}/file"], "is a file", lambda tmp: (tmp / "file").write_text("x")),
    "output not empty": (["--output", "{tmp}/full"], "is not empty",
                         lambda tmp: ((tmp / "full").mkdir(), (tmp / "full" / "mine.txt").write_text("x"))),
    "run without --resume": (["--output", "{tmp}/run"], "pass --resume", fake_checkpoint),
    "output in use by a starting run": (["--output", "{tmp}/busy"], "is in use by another run",
                                        lambda tmp: live_lock(tmp / "busy")),
    "resume a run that is running": (["--output", "{tmp}/run", "--resume"], "is in use by another run",
                                     lambda tmp: (fake_checkpoint(tmp), live_lock(tmp / "run"))),
    "resume nothing": (["--output", "{tmp}/new", "--resume"], "no checkpoint under", None),
    "resume a non-checkpoint": (["--resume", "{tmp}"], "not a checkpoint folder", None),
    "junk text cache": (["--text-cache", "{tmp}/cache.safetensors"], "not a text cache",
                        lambda tmp: (tmp / "cache.safetensors").write_bytes(b"\x00" * 64)),
    "text cache extension": (["--text-cache", "{tmp}/cache.txt"], "unsupported extension", None),
    "data missing": (["--data", "{tmp}/nope"], "no such data folder", None),
    # these load the tiny pipeline
    "every checkpoint damaged": (["--output", "{tmp}/run", "--resume"], "no intact checkpoint left", fake_checkpoint),
    "no image decodes": (["--data", "{tmp}/bad"], "none of the 1 training images could be decoded", undecodable_data),
    "model without transformer/": (["--model", "{no_transformer}"], "has no transformer/ folder", None),
}


def train_argv(models, data, tmp_path, arguments):
    places = {key: str(value) for key, value in models.items()} | {"tmp": str(tmp_path)}
    return ["train", "--model", models["flux"], "--data", data, "--output", tmp_path / "out", "--resolution", 32,
            "--vae", "f8", "--device", "cpu", "--max-sequence-length", 16, "--steps", 2, "--lora-rank", 2,
            "--grad-accum", 1, *[str(a).format(**places) for a in arguments]]


@pytest.mark.parametrize("name", TRAIN)
def test_train_refuses(name, models, data, tmp_path, capsys):
    arguments, expected, setup = TRAIN[name]
    if setup is not None:
        setup(tmp_path)
    lines = expect_failure(capsys, train_argv(models, data, tmp_path, arguments), expected, tmp_path)
    if name == "every checkpoint damaged":
        assert lines[0].startswith("warning: ") and "state.pt: damaged or truncated" in lines[0]


def test_train_stops_at_the_first_non_finite_loss(models, data, tmp_path, capsys, monkeypatch):
    """A NaN loss at step 3 stops the run before the update; the step-2 checkpoint stays as it was."""
    run = train_argv(models, data, tmp_path, ["--checkpoint-every", 1, "--keep-checkpoints", 0])
    assert d4k.run_cli(d4k.main, [str(a) for a in run]) == 0
    capsys.readouterr()
    shutil.rmtree(tmp_path / "out" / "checkpoints" / "step-00000002")
    (tmp_path / "out" / "lora.safetensors").unlink()
    (tmp_path / "out" / "pytorch_lora_weights.safetensors").unlink()
    real = d4k.training_loss
    monkeypatch.setattr(d4k, "training_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    lines = expect_failure(capsys, run[:-4] + ["--steps", 3, "--checkpoint-every", 1, "--resume"], "step 2: the loss is not finite",
                           tmp_path)
    assert "step-00000001, is kept" in lines[-1] and "lower --lr" in lines[-1]
    # a fresh run that diverges at once leaves no folder behind
    expect_failure(capsys, train_argv(models, data, tmp_path, ["--output", tmp_path / "new" / "run"]), "no checkpoint was written",
                   tmp_path)


# ----------------------------------------------------------------------------- train-vae


def vae_argv(models, data, tmp_path, arguments):
    places = {key: str(value) for key, value in models.items()} | {"tmp": str(tmp_path)}
    return ["train-vae", "--base", models["vae"], "--data", data, "--output", tmp_path / "out", "--resolution", 32,
            "--batch-size", 1, "--grad-accum", 1, "--steps", 2, "--lpips-weight", 0,
            "--gan-weight", 0, "--ema", 0, "--workers", 1, "--device", "cpu",
            *[str(a).format(**places) for a in arguments]]


TRAIN_VAE = {
    "resolution not a multiple of 16": (["--resolution", 100], "multiple of 16", None),
    "resolution too small": (["--resolution", 8], "argument --resolution: must be >= 16", None),
    "lr 0": (["--lr", 0], "argument --lr: must be in (0, 1], got 0", None),
    "lr nan": (["--lr", "nan"], "argument --lr", None),
    "ema 1.5": (["--ema", 1.5], "argument --ema", None),
    "ema 1": (["--ema", 1], "below 1", None),
    "steps 0": (["--steps", 0], "argument --steps", None),
    "workers 0": (["--workers", 0], "argument --workers", None),
    "negative weight": (["--sc-weight", -1], "argument --sc-weight", None),
    "gan at a small size": (["--gan-weight", 0.05], "128 or more", None),
    "accumulation 0": (["--grad-accum", 0], "argument --grad-accum", None),
    "f16 decode unknown": (["--f16-decode", "shifted"], "argument --f16-decode", None),
    "dtype fp16": (["--dtype", "fp16"], "argument --dtype", None),
    "seed 2**64": (["--seed", 2**64], "argument --seed", None),
    "device cuda unavailable": (["--device", no_cuda_device()], "argument --device", None),
    "output is a file": (["--output", "{tmp}/file"], "is a file", lambda tmp: (tmp / "file").write_text("x")),
    "output not empty": (["--output", "{tmp}/full"], "is not empty",
                         lambda tmp: ((tmp / "full" / "vae").mkdir(parents=True), (tmp / "full" / "vae" / "x").write_text("x"))),
    "data missing": (["--data", "{tmp}/nope"], "no such data folder", None),
    # these read weights
    "not a VAE": (["--base", "{junk}"], "not a readable safetensors file", None),
    "a transformer as the base": (["--base", "{flux}/transformer"], "not a 16-channel Flux/SD3 VAE", None),
    "VAE config it cannot represent": (["--base", "{vae_groups16}"], "norm_num_groups 16", None),
    "NaN in the base": (["--base", "{vae_nan}"], "decoder.conv_out.bias holds NaN or Inf", None),
    "every checkpoint damaged": (["--output", "{tmp}/run", "--resume"], "no intact checkpoint left",
                                 lambda tmp: fake_checkpoint(tmp, b"PK\x03\x04 truncated")),
    "resume a run that is running": (["--output", "{tmp}/run", "--resume"], "is in use by another run",
                                     lambda tmp: (fake_checkpoint(tmp), live_lock(tmp / "run"))),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("name", TRAIN_VAE)
def test_train_vae_refuses(name, models, images, tmp_path, capsys):
    arguments, expected, setup = TRAIN_VAE[name]
    if setup is not None:
        setup(tmp_path)
    expect_failure(capsys, vae_argv(models, images, tmp_path, arguments), expected, tmp_path)


def test_train_vae_stops_at_the_first_non_finite_loss(models, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(d4k, "scale_consistency_loss", lambda s, t: s.float().mean() * float("inf"))
    lines = expect_failure(capsys, vae_argv(models, images, tmp_path, []), "step 1: the loss is not finite", tmp_path)
    assert "no checkpoint was written" in lines[-1]

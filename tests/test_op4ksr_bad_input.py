"""op4ksr.py's CLIs (super-resolution, `train`, `calibrate-sigma`) on bad input: each case exits non-zero
with a short message and no traceback, writes no file and leaves every existing file byte-identical.
Most cases are refused before any model loads: they pass `--flux` a path that does not exist, so
a case that got as far as loading Flux would fail with another message."""

import json
import os
import socket
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import op4ksr
from common.io import run_cli
from test_op4ksr import lr_image, train_argv, write_hr
from tiny_pipelines import make_flux_pipeline


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def refused(capsys, root: Path, argv, fragment: str, max_lines=3, code=2) -> str:
    """Run the CLI in-process; check the exit code, one error line holding `fragment`, at most
    `max_lines` lines in all (None: a run that got to training and logged), no traceback, and
    that nothing under `root` changed."""
    before = snapshot(root)
    assert run_cli(op4ksr.main, [str(a) for a in argv]) == code
    captured = capsys.readouterr()
    text = captured.out + captured.err
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in text and len(errors) == 1 and fragment in errors[0], text
    assert max_lines is None or len(lines) <= max_lines, text
    assert snapshot(root) == before, "files changed"
    return errors[0]


def undecodable_png(path: Path, size=96) -> Path:
    """A PNG whose chunks are all intact (Pillow's verify() passes) but whose pixel data is far too short."""
    buffer = Path(path).with_suffix(".tmp")
    Image.new("RGB", (size, size), (90, 120, 150)).save(buffer, format="PNG")
    data = buffer.read_bytes()
    buffer.unlink()
    start = data.index(b"IDAT") - 4
    end = start + 12 + struct.unpack(">I", data[start : start + 4])[0]
    payload = zlib.compress(b"\0" * 16)
    chunk = struct.pack(">I", len(payload)) + b"IDAT" + payload + struct.pack(">I", zlib.crc32(b"IDAT" + payload))
    path.write_bytes(data[:start] + chunk + data[end:])
    return path


def rewrite(source: Path, target: Path, metadata=None, tensors=None, drop=()) -> Path:
    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata())
    state = {k: v for k, v in load_file(source).items() if k not in drop}
    save_file(state | (tensors or {}), target, meta | (metadata or {}))
    return target


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return make_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe", guidance=True, seed=0)


@pytest.fixture(scope="module")
def run(flux_folder, tmp_path_factory):
    """A finished 2-step training run with both checkpoints kept."""
    root = tmp_path_factory.mktemp("train")
    data = write_hr(root / "hr")
    assert run_cli(op4ksr.main, train_argv(flux_folder, data, root / "run", "--steps", 2, "--lr", "1e-2")) == 0
    return root / "run"


@pytest.fixture(scope="module")
def paths(run, flux_folder, tmp_path_factory):
    """Inputs, outputs and broken checkpoints for the inference cases, under paths["root"]."""
    root = tmp_path_factory.mktemp("work")
    weights = run / "op4ksr.safetensors"
    (root / "keep.png").write_bytes(b"keep me")
    (root / "notes.png").write_text("not an image")
    (root / "blocker").write_text("a file")
    (root / "folder").mkdir()
    (root / "empty").mkdir()
    for name in ("clash/a.png", "clash/a.jpg", "batch/x0.png", "batch/x1.png", "badbatch/good.png"):
        (root / name).parent.mkdir(exist_ok=True)
        lr_image(root / name, (16, 16))
    (root / "badbatch" / "broken.png").write_text("not an image")
    (root / "batch_op4ksr").mkdir()
    (root / "batch_op4ksr" / "x0.png").write_bytes(b"done before")
    lora_b = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    nan = load_file(weights)[lora_b].clone()
    nan[0, 0] = float("nan")
    config = json.loads(safe_open(str(weights), "pt").metadata()["flux_config"]) | {"hidden_size": 3072}
    (root / "text.safetensors").write_text("not safetensors")
    save_file({"x": torch.zeros(1)}, root / "other.safetensors")
    rewrite(weights, root / "nan.safetensors", tensors={lora_b: nan})
    rewrite(weights, root / "inf_prompt.safetensors", tensors={"prompt.txt": torch.full((1, 16, 32), float("inf"))})
    rewrite(weights, root / "sigma.safetensors", {"sigma": "nan"})
    rewrite(weights, root / "theta.safetensors", {"theta": "hundred"})
    rewrite(weights, root / "config.safetensors", {"flux_config": "{"})
    rewrite(weights, root / "newer.safetensors", {"format_version": "99"})
    rewrite(weights, root / "no_prompt.safetensors", drop=("prompt.y",))
    rewrite(weights, root / "prompt_shape.safetensors", tensors={"prompt.y": torch.zeros(1, 5)})
    rewrite(weights, root / "other_base.safetensors", {"flux_config": json.dumps(config)})
    names = {p.stem: p for p in root.iterdir()}
    return {"root": root, "weights": weights, "flux": flux_folder, "lr": lr_image(root / "lr.png", (20, 16)),
            "big": lr_image(root / "big.png", (80, 40)), "undecodable": undecodable_png(root / "undecodable.png"),
            "out": root / "out.png", "nowhere": root / "no" / "flux", **names}


def std(*extra):
    return ["--input", "{lr}", "--weights", "{weights}", "--output", "{out}", "--flux", "{nowhere}", *extra]


INFERENCE = {  # name: (argv with {path} fields, a fragment of the error line)
    "size negative": (std("--size", "-5"), "--size: must be in [32, 8192], got -5"),
    "size zero": (std("--size", "0"), "--size: must be in [32, 8192]"),
    "size not a number": (std("--size", "big"), "--size: expected an integer"),
    "size huge": (std("--size", "100000"), "--size: must be in [32, 8192]"),
    "scale inf": (std("--scale", "inf"), "--scale: must be a finite number"),
    "scale nan": (std("--scale", "nan"), "--scale: must be a finite number"),
    "scale zero": (std("--scale", "0"), "--scale: must be >= 1, got 0"),
    "scale negative": (std("--scale", "-4"), "--scale: must be >= 1"),
    "scale too large": (std("--scale", "1000"), "target sides must be between 32 and 8192 px"),
    "scale and size": (std("--scale", "2", "--size", "64"), "not allowed with argument"),
    "device absent": (std("--device", "cuda:99"), "cuda:99"),
    "device unknown": (std("--device", "tpu"), "'tpu' is not a device"),
    "colour fix unknown": (std("--color-fix", "magic"), "invalid choice"),
    "dtype unknown": (std("--dtype", "fp16"), "invalid choice"),
    "overwrite and skip": (std("--overwrite", "--skip-existing"), "not allowed with argument"),
    "unknown option": (std("--strength", "0.5"), "unrecognized arguments"),
    "no weights": (["--input", "{lr}", "--output", "{out}"], "op4ksr.py train"),
    "weights missing": (std("--weights", "{root}/missing.safetensors"), "missing.safetensors"),
    "weights a folder": (std("--weights", "{folder}"), "not an OMGSR-F adapter folder"),
    "weights not safetensors": (std("--weights", "{text}"), "not a readable safetensors file"),
    "weights not op4ksr": (std("--weights", "{other}"), "not an OP4KSR checkpoint"),
    "weights nan": (std("--weights", "{nan}"), "tensor transformer.transformer_blocks.0.attn.to_q.lora_B.weight holds NaN"),
    "weights inf prompt": (std("--weights", "{inf_prompt}"), "inf_prompt.safetensors: tensor prompt.txt holds NaN"),
    "weights sigma nan": (std("--weights", "{sigma}"), "sigma='nan', not a number in (0, 1]"),
    "weights theta text": (std("--weights", "{theta}"), "theta='hundred'"),
    "weights config broken": (std("--weights", "{config}"), "no readable 'flux_config'"),
    "weights newer": (std("--weights", "{newer}"), "format version 99"),
    "weights no prompt": (std("--weights", "{no_prompt}"), "prompt.y is missing"),
    "weights prompt shape": (std("--weights", "{prompt_shape}"), "prompt.y is (1, 5), the base Flux takes (1, 32)"),
    "weights other base": (std("--weights", "{other_base}", "--flux", "{flux}"), "hidden_size=3072"),
    "input missing": (std("--input", "{root}/missing.png"), "missing.png: no such file or folder"),
    "input not an image": (std("--input", "{notes}"), "not a readable image"),
    "input undecodable": (std("--input", "{undecodable}"), "not a readable image"),
    "input empty folder": (std("--input", "{empty}", "--output", "{root}/sr"), "no images"),
    "input larger than target": (std("--input", "{big}", "--size", "64"), "already larger than the target"),
    "output exists": (std("--output", "{keep}"), "keep.png exists; pass --overwrite"),
    "output a folder": (std("--output", "{folder}", "--overwrite"), "is a folder; give a file name"),
    "output extension": (std("--output", "{root}/out.txt"), "unsupported extension .txt"),
    "output under a file": (std("--output", "{blocker}/out.png"), "blocker is a file, not a folder"),
    "output is the input": (std("--output", "{lr}", "--overwrite"), "lr.png is an input image"),
    "folder output a file": (std("--input", "{batch}", "--output", "{keep}"), "is a file; a folder --input needs"),
    "folder output exists": (std("--input", "{batch}", "--output", "{batch_op4ksr}"), "pass --skip-existing"),
    "folder default output exists": (["--input", "{batch}", "--weights", "{weights}", "--flux", "{nowhere}"],
                                     "batch_op4ksr/x0.png exists"),
    "folder names clash": (std("--input", "{clash}", "--output", "{root}/sr"), "a.jpg and a.png would both be written"),
    "folder output is the input": (std("--input", "{batch}", "--output", "{batch}", "--overwrite"), "is an input image"),
    "folder with a broken image": (std("--input", "{badbatch}", "--output", "{root}/sr"), "broken.png: not a readable image"),
}


@pytest.mark.parametrize("case", INFERENCE)
def test_inference_refuses(case, paths, capsys):
    argv, fragment = INFERENCE[case]
    argv = [a.format(**paths) for a in argv]
    refused(capsys, paths["root"], argv, fragment)


def test_skip_existing_continues_a_batch(paths, tmp_path, capsys):
    folder = tmp_path / "batch"
    folder.mkdir()
    for i in range(2):
        lr_image(folder / f"x{i}.png", (16, 16))
    output = tmp_path / "sr"
    output.mkdir()
    (output / "x0.png").write_bytes(b"done before")
    argv = ["--input", folder, "--weights", paths["weights"], "--output", output, "--scale", "2"]
    assert run_cli(op4ksr.main, [*map(str, argv), "--skip-existing"]) == 0
    assert (output / "x0.png").read_bytes() == b"done before"
    with Image.open(output / "x1.png") as image:
        assert image.size == (32, 32)
    # all done: nothing to do, and no model is loaded (the --flux given does not exist)
    assert run_cli(op4ksr.main, [*map(str, argv), "--skip-existing", "--flux", str(tmp_path / "none")]) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_an_output_written_meanwhile_is_never_replaced(paths, tmp_path, capsys, monkeypatch):
    """Two runs with one output: the second to finish fails cleanly and keeps the other's file."""
    out = tmp_path / "out.png"
    real = op4ksr.super_resolve

    def other_run_finishes_first(*args, **kwargs):
        out.write_bytes(b"the other run's image")
        return real(*args, **kwargs)

    monkeypatch.setattr(op4ksr, "super_resolve", other_run_finishes_first)
    argv = ["--input", paths["lr"], "--weights", paths["weights"], "--output", out]
    refused(capsys, paths["root"], argv, "out.png exists", max_lines=None)
    assert out.read_bytes() == b"the other run's image" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


# ----------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Training data folders and outputs for the train cases, under data["root"]."""
    root = tmp_path_factory.mktemp("train_cases")
    write_hr(root / "hr")
    (root / "empty").mkdir()
    (root / "taken").mkdir()
    (root / "taken" / "op4ksr.safetensors").write_bytes(b"a finished run")
    (root / "started" / "checkpoints" / "step-00000001").mkdir(parents=True)
    (root / "started" / "checkpoints" / "step-00000001" / "state.pt").write_bytes(b"")
    (root / "blocker").write_text("a file")
    (root / "undecodable").mkdir()
    for i in range(2):
        undecodable_png(root / "undecodable" / f"{i}.png")
    return {"root": root, "new": root / "new_run", **{p.name: p for p in root.iterdir()}}


def train(flux_folder, data, *extra, output=None):
    return train_argv(flux_folder, data["hr"], output or data["new"], "--steps", 2, *extra)


TRAIN = {  # name: (extra arguments, fragment); later arguments override train_argv's
    "lr inf": (["--lr", "inf"], "--lr: must be a finite number"),
    "lr nan": (["--lr", "nan"], "--lr: must be a finite number"),
    "lr zero": (["--lr", "0"], "--lr: must be in (0, 1], got 0"),
    "lr huge": (["--lr", "1e38"], "--lr: must be in (0, 1]"),
    "steps zero": (["--steps", "0"], "--steps: must be >= 1"),
    "sigma zero": (["--sigma", "0"], "--sigma: must be in [0.001, 1]"),
    "sigma above one": (["--sigma", "1.5"], "--sigma: must be in [0.001, 1]"),
    "crop negative": (["--crop", "-5"], "--crop: must be in [1, 8192], got -5"),
    "scale zero": (["--scale", "0"], "--scale: must be in [1, 16]"),
    "seed negative": (["--seed", "-1"], "--seed: must be in [0, 18446744073709551615]"),
    "seed too large": (["--seed", str(2**64)], "--seed: must be in [0, 18446744073709551615]"),
    "device absent": (["--device", "cuda:99"], "cuda:99"),
    "mse weight negative": (["--mse-weight", "-1"], "--mse-weight: must be >= 0"),
    "periodicity weight inf": (["--periodicity-weight", "inf"], "--periodicity-weight: must be a finite number"),
    "batch size zero": (["--batch-size", "0"], "--batch-size: must be >= 1"),
    "grad norm zero": (["--max-grad-norm", "0"], "--max-grad-norm: must be > 0"),
    "lora rank zero": (["--lora-rank", "0"], "--lora-rank: must be >= 1"),
    "keep negative": (["--keep-checkpoints", "-1"], "--keep-checkpoints: must be >= 0"),
    "sequence too long": (["--max-sequence-length", "100000"], "--max-sequence-length: must be in [1, 512]"),
    "crop not a multiple of scale": (["--scale", "3"], "must be a multiple of --scale 3"),
    "all weights zero": (["--mse-weight", "0", "--periodicity-weight", "0"], "every loss weight is 0"),
    "lpips weights missing": (["--lpips-weight", "2", "--lpips-backbone", "{root}/vgg.safetensors"],
                              "vgg.safetensors is neither a file nor a Hub spec"),
    "f16 decode unknown": (["--f16-decode", "middle"], "--f16-decode: invalid choice"),
    "output a file": (["--output", "{blocker}"], "is a file; training writes a folder"),
    "output under a file": (["--output", "{blocker}/run"], "blocker is a file, not a folder"),
    "output holds a finished run": (["--output", "{taken}"], "already holds a training run: pass --resume"),
    "output holds a checkpoint": (["--output", "{started}"], "already holds a training run: pass --resume"),
    "resume without checkpoints": (["--output", "{empty}", "--resume"], "--resume: no complete checkpoint"),
    "resume a missing folder": (["--resume", "{root}/nowhere"], "nowhere: no such checkpoint folder"),
    "data missing": (["--data", "{root}/nowhere"], "no such data folder"),
    "data without images": (["--data", "{empty}"], "no usable images"),
}


@pytest.mark.parametrize("case", TRAIN)
def test_train_refuses_before_loading(case, data, capsys):
    extra, fragment = TRAIN[case]
    argv = train("/nonexistent/flux", data, *[a.format(**data) for a in extra])
    refused(capsys, data["root"], argv, fragment)


def test_train_refuses_a_crop_the_vae_cannot_tile(flux_folder, data, capsys):
    refused(capsys, data["root"], train(flux_folder, data, "--crop", 36), "--crop 36: must be a multiple of 8 px")


def test_train_stops_when_most_images_do_not_decode(flux_folder, data, capsys):
    argv = train(flux_folder, data, "--data", data["root"] / "undecodable")
    refused(capsys, data["root"], argv, "2 of the 2 training images do not decode", max_lines=None)


def test_train_skips_an_undecodable_image(flux_folder, tmp_path, capsys):
    hr = write_hr(tmp_path / "hr", count=2)
    undecodable_png(hr / "1.png")
    assert run_cli(op4ksr.main, train_argv(flux_folder, hr, tmp_path / "run", "--steps", 2)) == 0  # both drawn
    err = capsys.readouterr().err
    assert "1.png: not a readable image" in err and "1 of the 2 training images could not be decoded" in err
    assert (tmp_path / "run" / "op4ksr.safetensors").is_file()


def nan_loss_at(step: int, monkeypatch, gradient=False):
    """Make the training loss (or only its gradient) non-finite from call `step` on."""
    real, calls = op4ksr.sr_loss, []

    def broken(pred, *args, **kwargs):
        loss, parts = real(pred, *args, **kwargs)
        calls.append(1)
        if len(calls) >= step:
            # sqrt(|x|) at x = 0: the value stays finite (0), the gradient does not
            loss = loss + (pred - pred.detach()).abs().sqrt().sum() if gradient else loss * float("nan")
        return loss, parts

    monkeypatch.setattr(op4ksr, "sr_loss", broken)


def test_divergence_at_the_first_step_leaves_nothing(flux_folder, data, capsys, monkeypatch):
    nan_loss_at(1, monkeypatch)
    message = refused(capsys, data["root"], train(flux_folder, data), "step 1: the loss (nan) is not finite", max_lines=None)
    assert "no checkpoint was written" in message and "lower --lr" in message and not data["new"].exists()


@pytest.mark.parametrize("gradient", [False, True], ids=["loss", "gradient"])
def test_divergence_keeps_the_last_good_checkpoint(flux_folder, data, tmp_path, capsys, monkeypatch, gradient):
    nan_loss_at(2, monkeypatch, gradient)
    output = tmp_path / "run"
    what = "the gradient norm (nan)" if gradient else "the loss (nan)"
    argv = train(flux_folder, data, "--steps", 3, output=output)
    message = refused(capsys, data["root"], argv, f"step 2: {what} is not finite", max_lines=None)
    assert "last good checkpoint" in message and "step-00000001" in message and "lower --lr and --resume" in message
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000001"]
    assert not (output / "op4ksr.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in load_file(output / "checkpoints/step-00000001/trainable.safetensors").values())


def test_train_refuses_an_output_another_run_holds(flux_folder, data, tmp_path, capsys):
    """A run that is writing OUTPUT holds OUTPUT/.lock: a second run stops before loading anything, and
    neither removes nor changes any of the first run's files."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # this process: alive
    refused(capsys, tmp_path, train(flux_folder, data, output=busy), "is in use by another run")


def test_resume_over_a_truncated_checkpoint_falls_back(flux_folder, run, tmp_path, capsys):
    """The newest state.pt cut short: one warning names it, training goes on from the one before."""
    import shutil

    output = tmp_path / "run"
    shutil.copytree(run, output)
    state = output / "checkpoints" / "step-00000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    data = run.parent / "hr"
    capsys.readouterr()
    assert run_cli(op4ksr.main, train_argv(flux_folder, data, output, "--steps", 3, "--lr", "1e-2", "--resume")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "step-00000002" in line and "state.pt" in line]
    assert len(warnings) == 1, warnings
    for folder in (output / "checkpoints").iterdir():
        (folder / "state.pt").write_bytes(b"")
    argv = train_argv(flux_folder, data, output, "--steps", 4, "--resume")
    refused(capsys, tmp_path, argv, "no intact checkpoint", max_lines=None)


# ----------------------------------------------------------------------------- calibrate-sigma

# name: (extra arguments, fragment); the VAE given does not exist, so each is refused before it loads
CALIBRATE = {
    "data missing": (["--data", "{root}/nowhere"], "no such data folder"),
    "data without images": (["--data", "{empty}"], "no usable images"),
    "crop not a multiple of scale": (["--scale", "3"], "--crop 64: must be a multiple of --scale 3"),
    "crop zero": (["--crop", "0"], "--crop: must be in [1, 8192], got 0"),
    "scale zero": (["--scale", "0"], "--scale: must be in [1, 16]"),
    "max images zero": (["--max-images", "0"], "--max-images: must be >= 1, got 0"),
    "max images not a number": (["--max-images", "all"], "--max-images"),
    "batch size zero": (["--batch-size", "0"], "--batch-size: must be >= 1"),
    "seed negative": (["--seed", "-1"], "--seed: must be in [0, 18446744073709551615]"),
    "device absent": (["--device", "cuda:99"], "cuda:99"),
    "vae missing": ([], "/nonexistent/vae: no such file or folder"),
}


def calibrate(vae, data, *extra):
    return ["calibrate-sigma", "--data", data["hr"], "--vae", vae, "--crop", 64, *extra]


@pytest.mark.parametrize("case", CALIBRATE)
def test_calibrate_refuses(case, data, capsys):
    extra, fragment = CALIBRATE[case]
    argv = calibrate("/nonexistent/vae", data, *[a.format(**data) for a in extra])
    refused(capsys, data["root"], argv, fragment)


def test_calibrate_refuses_a_crop_the_vae_cannot_tile(flux_folder, data, capsys):
    argv = calibrate(flux_folder, data, "--crop", 36)
    refused(capsys, data["root"], argv, "--crop 36: must be a multiple of 8 px")


def test_calibrate_stops_when_most_images_do_not_decode(flux_folder, data, capsys):
    argv = calibrate(flux_folder, data, "--data", data["undecodable"])
    refused(capsys, data["root"], argv, "2 of the 2 training images do not decode", max_lines=None)

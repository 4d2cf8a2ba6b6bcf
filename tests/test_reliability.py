"""The second round of bad input, across diffusion4k.py, op4ksr.py and cupscale.py: outputs that are inputs,
foreign checkpoints, file-system faults (names too long, a full or read-only disk, dangling links, FIFOs,
SIGTERM), weights that are not float, text in other encodings, caption commands that leave children, huge
images and file modes. Each refusal: exit code 2 (143 for SIGTERM), at most 3 lines, no traceback, nothing
written, every existing file byte-identical. Faults no small test machine has (a full disk, a long name on
a file system) are simulated by monkeypatching the call that would meet them."""

import contextlib
import errno
import json
import os
import re
import shlex
import signal
import stat
import struct
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_diffusion4k_train import write_dataset
from test_op4ksr import lr_image, write_hr
from test_op4ksr import train_argv as sr_train_argv
from tiny_pipelines import make_flux_pipeline, make_sd3_pipeline

import cupscale as cu
import diffusion4k as d4k
import op4ksr
from common import io
from common.io import UserError, run_cli

PY = shlex.quote(sys.executable)
INFO = ("loading ", "data: ", "training ", "resumed ", "wrote ", "RSP ", "note: ", "text embeddings")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*")) if not p.is_fifo()}


@contextlib.contextmanager
def deadline(seconds=60):
    """A run that hangs (reading a FIFO) fails the test instead of blocking the suite."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused(capsys, main, argv, fragment, work: Path, code=2, logs=False) -> str:
    """Run `main(argv)` in process; check the exit code, one error line holding `fragment` (at most 3
    lines besides progress lines), no traceback, and that nothing under `work` changed (logs: but the
    training logs, which record the steps run before the failure)."""
    before = snapshot(work)
    with deadline():
        result = run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    parts = (part.strip() for part in re.split(r"[\r\n]", err))  # progress bars end their lines with \r
    lines = [part for part in parts if part and not part.startswith(INFO) and not re.search(r"step/s|\?step", part)]
    assert "Traceback" not in err and result == code, err
    assert lines and len(lines) <= 3 and fragment in lines[-1], (fragment, err)
    after = snapshot(work)
    if logs:
        before, after = ({k: v for k, v in files.items() if not k.endswith("train_log.jsonl")}
                         for files in (before, after))
    assert after == before, "files were written, changed or removed"
    return lines[-1]


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def enospc(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def sigterm(*_, **__):
    """What a `kill` arriving in the middle of a write does: the handler `run_cli` installs raises."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)  # the signal is handled on the next bytecode; never reached


def huge_png(path: Path, width=20000, height=20000) -> Path:
    """A PNG whose header says width x height; its pixel data is a few bytes (it never decodes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


# ================================================================================ shared models and runs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    flux, sd3 = make_flux_pipeline(root / "flux"), make_sd3_pipeline(root / "sd3")
    return {"root": root, "flux": flux, "sd3": sd3}


def variant(models, name, change) -> Path:
    """A copy of the tiny Flux pipeline changed by `change(folder)`."""
    import shutil

    folder = models["root"] / name
    if not folder.exists():
        shutil.copytree(models["flux"], folder)
        change(folder)
    return folder


def d4k_train_argv(model, data, output, *extra):
    return ["train", "--model", model, "--data", data, "--output", output, "--resolution", 32, "--vae", "f8",
            "--device", "cpu", "--max-sequence-length", 16, "--steps", 2, "--lora-rank", 2, "--grad-accum", 1,
            "--checkpoint-every", 1, "--keep-checkpoints", 0, *extra]


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """Finished runs whose checkpoints other runs try to resume: a Flux LoRA and an SD3 LoRA (WLF), and an
    OP4KSR LoRA run."""
    root = tmp_path_factory.mktemp("runs")
    data, hr = write_dataset(root / "data"), write_hr(root / "hr")
    for name, model in (("flux", models["flux"]), ("sd3", models["sd3"])):
        assert run_cli(d4k.main, [str(a) for a in d4k_train_argv(model, data, root / name)]) == 0
    assert run_cli(op4ksr.main, sr_train_argv(models["flux"], hr, root / "sr", "--steps", 2)) == 0
    return {"root": root, "data": data, "hr": hr, **{name: root / name for name in ("flux", "sd3", "sr")}}


def step(run: Path, number=2) -> Path:
    return run / "checkpoints" / f"step-{number:08d}"


def generate_argv(models, tmp, *extra):
    return ["--model", models["flux"], "--prompt", "a cat", "--height", 32, "--width", 32, "--steps", 1,
            "--output", tmp / "out.png", "--device", "cpu", *extra]


def batch_argv(models, prompts, output_dir, *extra):
    return generate_argv(models, output_dir, "--prompts", prompts, "--output-dir", output_dir, *extra)


def sr_argv(runs, tmp, *extra):
    return ["--input", tmp / "lr.png", "--weights", runs["sr"] / "op4ksr.safetensors", "--output",
            tmp / "sr.png", "--scale", 2, *extra]


CU_BASE = ["--prompt", "a photo of cat", "--scale", "1", "--region-size", "64", "--region-overlap", "32",
           "--vae-tile", "128", "--vae-overlap", "16", "--steps", "2", "--device", "cpu", "--dtype", "fp32"]


def cu_argv(models, tmp, *extra):
    return ["--input", tmp / "lr.png", "--output", tmp / "hr.png", "--model", models["sd3"], *CU_BASE, *extra]


@pytest.fixture
def work(tmp_path):
    Image.new("RGB", (64, 64), (200, 120, 40)).save(tmp_path / "lr.png")
    return tmp_path


# ================================================================ 1. no output replaces or enters an input


def test_generate_never_replaces_its_prompt_file(models, work, capsys):
    """The Aesthetic-4K captions file as --prompts and its folder as --output-dir: --skip-existing and
    --overwrite used to replace it by the generated records."""
    (work / "a.jpg").write_bytes(b"a user's photo")
    (work / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "a cat", "aesthetic": 6.1}))
    for flag in ("--skip-existing", "--overwrite"):
        argv = batch_argv(models, work / "metadata.jsonl", work, flag)
        refused(capsys, d4k.main, argv, "metadata.jsonl is --prompts", work)


def test_generate_never_writes_into_its_model(models, tmp_path, capsys):
    model = variant(models, "flux_out", lambda f: None)
    refused(capsys, d4k.main, generate_argv(models, tmp_path, "--model", model, "--output", model / "x.png"),
            "lies inside --model", models["root"])


@pytest.mark.parametrize("where", ["data", "inside data"])
def test_training_never_writes_into_its_data(models, runs, where, capsys):
    output = runs["data"] if where == "data" else runs["data"] / "run"
    argv = d4k_train_argv(models["flux"], runs["data"], output)
    refused(capsys, d4k.main, argv, "--output: ", runs["data"])
    vae = ["train-vae", "--base", models["flux"] / "vae", "--data", runs["data"], "--output", output]
    refused(capsys, d4k.main, vae, "--output: ", runs["data"])
    sr = sr_train_argv(models["flux"], runs["hr"], runs["hr"] if where == "data" else runs["hr"] / "run")
    refused(capsys, op4ksr.main, sr, "--output: ", runs["hr"])


def test_text_cache_is_never_a_data_file(models, runs, tmp_path, capsys):
    argv = d4k_train_argv(models["flux"], runs["data"], tmp_path / "run", "--text-cache",
                          runs["data"] / "cache.safetensors")
    refused(capsys, d4k.main, argv, "--text-cache: ", runs["data"])


def test_cupscale_never_replaces_its_input_or_region_prompts(models, work, capsys):
    refused(capsys, cu.main, cu_argv(models, work, "--output", work / "lr.png", "--overwrite"),
            "lr.png is --input", work)
    link = work / "alias.png"
    link.symlink_to(work / "lr.png")
    refused(capsys, cu.main, cu_argv(models, work, "--output", link, "--overwrite"), "is --input", work)
    (work / "hr.regions.json").write_text('{"0,0": "a cat"}')
    refused(capsys, cu.main, cu_argv(models, work, "--region-prompts", work / "hr.regions.json", "--overwrite"),
            "is --region-prompts", work)


def test_op4ksr_never_replaces_its_input(runs, work, capsys):
    lr_image(work / "small.png", (16, 16))
    refused(capsys, op4ksr.main, sr_argv(runs, work, "--input", work / "small.png", "--output", work / "small.png",
                                         "--overwrite"), "small.png is an input image", work)


def test_check_apart_knows_a_file_by_any_name(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    os.link(tmp_path / "in" / "a.png", tmp_path / "hard.png")
    (tmp_path / "soft").symlink_to(tmp_path / "in")
    for output, fragment in ((tmp_path / "hard.png", "is --input"), (tmp_path / "soft" / "new.png", "lies inside"),
                             (tmp_path / "in" / ".." / "in" / "a.png", "is --input")):
        with pytest.raises(UserError, match=fragment):
            io.check_apart([("--output", output)], [("--input", tmp_path / "in" / "a.png"),
                                                    ("--data", tmp_path / "in"), ("--model", "owner/name")])
    io.check_apart([("--output", tmp_path / "out.png"), ("--sidecar", None)], [("--input", tmp_path / "in")])


# ======================================================= 2. --resume takes only this run's checkpoints


def resumed(runs, tmp_path, source: str) -> Path:
    """A copy of run `source`'s folder, to resume from."""
    import shutil

    shutil.copytree(runs[source], tmp_path / source)
    return tmp_path / source


@pytest.mark.parametrize("case, extra, fragment", [
    ("an SD3 run's checkpoint", ["--resume", "{sd3}"], "a checkpoint of another run (model "),
    ("another rank", ["--resume", "{flux}", "--lora-rank", 4], "(lora_rank 2 there, 4 here)"),
    ("another alpha", ["--resume", "{flux}", "--lora-alpha", 8], "(lora_alpha 2 there, 8.0 here)"),
    ("another VAE", ["--resume", "{flux}", "--vae", "f16"], '(vae "f8" there, "f16" here)'),
    ("an OP4KSR checkpoint", ["--resume", "{sr}"], '(trainer "op4ksr.py train" there'),
])
def test_train_resumes_only_its_own_checkpoints(models, runs, tmp_path, capsys, case, extra, fragment):
    places = {"sd3": step(runs["sd3"]), "flux": step(runs["flux"]), "sr": step(runs["sr"])}
    output = resumed(runs, tmp_path, "flux")
    argv = d4k_train_argv(models["flux"], runs["data"], output, "--steps", 3)
    refused(capsys, d4k.main, argv + [str(a).format(**places) for a in extra], fragment, tmp_path)


def test_train_refuses_a_checkpoint_without_its_record_or_with_other_tensors(models, runs, tmp_path, capsys):
    output = resumed(runs, tmp_path, "flux")
    file = step(output) / "trainable.safetensors"
    state = load_file(file)
    save_file(state, file)  # no record
    argv = d4k_train_argv(models["flux"], runs["data"], output, "--steps", 3, "--resume")
    refused(capsys, d4k.main, argv, "holds no record of the run that wrote it", tmp_path)
    args = d4k.train_parser().parse_args([str(a) for a in argv[1:]])
    record = json.dumps(d4k.wlf_run(d4k.recipe(d4k.WLFRecipe, args)))
    save_file({k: v for k, v in list(state.items())[1:]}, file, {"run": record})  # one tensor short
    refused(capsys, d4k.main, argv, "does not fit this model: 1 missing", tmp_path)


@pytest.mark.parametrize("case, extra, fragment", [
    ("another theta", ["--theta", 10000], "(theta 100.0 there, 10000.0 here)"),
    ("another sigma", ["--sigma", 0.5], "(sigma "),
    ("another prompt", ["--prompt", "a dog"], "(prompt "),
    ("a WLF checkpoint", ["--resume", "{flux}"], '(trainer "diffusion4k.py train" there'),
])
def test_op4ksr_train_resumes_only_its_own_checkpoints(models, runs, tmp_path, capsys, case, extra, fragment):
    output = resumed(runs, tmp_path, "sr")
    argv = sr_train_argv(models["flux"], runs["hr"], output, "--steps", 3, "--resume")
    refused(capsys, op4ksr.main, argv + [str(a).format(flux=step(runs["flux"])) for a in extra], fragment,
            tmp_path)


def test_train_vae_resumes_only_its_own_checkpoints(models, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        lr_image(images / f"{i}.png", (48, 40))
    common = ["train-vae", "--data", images, "--output", tmp_path / "run", "--resolution", 32, "--batch-size", 1,
              "--grad-accum", 1, "--steps", 1, "--lpips-weight", 0, "--gan-weight", 0, "--ema", 0, "--workers", 1,
              "--device", "cpu"]
    assert run_cli(d4k.main, [str(a) for a in common + ["--base", models["flux"] / "vae"]]) == 0
    capsys.readouterr()
    other = variant(models, "flux_vae_copy", lambda f: None) / "vae"
    refused(capsys, d4k.main, common + ["--base", other, "--steps", 2, "--resume"],
            "a checkpoint of another run (base ", tmp_path)
    refused(capsys, d4k.main, common + ["--base", models["flux"] / "vae", "--steps", 2, "--resume", "--f16-decode",
                                        "centred"], '(f16_decode "partitioned" there, "centred" here)', tmp_path)


# ===================================================================== 3. file-system limits and faults

LONG = "x" * 300 + ".png"


def test_names_too_long_are_refused_before_any_work(models, runs, work, capsys):
    fragment = "255"  # "a file name of 304 bytes; ... at most 255", or the OS's "name too long" in words
    refused(capsys, d4k.main, generate_argv(models, work, "--output", work / LONG), fragment, work)
    refused(capsys, cu.main, cu_argv(models, work, "--output", work / LONG), fragment, work)
    refused(capsys, op4ksr.main, sr_argv(runs, work, "--input", work / "lr.png", "--output", work / LONG),
            fragment, work)
    argv = d4k_train_argv(models["flux"], runs["data"], work / ("r" * 300))
    refused(capsys, d4k.main, argv, "255", work)


@pytest.mark.parametrize("number, words", [(errno.ENAMETOOLONG, "name too long"),
                                           (errno.EROFS, "read-only file system"),
                                           (errno.ENOSPC, "no space left on device")])
def test_a_file_system_that_refuses_the_output_gives_one_line(models, work, capsys, monkeypatch, number, words):
    def refuse(*_, **__):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    refused(capsys, d4k.main, generate_argv(models, work), f"out.png: {words}", work)


def test_a_failed_write_removes_the_folders_it_made(tmp_path):
    with pytest.raises(UserError, match="a.json: no space left on device"):
        with io.atomic_files([tmp_path / "new" / "deeper" / "a.json", tmp_path / "new" / "b.json"]):
            enospc()
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_an_image_is_written(models, work, capsys, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", enospc)
    refused(capsys, d4k.main, generate_argv(models, work), "out.png: no space left on device", work)


def test_a_full_disk_while_a_checkpoint_is_written_leaves_no_checkpoint(models, runs, tmp_path, capsys,
                                                                        monkeypatch):
    output = resumed(runs, tmp_path, "flux")
    monkeypatch.setattr(torch, "save", enospc)
    argv = d4k_train_argv(models["flux"], runs["data"], output, "--steps", 3, "--resume")
    message = refused(capsys, d4k.main, argv, "state.pt: no space left on device", tmp_path, logs=True)
    assert "step-00000003" in message


@pytest.mark.parametrize("fault, fragment, code", [(enospc, "state.pt: no space left on device", 2),
                                                   (sigterm, "terminated", 143)], ids=["ENOSPC", "SIGTERM"])
def test_op4ksr_checkpoints_are_whole_or_absent(models, runs, tmp_path, capsys, monkeypatch, fault, fragment, code):
    output = resumed(runs, tmp_path, "sr")
    monkeypatch.setattr(torch, "save", fault)
    argv = sr_train_argv(models["flux"], runs["hr"], output, "--steps", 3, "--resume")
    refused(capsys, op4ksr.main, argv, fragment, tmp_path, code=code, logs=True)


def test_a_full_disk_inside_the_safetensors_writer(models, runs, tmp_path, capsys, monkeypatch):
    """safetensors' Rust writer reports the OS error as text: its number still gives the words."""
    from safetensors import SafetensorError

    def full(*_, **__):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              'message: "No space left on device" }) (os error 28)')

    output = resumed(runs, tmp_path, "flux")
    monkeypatch.setattr("safetensors.torch.save_file", full)
    argv = d4k_train_argv(models["flux"], runs["data"], output, "--steps", 3, "--resume")
    refused(capsys, d4k.main, argv, "trainable.safetensors: no space left on device", tmp_path, logs=True)


def test_sigterm_during_a_write_leaves_nothing(models, runs, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(Image.Image, "save", sigterm)
    refused(capsys, d4k.main, generate_argv(models, work), "terminated", work, code=143)
    (work / "p.txt").write_text("a cat\n")
    batch = batch_argv(models, work / "p.txt", work / "new" / "out")
    refused(capsys, d4k.main, batch, "terminated", work, code=143)  # no folder made for it is left
    monkeypatch.undo()
    output = resumed(runs, tmp_path, "flux")
    monkeypatch.setattr(torch, "save", sigterm)
    argv = d4k_train_argv(models["flux"], runs["data"], output, "--steps", 3, "--resume")
    refused(capsys, d4k.main, argv, "terminated", tmp_path, code=143, logs=True)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_dangling_links_as_outputs_are_refused_before_any_work(models, runs, work, capsys):
    (work / "link.png").symlink_to(work / "gone" / "x.png")
    (work / "dir").symlink_to(work / "gone")
    fragment = "which does not exist"
    refused(capsys, d4k.main, generate_argv(models, work, "--output", work / "link.png"), fragment, work)
    refused(capsys, cu.main, cu_argv(models, work, "--output", work / "link.png"), fragment, work)
    refused(capsys, op4ksr.main, sr_argv(runs, work, "--output", work / "link.png"), fragment, work)
    refused(capsys, d4k.main, d4k_train_argv(models["flux"], runs["data"], work / "dir"), fragment, work)
    refused(capsys, d4k.main, d4k_train_argv(models["flux"], runs["data"], work / "dir" / "run"), fragment, work)


def test_fifos_are_refused_without_being_opened(models, runs, work, capsys):
    """Each would wait for a writer forever if it were opened."""
    pipe = fifo(work / "pipe.png")
    fragment = "is a FIFO (named pipe)"
    refused(capsys, cu.main, cu_argv(models, work, "--input", pipe), fragment, work)
    refused(capsys, op4ksr.main, sr_argv(runs, work, "--input", pipe), fragment, work)
    refused(capsys, cu.main, cu_argv(models, work, "--region-prompts", fifo(work / "r.json")), fragment, work)
    refused(capsys, d4k.main, batch_argv(models, fifo(work / "p.txt"), work / "out"), fragment, work)
    weights = fifo(work / "w.safetensors")
    refused(capsys, op4ksr.main, sr_argv(runs, work, "--weights", weights), fragment, work)
    refused(capsys, d4k.main, generate_argv(models, work, "--model", weights), fragment, work)


def test_a_fifo_listed_in_metadata_is_skipped(models, tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    fifo(data / "pipe.png")
    with (data / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "pipe.png", "text": "a pipe"}) + "\n")
    with deadline():
        examples = d4k.read_dataset(data)
        files = d4k.vae_image_files(data)
    assert len(examples) == 3 and len(files) == 3
    assert capsys.readouterr().err.count("is a FIFO (named pipe)") == 2
    os.replace(data / "metadata.jsonl", tmp_path / "elsewhere")
    fifo(data / "metadata.jsonl")
    argv = d4k_train_argv(models["flux"], data, tmp_path / "run")
    refused(capsys, d4k.main, argv, "metadata.jsonl is a FIFO", tmp_path)


# ======================================================================= 4. weights that are not float


def with_tensor(key, value):
    def change(folder):
        file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        save_file({**load_file(file), key: value}, file)
    return change


def edit_config(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def shard(folder: Path, index: str):
    file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    os.replace(file, file.with_name("diffusion_pytorch_model-00001-of-00001.safetensors"))
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(index)


MODEL_CASES = {  # name: (change to the tiny Flux pipeline, fragment)
    "int tensor": (lambda f: with_tensor("proj_out.weight", torch.ones(8, 8, dtype=torch.int32))(f),
                   "tensor proj_out.weight is int32, not floating point"),
    "bool tensor": (lambda f: with_tensor("proj_out.bias", torch.ones(8, dtype=torch.bool))(f),
                    "tensor proj_out.bias is bool, not floating point"),
    "index not JSON": (lambda f: shard(f, "{not json"), "index.json: not a readable JSON file"),
    "index without weight_map": (lambda f: shard(f, '{"metadata": {}}'), "no weight_map naming a shard file"),
    "config field a string": (lambda f: edit_config(f / "transformer" / "config.json", num_attention_heads="2"),
                              'field num_attention_heads is "2", not a positive integer'),
    "config field a list": (lambda f: edit_config(f / "vae" / "config.json", scaling_factor=[1]),
                            "field scaling_factor is [1], not a positive number"),
    "RoPE axes against the heads": (lambda f: edit_config(f / "transformer" / "config.json", axes_dims_rope=[1, 1, 1]),
                                    "axes_dim (1, 1, 1) must sum to the head dim"),
    "CLIP activation unknown": (lambda f: edit_config(f / "text_encoder" / "config.json", hidden_act="banana"),
                                "hidden_act 'banana' is not one of"),
    "CLIP heads against the width": (lambda f: edit_config(f / "text_encoder" / "config.json", num_attention_heads=3),
                                     "hidden_size 32 is not divisible by num_attention_heads 3"),
    "config.json an array": (lambda f: (f / "transformer" / "config.json").write_text("[1]"),
                             "not a JSON object but a list"),
    "config.json repeats a key": (lambda f: (f / "vae" / "config.json").write_text('{"a": 1, "a": 2}'),
                                  "the key 'a' appears twice"),
}


@pytest.mark.parametrize("field, value", [("patch_size", "2"), ("pos_embed_max_size", 1.5),
                                          ("block_out_channels", "abc")])
def test_cupscale_refuses_config_fields_of_the_wrong_type(models, work, capsys, field, value):
    part = "vae" if field == "block_out_channels" else "transformer"
    model = models["root"] / f"sd3_{field}"
    if not model.exists():
        import shutil

        shutil.copytree(models["sd3"], model)
        edit_config(model / part / "config.json", **{field: value})
    refused(capsys, cu.main, cu_argv(models, work, "--model", model), f"config.json: field {field} is ", work)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_models_refuse_what_is_not_weights(models, tmp_path, capsys, case):
    change, fragment = MODEL_CASES[case]
    model = variant(models, case.replace(" ", "_"), change)
    refused(capsys, d4k.main, generate_argv(models, tmp_path, "--model", model), fragment, tmp_path)


def op4ksr_variant(runs, name, tensors=None, metadata=None) -> Path:
    from safetensors import safe_open

    source = runs["sr"] / "op4ksr.safetensors"
    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata())
    target = runs["root"] / f"{name}.safetensors"
    save_file({**load_file(source), **(tensors or {})}, target, {**meta, **(metadata or {})})
    return target


A = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"


@pytest.mark.parametrize("case", ["int8", "ranks disagree", "1-D lora_A", "scale overflows", "theta text"])
def test_op4ksr_checkpoints_refuse_what_is_not_a_lora(runs, work, capsys, case):
    a = load_file(runs["sr"] / "op4ksr.safetensors")[A]
    tensors, metadata, fragment = {
        "int8": ({A: a.to(torch.int8)}, None, f"tensor {A} is int8, not floating point"),
        "ranks disagree": ({A: torch.zeros(a.shape[0] + 1, a.shape[1])}, None, "not a low-rank pair"),
        "1-D lora_A": ({A: torch.zeros(a.shape[1])}, None, "not a low-rank pair"),
        "scale overflows": (None, {"scale": "1e999"}, "scale='1e999', not a number"),
        "theta text": (None, {"theta": "[100]"}, "theta='[100]'"),
    }[case]
    weights = op4ksr_variant(runs, case.replace(" ", "_"), tensors, metadata)
    refused(capsys, op4ksr.main, sr_argv(runs, work, "--weights", weights), fragment, work)


def test_pickled_weights_holding_non_tensors_are_refused(tmp_path):
    torch.save({"lin0.model.1.weight": 1.0}, tmp_path / "linear.pth")
    with pytest.raises(UserError, match="entry lin0.model.1.weight is a float, not a tensor"):
        d4k.load_lpips(tmp_path / "linear.pth", tmp_path / "linear.pth")


# ========================================================================================== 5. text


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_wide_text_without_a_mark_is_refused(models, work, capsys, encoding):
    (work / "prompts.txt").write_bytes("a cat\na dog\n".encode(encoding))
    argv = batch_argv(models, work / "prompts.txt", work / "o")
    refused(capsys, d4k.main, argv, "holds NUL characters (UTF-16 or UTF-32 without a byte-order mark?)", work)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_text_with_a_byte_order_mark_is_decoded(tmp_path, encoding):
    (tmp_path / "prompts.txt").write_bytes("a cat\nun café\n".encode(encoding))
    assert d4k.read_prompt_file(tmp_path / "prompts.txt") == (["a cat", "un café"], None)
    (tmp_path / "r.json").write_bytes('{"0,0": "a cat"}'.encode(encoding))
    assert io.read_json(tmp_path / "r.json") == {"0,0": "a cat"}


def test_blank_prompts_are_refused(models, runs, work, capsys):
    refused(capsys, d4k.main, generate_argv(models, work, "--prompt", "   "), "the prompt is empty or blank", work)
    refused(capsys, cu.main, cu_argv(models, work, "--prompt", " \t"), "--prompt is blank", work)
    argv = sr_train_argv(models["flux"], runs["hr"], work / "run", "--prompt", "  ")
    refused(capsys, op4ksr.main, argv, "--prompt is blank", work)


@pytest.mark.parametrize("line, fragment", [
    ('{"file_name": "a.jpg", "text": null}', "expected an object with a file_name and a non-empty text"),
    ('{"file_name": "a.jpg", "text": 7}', "expected an object with a file_name and a non-empty text"),
    ('{"file_name": "a.jpg", "text": "   "}', "expected an object with a file_name and a non-empty text"),
    ('{"file_name": "a.jpg", "text": "a", "text": "b"}', "the key 'text' appears twice"),
])
def test_jsonl_values_of_the_wrong_type_are_refused(models, work, capsys, line, fragment):
    (work / "p.jsonl").write_text(line + "\n")
    argv = batch_argv(models, work / "p.jsonl", work / "o")
    refused(capsys, d4k.main, argv, fragment, work)


def test_training_data_skips_repeated_names_and_captions_that_are_not_text(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    with (data / "metadata.jsonl").open("a") as f:
        f.write('{"file_name": "0.png", "text": "again"}\n{"file_name": "1.png", "text": null}\n')
    assert [e.text for e in d4k.read_dataset(data)] == [json.loads(line)["text"] for line in
                                                            (data / "metadata.jsonl").read_text().splitlines()[:3]]
    err = capsys.readouterr().err
    assert "file_name '0.png' repeats line 1" in err and "must be strings" in err
    assert len(d4k.vae_image_files(data)) == 3 and "repeats line 1" in capsys.readouterr().err


@pytest.mark.parametrize("text, fragment", [
    ('{"0,0": "a", "0,0": "b"}', "the key '0,0' appears twice"),
    ('{"0,0": null}', "0,0"),
])
def test_region_prompts_with_repeated_or_wrong_values_are_refused(models, work, capsys, text, fragment):
    (work / "r.json").write_text(text)
    refused(capsys, cu.main, cu_argv(models, work, "--region-prompts", work / "r.json"), fragment, work)


# ================================================================================ 6. caption commands


def test_a_caption_command_is_done_when_it_exits_whatever_its_children_do():
    code = "import subprocess, sys; subprocess.Popen(['sleep', '30']); print('a cat'); sys.stdout.flush()"
    start = time.monotonic()
    assert cu._run_caption_command([sys.executable, "-c", code], 20) == "a cat"
    assert time.monotonic() - start < 10


def test_a_caption_command_timeout_kills_its_whole_group(tmp_path):
    marker = tmp_path / "child-was-here"
    child = f"import time, pathlib; time.sleep(2); pathlib.Path({str(marker)!r}).write_text('x')"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(30)"
    start = time.monotonic()
    with pytest.raises(UserError, match="caption command timed out after 0.5 s"):
        cu._run_caption_command([sys.executable, "-c", code], 0.5)
    assert time.monotonic() - start < 10
    time.sleep(3)
    assert not marker.exists()


# ===================================================================== 7. sizes from headers, warnings


def test_a_huge_image_is_refused_from_its_header(models, runs, work, capsys, monkeypatch):
    huge_png(work / "huge.png")
    monkeypatch.setattr(io, "to_rgb", lambda *_: pytest.fail("the image was decoded"))
    refused(capsys, cu.main, cu_argv(models, work, "--input", work / "huge.png"), "huge.png", work)
    refused(capsys, op4ksr.main, sr_argv(runs, work, "--input", work / "huge.png"), "huge.png", work)


def test_library_warnings_become_one_line(capsys):
    import warnings

    def main(argv):
        warnings.warn("something odd\nwith details on a second line", UserWarning)

    assert run_cli(main, []) == 0
    assert capsys.readouterr().err == "warning: something odd\n"


def test_an_hf_home_that_is_a_file_and_a_half_repo_id_are_one_line(tmp_path):
    import subprocess

    (tmp_path / "hf").write_text("a file")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    script = Path(d4k.__file__)
    for model, fragment in (("owner/name", "the Hugging Face cache cannot be used"),
                            ("owner/", "no such file or folder, nor a Hub repo id")):
        done = subprocess.run([sys.executable, script, "--model", model, "--prompt", "a", "--output",
                               tmp_path / "x.png"], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and fragment in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# ============================================================================================ 8. modes


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_output_gets_the_umask_mode(models, runs, tmp_path, mask):
    previous = os.umask(mask)
    try:
        argv = d4k_train_argv(models["flux"], runs["data"], tmp_path / "run", "--steps", 1)
        assert run_cli(d4k.main, [str(a) for a in argv]) == 0
        assert run_cli(d4k.main, [str(a) for a in generate_argv(models, tmp_path)]) == 0
        argv = sr_train_argv(models["flux"], runs["hr"], tmp_path / "sr", "--steps", 1)
        assert run_cli(op4ksr.main, argv) == 0
        Image.new("RGB", (64, 64), (200, 120, 40)).save(tmp_path / "lr.png")
        assert run_cli(cu.main, [str(a) for a in cu_argv(models, tmp_path)]) == 0
        (tmp_path / "lr.png").unlink()
    finally:
        os.umask(previous)
    outputs = [p for p in tmp_path.rglob("*") if not p.name.startswith(".")]
    assert outputs and {p.suffix for p in outputs} >= {".safetensors", ".pt", ".png", ".jsonl", ".json"}
    for path in outputs:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path

"""cupscale.py's command line on bad input: each case answers in one short line with a non-zero exit,
writes nothing and leaves every existing file as it was. All but the last tests are refused before
any weight is read, on a tiny random SD3 pipeline (VAE factor 2, patch 2: sizes are multiples of 4 px;
position table 32 patches: regions of at most 128 px)."""

import errno
import shlex
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import cupscale as cu
from common.io import run_cli
from tiny_pipelines import make_sd3_pipeline

PY = shlex.quote(sys.executable)
# Regions 64 px with 32 px overlap, VAE tiles 128 px, 6-step schedule (3 steps run); the 64 px input at
# --scale 2 gives 3x3 regions.
BASE = {"--input": "{tmp}/lr.png", "--output": "{tmp}/hr.png", "--prompt": "a photo of cat", "--scale": "2",
        "--region-size": "64", "--region-overlap": "32", "--vae-tile": "128", "--vae-overlap": "16",
        "--steps": "6", "--device": "cpu", "--dtype": "fp32"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipeline", seed=0)


def caption(code):
    """A --caption-cmd running `code` in Python with the region's crop as argv[1]."""
    return f"{PY} -c {shlex.quote(code)} {{image}}"


def write(name, data):
    def prepare(tmp):
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return prepare


def folder_at(name):
    return lambda tmp: (tmp / name).mkdir()


def image_at(name, size):
    return lambda tmp: Image.new("RGB", size, (90, 140, 200)).save(tmp / name)


def case(name, changes, expected, prepare=None, **marks):
    return pytest.param(changes, expected, prepare, id=name, **marks)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
GRID = '{"0,0": "a", "0,1": "b", "1,0": "c", "1,1": "d"}'  # 2x2; the run has 3x3 regions

CASES = [
    # numbers, refused by the parser
    case("guidance-nan", {"--guidance": "nan"}, "--guidance: must be a finite number"),
    case("guidance-negative", {"--guidance": "-1"}, "--guidance: must be in [0, 100], got -1"),
    case("scale-nan", {"--scale": "nan"}, "--scale: must be a finite number"),
    case("scale-inf", {"--scale": "inf"}, "--scale: must be a finite number"),
    case("scale-below-one", {"--scale": "0.5"}, "--scale: must be in [1, 128], got 0.5"),
    case("scale-not-a-number", {"--scale": "x4"}, "--scale: expected a number, got 'x4'"),
    case("steps-zero", {"--steps": "0"}, "--steps: must be in [1, 1000], got 0"),
    case("steps-fraction", {"--steps": "2.5"}, "--steps: expected an integer"),
    case("strength-above-one", {"--strength": "1.5"}, "--strength: must be in [0, 1], got 1.5"),
    case("strength-nan", {"--strength": "nan"}, "--strength: must be a finite number"),
    case("strength-zero", {"--strength": "0"},
         "--strength 0 of --steps 6 leaves no step to take (--noise-level diffusers-strength)"),
    case("strength-leaves-no-step", {"--strength": "0.1", "--noise-level": "snr-matched"},
         "--strength 0.1 of --steps 6 leaves no step to take (--noise-level snr-matched)"),
    case("noise-level-unknown", {"--noise-level": "sdxl"}, "--noise-level: invalid choice: 'sdxl'"),
    case("gsp-normalisation-unknown", {"--gsp-normalisation": "l2"},
         "--gsp-normalisation: invalid choice: 'l2'"),
    case("seed-negative", {"--seed": "-1"}, f"--seed: must be in [0, {2**64 - 1}], got -1"),
    case("seed-beyond-64-bits", {"--seed": str(2**64)}, f"--seed: must be in [0, {2**64 - 1}], got {2**64}"),
    case("region-size-zero", {"--region-size": "0"}, "--region-size: must be >= 1, got 0"),
    case("region-overlap-negative", {"--region-overlap": "-32"}, "--region-overlap: must be >= 0, got -32"),
    case("region-batch-zero", {"--region-batch": "0"}, "--region-batch: must be >= 1, got 0"),
    case("vae-tile-zero", {"--vae-tile": "0"}, "--vae-tile: must be >= 1, got 0"),
    case("vae-overlap-negative", {"--vae-overlap": "-1"}, "--vae-overlap: must be >= 0, got -1"),
    case("gsp-step-nan", {"--gsp-step-size": "nan"}, "--gsp-step-size: must be a finite number"),
    case("gsp-step-beyond-one", {"--gsp-step-size": "2"}, "--gsp-step-size: must be in [0, 1], got 2"),
    case("device-banana", {"--device": "banana"}, "--device: 'banana' is not a device"),
    case("device-cuda-absent", {"--device": "cuda"}, "--device: cuda: CUDA is not available", marks=NO_CUDA),
    case("device-cuda-index", {"--device": "cuda:64"}, "--device: cuda:64: "),
    case("mode-unknown", {"--mode": "upscale"}, "--mode: invalid choice: 'upscale'"),
    case("input-not-given", {"--input": None}, "the following arguments are required: --input"),
    case("two-region-prompt-sources", {"--region-prompts": "{tmp}/r.json", "--caption-cmd": "x {image}"},
         "--caption-cmd: not allowed with argument --region-prompts"),
    # the outputs, checked before anything is read
    case("output-exists", {}, "hr.png exists; pass --overwrite", write("hr.png", b"an earlier result")),
    case("sidecar-exists", {}, "hr.regions.json exists; pass --overwrite", write("hr.regions.json", "{}")),
    case("output-is-a-folder", {"--output": "{tmp}/out"}, "out is a folder; give a file name",
         folder_at("out")),
    case("sidecar-is-a-folder", {"--overwrite": True}, "hr.regions.json is a folder, where the regions of",
         folder_at("hr.regions.json")),
    case("output-extension", {"--output": "{tmp}/hr.gif"}, "hr.gif: unsupported extension .gif"),
    case("output-inside-a-file", {"--output": "{tmp}/lr.png/hr.png"}, "lr.png is a file, not a folder"),
    # the input
    case("input-is-a-folder", {"--input": "{tmp}"}, "is a folder; give an image file"),
    case("input-missing", {"--input": "{tmp}/nothing.png"}, "nothing.png: no such file"),
    case("input-not-an-image", {"--input": "{tmp}/notes.png"}, "notes.png: not a readable image",
         write("notes.png", "hello")),
    case("input-too-small", {"--input": "{tmp}/small.png"}, "48x80: too small",
         image_at("small.png", (48, 80))),
    case("target-beyond-8192", {"--input": "{tmp}/big.png", "--scale": "100"}, "12800x12800",
         image_at("big.png", (128, 128))),
    # the model, looked up through its config files only
    case("model-missing", {"--model": "{tmp}/nowhere"}, "nowhere: no such file or folder"),
    case("model-not-a-pipeline", {"--model": "{tmp}/folder"}, "not an SD3 pipeline folder", folder_at("folder")),
    case("model-not-safetensors", {"--model": "{tmp}/lr.png"}, "lr.png: not a readable safetensors file"),
    # sizes the model cannot take
    case("region-beyond-position-table", {"--region-size": "256"}, "position table covers at most 128 px"),
    case("region-not-a-multiple", {"--region-size": "66"}, "must be multiples of 4 px"),
    case("overlap-not-below-region", {"--region-overlap": "64"}, "0 <= overlap < size"),
    case("vae-overlap-not-below-tile", {"--vae-overlap": "128"}, "0 <= overlap < tile"),
    # regional prompt files
    case("region-prompts-not-utf8", {"--region-prompts": "{tmp}/r.json"}, "the JSON file is not UTF-8 text",
         write("r.json", b'{"0,0": "caf\xe9"}')),
    case("region-prompts-folder", {"--region-prompts": "{tmp}/r.json"}, "r.json: is a folder",
         folder_at("r.json")),
    case("region-prompts-missing", {"--region-prompts": "{tmp}/r.json"}, "r.json: cannot read the JSON file"),
    case("region-prompts-not-json", {"--region-prompts": "{tmp}/r.json"}, "r.json: not a readable JSON file",
         write("r.json", '{"0,0": ')),
    case("region-prompts-wrong-grid", {"--region-prompts": "{tmp}/r.json"}, "missing regions 0,2, 1,2, 2,0",
         write("r.json", GRID)),
    # caption commands, run before the weights are read
    case("caption-fails", {"--caption-cmd": caption("import sys; sys.exit('llava: out of memory')")},
         "region 0,0: caption command failed with exit code 1: "),
    case("caption-not-utf8", {"--caption-cmd": caption("import sys; sys.stdout.buffer.write(b'\\xff cat')")},
         "printed non-UTF-8 bytes (at byte 0)"),
    case("caption-terminal-escapes", {"--caption-cmd": caption("print('\\x1b[31ma cat\\x1b[0m')")},
         "printed control characters"),
    case("caption-silent", {"--caption-cmd": caption("pass")}, "caption command printed nothing"),
    case("caption-not-found", {"--caption-cmd": "no-such-captioner {image}"}, "caption command not found"),
    case("caption-not-executable", {"--caption-cmd": "{tmp}/captioner.sh {image}"},
         "caption command cannot run: ", write("captioner.sh", "#!/bin/sh\necho a cat\n")),
    case("caption-without-image", {"--caption-cmd": f"{PY} -c pass"}, "must contain the placeholder {image}"),
    case("caption-unclosed-quote", {"--caption-cmd": "llava --prompt 'a cat {image}"}, "cannot be split"),
]


def command(tmp, model, changes):
    options = {**BASE, "--model": str(model), **changes}
    argv = []
    for option, value in options.items():
        if value is True:
            argv.append(option)
        elif value is not None:
            argv += [option, value.replace("{tmp}", str(tmp))]
    return argv


def snapshot(tmp):
    return {path: path.read_bytes() for path in sorted(tmp.rglob("*")) if path.is_file()}


@pytest.fixture
def work(tmp_path):
    Image.new("RGB", (64, 64), (200, 120, 40)).save(tmp_path / "lr.png")
    return tmp_path


def error_lines(err):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("error: "))
    return lines[start:]


@pytest.mark.parametrize("changes, expected, prepare", CASES)
def test_bad_input_is_refused_before_any_weight_and_writes_nothing(folder, work, capsys, changes, expected,
                                                                    prepare):
    if prepare:
        prepare(work)
    before = snapshot(work)
    assert run_cli(cu.main, command(work, folder, changes)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) <= 3 and "loading SD3" not in err, err
    assert expected in error_lines(err)[0], err
    assert snapshot(work) == before  # no image, no sidecar, no temporary file; the others byte-identical


# The three cases below run the whole (tiny) pipeline: one region, one step.
QUICK = {"--scale": "1", "--steps": "2"}


def appearing(name):
    """A caption command that creates `name` in the work folder (another run finishing meanwhile)."""
    return caption(f"import pathlib; pathlib.Path({name!r}).write_text('theirs'); print('a cat')")


@pytest.mark.parametrize("name", ["hr.regions.json", "hr.png"])
def test_a_file_that_appears_during_the_run_is_kept_and_nothing_written(folder, work, capsys, monkeypatch,
                                                                         name):
    monkeypatch.chdir(work)  # the caption command writes into the current folder
    before = snapshot(work)
    assert run_cli(cu.main, command(work, folder, {**QUICK, "--caption-cmd": appearing(name)})) == 2
    err = capsys.readouterr().err
    assert f"{name} exists" in error_lines(err)[0] and len(error_lines(err)) <= 3, err
    assert snapshot(work) == {**before, work / name: b"theirs"}


def test_a_sidecar_that_cannot_be_written_takes_the_image_with_it(folder, work, capsys, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)  # only the sidecar is written with write_text
    before = snapshot(work)
    assert run_cli(cu.main, command(work, folder, QUICK)) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in error_lines(err)[0] and len(error_lines(err)) <= 3, err
    assert snapshot(work) == before

"""Tests of common/io.py (CPU, no network). The attention tests are in tests/test_attention.py."""

import errno
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from common import io
from common.io import UserError

# ================================================================================ images


def save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_load_rgba_composited_on_white(tmp_path):
    array = np.zeros((4, 6, 4), np.uint8)
    array[..., 0] = 200
    array[:, :3, 3] = 0  # left half fully transparent
    array[:, 3:, 3] = 255
    image = io.load_image(save(Image.fromarray(array, "RGBA"), tmp_path / "a.png"))
    assert image.mode == "RGB" and image.size == (6, 4)
    out = np.asarray(image)
    assert (out[:, :3] == 255).all()
    assert (out[:, 3:] == [200, 0, 0]).all()


def test_load_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    path = save(image, tmp_path / "p.png", transparency=0)
    out = np.asarray(io.load_image(path))
    assert (out[1, 1] == [10, 20, 30]).all()
    assert (out[0, 0] == 255).all()  # transparent index -> white


def test_load_16_bit_grey(tmp_path):
    values = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "g16.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    out = np.asarray(io.load_image(path))
    assert out.shape == (2, 2, 3)
    assert out[..., 0].tolist() == [[0, 128], [255, 1]]


def test_load_grey_l(tmp_path):
    path = save(Image.fromarray(np.array([[0, 100], [200, 255]], np.uint8), "L"), tmp_path / "l.png")
    out = np.asarray(io.load_image(path))
    assert out.shape == (2, 2, 3) and out[..., 1].tolist() == [[0, 100], [200, 255]]


def test_load_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (8, 6), (0, 0, 0, 0)), tmp_path / "c.jpg")
    image = io.load_image(path)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert np.asarray(image).min() > 240  # no ink = white


def test_load_exif_rotated_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(Image.new("RGB", (40, 20), (255, 0, 0)), tmp_path / "r.jpg", exif=exif)
    assert io.load_image(path).size == (20, 40)


def test_load_bad_images(tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    png = save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), tmp_path / "full.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    for path, needle in ((not_image, "not a readable image"), (truncated, "not a readable image"),
                         (tmp_path / "missing.png", "no such file")):
        with pytest.raises(UserError) as error:
            io.load_image(path)
        assert needle in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UserError) as error:
        io.load_image(png, max_pixels=64 * 64 - 1)
    assert "64x64 exceeds" in str(error.value)
    assert io.load_image(png, max_pixels=64 * 64).size == (64, 64)


def test_save_png_metadata_and_jpeg(tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8))
    io.save_image(image, tmp_path / "out.png", {"prompt": "a cat, 4K", "seed": 7})
    with Image.open(tmp_path / "out.png") as saved:
        assert saved.text == {"prompt": "a cat, 4K", "seed": "7"}
        assert np.array_equal(np.asarray(saved), np.asarray(image))  # PNG is lossless
    io.save_image(image, tmp_path / "out.jpg", {"seed": 7})
    with Image.open(tmp_path / "out.jpg") as saved:
        assert saved.format == "JPEG" and saved.size == (7, 5)
        assert json.loads(saved.info["comment"]) == {"seed": "7"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jpg", "out.png"]  # no temp files


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous image")
    image = Image.new("RGB", (4, 4))

    def failing_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"\x89PNG half written")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(UserError) as error:
        io.save_image(image, target)
    assert "no space left on device" in str(error.value)
    with pytest.raises(UserError):
        io.save_image(image, tmp_path / "new.png")
    assert target.read_bytes() == b"previous image"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no new file, no temp file


def test_save_refusals(tmp_path):
    image = Image.new("RGB", (4, 4))
    (tmp_path / "exists.png").write_bytes(b"keep")
    with pytest.raises(UserError, match="exists"):
        io.save_image(image, tmp_path / "exists.png", overwrite=False)
    assert (tmp_path / "exists.png").read_bytes() == b"keep"
    with pytest.raises(UserError, match="unsupported image extension"):
        io.save_image(image, tmp_path / "out.gif")
    io.save_image(image, tmp_path / "exists.png", overwrite=True)
    with Image.open(tmp_path / "exists.png") as saved:
        assert saved.size == (4, 4)


def test_image_tensor_round_trip():
    array = np.random.default_rng(2).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    array[0, :3] = [[0, 0, 0], [255, 255, 255], [127, 128, 1]]
    tensor = io.image_to_tensor(Image.fromarray(array))
    assert tensor.shape == (3, 9, 7) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.asarray(io.tensor_to_image(tensor)), array)
    assert np.asarray(io.tensor_to_image(torch.full((3, 2, 2), 5.0))).min() == 255  # clipped


# ========================================================================== cli, seeding


def test_run_cli(capsys):
    def main(argv):
        raise UserError("the thing is broken")

    assert io.run_cli(main, []) == 2
    assert capsys.readouterr().err == "error: the thing is broken\n"
    assert io.run_cli(lambda argv: None, []) == 0


def test_run_cli_reports_a_kit_value_error_as_one_line(capsys):
    """Models and kits refuse their input with a plain ValueError; the command line shows it as
    a UserError: one line, exit code 2, no traceback."""
    def main(argv):
        raise ValueError("x.safetensors: not a Flux transformer checkpoint")

    assert io.run_cli(main, []) == 2
    assert capsys.readouterr().err == "error: x.safetensors: not a Flux transformer checkpoint\n"


def test_build_names_the_checkpoint():
    """A config refused while the model is built is named after its file (the config readers
    leave that to `build`); file errors from common.io pass through unchanged."""
    def refuse(message, kind=ValueError):
        def make():
            raise kind(message)
        return make

    with pytest.raises(UserError, match=r"^ckpt\.safetensors: head dim 7: pass the RoPE axes_dim$"):
        io.build(refuse("head dim 7: pass the RoPE axes_dim"), {}, "Flux", "ckpt.safetensors")
    with pytest.raises(UserError, match=r"^config\.json: not a readable JSON file$"):
        io.build(refuse("config.json: not a readable JSON file", UserError), {}, "T5", "ckpt")


def test_seed_everything():
    generator = io.seed_everything(1234)
    a, a_global = torch.randn(5, generator=generator), torch.randn(5)
    generator = io.seed_everything(1234)
    assert torch.equal(torch.randn(5, generator=generator), a) and torch.equal(torch.randn(5), a_global)
    assert not torch.equal(torch.randn(5, generator=io.seed_everything(1235)), a)


# ============================================================================== weights


def test_resolve_source_local(tmp_path):
    pipeline = tmp_path / "pipeline"
    (pipeline / "transformer").mkdir(parents=True)
    (pipeline / "vae").mkdir()
    assert io.resolve_source(pipeline, subfolder="transformer") == pipeline / "transformer"
    assert io.resolve_source(pipeline, subfolder="vae") == pipeline / "vae"
    assert io.resolve_source(pipeline / "vae", subfolder="vae") == pipeline / "vae"  # component folder itself
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    assert io.resolve_source(single, subfolder="transformer") == single
    with pytest.raises(UserError, match="no such file or folder"):
        io.resolve_source(tmp_path / "absent")


def test_sharded_index(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "stray.safetensors").write_bytes(b"not part of the model")
    files = io.safetensors_files(tmp_path)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    state = io.load_safetensors(tmp_path)
    assert sorted(state) == ["a", "b"]
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="missing shard"):
        io.load_safetensors(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .safetensors files"):
        io.safetensors_files(tmp_path / "empty")


def test_load_safetensors_dtypes_and_filter(tmp_path):
    from safetensors.torch import save_file

    fp8 = torch.tensor([0.5, -1.75, 448.0, 0.015625]).to(torch.float8_e4m3fn)
    path = tmp_path / "mixed.safetensors"
    save_file({"w32": torch.tensor([1.0, 2.5]), "w16": torch.tensor([3.0], dtype=torch.bfloat16), "w8": fp8,
               "ids": torch.tensor([1, 2, 3], dtype=torch.int64), "flags": torch.tensor([1, 0], dtype=torch.uint8),
               "text_encoders.skip": torch.ones(2)}, str(path))
    for dtype in (torch.bfloat16, torch.float32):
        state = io.load_safetensors(path, dtype)
        assert {k: v.dtype for k, v in state.items()} == {
            "w32": dtype, "w16": dtype, "w8": dtype, "ids": torch.int64, "flags": torch.uint8, "text_encoders.skip": dtype}
        assert state["w8"].float().tolist() == [0.5, -1.75, 448.0, 0.015625]
        assert state["ids"].tolist() == [1, 2, 3]
    kept = io.load_safetensors(path, None)
    assert kept["w8"].dtype == torch.float8_e4m3fn and kept["w16"].dtype == torch.bfloat16  # dtype=None keeps all
    filtered = io.load_safetensors(path, torch.float32, key_filter=lambda key: not key.startswith("text_encoders."))
    assert sorted(filtered) == ["flags", "ids", "w16", "w32", "w8"]


def test_load_safetensors_bad_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    for read in (io.load_safetensors, io.safetensors_keys):
        with pytest.raises(UserError) as error:
            read(bad)
        assert "not a readable safetensors file" in str(error.value) and "\n" not in str(error.value)


def test_safetensors_keys(tmp_path):
    from safetensors.torch import save_file

    save_file({"b": torch.ones(2), "a": torch.zeros(1, dtype=torch.int32)}, str(tmp_path / "m.safetensors"))
    assert sorted(io.safetensors_keys(tmp_path / "m.safetensors")) == ["a", "b"]


def test_read_json(tmp_path):
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert io.read_json(tmp_path / "ok.json") == {"a": 1}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not a readable JSON file"):
        io.read_json(tmp_path / "bad.json")


# ======================================================================= bad-input plumbing


def test_argument_types_name_the_range():
    parser = io.ArgumentParser(prog="tool")
    parser.add_argument("--size", type=io.integer(1))
    parser.add_argument("--strength", type=io.number(0, 1))
    parser.add_argument("--seed", type=io.SEED)
    parser.add_argument("--device", type=io.device_name)
    assert parser.parse_args(["--size", "3", "--strength", "0.5", "--seed", str(2**64 - 1)]).seed == 2**64 - 1
    for argv, expected in [
        (["--size", "0"], "argument --size: must be >= 1, got 0"),
        (["--size", "x"], "expected an integer, got 'x'"),
        (["--strength", "nan"], "must be a finite number, got nan"),
        (["--strength", "inf"], "must be a finite number"),
        (["--strength", "1.5"], "must be in [0, 1], got 1.5"),
        (["--seed", str(2**64)], "must be in [0, 18446744073709551615]"),
        (["--seed", "-1"], "must be in"),
        (["--device", "banana"], "'banana' is not a device"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "cuda"),
    ]:
        with pytest.raises(UserError) as error:
            parser.parse_args(argv)
        assert expected in str(error.value) and "tool --help" in str(error.value), (argv, str(error.value))


def test_check_output_file_refuses_before_any_work(tmp_path):
    (tmp_path / "exists.png").write_bytes(b"keep")
    (tmp_path / "a-file").write_bytes(b"")
    for path, overwrite, expected in [
        (tmp_path / "exists.png", False, "exists; pass --overwrite"),
        (tmp_path, True, "is a folder; give a file name"),
        (tmp_path / "out.gif", True, "unsupported extension .gif"),
        (tmp_path / "out", True, "unsupported extension (none)"),
        (tmp_path / "a-file" / "out.png", True, "a-file is a file, not a folder"),
    ]:
        with pytest.raises(UserError) as error:
            io.check_output_file(path, overwrite)
        assert expected in str(error.value), str(error.value)
    assert io.check_output_file(tmp_path / "exists.png", overwrite=True) == tmp_path / "exists.png"
    assert io.check_output_file(tmp_path / "new" / "deeper" / "x.JPG") == tmp_path / "new" / "deeper" / "x.JPG"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="not writable"):
            io.check_output_file(locked / "x.png")


def test_atomic_files_appear_together_with_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        with io.atomic_files([tmp_path / "a.png", tmp_path / "a.json"]) as (image, sidecar):
            image.write_bytes(b"image")
            sidecar.write_text("{}")
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.png"]
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644

    with pytest.raises(RuntimeError):  # the block fails half-way: neither file appears
        with io.atomic_files([tmp_path / "b.png", tmp_path / "b.json"]) as (image, sidecar):
            image.write_bytes(b"image")
            raise RuntimeError("sidecar failed")
    (tmp_path / "c.json").write_text("someone else's")  # the second name is taken: the first is rolled back
    with pytest.raises(UserError, match="c.json exists"):
        with io.atomic_files([tmp_path / "c.png", tmp_path / "c.json"]) as temps:
            for temp in temps:
                temp.write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.png", "c.json"]
    assert (tmp_path / "c.json").read_text() == "someone else's"


def test_exclusive_creation_loses_no_result(tmp_path):
    """Two runs writing one name: the second to finish fails cleanly instead of replacing the first."""
    target = tmp_path / "metrics.json"
    with pytest.raises(UserError, match="another run"):
        with io.atomic_write(target, overwrite=False) as temp:
            temp.write_text("second run")
            target.write_text("first run")  # finished while the second was still writing
    assert target.read_text() == "first run" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_non_finite_results_are_not_saved():
    with pytest.raises(UserError, match="NaN/Inf"):
        io.tensor_to_image(torch.full((3, 2, 2), float("nan")))


def test_error_line_starts_on_its_own_line(capsys):
    def main(argv):
        update = io.progress_bar("sampling", total=10)
        update(3)
        raise UserError("stopped half-way")

    assert io.run_cli(main, []) == 2
    err = capsys.readouterr().err
    assert "\nerror: stopped half-way\n" in err and not io._open_bars


def test_progress_bar_shows_a_postfix_and_closes_at_total():
    update = io.progress_bar("train", total=3, initial=1)
    bar = io._open_bars[-1]
    update(2, postfix={"loss": "0.5", "mse": "0.25"})
    assert bar.n == 2 and "loss=0.5" in bar.postfix and "mse=0.25" in bar.postfix
    update(3)
    assert bar not in io._open_bars


def test_read_text_refuses_non_utf8(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text"):
        io.read_text(tmp_path / "latin1.txt", "prompt file")
    (tmp_path / "model_index.json").write_bytes(b'{"name": "\xff"}')
    with pytest.raises(UserError, match="model_index.json: the JSON file is not UTF-8"):
        io.read_json(tmp_path / "model_index.json")


# ----------------------------------------------------------------------------- folder_lock


def test_folder_lock_keeps_a_second_run_out_and_is_released(tmp_path):
    folder = tmp_path / "new" / "run"
    with io.folder_lock(folder):
        holder = (folder / ".lock").read_text()
        assert holder == f"{io.socket.gethostname()} {os.getpid()}"
        with pytest.raises(io.FolderInUse) as refused, io.folder_lock(folder):
            pass
        message = str(refused.value)
        assert f"in use by another run ({holder})" in message and str(folder / ".lock") in message
        assert "\n" not in message and isinstance(refused.value, UserError)
        assert (folder / ".lock").read_text() == holder  # the refused run left the lock alone
    assert list(folder.iterdir()) == []
    with pytest.raises(RuntimeError), io.folder_lock(folder):  # released on failure too
        raise RuntimeError
    assert list(folder.iterdir()) == []
    with io.folder_lock(tmp_path / "rank1", enabled=False):
        assert not (tmp_path / "rank1").exists()


def test_folder_lock_takes_over_a_dead_run_but_not_another_machine(tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-c", "import os; print(os.getpid())"]
    finished = subprocess.run(command, capture_output=True, text=True)
    (tmp_path / ".lock").write_text(f"{io.socket.gethostname()} {finished.stdout.strip()}")
    with io.folder_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{io.socket.gethostname()} {os.getpid()}"
    (tmp_path / ".lock").write_text("another-machine 1")
    with pytest.raises(io.FolderInUse, match="another-machine 1"), io.folder_lock(tmp_path):
        pass


def test_device_dtype_defaults_follow_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert io.device_dtype() == (torch.device("cuda"), torch.bfloat16)
    assert io.device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert io.device_dtype("cuda", "fp32") == (torch.device("cuda"), torch.float32)
    assert io.device_dtype("cpu", torch.float16) == (torch.device("cpu"), torch.float16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert io.device_dtype(dtype="bf16") == (torch.device("cpu"), torch.bfloat16)


def test_train_output_rules_of_both_trainers(tmp_path):
    """diffusion4k.py (no `finished`): only a lock may stay, --resume PATH needs a state.pt. op4ksr.py
    (`finished` names its result file): other files may stay, --resume takes a folder."""
    out = tmp_path / "run"
    assert io.check_train_output(out, None) is None  # a new folder
    (out / "notes.txt").parent.mkdir()
    (out / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not empty and holds no checkpoint"):
        io.check_train_output(out, None)
    assert io.check_train_output(out, None, finished="op4ksr.safetensors") is None
    checkpoint = out / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.pt").write_bytes(b"")
    with pytest.raises(UserError, match="already holds a training run"):
        io.check_train_output(out, None)
    assert io.check_train_output(out, "latest") == checkpoint
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UserError, match="no state.pt"):
        io.check_train_output(out, str(bare))
    assert io.check_train_output(out, str(bare), finished="op4ksr.safetensors") == bare
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        io.check_train_output(tmp_path / "file", None)


def test_a_failed_run_leaves_the_folder_as_it_was(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    new = tmp_path / "a" / "b" / "run"
    for folder in (existing, new):
        with pytest.raises(RuntimeError), io.undone_on_failure(folder):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "train_log.jsonl").write_text("{}")
            raise RuntimeError("failed before the first checkpoint")
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "a").exists()

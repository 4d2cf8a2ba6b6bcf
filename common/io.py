"""File I/O shared by the method files: weights, images, arguments, progress, errors.

Weights
    `resolve_source` turns a Hub repo id or a local path into local files, downloading only
    the files asked for; `load_safetensors` reads one file, a shard set (through its
    `*.index.json`) or a folder straight into the requested dtype and device.
Images
    `load_image` opens anything Pillow reads (EXIF orientation applied, palette / 16-bit /
    alpha / CMYK converted to 8-bit RGB, decompression bombs refused); `save_image` writes
    atomically and stores the generation settings as PNG text chunks.
Outputs
    `check_output_file` refuses a bad output path before any weights are read; `atomic_files`
    writes one or several files so that they all appear, complete, or none does, and never
    replaces an existing file unless asked to (two runs racing for one name: one fails cleanly);
    `folder_lock` keeps a second training run out of a folder that one is writing.
Arguments
    `ArgumentParser` reports a bad argument in one line; `integer`, `number` and `device_name`
    are argparse types that check ranges, finiteness and devices before anything is loaded.
Errors
    `UserError` is a problem the user can fix; `run_cli` prints it as one line and exits 2.
"""

import argparse
import contextlib
import errno
import json
import math
import os
import random
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

MAX_IMAGE_PIXELS = 16384 * 16384  # a 16K square; anything larger is refused before decoding


class UserError(Exception):
    """A problem with the user's input, files or environment, stated in one line."""


def run_cli(main, argv=None, memory_hint="try a smaller size") -> int:
    """Run `main(argv)`; turn the errors a user can act on into one line on stderr and an exit code.
    memory_hint: what the CLI offers against running out of GPU memory."""
    try:
        main(argv)
    except UserError as error:
        end_progress_lines()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        end_progress_lines()
        print(f"error: out of GPU memory; {memory_hint}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        end_progress_lines()
        print("interrupted", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------- arguments


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as a `UserError`: one line instead of a usage dump."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def _range_text(low, high) -> str:
    if high is None:
        return f">= {low}"
    return f"<= {high}" if low is None else f"in [{low}, {high}]"


def integer(low=None, high=None):
    """argparse type: an integer in [low, high] (either bound may be None)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range_text(low, high)}, got {value}")
        return value

    return parse


def number(low=None, high=None):
    """argparse type: a finite float in [low, high] (either bound may be None)."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range_text(low, high)}, got {value:g}")
        return value

    return parse


def positive(high=None):
    """argparse type: a finite number in (0, high] (a learning rate, a weight that must act)."""
    finite = number()

    def parse(text):
        value = finite(text)
        if value <= 0 or (high is not None and value > high):
            allowed = "> 0" if high is None else f"in (0, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value:g}")
        return value

    return parse


SEED = integer(0, 2**64 - 1)  # torch.Generator.manual_seed takes 64-bit seeds


def device_name(text) -> str:
    """argparse type: a torch device that exists on this machine (cpu, cuda, cuda:N, mps)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (use cuda, cuda:N, cpu or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: unsupported device type (use cuda, cuda:N, cpu or mps)")
    return text


# ----------------------------------------------------------------------------- progress

_open_bars = []


def progress_bar(description: str, total=None, initial=0):
    """A progress bar on stderr; returns `update(done, total, postfix)` (postfix: a dict of values
    shown after the bar, e.g. the losses). The bar closes itself at `total`."""
    from tqdm.auto import tqdm  # a dependency of huggingface-hub

    bar = tqdm(desc=description, total=total, initial=initial, unit="step", file=sys.stderr, leave=False)
    _open_bars.append(bar)

    def update(done, total=None, postfix=None):
        if total is not None:
            bar.total = total
        if postfix is not None:
            bar.set_postfix(postfix, refresh=False)
        bar.update(done - bar.n)
        if done == bar.total and bar in _open_bars:
            bar.close()
            _open_bars.remove(bar)

    return update


def warn(message: str):
    """A warning line on stderr, above any progress bar (a plain print would land on the bar's line)."""
    from tqdm.auto import tqdm  # a dependency of huggingface-hub

    tqdm.write(f"warning: {message}", file=sys.stderr)


def end_progress_lines():
    """Close the bars still open (a run that stopped half-way) so that the next line starts clean."""
    if _open_bars:
        while _open_bars:
            _open_bars.pop().close()
        print(file=sys.stderr)


def read_text(path, what="file") -> str:
    """A UTF-8 text file's contents, or a one-line `UserError` naming the file and the problem."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: the {what} is not UTF-8 text (byte {error.start})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a {what}") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read the {what} ({error.strerror or error})") from None


# ----------------------------------------------------------------------------- weights


def resolve_source(source, subfolder=None, allow_patterns=("*.safetensors", "*.json"), token=None) -> Path:
    """Return a local path for `source`: an existing file or folder, or a Hub repo id.

    For a Hub repo only the files matching `allow_patterns` inside `subfolder` are
    downloaded (or taken from the local cache). Gated repos (FLUX.1-dev, SD3) need a
    token: `HF_TOKEN` in the environment, `huggingface-cli login`, or `token=`.
    """
    local = Path(source).expanduser()
    if local.exists():
        # A local pipeline folder resolves to its component subfolder; a component folder
        # or a single file is taken as it is.
        if subfolder and (local / subfolder).is_dir():
            return local / subfolder
        return local
    if str(source).count("/") != 1 or str(source).startswith((".", "/", "~")):
        raise UserError(f"{source}: no such file or folder, and not a Hub repo id of the form owner/name")

    from huggingface_hub import errors as hub
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/{p}" if subfolder else p for p in allow_patterns]
    try:
        root = Path(snapshot_download(str(source), allow_patterns=patterns, token=token))
    except hub.GatedRepoError:
        raise UserError(
            f"{source} is a gated repo: accept its licence at https://huggingface.co/{source} "
            "and log in (huggingface-cli login, or set HF_TOKEN)"
        ) from None
    except hub.RepositoryNotFoundError:
        message = "no such repo on the Hugging Face Hub (or it is private and no token was given)"
        raise UserError(f"{source}: {message}") from None
    except hub.LocalEntryNotFoundError:
        message = "not in the local Hub cache and the Hub cannot be reached (offline?)"
        raise UserError(f"{source}: {message}") from None
    except hub.HfHubHTTPError as error:
        raise UserError(f"{source}: download failed: {str(error).splitlines()[0]}") from None
    path = root / subfolder if subfolder else root
    if not path.exists():
        raise UserError(f"{source} has no files matching {patterns}")
    return path


def safetensors_files(path) -> list[Path]:
    """The safetensors files that make up one model: a file, a sharded set, or a folder's files."""
    path = Path(path)
    if path.is_file():
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no .safetensors files")
    return files


def load_safetensors(path, dtype=None, device="cpu", key_filter=None) -> dict[str, torch.Tensor]:
    """Read every tensor of `path` (see `safetensors_files`) into `dtype` on `device`.

    Floating-point tensors (fp8 included) are converted to `dtype`; integer tensors are kept.
    `key_filter(key) -> bool` skips tensors before they are read, so loading one model out
    of an all-in-one checkpoint never reads the others.
    """
    from safetensors import SafetensorError, safe_open

    state = {}
    for file in safetensors_files(path):
        if not file.exists():
            raise UserError(f"{file}: missing shard")
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key_filter is None or key_filter(key):
                        tensor = f.get_tensor(key)
                        cast = dtype is not None and tensor.is_floating_point()
                        state[key] = tensor.to(dtype) if cast else tensor
        except (SafetensorError, OSError) as error:
            raise UserError(f"{file}: not a readable safetensors file ({error})") from None
    return state


def safetensors_keys(path) -> list[str]:
    """The tensor names of a safetensors file, read from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error})") from None


def read_json(path) -> dict:
    try:
        return json.loads(read_text(path, "JSON file"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not a readable JSON file ({error})") from None


# ----------------------------------------------------------------------------- outputs

IMAGE_FORMATS = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"
}


def check_writable_folder(folder) -> None:
    """Refuse a folder that cannot be created or written, naming the first ancestor in the way."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write into {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {folder}: {existing} is not writable")


def check_output_file(path, overwrite=False, suffixes=tuple(IMAGE_FORMATS)) -> Path:
    """Refuse an output path that would fail at the end of a long run: call it before loading anything.

    `suffixes=None` accepts any extension. Returns the path.
    """
    path = Path(path)
    if path.is_dir():
        example = path / ("output" + (suffixes or (".png",))[0])
        raise UserError(f"{path} is a folder; give a file name such as {example}")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        allowed = ", ".join(suffixes)
        raise UserError(f"{path}: unsupported extension {path.suffix or '(none)'} (use one of {allowed})")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    check_writable_folder(path.parent)
    return path


def _file_mode() -> int:
    mask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


def _publish(temp: Path, path: Path, overwrite: bool):
    """Move a finished temporary file to `path`; without `overwrite`, fail if `path` exists."""
    if overwrite:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)  # atomic and exclusive: fails if `path` appeared meanwhile
    except FileExistsError:
        message = "exists (written by another run meanwhile?); pass --overwrite to replace it"
        raise UserError(f"{path} {message}") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # a file system without hard links: check, then rename
            raise UserError(f"{path} exists; pass --overwrite to replace it") from None
        os.replace(temp, path)
    temp.unlink(missing_ok=True)


class FolderInUse(UserError):
    """Another run holds the folder: a run that stops for this must not clean anything up in it."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{folder} is in use by another run ({holder or 'unknown'}): choose another "
                         f"--output, or delete {folder / '.lock'} if that run has ended")


@contextlib.contextmanager
def folder_lock(folder, enabled=True):
    """Hold FOLDER/.lock (host and process id) while this run writes FOLDER, so that a second run on it
    stops with one line instead of overwriting this one's checkpoints. A lock left by a process of this
    machine that no longer runs (a killed run) is taken over. Under torchrun only rank 0 takes it."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock, owner = folder / ".lock", f"{socket.gethostname()} {os.getpid()}"
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            holder = lock.read_text(errors="replace").strip()
        except OSError:  # removed or unreadable meanwhile
            holder = ""
        host, _, pid = holder.partition(" ")
        if host != socket.gethostname() or not pid.isdigit() or _running(int(pid)):
            raise FolderInUse(folder, holder) from None
        descriptor = os.open(lock, os.O_WRONLY | os.O_TRUNC)  # the lock of a run that died: take it over
    with os.fdopen(descriptor, "w") as file:
        file.write(owner)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


@contextlib.contextmanager
def atomic_files(paths, overwrite=False):
    """Yield one temporary path beside each of `paths`; when the block succeeds, move them all in.

    Either every file appears, complete and with the umask's mode, or none does: a failure in the
    block, or in moving any of them in, removes the temporary files and the ones already moved.
    Without `overwrite` an existing file is never replaced, even one that appears during the run.
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists; pass --overwrite to replace it")
    temps, published, mode = [], [], _file_mode()
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(handle)
            os.chmod(temp, mode)
            temps.append(Path(temp))
    except OSError as error:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise UserError(f"cannot write {paths[len(temps)]}: {error.strerror or error}") from None
    try:
        yield temps
        for temp, path in zip(temps, paths):
            os.chmod(temp, mode)  # again: some writers (safetensors) replace the file with a 0600 one
            _publish(temp, path, overwrite)
            published.append(path)
    except BaseException as error:
        for temp in temps:
            temp.unlink(missing_ok=True)
        if not overwrite:  # what this run created; replaced files cannot be restored
            for path in published:
                path.unlink(missing_ok=True)
        if isinstance(error, OSError):
            reason = error.strerror or str(error)
            if error.errno == errno.ENOSPC:
                reason = "no space left on device"
            raise UserError(f"cannot write {paths[len(published)]}: {reason}") from None
        raise


@contextlib.contextmanager
def atomic_write(path, overwrite=True):
    """`atomic_files` for one file: yield a temporary path that replaces (or creates) `path` on success."""
    with atomic_files([path], overwrite) as (temp,):
        yield temp


# ----------------------------------------------------------------------------- images


def load_image(path, max_pixels=MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB, upright, refusing files that are not images or too large."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give an image file")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with Image.open(path) as opened:
            if opened.width * opened.height > max_pixels:
                size = f"{opened.width}x{opened.height}"
                raise UserError(f"{path}: {size} exceeds the {max_pixels:,}-pixel limit")
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
        raise UserError(f"{path}: not a readable image ({error})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent areas become white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 1.0 if image.mode == "F" else 65535.0
        values = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(values, mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def write_image(image: Image.Image, file, suffix: str, metadata=None):
    """Encode `image` into `file` in the format of `suffix`; `metadata` (str -> str) goes into PNG
    text chunks or the JPEG comment."""
    if suffix.lower() not in IMAGE_FORMATS:
        raise UserError(f"unsupported image extension {suffix} (use one of {', '.join(IMAGE_FORMATS)})")
    kind = IMAGE_FORMATS[suffix.lower()]
    options = {}
    metadata = {key: str(value) for key, value in (metadata or {}).items()}
    if kind == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_itxt(key, value)
        options["pnginfo"] = info
    elif kind == "JPEG":
        options.update(quality=95, comment=json.dumps(metadata).encode())
    image.save(file, format=kind, **options)


def save_image(image: Image.Image, path, metadata=None, overwrite=True):
    """Write `image` atomically, in the format its extension names (see `write_image`)."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_FORMATS:
        raise UserError(f"{path}: unsupported image extension (use one of {', '.join(IMAGE_FORMATS)})")
    with atomic_write(path, overwrite=overwrite) as temp:
        write_image(image, temp, path.suffix, metadata)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> 8-bit RGB image (values outside are clipped).

    A tensor holding NaN or Inf is refused: it comes from broken weights or settings, and would
    otherwise be written as a black or garbage image."""
    if not torch.isfinite(x).all():
        raise UserError("the result holds NaN/Inf values (broken weights or settings); no image was written")
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for noise, so a seed gives the same
    noise on every device."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator("cpu").manual_seed(seed)

"""File I/O shared by the method files: weights from the Hub or disk, images, seeding, errors.

Weights
    `resolve_source` turns a Hub repo id or a local path into local files, downloading only
    the files asked for; `load_safetensors` reads one file, a shard set (through its
    `*.index.json`) or a folder straight into the requested dtype and device.
Images
    `load_image` opens anything Pillow reads (EXIF orientation applied, palette / 16-bit /
    alpha / CMYK converted to 8-bit RGB, decompression bombs refused); `save_image` writes
    atomically (temporary file + rename, so a crash never leaves half an image behind) and
    stores the generation settings as PNG text chunks.
Errors
    `UserError` is a problem the user can fix; `run_cli` prints it as one line and exits 2.
"""

import contextlib
import errno
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

MAX_IMAGE_PIXELS = 16384 * 16384  # a 16K square; anything larger is refused before decoding


class UserError(Exception):
    """A problem with the user's input, files or environment, stated in one line."""


def run_cli(main, argv=None) -> int:
    """Run `main(argv)`; turn the errors a user can act on into one line on stderr and an exit code."""
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("error: out of GPU memory; try a smaller size or the --offload option", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


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

    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub

    patterns = [f"{subfolder}/{p}" if subfolder else p for p in allow_patterns]
    try:
        root = Path(snapshot_download(str(source), allow_patterns=patterns, token=token))
    except hub.GatedRepoError:
        raise UserError(
            f"{source} is a gated repo: accept its licence at https://huggingface.co/{source} "
            "and log in (huggingface-cli login, or set HF_TOKEN)"
        ) from None
    except hub.RepositoryNotFoundError:
        raise UserError(f"{source}: no such repo on the Hugging Face Hub (or it is private and no token was given)") from None
    except hub.LocalEntryNotFoundError:
        raise UserError(f"{source}: not in the local Hub cache and the Hub cannot be reached (offline?)") from None
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
                        state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
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
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a readable JSON file ({error})") from None


@contextlib.contextmanager
def atomic_write(path, overwrite=True):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    On any failure the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}") from None
    try:
        yield Path(temp)
        os.replace(temp, path)
    except OSError as error:
        Path(temp).unlink(missing_ok=True)
        reason = "no space left on device" if error.errno == errno.ENOSPC else error.strerror or str(error)
        raise UserError(f"cannot write {path}: {reason}") from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- images


def load_image(path, max_pixels=MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB, upright, refusing files that are not images or too large."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with Image.open(path) as opened:
            if opened.width * opened.height > max_pixels:
                raise UserError(f"{path}: {opened.width}x{opened.height} exceeds the {max_pixels:,}-pixel limit")
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


def save_image(image: Image.Image, path, metadata=None, overwrite=True):
    """Write `image` atomically; `metadata` (str -> str) goes into PNG text chunks or the JPEG comment."""
    path = Path(path)
    suffix = path.suffix.lower()
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
    if suffix not in formats:
        raise UserError(f"{path}: unsupported image extension (use one of {', '.join(formats)})")
    options = {}
    metadata = {key: str(value) for key, value in (metadata or {}).items()}
    if formats[suffix] == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_itxt(key, value)
        options["pnginfo"] = info
    elif formats[suffix] == "JPEG":
        options.update(quality=95, comment=json.dumps(metadata).encode())
    with atomic_write(path, overwrite=overwrite) as temp:
        image.save(temp, format=formats[suffix], **options)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> 8-bit RGB image (values outside are clipped)."""
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for noise, so a seed gives the same
    noise on every device."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator("cpu").manual_seed(seed)

"""File I/O shared by the method files: weights, images, arguments, progress, errors. Checks run
before anything heavy loads and refuse what the user can fix as a one-line `UserError` (`run_cli`
prints it); outputs never replace an input (`check_apart`) and are written atomically."""

import argparse
import codecs
import contextlib
import errno
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from tqdm.auto import tqdm  # a dependency of huggingface-hub

MAX_IMAGE_PIXELS = 16384 * 16384  # a 16K square; anything larger is refused before decoding
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # Pillow warns above its limit: of images refused anyway
NAME_MAX = 255  # bytes in one file name: ext4, xfs, btrfs, APFS, NTFS (in UTF-16 units)

class UserError(Exception):
    """A problem with the user's input, files or environment, stated in one line."""

class Terminated(BaseException):
    """SIGTERM (`kill`, a job scheduler) raised where the program is, so every clean-up runs."""

def run_cli(main, argv=None, memory_hint="try a smaller size") -> int:
    """Run `main(argv)`, turning what a user can act on into one stderr line and an exit code."""
    with _one_line_warnings(), _sigterm_raises():
        try:
            main(argv)
            return 0
        except (UserError, ValueError) as error:  # ValueError: a model or kit refusing its input
            message, code = f"error: {error}", 2
        except torch.OutOfMemoryError:
            message, code = f"error: out of GPU memory; {memory_hint}", 3
        except OSError as error:  # what no check could foresee: a full disk, a vanished file
            message, code = f"error: {os_error_text(error)}", 2
        except KeyboardInterrupt:
            message, code = "interrupted", 130
        except Terminated:
            message, code = "terminated", 143
        if _open_bars:  # close the bars of a run stopped half-way: the message starts a clean line
            while _open_bars:
                _open_bars.pop().close()
            print(file=sys.stderr)
        print(message, file=sys.stderr)
    return code

def os_error_text(error: OSError, action: str = "") -> str:
    """One line for a file-system error: '[action ]FILE: reason', the reason in words."""
    reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system",
               errno.ENAMETOOLONG: f"name too long (a file system takes {NAME_MAX} bytes per name)"}
    reason = reasons.get(error.errno) or error.strerror or str(error)
    return f"{action}{_short(error.filename)}: {reason}" if error.filename else f"{action}{reason}"

def _short(path, limit: int = 100) -> str:
    """A path fit for a one-line message: a very long one keeps its start and its end."""
    text = str(path)
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 4 :]}"

@contextlib.contextmanager
def _one_line_warnings():
    """A library warning as one `warning:` line, without Python's file, line and source line."""
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        yield
    finally:
        warnings.showwarning = previous

def _show_warning(message, category, *_, **__):
    lines = str(message).strip().splitlines()
    warn(lines[0] if lines else category.__name__)

@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises `Terminated` (in the main thread: only it sets handlers) so clean-ups run."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

def _raise_terminated(signum, frame):
    raise Terminated

# ----------------------------------------------------------------------------- arguments

class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as a `UserError`: one line instead of a usage dump."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")

def integer(low=None, high=None):
    """argparse type: an integer in [low, high] (either bound may be None)."""
    return functools.partial(_bounded, int, "an integer", low, high)

def number(low=None, high=None):
    """argparse type: a finite float in [low, high] (either bound may be None)."""
    return functools.partial(_bounded, float, "a number", low, high)

def _bounded(kind, name: str, low, high, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = (f">= {low}" if high is None else f"<= {high}" if low is None
                   else f"in [{low}, {high}]")
        shown = f"{value:g}" if kind is float else value
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {shown}")
    return value

def positive(high=None):
    """argparse type: a finite number in (0, high] (a learning rate, a weight that must act)."""
    return functools.partial(_positive, high)

def _positive(high, text: str) -> float:
    value = _bounded(float, "a number", None, None, text)
    if value <= 0 or (high is not None and value > high):
        allowed = "> 0" if high is None else f"in (0, {high:g}]"
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {value:g}")
    return value

SEED = integer(0, 2**64 - 1)  # torch.Generator.manual_seed takes 64-bit seeds

def device_name(text) -> str:
    """argparse type: a torch device that exists on this machine (cpu, cuda, cuda:N, mps)."""
    kinds = "(use cuda, cuda:N, cpu or mps)"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device {kinds}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        problem = f"unsupported device type {kinds}"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        problem = "MPS is not available on this machine; use --device cpu"
    elif device.type == "cuda" and not torch.cuda.is_available():
        problem = "CUDA is not available here; use --device cpu"
    elif device.type == "cuda" and (device.index or 0) >= (count := torch.cuda.device_count()):
        problem = f"this machine has {count} CUDA device(s)"
    else:
        return text
    raise argparse.ArgumentTypeError(f"{text}: {problem}")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

def device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """DEVICE, else CUDA or the CPU; DTYPE (or a DTYPES name), else bf16 on CUDA, fp32 elsewhere."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, DTYPES.get(dtype, dtype) or default

# ----------------------------------------------------------------------------- progress

_open_bars = []

def progress_bar(description: str, total=None, initial=0):
    """A stderr bar; returns `update(done, total, postfix: a dict)`, which closes it at `total`."""
    bar = tqdm(desc=description, total=total, initial=initial, unit="step", file=sys.stderr,
               leave=False)
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
    """A warning line on stderr above any progress bar (a print would land on the bar's line)."""
    tqdm.write(f"warning: {message}", file=sys.stderr)

# ----------------------------------------------------------------------------- inputs

# Byte-order marks, UTF-32's first (UTF-32-LE's starts with UTF-16-LE's); the codecs drop them.
BOMS = {codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32", codecs.BOM_UTF8: "UTF-8-sig",
        codecs.BOM_UTF16_LE: "UTF-16", codecs.BOM_UTF16_BE: "UTF-16"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what readers take
FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}

def check_regular_file(path, what="file") -> Path:
    """Refuse, unopened, a FIFO (a read waits for a writer forever), a device or a socket."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return Path(path)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise UserError(f"{_short(path)} is {kind}, not a {what}")
    return Path(path)

def read_text(path, what="file") -> str:
    """A text file's contents: UTF-8, or UTF-16 / UTF-32 with a byte-order mark (dropped). NULs
    (UTF-16 / UTF-32 without a mark, a binary file) would fill prompts and are refused."""
    check_regular_file(path, what)
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a {what}") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read the {what} ({error.strerror or error})") from None
    encoding = next((name for bom, name in BOMS.items() if data.startswith(bom)), "UTF-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: the {what} is not {encoding.removesuffix('-sig')} text "
                        f"(byte {error.start})") from None
    if "\0" in text:
        raise UserError(f"{path}: the {what} holds NUL characters (UTF-16 or UTF-32 without a "
                        "byte-order mark?); save it as UTF-8")
    return text

def loads_unique(text: str):
    """`json.loads`, refusing (ValueError) an object naming a key twice: json keeps the last."""
    return json.loads(text, object_pairs_hook=_unique_keys)

def _unique_keys(pairs: list) -> dict:
    data = dict(pairs)
    if len(data) < len(pairs):
        seen = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {repeated!r} appears twice")
    return data

def read_json(path) -> dict:
    """A JSON file holding an object, or a one-line `UserError` naming the file and the problem."""
    try:
        data = loads_unique(read_text(path, "JSON file"))
    except ValueError as error:
        raise UserError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object but a {type(data).__name__}")
    return data

# ----------------------------------------------------------------------------- weights

def resolve_source(source, subfolder=None, allow_patterns=("*.safetensors", "*.json"),
                   token=None) -> Path:
    """A local path for `source`: a file or folder, or a Hub repo id whose `allow_patterns` files in
    `subfolder` are downloaded (or cached). Gated repos (FLUX.1-dev, SD3) need a token."""
    local = Path(source).expanduser()
    if local.exists():
        # a pipeline folder resolves to its component subfolder; a component folder or file is kept
        return local / subfolder if subfolder and (local / subfolder).is_dir() else local
    if not is_repo_id(source):
        raise UserError(f"{source}: no such file or folder, and not a Hub repo id of the form "
                        "owner/name")
    from huggingface_hub import errors as hub
    from huggingface_hub import snapshot_download
    patterns = [f"{subfolder}/{p}" if subfolder else p for p in allow_patterns]
    try:
        root = Path(snapshot_download(str(source), allow_patterns=patterns, token=token))
    except hub.GatedRepoError:
        raise UserError(f"{source} is a gated repo: accept its licence at https://huggingface.co/"
                        f"{source} and log in (huggingface-cli login, or set HF_TOKEN)") from None
    except hub.RepositoryNotFoundError:
        message = "no such repo on the Hugging Face Hub (or it is private and no token was given)"
        raise UserError(f"{source}: {message}") from None
    except hub.LocalEntryNotFoundError:
        message = "not in the local Hub cache and the Hub cannot be reached (offline?)"
        raise UserError(f"{source}: {message}") from None
    except hub.HfHubHTTPError as error:
        raise UserError(f"{source}: download failed: {str(error).splitlines()[0]}") from None
    except OSError as error:  # the cache folder cannot be used: HF_HOME is a file, read-only, full
        raise UserError(f"{source}: the Hugging Face cache cannot be used "
                        f"({os_error_text(error)}); check HF_HOME / HF_HUB_CACHE") from None
    path = root / subfolder if subfolder else root
    if not path.exists():
        raise UserError(f"{source} has no files matching {patterns}")
    return path

_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"

def is_repo_id(text) -> bool:
    """Whether `text` is a Hub repo id, owner/name (`owner/` or `a/b/c` is a missing path)."""
    valid = re.fullmatch(f"{_REPO_PART}/{_REPO_PART}", str(text))
    return valid is not None and not re.search(r"--|\.\.", str(text))

def source_name(source) -> str:
    """A weights source as a run records it: a local path made absolute, a Hub repo id as it is."""
    local = Path(str(source)).expanduser()
    return str(local.resolve()) if local.exists() else str(source)

def safetensors_files(path) -> list[Path]:
    """The safetensors files that make up one model: a file, a sharded set, or a folder's files."""
    path = Path(path)
    if not path.is_dir():
        return [check_regular_file(path, "safetensors file")]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map")
        shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        if not shards or not all(isinstance(s, str) and Path(s).name == s for s in shards):
            raise UserError(f"{indexes[0]}: no weight_map naming a shard file for each tensor "
                            "(a damaged index?)")
        return [path / name for name in sorted(shards)]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path}: no .safetensors files")
    return files

def load_safetensors(path, dtype=None, device="cpu", key_filter=None) -> dict[str, torch.Tensor]:
    """The tensors of `path` on `device`, floating-point ones (fp8 too) in `dtype`; a key that
    `key_filter(key)` refuses is never read (the other models of an all-in-one file)."""
    from safetensors import SafetensorError, safe_open
    state = {}
    for file in safetensors_files(path):
        if not file.exists():
            raise UserError(f"{file}: missing shard")
        check_regular_file(file, "safetensors file")
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
    return _safetensors_header(path)[0]

def safetensors_metadata(path) -> dict[str, str]:
    """The string metadata of a safetensors file, read from its header alone."""
    return _safetensors_header(path)[1]

def _safetensors_header(path) -> tuple[list[str], dict]:
    from safetensors import SafetensorError, safe_open
    check_regular_file(path, "safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error})") from None

def check_weights(state: dict, path) -> dict:
    """Refuse what cannot be weights, naming the shard and the tensor: not a tensor (a pickled
    .pth), integers (a quantised or foreign file), NaN / Inf (a diverged run, a damaged file)."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            problem = f"entry {key} is a {type(value).__name__}, not a tensor"
        elif not value.is_floating_point():
            dtype = str(value.dtype).removeprefix("torch.")
            problem = (f"tensor {key} is {dtype}, not floating point; "
                       "these are not weights this code reads")
        elif not torch.isfinite(value).all():
            problem = f"tensor {key} holds NaN or Inf values; these weights are broken"
        else:
            continue
        files = safetensors_files(path) if Path(path).is_dir() else [path]
        file = next((f for f in files if len(files) == 1 or key in safetensors_keys(f)), path)
        raise UserError(f"{file}: {problem}")
    return state

def assign_state_dict(model: torch.nn.Module, state: dict, what: str) -> torch.nn.Module:
    """Load `state` into a meta-device model, refusing any mismatch."""
    report = shape_mismatch(state, {k: v.shape for k, v in model.state_dict().items()})
    if report:
        raise UserError(f"{what}: does not match the model: {report}")
    model.load_state_dict(state, strict=True, assign=True)
    return model

def build(make, state: dict, what: str, source) -> torch.nn.Module:
    try:
        with torch.device("meta"):
            model = make()
    except ValueError as error:  # a config read from `source`'s files, refused: name the file
        raise UserError(f"{source}: {error}") from None
    return assign_state_dict(model, state, what).eval()

def shape_mismatch(state: dict, expected: dict) -> str:
    wrong = [f"{k} {tuple(state[k].shape)} instead of {tuple(shape)}"
             for k, shape in expected.items() if k in state and state[k].shape != shape]
    return mismatch_report({"missing": [k for k in expected if k not in state],
                            "unexpected": [k for k in state if k not in expected],
                            "wrong-shape": wrong})

def mismatch_report(kinds: dict) -> str:
    """'2 missing (a, b); 1 unexpected (c)', naming up to three keys of each kind."""
    return "; ".join(f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                     for kind, keys in kinds.items() if keys)

def first_keys(state: dict) -> str:
    return ", ".join(list(state)[:3])

def count_blocks(keys, pattern: str) -> int:
    return max((int(m[1]) for key in keys if (m := re.match(pattern, key))), default=-1) + 1

def component_path(source, subfolder, token=None, allow_patterns=("*.safetensors", "*.json")):
    """`resolve_source`, refusing a pipeline folder without the subfolder."""
    path = resolve_source(source, subfolder, allow_patterns, token)
    if subfolder and path.is_dir() and (path / "model_index.json").is_file():
        raise UserError(f"{source}: this pipeline folder has no {subfolder}/ folder")
    return path

def folder_config(path) -> dict:
    """A component's config.json, type-checked."""
    config = (path if path.is_dir() else path.parent) / "config.json"
    beside = path.is_dir() or path.name.startswith("diffusion_pytorch_model")
    return check_config_fields(read_json(config) if beside and config.exists() else {}, config)

def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

def is_count(value) -> bool:
    return is_number(value) and isinstance(value, int) and value > 0

CONFIG_TYPES = {  # what a config.json field may hold (null: as if absent)
    "a positive integer": is_count,
    "an integer >= 0": lambda v: is_number(v) and isinstance(v, int) and v >= 0,
    "a positive number": lambda v: is_number(v) and v > 0,
    "a finite number": is_number,
    "a list of positive integers": lambda v: isinstance(v, list) and v and all(map(is_count, v)),
    "a string": lambda v: isinstance(v, str),
    "an object": lambda v: isinstance(v, dict),
}
CONFIG_FIELDS = {  # the config.json fields the loaders read
    "axes_dims_rope": "a list of positive integers", "num_attention_heads": "a positive integer",
    "scaling_factor": "a positive number", "shift_factor": "a finite number",
    "stride": "a positive integer", "relative_attention_max_distance": "a positive integer",
    "layer_norm_epsilon": "a positive number", "layer_norm_eps": "a positive number",
    "eos_token_id": "an integer >= 0", "hidden_act": "a string", "feed_forward_proj": "a string",
    "text_config": "an object",
}

def check_config_fields(config: dict, file) -> dict:
    for key, kind in CONFIG_FIELDS.items():
        value = config.get(key)
        if value is not None and not CONFIG_TYPES[kind](value):
            raise UserError(f"{file}: field {key} is {json.dumps(value)[:40]}, not {kind}")
    if isinstance(config.get("text_config"), dict):
        check_config_fields(config["text_config"], file)
    return config

DIFFUSION_PREFIX = "model.diffusion_model."
OTHER_COMPONENTS = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.",
                    "vae.", "text_encoder")  # the others in all-in-one files (ComfyUI, Stability)

def read_component(path, dtype, device, prefix=DIFFUSION_PREFIX) -> dict:
    """One component's tensors: those under `prefix` (stripped), else those of no other one."""
    if path.is_file() and any(key.startswith(prefix) for key in safetensors_keys(path)):
        return read_prefixed(path, dtype, device, prefix)
    return read_prefixed(path, dtype, device, skip=OTHER_COMPONENTS)

def read_prefixed(path, dtype, device, prefix="", skip=()) -> dict:
    """The tensors under `prefix`, stripped of it, but those that then start with `skip`."""
    def wanted(key):
        return key.startswith(prefix) and not key[len(prefix) :].startswith(skip)
    state = check_weights(load_safetensors(path, dtype, device, key_filter=wanted), path)
    return {key[len(prefix) :]: value for key, value in state.items()}

# ----------------------------------------------------------------------------- outputs

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF",
                 ".tiff": "TIFF"}

def check_writable_folder(folder) -> None:
    """Refuse a folder that cannot be created or written, naming the first ancestor in the way."""
    existing = folder = Path(folder)
    check_name_length(folder)
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # mkdir would fail on it at the end of the run
            raise UserError(f"cannot write into {folder}: {existing} is a link to "
                            f"{os.readlink(existing)}, which does not exist")
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write into {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {folder}: {existing} is not writable")

def check_name_length(path) -> None:
    """Refuse before the run, not at its end, a name over NAME_MAX bytes or a path over 4095."""
    for name in (*Path(path).parts, str(path)):
        limit = 4095 if name == str(path) else NAME_MAX
        if len(os.fsencode(name)) > limit:
            raise UserError(f"{_short(path)}: a {'path' if limit > NAME_MAX else 'file name'} of "
                            f"{len(os.fsencode(name))} bytes; file systems take at most {limit}")

def check_output_file(path, overwrite=False, suffixes=tuple(IMAGE_FORMATS)) -> Path:
    """Refuse, before anything loads, an output path that would fail at the end of a long run."""
    path = Path(path)
    check_name_length(path)
    if path.is_dir():
        example = path / ("output" + (suffixes or (".png",))[0])
        raise UserError(f"{path} is a folder; give a file name such as {example}")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise UserError(f"{path}: unsupported extension {path.suffix or '(none)'} "
                        f"(use one of {', '.join(suffixes)})")
    if path.is_symlink() and not path.exists():
        raise UserError(f"{path} is a link to {os.readlink(path)}, which does not exist; remove "
                        "the link or choose another name")
    check_regular_file(path, "file to replace")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    check_writable_folder(path.parent)
    return path

def check_apart(outputs, inputs) -> None:
    """Refuse, whatever --overwrite says, an output that is an input (by any name) or lies in it."""
    sources = [(option, Path(path).expanduser()) for option, path in inputs if path is not None]
    sources = [(option, path, path.resolve()) for option, path in sources if path.exists()]
    for out_option, output in ((option, path) for option, path in outputs if path is not None):
        check_name_length(output)  # before the file system is asked about it
        target = Path(output).expanduser().resolve()
        for option, source, real in sources:
            if target == real or (target.exists() and os.path.samefile(target, real)):
                raise UserError(f"{out_option}: {output} is {option} {source}; an output never "
                                f"replaces an input: choose another {out_option}")
            if real.is_dir() and target.is_relative_to(real):
                raise UserError(f"{out_option}: {output} lies inside {option} {source}; a run "
                                f"never writes into its inputs: choose another {out_option}")

def _file_mode() -> int:
    mask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask

def _publish(temp: Path, path: Path, overwrite: bool):
    if overwrite:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)  # atomic and exclusive: fails if `path` appeared meanwhile
    except FileExistsError:
        raise UserError(f"{path} exists (written by another run meanwhile?); pass --overwrite to "
                        "replace it") from None
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
        super().__init__(f"{folder} is in use by another run ({holder or 'unknown'}): choose "
                         f"another --output, or delete {folder / '.lock'} if that run has ended")

@contextlib.contextmanager
def folder_lock(folder, enabled=True):
    """Hold FOLDER/.lock (host and pid) while this run writes it: a second run stops instead of
    overwriting it; a killed run's lock on this host is taken over. Under torchrun rank 0 locks."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock, owner = folder / ".lock", f"{socket.gethostname()} {os.getpid()}"
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # umask decides
    except FileExistsError:
        try:
            holder = lock.read_text(errors="replace").strip()
        except OSError:  # removed or unreadable meanwhile
            holder = ""
        host, _, pid = holder.partition(" ")
        if host != socket.gethostname() or not pid.isdigit() or _running(int(pid)):
            raise FolderInUse(folder, holder) from None
        descriptor = os.open(lock, os.O_WRONLY | os.O_TRUNC)  # a dead run's lock: take it over
    with os.fdopen(descriptor, "w") as file:
        file.write(owner)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)

def _running(pid: int) -> bool:
    try:
        with contextlib.suppress(PermissionError):  # it exists, as another user's process
            os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    return True

def latest_checkpoint(output) -> Path | None:
    """The newest complete checkpoint: `state.pt` is written last, a crash mid-save leaves none."""
    done = sorted((Path(output) / "checkpoints").glob("step-*/state.pt"))
    return done[-1].parent if done else None

def check_train_output(output: Path, resume, finished: str | None = None) -> Path | None:
    """Fail before any model loads if OUTPUT cannot be written, holds another run or nothing to
    resume; return the checkpoint to resume from, or None. With `finished` (op4ksr.py's last file)
    other files may stay and --resume takes any folder; without, only a `.lock` may, --resume needs
    a state.pt, and True (train-vae) starts afresh where there is none."""
    ours, previous = finished is None, latest_checkpoint(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"{output} is a file; --output takes a folder" if ours else
                        f"--output {output} is a file; training writes a folder "
                        f"(checkpoints/, train_log.jsonl, {finished})")
    check_writable_folder(output)
    if not resume and (previous is not None or not ours and (output / finished).exists()):
        raise UserError(f"{output} already holds a training run: pass --resume"
                        f"{'' if ours else ' to continue it'}, or choose another --output")
    if (ours and previous is None and output.is_dir()
            and any(p.name != ".lock" for p in output.iterdir())):
        raise UserError(f"{output} is not empty and holds no checkpoint; choose a new or empty "
                        "--output")
    if resume == "latest" and previous is None:
        raise UserError(f"--resume: no {'' if ours else 'complete '}checkpoint under "
                        f"{output / 'checkpoints'}" + (" (start without --resume)" if ours else ""))
    if resume in (None, False, True, "latest"):
        return previous if resume else None
    if not ((Path(resume) / "state.pt").is_file() if ours else Path(resume).is_dir()):
        raise UserError(f"--resume {resume}: " + ("not a checkpoint folder (it has no state.pt)"
                                                  if ours else "no such checkpoint folder"))
    return Path(resume)

@contextlib.contextmanager
def undone_on_failure(output: Path, main: bool = True):
    """A run that fails before its first checkpoint leaves no trace: what it created is removed."""
    created = _missing_folders([output / "run"])[-1:]  # the top folder it creates, if any
    before = None if not output.exists() else set(output.iterdir())
    try:
        yield
    except BaseException as error:  # FolderInUse: another run's folder, nothing in it is ours
        if main and not isinstance(error, FolderInUse) and latest_checkpoint(output) is None:
            for path in created if before is None else set(output.iterdir()) - before:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise

@contextlib.contextmanager
def atomic_files(paths, overwrite=False):
    """Temporary paths beside `paths`, all moved in (with the umask's mode) if the block succeeds,
    else none; without `overwrite` no file is replaced, even one that appears meanwhile."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists; pass --overwrite to replace it")
    temps, published, mode, made = [], [], _file_mode(), _missing_folders(paths)
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            # the temporary name adds 14 bytes: a name near NAME_MAX would not fit
            name = path.name if len(os.fsencode(path.name)) <= NAME_MAX - 20 else "output"
            handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
            os.close(handle)
            os.chmod(temp, mode)
            temps.append(Path(temp))
    except OSError as error:
        _remove(temps, made)
        raise UserError(f"cannot write {paths[len(temps)]}: {_write_failure(error)}") from None
    try:
        yield temps
        for temp, path in zip(temps, paths):
            os.chmod(temp, mode)  # again: a writer may replace it with a 0600 file (safetensors)
            _publish(temp, path, overwrite)
            published.append(path)
    except BaseException as error:
        # without overwrite, what this run created; replaced files cannot be restored
        _remove(temps + ([] if overwrite else published), made)
        reason = _write_failure(error)
        if reason is None:
            raise
        raise UserError(f"cannot write {paths[len(published)]}: {reason}") from None

def _missing_folders(paths: list[Path]) -> list[Path]:
    """The folders that writing `paths` will create, deepest first."""
    missing = set()
    for path in paths:
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            missing.add(folder)
            folder = folder.parent
    return sorted(missing, key=lambda folder: len(folder.parts), reverse=True)

def _remove(files: list[Path], folders: list[Path]):
    """Remove `files`, then those of `folders` that are left empty."""
    for file in files:
        file.unlink(missing_ok=True)
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()

def _write_failure(error: BaseException) -> str | None:
    """Why the file system refused a write (OSError, or safetensors' 'os error N'), else None."""
    if isinstance(error, OSError):
        return os_error_text(OSError(error.errno, error.strerror or str(error)))
    found = re.search(r"os error (\d+)", str(error)) if isinstance(error, Exception) else None
    return os_error_text(OSError(int(found[1]), os.strerror(int(found[1])))) if found else None

def save_torch(data, path):
    """Atomic `torch.save` via a file object: a full disk raises OSError, not a RuntimeError."""
    with atomic_write(path) as temp, open(temp, "wb") as file:
        torch.save(data, file)

@contextlib.contextmanager
def atomic_write(path, overwrite=True):
    with atomic_files([path], overwrite) as (temp,):
        yield temp

# ----------------------------------------------------------------------------- images

def load_image(path, max_pixels=MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB, upright, refusing files that are not images or too large."""
    with _opened_image(path, max_pixels) as opened:
        turned = opened.getexif().get(0x0112, 1) != 1  # exif_transpose copies upright images too
        image = ImageOps.exif_transpose(opened) if turned else opened
        image.load()
    return to_rgb(image)

def image_size(path, max_pixels=MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) as `load_image` returns it (EXIF rotation applied), from the header alone."""
    with _opened_image(path, max_pixels) as opened:
        turned = opened.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap the sides
        return opened.size[::-1] if turned else opened.size

def verify_image(path, max_pixels=MAX_IMAGE_PIXELS) -> None:
    """Refuse a non-image, too large or corrupt file, without decoding (a truncated PNG passes)."""
    with _opened_image(path, max_pixels) as opened:
        opened.verify()

@contextlib.contextmanager
def _opened_image(path, max_pixels):
    """Pillow's opened image; a non-image, one over `max_pixels` or a failing decode is refused."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give an image file")
    if not path.exists():
        raise UserError(f"{path}: no such file")
    check_regular_file(path, "image file")
    try:
        with Image.open(path) as opened:
            if opened.width * opened.height > max_pixels:
                size = f"{opened.width}x{opened.height}"
                raise UserError(f"{path}: {size} exceeds the {max_pixels:,}-pixel limit")
            yield opened
    except Image.DecompressionBombError:
        raise UserError(f"{path}: exceeds the {max_pixels:,}-pixel limit") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{path}: not a readable image ({error})") from None

def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent areas become white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 1.0 if image.mode == "F" else 65535.0
        values = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(values, mode="L")
    transparent = image.mode == "P" and "transparency" in image.info
    if transparent or image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image if image.mode == "RGB" else image.convert("RGB")  # no copy of a 4K RGB image

def write_image(image: Image.Image, file, suffix: str, metadata=None):
    """Encode `image` into `file` as `suffix` says; `metadata` goes to PNG text or JPEG comment."""
    kind = IMAGE_FORMATS.get(suffix.lower())
    if kind is None:
        raise UserError(f"unsupported image extension {suffix} "
                        f"(use one of {', '.join(IMAGE_FORMATS)})")
    metadata = {key: str(value) for key, value in (metadata or {}).items()}
    options = {"JPEG": dict(quality=95, comment=json.dumps(metadata).encode())}.get(kind, {})
    if kind == "PNG":
        options["pnginfo"] = info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_itxt(key, value)
    image.save(file, format=kind, **options)

def save_image(image: Image.Image, path, metadata=None, overwrite=True):
    """Write `image` atomically, in the format its extension names (see `write_image`)."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_FORMATS:
        raise UserError(f"{path}: unsupported image extension "
                        f"(use one of {', '.join(IMAGE_FORMATS)})")
    with atomic_write(path, overwrite=overwrite) as temp:
        write_image(image, temp, path.suffix, metadata)

def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0

def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> 8-bit RGB image, clipped; NaN / Inf is refused."""
    if not torch.isfinite(x).all():
        raise UserError("the result holds NaN/Inf values (broken weights or settings); "
                        "no image was written")
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), mode="RGB")

def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator: the same noise on every device."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator("cpu").manual_seed(seed)

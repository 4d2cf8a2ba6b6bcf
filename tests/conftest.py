import getpass
import os
import sys
import tempfile
from pathlib import Path

# inductor's on-disk cache does not key its kernels by ATEN_CPU_CAPABILITY: a kernel built in a run
# with one capability and reused in a run with another returned NaN. One cache per capability.
_CAPABILITY = os.environ.get("ATEN_CPU_CAPABILITY", "native")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}_{_CAPABILITY}"))

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))


def _make_torchvision_importable():
    """The reference packages pytorch-fid, torch-fidelity and lpips import torchvision, whose PyPI
    wheel is built for CUDA torch. On the CPU build its compiled ops do not load and the import
    fails while registering a fake kernel for `torchvision::nms`; so would every later import
    of transformers, which imports torchvision when present. Defining the two op schemas it
    needs first is enough for the model code the tests use (no detection op ever runs)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401  (a working install: nothing to do)
    except RuntimeError:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401
        return library  # the schemas live as long as this object
    return None


_TORCHVISION_OPS = _make_torchvision_importable()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
    from common import io  # a test that stops a run half-way leaves its progress bars to the next one

    io._open_bars.clear()


def randomize_(module, std=0.2, seed=0):
    """Fill every parameter and floating buffer with N(0, std) noise (norm scales too), so a
    wrongly mapped key cannot hide behind an all-ones or all-zeros initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
    return module


def report(name, ours, reference):
    """Print and return the max abs error between two tensors (pytest -s shows it; -q keeps it in the log)."""
    error = (ours.float() - reference.float()).abs().max().item()
    print(f"[parity] {name}: max abs error {error:.3e} (reference magnitude {reference.abs().max().item():.3e})")
    return error


def free_port() -> int:
    """A TCP port nobody listens on now, for torchrun's rendezvous (a fixed port collides with any
    other test run on the machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

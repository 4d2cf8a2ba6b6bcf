import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


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

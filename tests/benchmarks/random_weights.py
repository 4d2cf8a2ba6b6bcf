"""Full-size models with random weights, for benchmarks and the GPU acceptance run: no download.

A model is built on the meta device and materialised on the target device directly in the target
dtype, so a 12B model never exists in fp32 (48 GB) on the way to bf16 (24 GB). Every weight is then
drawn from N(0, std); norm layers get scale 1 and bias 0, BatchNorm running statistics mean 0 and
variance 1, so activations stay finite through a full-depth model in bf16.
"""

import torch
import torch.nn as nn

NORM_ONES = ("weight", "scale", "running_var")  # a norm layer's tensors that are 1; the others are 0


def random_model(factory, device, dtype, seed: int = 0, std: float = 0.02) -> nn.Module:
    """`factory()` built on the meta device, materialised on `device` in `dtype`, randomised; eval, frozen."""
    with torch.device("meta"):
        model = factory()
    model = model.to(dtype).to_empty(device=device)  # .to on meta allocates nothing
    return randomise_(model, seed, std).eval().requires_grad_(False)


@torch.no_grad()
def randomise_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Fill every floating parameter and buffer in place (see the module docstring); returns the model."""
    device = next(iter(model.state_dict().values())).device
    generator = torch.Generator(device).manual_seed(seed)
    for module in model.modules():
        norm = "Norm" in type(module).__name__  # LayerNorm, GroupNorm, BatchNorm2d, RMSNorm, T5LayerNorm
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if not tensor.is_floating_point():
                continue
            if norm:
                tensor.fill_(1.0 if name in NORM_ONES else 0.0)
            else:
                tensor.normal_(0.0, std, generator=generator)
    return model

"""One attention function for every model in the project, so the kernel is chosen in one place:
* CUDA, bf16/fp16, head_dim <= 256: cuDNN or flash attention (cuDNN first on Hopper, where it is
  the faster), then memory-efficient, then math.
* head_dim > 256 (the VAE's mid attention: 512 channels in one head): flash and cuDNN cannot take
  it, so memory-efficient attention comes first.
* CPU (the tests): whatever SDPA picks; PyTorch's CPU flash kernel takes every float dtype, with
  or without a mask, except bf16 where it breaks (`cpu_flash_breaks`): there, math.

Splitting the queries. The fused kernels (flash, cuDNN, memory-efficient, CPU flash) stream
over the keys in blocks and never hold the score matrix, so they get the whole call: splitting
it would only add kernel launches. Only SDPA's math backend writes the (batch, heads, queries,
keys) scores, and at 4096x4096 the VAE attends over 262,144 tokens: one fp32 score matrix would
need 256 GiB. So `attention` asks SDPA which backend it would run for these inputs under the
backends enabled here (`torch._fused_sdp_choice`, SDPA's own dispatch), and only for the math
backend processes the queries in chunks of at most `MAX_SCORE_ELEMENTS` scores. Chunking
queries is exact: softmax runs over keys, independently for each query.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

MAX_SCORE_ELEMENTS = 2**28  # 1 GiB of fp32 scores per chunk

def preferred_backends(q: torch.Tensor) -> list[SDPBackend]:
    """SDPA backends in the order we want them tried for this query tensor."""
    fused_half = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9:
        fused_half.reverse()
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256:
        return fused_half + [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and cpu_flash_breaks():
        return [SDPBackend.MATH]
    return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

def cpu_flash_breaks() -> bool:
    """On AMX CPUs the CPU flash kernel packs bf16 with AVX-512 code: below avx512, it raises."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return amx and torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16")

def builds_scores(q, k, v, mask=None, scale=None) -> bool:
    """Whether SDPA, with the backends enabled where it is called, would run its math backend
    for these inputs: the one backend that writes the full score matrix."""
    return torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=scale) == SDPBackend.MATH.value

def attention(q, k, v, mask=None, scale=None):
    """softmax(q @ k^T * scale + mask) @ v.

    q: (batch, heads, queries, head_dim); k, v: (batch, heads, keys, head_dim).
    mask: None, or a bool (True = attend) / additive float tensor broadcastable to
    (batch, heads, queries, keys). scale: defaults to 1/sqrt(head_dim).
    Returns (batch, heads, queries, head_dim).
    """
    device = q.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        # SDPA's own autocast rule, applied before the backend choice: under bf16 autocast with fp32
        # master weights the fp32 RMSNorm scales make q and k fp32 while v is bf16, which no fused
        # kernel takes; SDPA would cast them itself, but only after `builds_scores` saw "math".
        dtype = torch.get_autocast_dtype(device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        mask = mask.to(dtype) if mask is not None and mask.is_floating_point() else mask
    batch, heads, queries, _ = q.shape
    chunk = max(1, MAX_SCORE_ELEMENTS // (batch * heads * k.shape[-2]))
    with sdpa_kernel(preferred_backends(q), set_priority=True):
        # Inside a compiled block (`compile_blocks`) the question would break the block's graph;
        # the transformers' q, k, v always suit a fused kernel, so the call stays whole there.
        whole = queries <= chunk or torch.compiler.is_compiling()
        if whole or not builds_scores(q, k, v, mask, scale):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        outputs = []
        for start in range(0, queries, chunk):
            rows = slice(start, start + chunk)
            rows_mask = mask[..., rows, :] if mask is not None and mask.shape[-2] != 1 else mask
            outputs.append(F.scaled_dot_product_attention(q[..., rows, :], k, v,
                                                          attn_mask=rows_mask, scale=scale))
        return torch.cat(outputs, dim=-2)

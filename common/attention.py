"""One attention function for every model in the project.

All transformers, the text encoders and the VAE's mid-block call `attention`, so the
choice of kernel is made in exactly one place:

* CUDA, bf16/fp16, head_dim <= 256: cuDNN or flash attention (cuDNN first on Hopper,
  where it is the faster of the two), then memory-efficient, then math.
* head_dim > 256 (the VAE's mid attention has 512 channels in one head): flash and cuDNN
  cannot take it, so memory-efficient attention comes first.
* CPU / fp32 (the tests): whatever SDPA picks.

Queries are processed in chunks whenever the full score matrix would exceed
`MAX_SCORE_ELEMENTS`. The fused kernels never build that matrix, but the math fallback
(and an explicit mask) do, and at 4096x4096 the VAE attends over 262,144 tokens: one
fp32 score matrix would need 256 GiB. Chunking queries is exact, since softmax runs
over keys, independently for each query.
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
    return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def attention(q, k, v, mask=None, scale=None):
    """softmax(q @ k^T * scale + mask) @ v.

    q: (batch, heads, queries, head_dim); k, v: (batch, heads, keys, head_dim).
    mask: None, or a bool (True = attend) / additive float tensor broadcastable to
    (batch, heads, queries, keys). scale: defaults to 1/sqrt(head_dim).
    Returns (batch, heads, queries, head_dim).
    """
    batch, heads, queries, _ = q.shape
    keys = k.shape[-2]
    chunk = max(1, MAX_SCORE_ELEMENTS // (batch * heads * keys))
    with sdpa_kernel(preferred_backends(q), set_priority=True):
        if queries <= chunk:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        outputs = []
        for start in range(0, queries, chunk):
            rows = slice(start, start + chunk)
            chunk_mask = mask
            if mask is not None and mask.shape[-2] != 1:
                chunk_mask = mask[..., rows, :]
            outputs.append(F.scaled_dot_product_attention(q[..., rows, :], k, v, attn_mask=chunk_mask, scale=scale))
        return torch.cat(outputs, dim=-2)

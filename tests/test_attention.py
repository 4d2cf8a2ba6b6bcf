"""Tests of common/attention.py (CPU): exactness against a float64 reference, and when the
queries are split: only where SDPA's math backend would write the whole score matrix."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend

import common.attention as attention_module
from common.attention import attention, builds_scores


def manual_attention(q, k, v, mask=None, scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
        )
    return (scores.softmax(-1) @ v.double()).float()


def qkv(b=2, h=3, lq=11, lk=13, dim=16, seed=0, value_dim=None):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(b, h, n, d, generator=g) for n, d in ((lq, dim), (lk, dim), (lk, value_dim or dim))
    )


def masks(b=2, h=3, lq=11, lk=13):
    g = torch.Generator().manual_seed(1)
    boolean = torch.rand(b, 1, lq, lk, generator=g) > 0.3
    boolean[..., 0] = True  # every query sees at least one key
    key_padding = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    key_padding[0, ..., -4:] = False
    additive = torch.randn(b, h, lq, lk, generator=g)
    return {
        "none": None,
        "bool per query": boolean,
        "bool key padding": key_padding,
        "float per query": additive,
        "float broadcast": additive[:, :1, :1],
    }


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The number of queries of every F.scaled_dot_product_attention call, in order."""
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        attention_module.F,
        "scaled_dot_product_attention",
        lambda *a, **kw: calls.append(a[0].shape[-2]) or real_sdpa(*a, **kw),
    )
    return calls


@pytest.mark.parametrize("mask_name", list(masks()))
@pytest.mark.parametrize("scale", [None, 0.05])
def test_attention_matches_manual(mask_name, scale):
    q, k, v = qkv()
    mask = masks()[mask_name]
    torch.testing.assert_close(
        attention(q, k, v, mask, scale), manual_attention(q, k, v, mask, scale), atol=1e-5, rtol=1e-5
    )


def test_unmasked_fused_call_over_the_limit_is_one_call(sdpa_calls):
    """16,400^2 = 2.7e8 scores > MAX_SCORE_ELEMENTS: the CPU flash kernel never holds them, so no split."""
    q = torch.randn(1, 1, 16400, 8, generator=torch.Generator().manual_seed(0))
    assert q.shape[-2] ** 2 > attention_module.MAX_SCORE_ELEMENTS
    assert not builds_scores(q, q, q)
    out = attention(q, q, q)
    assert sdpa_calls == [16400] and out.shape == q.shape


@pytest.mark.parametrize("mask_name", list(masks()))
def test_fused_kernel_takes_masks_whole(monkeypatch, sdpa_calls, mask_name):
    """PyTorch's CPU flash kernel reads a mask block by block: masked calls stay whole too."""
    q, k, v = qkv()
    monkeypatch.setattr(attention_module, "MAX_SCORE_ELEMENTS", 200)  # 2 queries' scores per chunk
    out = attention(q, k, v, masks()[mask_name], 0.3)
    assert sdpa_calls == [11]
    torch.testing.assert_close(out, manual_attention(q, k, v, masks()[mask_name], 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_name", list(masks()))
def test_math_backend_is_split_exactly(monkeypatch, sdpa_calls, mask_name):
    """A value head dim unlike the query's sends SDPA to its math backend, which writes the scores:
    with room for 200 scores (2 queries of 6 x 13 keys) the 11 queries go in 6 calls, and the
    result equals the single call to float rounding."""
    q, k, v = qkv(value_dim=8)
    mask = masks()[mask_name]
    assert builds_scores(q, k, v, mask)
    whole = attention(q, k, v, mask, 0.3)
    monkeypatch.setattr(attention_module, "MAX_SCORE_ELEMENTS", 200)
    sdpa_calls.clear()
    chunked = attention(q, k, v, mask, 0.3)
    assert sdpa_calls == [2, 2, 2, 2, 2, 1]
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked, manual_attention(q, k, v, mask, 0.3), atol=1e-5, rtol=1e-5)


def test_math_only_backends_are_split(monkeypatch, sdpa_calls):
    """Where only the math backend is enabled (a CUDA fallback), a masked call over the limit is split."""
    monkeypatch.setattr(attention_module, "preferred_backends", lambda q: [SDPBackend.MATH])
    monkeypatch.setattr(attention_module, "MAX_SCORE_ELEMENTS", 200)
    q, k, v = qkv()
    mask = masks()["bool per query"]
    out = attention(q, k, v, mask)
    assert sdpa_calls == [2, 2, 2, 2, 2, 1]
    torch.testing.assert_close(out, manual_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_attention_head_dim_512():
    """The VAE's mid attention: one head of 512 channels."""
    q, k, v = qkv(b=1, h=1, lq=24, lk=24, dim=512)
    out = attention(q, k, v)
    assert out.shape == (1, 1, 24, 512)
    torch.testing.assert_close(out, manual_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_bf16_on_the_cpu_runs_at_every_cpu_capability():
    """On AMX CPUs PyTorch's CPU flash kernel raises "pack_vnni2 is only supported when avx512 is
    supported" for bf16 at ATEN_CPU_CAPABILITY=default or avx2 (CI runs the suite at both): bf16
    must still run there, and agree with the float64 reference to bf16 precision."""
    q, k, v = (x.bfloat16() for x in qkv(b=1, h=2, lq=64, lk=64, dim=64))
    out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert (out.float() - manual_attention(q, k, v)).abs().max() < 2e-2


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
@pytest.mark.parametrize("amx", [False, True])
def test_bf16_on_the_cpu_leaves_flash_only_where_it_breaks(monkeypatch, amx, capability):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    breaks = amx and capability != "AVX512"
    bf16, fp32 = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16), torch.zeros(1, 1, 4, 8)
    assert (attention_module.preferred_backends(bf16) == [SDPBackend.MATH]) == breaks
    assert SDPBackend.FLASH_ATTENTION in attention_module.preferred_backends(fp32)

"""tests/benchmarks/plan.py against real runs.

What is compared: the plan runs the project's code on the meta device (shapes only, attention as a
GPU would run it); here the same workloads run for real on the CPU with tiny models in fp32, and
LiveBytes counts the same way on the real tensors. Planned FLOPs and peaks must match the real
run's within 10 % (where SDPA's CPU backend choice matches the GPU's, as for these inputs). Two
independent checks: the real run's live bytes against the CPU allocations recorded by
torch.profiler, and the FLOP count against FlopCounterMode. At full size, flux-4096's FLOPs must
fall within 2 % of the analytic count of tests/benchmarks/bench_flux.py.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category, MemoryProfileTimeline
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
import plan  # noqa: E402

d = plan.d
TINY = dict(
    flux=d.FluxConfig(hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=32,
                      vec_in_dim=16, axes_dim=(4, 14, 14)),
    vae=d.VAEConfig(base_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1),
    text_tokens=8, lora_rank=4, dtype=torch.float32, autocast=False,
)
PLANNED, REAL = plan.Setup(**TINY, device="meta"), plan.Setup(**TINY, device="cpu")
WORKLOADS = {  # F16 VAE: 128 px -> an 8x8 latent, 16 image tokens
    "generate (step + decode)": lambda s: plan.generate_trace(s, "flux", 128),
    "op4ksr": lambda s: plan.op4ksr_trace(s, 128),
    "op4ksr F8": lambda s: plan.op4ksr_trace(s, 128, f16=False),
    "OMGSR-F tiled (7 x 7 tiles)": lambda s: plan.omgsr_f_trace(s, 128, process_size=64),
    "WLF LoRA training step": lambda s: plan.wlf_lora_trace(s, 128),
}


@pytest.fixture(scope="module")
def traces():
    torch.manual_seed(0)
    return {name: (run(PLANNED), run(REAL)) for name, run in WORKLOADS.items()}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_planned_flops_and_peaks_match_a_real_run(traces, name):
    planned, real = traces[name]
    assert real.total.flops > 0 and planned.total.flops == pytest.approx(real.total.flops, rel=1e-6)
    assert planned.total.peak.keys() == real.total.peak.keys()
    for mode, peak in real.total.peak.items():
        assert planned.total.peak[mode] == pytest.approx(peak, rel=0.10), f"{name}, offload {mode}"
    for phase, stats in real.phases.items():  # flux-4096 and decode-f16-4096 are phases of one run
        assert planned.phases[phase].peak["none"] == pytest.approx(stats.peak["none"], rel=0.10), phase


def test_live_bytes_match_the_cpu_allocator():
    """The real generate run's peak of live bytes above the weights, against the peak of what the
    CPU allocator handed out in the same run (torch.profiler's memory timeline, weights left out).
    The allocator also sees the scratch memory kernels allocate and free inside one op (at this
    size mostly the VAE mid-block's math attention), which LiveBytes does not: LiveBytes may not
    exceed the allocator and must see at least 80 % of it."""
    transformer = REAL.build(lambda: d.Flux(REAL.flux))
    vae = REAL.build(lambda: d.AutoEncoder(REAL.f16(REAL.vae)))
    pipe = d.Pipeline("flux", transformer, vae, {}, {}, torch.device("cpu"), torch.float32, "test")
    condition = plan.flux_condition(REAL)
    residency = plan.Residency({"transformer": (transformer, [transformer]), "vae": (vae, [vae.decoder])})
    run = lambda _: d.generate(pipe, condition, 128, 128, steps=1, guidance=3.5, seed=0)  # noqa: E731
    options = dict(profile_memory=True, record_shapes=True, with_stack=True)  # what the memory timeline needs
    with profile(activities=[ProfilerActivity.CPU], **options) as prof:
        tracked = plan.Tracer(residency, "cpu")(run)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    weights = _CATEGORY_TO_INDEX[Category.PARAMETER] + 1  # the timeline's column of the weights
    allocated = max(sum(size) - size[weights] for size in sizes)
    live = tracked.total.peak["none"] - residency.bytes("none")
    assert 0.8 * allocated <= live <= allocated, (live, allocated)


@pytest.mark.parametrize("name", ["generate (step + decode)", "op4ksr"])
def test_flops_match_flop_counter_mode(name):
    """LiveBytes counts FLOPs with FlopCounterMode's formulas; the two totals agree (op4ksr runs in
    inference mode, where LiveBytes itself decomposes composite ops)."""
    with FlopCounterMode(display=False, custom_mapping=plan.FUSED_FLOPS) as counter:
        trace = WORKLOADS[name](PLANNED)
    assert trace.total.flops == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_flux_4096_flops_match_the_analytic_count():
    """One Flux-12B step at 4096^2 (F16: 16,384 image + 512 text tokens), planned at full size."""
    trace = plan.generate_trace(plan.REAL, "flux", 4096)
    planned = trace.phases["transformer"].flops
    assert planned == pytest.approx(plan.flux_forward_flops(plan.REAL.flux, 16384, 512), rel=0.02)


def test_omgsr_f_4096_is_49_tile_passes():
    """OMGSR-F's tiled baseline at 4096^2 (F8: a 512^2 latent, tiles of 128 overlapping by 64): its Flux
    work is 49 passes of 4,096 image + 512 text tokens, about 8x one patch-free F16 pass (16,384 tokens)."""
    trace = plan.omgsr_f_trace(plan.REAL, 4096)
    one_tile = plan.flux_forward_flops(plan.REAL.flux, 4096, 512)
    assert trace.phases["transformer"].flops == pytest.approx(49 * one_tile, rel=0.02)
    ratio = 49 * one_tile / plan.flux_forward_flops(plan.REAL.flux, 16384, 512)
    assert 7 < ratio < 10


def test_gpu_attention_choice():
    """Fused unless an input's last dim is strided (as the VAE mid-block's transposed q, k, v)."""
    q = torch.empty(1, 1, 64, 512, device="meta")
    assert not plan.builds_scores_on_cuda(q, q, q)
    strided = torch.empty(1, 1, 512, 64, device="meta").transpose(-1, -2)
    assert plan.builds_scores_on_cuda(strided, strided, strided)


def test_cuda_autocast_emulation():
    """CUDA's autocast lists on meta tensors, and its cache of weight casts for the block's length."""
    weight = torch.nn.Parameter(torch.empty(8, 4, device="meta"))
    x = torch.empty(2, 4, device="meta")
    with plan.CudaAutocast() as autocast:
        y = F.linear(x, weight)
        assert y.dtype == torch.bfloat16
        assert F.layer_norm(y, (8,)).dtype == torch.float32 and y.softmax(-1).dtype == torch.float32
        assert F.gelu(y).dtype == torch.bfloat16 and (y + 1).dtype == torch.bfloat16
        assert autocast.cache[id(weight)][1] is autocast.to_bf16(weight)

"""What each workload costs at full size: FLOPs, weight bytes, peak GPU memory under each offload
mode and a roofline time on an H100 SXM and an H200, from the project's own code run on the meta
device (shapes and dtypes, no values): no weights, no GPU, a few minutes on a CPU.

    python tests/benchmarks/plan.py                               # every workload, as a table
    python tests/benchmarks/plan.py --only flux-4096,op4ksr-4096 --json plan.json
    python tests/benchmarks/plan.py --only op4ksr-4096 --explain  # + the largest tensors at the peak

Each workload calls the method files' own functions on models built on the meta device from the
real configurations (FLUX.1-dev, SD3-Medium, the 16-channel VAEs), in bf16: `generate`,
`super_resolve`, `upscale`, `wlf_micro_step` (the body of `wlf_step`), the body of
`sc_vae_step`. The meta device stands for the GPU; CPU tensors
are host memory.

FLOPs
    torch.utils.flop_counter's formulas (FlopCounterMode's registry: matmuls, convolutions,
    attention), applied to every op as it runs, forward and backward, gradient-checkpointing
    recomputation included. FlopCounterMode itself does not run alongside: its module tracker
    keeps each checkpointed block's recomputed graph alive until the end of backward, which
    would inflate training peaks (tests/test_plan.py checks that both counts agree).
Attention
    As a GPU runs it: SDPA's fused kernels (flash, cuDNN, memory-efficient) never write the
    scores; they need each input's last dim contiguous, else SDPA falls back to its math backend,
    which does (and common.attention then splits the queries). During planning SDPA (ours through
    common.attention, diffusers' directly) makes that choice (`builds_scores_on_cuda`) and runs
    PyTorch's flash op for the CPU on meta tensors (an output and a fp32 log-sum-exp per query,
    as the fused GPU kernels leave), or the math backend; FLOPs of the fused op are
    FlopCounterMode's SDPA formulas (4 b h q k d forward, 2.5 times that backward).
Live bytes
    `LiveBytes`, a TorchDispatchMode, sees every aten op. An output whose storage no input holds
    is a new allocation: its bytes are added, and a weakref finalizer on the storage subtracts
    them when PyTorch frees it (autograd's saved tensors included, exactly as long as they live).
    Peak = max over the run of live bytes + the weights resident at that moment, which depend on
    the offload mode (`diffusion4k.load_pipeline`): "none" every component (the text encoders
    only visit to encode: never resident), "model" the component running (the one whose forward
    began last), "blocks" the transformer's non-block modules always, the streamed block that runs
    and the next one (sent ahead), and the other component running. Not modelled: the caching
    allocator's rounding, fragmentation and cached blocks, cuBLAS / cuDNN workspaces, kernels'
    internal scratch, the CUDA context (about 0.5 GiB): what a real run reserves is higher.
Roofline
    Per op on the GPU: max(FLOPs / peak, bytes / bandwidth), bytes = its inputs read + outputs
    written (views move nothing), summed over the ops: eager PyTorch, no fusion, no overlap of
    ops, no host transfers (see Transfers) or collectives. Peaks (dense): bf16 / fp16 989 TFLOP/s
    on both; fp32 matmuls 67 TFLOP/s (no TF32); HBM 3.35 TB/s (H100 SXM), 4.8 TB/s (H200).
Transfers
    What --offload copies from host to GPU memory, at PCIE (an assumption, not a measurement):
    "model" each component once per image, as its phase begins; "blocks" every streamed block at
    every step, from pinned memory on a side stream while the previous block computes, so a step
    takes max(compute, copy) (`est_seconds_blocks`); nothing is copied back. The table's "PCIe s"
    is one step's copies, "blocks s" that step's estimate.
Autocast
    Meta tensors have no autocast, so the training steps, which run under CUDA bf16 autocast,
    run under `CudaAutocast`: CUDA's cast lists for the ops the models call, and its cache of
    the bf16 copies of fp32 weights, kept until the autocast block ends (off for WLF training,
    whose autocast has cache_enabled=False).
Meta device
    Copies to the CPU return empty CPU tensors; `.item()` of a meta tensor reads 0 (True for a
    bool, so finiteness checks pass). Composite ops, which inference mode hands over whole, run
    as their C++ decomposition, as on a GPU.

Scaled-down runs: C-Upscale runs one of its denoising steps (the RAP pass, every region batch,
GSP), and in it the model for the first region batch of each size only; the other batches (same
shapes) are charged that batch's FLOPs and time and get an empty output. FLOPs and time = encode
and decode + the step times the number of steps; the peak is the run's (every step and batch
allocates alike). Training runs two steps and reports the second (optimizer states exist, as in
every later step). FSDP2 on 8 GPUs (`wlf-fsdp8-4096`) is modelled per GPU:
an eighth of the fp32 weights, gradients and AdamW states, plus two blocks' fp32 weights gathered
(the running block and the prefetched one) and one block's full fp32 gradients before its
reduce-scatter; the step's activations are traced on the unsharded model.
"""

import argparse
import contextlib
import functools
import json
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import common.attention  # noqa: E402
import cupscale as cu  # noqa: E402
import diffusion4k as d  # noqa: E402
import op4ksr as op  # noqa: E402
from bench_flux import flux_forward_flops  # noqa: E402

aten = torch.ops.aten
GIB = 2**30
GPUS = {"h100": dict(bf16=989e12, fp32=67e12, hbm=3.35e12), "h200": dict(bf16=989e12, fp32=67e12, hbm=4.8e12)}
PCIE = 50e9  # bytes/s host to GPU from pinned memory, assumed: PCIe 5.0 x16 (64 GB/s raw); about 25 on 4.0
FUSED = aten._scaled_dot_product_flash_attention_for_cpu
FUSED_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward
FUSED_FLOPS = {  # FlopCounterMode's SDPA formulas, for the op that stands for the fused kernels
    FUSED: lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    FUSED_BACKWARD: lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
        grad, q, k, v
    ),
}
FLOPS = {**flop_registry, **{op: shape_wrapper(formula) for op, formula in FUSED_FLOPS.items()}}
NO_TRAFFIC = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default}
COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
EXPLAIN = False  # --explain: record what is live at each peak

# ======================================================================= accounting


def weight_bytes(*things) -> int:
    """Bytes of the parameters and buffers of modules (or of tensors), each tensor once."""
    tensors = {}
    for thing in things:
        for t in [*thing.parameters(), *thing.buffers()] if isinstance(thing, nn.Module) else thing:
            tensors[id(t)] = t.nbytes
    return sum(tensors.values())


class Residency:
    """Weight bytes on the GPU at each moment, per offload mode (see the module docstring).

    components: {name: (weights, modules whose forward starts that component's phase)}; weights
    is a module, a list of tensors or a byte count. blocks: the transformer's streamed blocks.
    """

    def __init__(self, components: dict, modes=("none",), blocks=()):
        self.sizes = {
            name: w if isinstance(w, int) else weight_bytes(w) for name, (w, _) in components.items()
        }
        self.modes, self.phase, self.block = modes, "setup", 0
        self.streamed = weight_bytes(*blocks)
        self.on_change = lambda: None
        self.hooks = [
            m.register_forward_pre_hook(functools.partial(self._enter, name))
            for name, (_, entries) in components.items()
            for m in entries
        ]
        sizes = [weight_bytes(block) for block in blocks]
        for i, block in enumerate(blocks):  # the running block and the next one, sent ahead
            after = sizes[(i + 1) % len(sizes)]
            self.hooks += [
                block.register_forward_pre_hook(functools.partial(self._block, sizes[i] + after)),
                block.register_forward_hook(functools.partial(self._block, after)),
            ]

    def _enter(self, name, *_):
        self.phase = name
        self.on_change()

    def _block(self, size, *_):
        self.block = size
        self.on_change()

    def bytes(self, mode: str) -> int:
        running = self.sizes.get(self.phase, 0)
        if mode == "none":
            return sum(self.sizes.values())
        if mode == "model":
            return running
        resident = self.sizes.get("transformer", 0) - self.streamed + self.block  # "blocks"
        return resident + (running if self.phase != "transformer" else 0)

    def remove(self):
        for hook in self.hooks:
            hook.remove()


@dataclass
class Stats:
    flops: float = 0.0
    seconds: dict = field(default_factory=lambda: dict.fromkeys(GPUS, 0.0))
    peak: dict = field(default_factory=dict)  # offload mode -> bytes


class LiveBytes(TorchDispatchMode):
    """Live bytes of the tensors on `device`, the per-op roofline, per phase (see the module docstring)."""

    def __init__(self, residency: Residency, device: str, explain=False):
        super().__init__()
        self.residency, self.device, self.live = residency, device, 0
        self.seen = weakref.WeakSet()
        self.phases = {}
        self.total = Stats()
        self.explain, self.tensors, self.at_peak = explain, {}, {}  # explain: what is live at each peak
        residency.on_change = self.note

    def on_device(self, values) -> list:
        """The tensors on the device among values (and in lists among them: aten ops nest no deeper)."""
        flat = [v for value in values for v in (value if isinstance(value, (tuple, list)) else (value,))]
        return [t for t in flat if isinstance(t, torch.Tensor) and t.device.type == self.device]

    def charge(self, flops: float, seconds: dict):
        """Add work done elsewhere (see cupscale_trace) to the running phase."""
        for s in (self.phases.setdefault(self.residency.phase, Stats()), self.total):
            s.flops += flops
            for gpu in GPUS:
                s.seconds[gpu] += seconds[gpu]

    def _free(self, size, key):
        self.live -= size
        self.tensors.pop(key, None)

    def note(self):
        stats = self.phases.setdefault(self.residency.phase, Stats())
        for mode in self.residency.modes:
            total = self.live + self.residency.bytes(mode)
            for name, s in ((self.residency.phase, stats), ("total", self.total)):
                if mode == "none" and self.explain and total > s.peak.get(mode, 0):
                    self.at_peak[name] = list(self.tensors.values())
                s.peak[mode] = max(s.peak.get(mode, 0), total)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.device == "meta":
            host = host_side(func, args, kwargs)
            if host is not NotImplemented:
                return host
        if composite(func):  # inference mode lets composite ops through: run their C++ decomposition
            with self:
                return func._op_dk(COMPOSITE, *args, **kwargs)
        out = func(*args, **kwargs)
        inputs = self.on_device((*args, *kwargs.values()))
        outputs = self.on_device(out if isinstance(out, (tuple, list)) else (out,))
        if not inputs and not outputs:
            return out
        held = {id(t.untyped_storage()) for t in inputs}
        for t in outputs:
            storage = t.untyped_storage()
            if id(storage) not in held and storage not in self.seen:
                self.seen.add(storage)
                self.live += storage.nbytes()
                weakref.finalize(storage, self._free, storage.nbytes(), id(storage))
                if self.explain:
                    where = (str(func.overloadpacket), tuple(t.shape), t.dtype, caller())
                    self.tensors[id(storage)] = (storage.nbytes(), *where)
        formula = FLOPS.get(func.overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula else 0
        moved = 0 if func.is_view or func in NO_TRAFFIC else sum(t.nbytes for t in inputs + outputs)
        precision = "bf16" if any(t.dtype in (torch.bfloat16, torch.float16) for t in inputs) else "fp32"
        stats = self.phases.setdefault(self.residency.phase, Stats())
        for s in (stats, self.total):
            s.flops += flops
            for gpu, spec in GPUS.items():
                s.seconds[gpu] += max(flops / spec[precision], moved / spec["hbm"])
        self.note()
        return out


def caller() -> str:
    """The innermost line of a method file (or of diffusers) on the Python stack."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.endswith(("diffusion4k.py", "op4ksr.py", "cupscale.py")) or "/diffusers/" in name:
            return f"{Path(name).name}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "plan.py (backward, optimizer or set-up)"


def largest(at_peak: list, count: int = 8) -> list[str]:
    """The biggest groups of tensors live at the peak: (where made, op, shape, dtype) and their GiB."""
    groups = {}
    for size, name, shape, dtype, where in at_peak:
        key = (where, name, shape, str(dtype).removeprefix("torch."))
        total, n = groups.get(key, (0, 0))
        groups[key] = (total + size, n + 1)
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])[:count]
    return [
        f"{size / GIB:7.2f} GiB  {n:>4} x {list(shape)} {dtype} {op} at {where}"
        for (where, op, shape, dtype), (size, n) in ranked
    ]


@functools.cache
def composite(func) -> bool:
    """Whether an op runs as its composite parts: it has a CompositeImplicitAutograd kernel and no
    kernel of its own (seen through the CPU and meta builds). The C++ composite is what CUDA runs;
    `OpOverload.decompose` may pick a Python decomposition instead, which allocates differently."""
    has = lambda key: torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)  # noqa: E731
    return has(COMPOSITE) and not has("CPU") and not has("Meta")


def host_side(func, args, kwargs):
    """What the GPU would hand to the host: copies to the CPU (empty) and `.item()` (0, or True)."""
    if func.overloadpacket in (aten._to_copy, aten.to) and args[0].device.type == "meta":
        device = kwargs.get("device") or next((a for a in args if isinstance(a, torch.device)), None)
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), args[0].dtype)
        if device is not None and torch.device(device).type == "cpu":
            return torch.empty(args[0].shape, dtype=dtype)
    if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
        return True if args[0].dtype == torch.bool else 0
    if func is aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type == "meta":
        return args[0]
    return NotImplemented


def builds_scores_on_cuda(query, key, value, *args, **kwargs) -> bool:
    """What SDPA decides on a GPU for the models' inputs (bf16, head dims up to 512, masks only in
    the text encoders): a fused kernel (flash, cuDNN, memory-efficient), unless an input's last
    dim is not contiguous, which every fused kernel requires: then the math backend."""
    return any(t.shape[-1] > 1 and t.stride(-1) != 1 for t in (query, key, value))


def planned_sdpa(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """F.scaled_dot_product_attention as the GPU would run it: PyTorch's CPU flash op (which runs on
    meta) for the fused kernels, or SDPA's math backend where `builds_scores_on_cuda`."""
    if builds_scores_on_cuda(query, key, value):
        return aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale
        )[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # what SDPA does before its kernels
        additive = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
        attn_mask = additive.masked_fill(~attn_mask, float("-inf"))
    return FUSED.default(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


class CudaAutocast(TorchFunctionMode):
    """torch.autocast("cuda", torch.bfloat16) for tensors on `device` (meta has no autocast): CUDA's
    lists for the ops the models call, and (with `cache`) its cache of the bf16 copies of fp32 leaves
    that require grad (weights), which lives as long as the block."""

    BF16 = {F.linear, F.conv2d, torch.matmul, torch.Tensor.matmul, torch.bmm, torch.baddbmm, torch.einsum,
            FUSED.default, aten._scaled_dot_product_attention_math}  # (SDPA as planned_sdpa runs it)
    FP32 = {F.layer_norm, F.group_norm, F.mse_loss, torch.exp, torch.Tensor.exp, torch.rsqrt,
            torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.linalg.vector_norm,
            torch.Tensor.norm}
    FP32_OUTPUT = {F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.sum, torch.Tensor.sum}

    def __init__(self, device="meta", cache=True):
        super().__init__()
        self.device, self.cache = device, {} if cache else None

    def eligible(self, t) -> bool:
        floating = (torch.float32, torch.float16, torch.bfloat16)
        return isinstance(t, torch.Tensor) and t.device.type == self.device and t.dtype in floating

    def to_bf16(self, t):
        if not self.eligible(t) or t.dtype == torch.bfloat16:
            return t
        if self.cache is not None and t.is_leaf and t.requires_grad:
            return self.cache.setdefault(id(t), (t, t.to(torch.bfloat16)))[1]
        return t.to(torch.bfloat16)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.BF16:
            args, kwargs = tree_map(self.to_bf16, (args, kwargs))
        elif func in self.FP32:
            args, kwargs = tree_map(lambda t: t.float() if self.eligible(t) else t, (args, kwargs))
        elif func in self.FP32_OUTPUT and args and self.eligible(args[0]) and kwargs.get("dtype") is None:
            kwargs["dtype"] = torch.float32
        return func(*args, **kwargs)


@contextlib.contextmanager
def gpu_attention():
    """SDPA (ours through common.attention, diffusers' directly) decides and runs as on a GPU."""
    saved = F.scaled_dot_product_attention, common.attention.builds_scores
    F.scaled_dot_product_attention, common.attention.builds_scores = planned_sdpa, builds_scores_on_cuda
    try:
        yield
    finally:
        F.scaled_dot_product_attention, common.attention.builds_scores = saved


@dataclass
class Trace:
    total: Stats
    phases: dict  # phase -> Stats
    sizes: dict  # component -> weight bytes
    at_peak: dict  # phase or "total" -> what was live at its peak (offload "none"; --explain only)
    streamed: int = 0  # weight bytes of the blocks that --offload blocks streams


class Tracer:
    """LiveBytes over a run, attention as on a GPU on meta; `restart` forgets what was counted so far
    (the allocations stay live), so that a run can report its last step only."""

    def __init__(self, residency: Residency, device="meta"):
        self.residency, self.device = residency, device
        self.live = LiveBytes(residency, device, EXPLAIN)

    def restart(self):
        self.live.phases, self.live.total, self.live.at_peak = {}, Stats(), {}
        self.live.note()

    def __call__(self, run) -> Trace:
        with gpu_attention() if self.device == "meta" else contextlib.nullcontext(), self.live:
            run(self)
        self.residency.remove()
        live, residency = self.live, self.residency
        return Trace(live.total, live.phases, residency.sizes, live.at_peak, residency.streamed)


# ======================================================================== workloads


@dataclass(frozen=True)
class Setup:
    """Configurations, device and dtype of a plan: the real models on meta in bf16 (the GPU), or
    tiny ones on the CPU in fp32 (tests/test_plan.py runs both and compares)."""

    flux: d.FluxConfig = d.FLUX_DEV
    sd3: d.SD3Config = d.SD3_MEDIUM
    vae: d.VAEConfig = d.FLUX_VAE
    sd3_vae: d.VAEConfig = d.SD3_VAE
    text_tokens: int = 512  # Flux's T5 length
    train_text_tokens: int = 77  # Flux's T5 length in WLF training (upstream's)
    sd3_text_tokens: int = 333  # 77 CLIP + 256 T5
    lora_rank: int = 64
    device: str = "meta"
    dtype: torch.dtype = torch.bfloat16
    autocast: bool = True  # training under CUDA bf16 autocast, as on a GPU

    def build(self, factory, dtype=None) -> nn.Module:
        with torch.device(self.device):
            model = factory()
        return model.to(dtype or self.dtype).eval().requires_grad_(False)

    def randn(self, *shape):
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def f16(self, config):
        return type(config)(**{**vars(config), "stride": 2})


def flux_condition(s: Setup, device="cpu", tokens=None) -> dict:
    return {
        "txt": torch.randn(1, tokens or s.text_tokens, s.flux.context_in_dim, device=device, dtype=s.dtype),
        "y": torch.randn(1, s.flux.vec_in_dim, device=device, dtype=s.dtype),
    }


def sd3_condition(s: Setup) -> dict:
    return {
        "context": torch.randn(1, s.sd3_text_tokens, s.sd3.context_dim),
        "pooled": torch.randn(1, s.sd3.adm_in_channels),
    }


def generate_trace(s: Setup, kind: str, size: int) -> Trace:
    """diffusion4k.generate: one denoising step, then the decode as the CLI runs it (whole up to
    4096^2 with the banded last stage, tiles above)."""
    flux = kind == "flux"
    transformer = s.build(lambda: d.Flux(s.flux) if flux else d.MMDiT(s.sd3))
    vae = s.build(lambda: d.AutoEncoder(s.f16(s.vae if flux else s.sd3_vae)))
    pipe = d.Pipeline(kind, transformer, vae, {}, {}, torch.device(s.device), s.dtype, "plan")
    blocks = (
        [*transformer.double_blocks, *transformer.single_blocks] if flux else list(transformer.joint_blocks)
    )
    residency = Residency(
        {"transformer": (transformer, [transformer]), "vae": (vae, [vae.encoder, vae.decoder])},
        ("none", "model", "blocks"),
        blocks,
    )
    condition = flux_condition(s) if flux else sd3_condition(s)
    return Tracer(residency, s.device)(
        lambda _: d.generate(pipe, condition, size, size, steps=1, guidance=3.5, seed=0)
    )


def op4ksr_trace(s: Setup, size: int, f16: bool = True) -> Trace:
    """op4ksr.super_resolve of a size/4 input: F16 (or F8) encode, one Flux pass, decode. Everything
    resident."""
    transformer = s.build(lambda: op.Flux(op.FluxConfig(**vars(s.flux))))
    vae = s.build(lambda: op.AutoEncoder(op.VAEConfig(**vars(s.f16(s.vae) if f16 else s.vae))))
    residency = Residency(
        {"transformer": (transformer, [transformer]), "vae": (vae, [vae.encoder, vae.decoder])}
    )

    def run(_):
        prompt = flux_condition(s, s.device)
        pipe = op.SRPipeline(
            transformer, vae, prompt["txt"], prompt["y"], 0.5, 3.5, 4.0, torch.device(s.device), s.dtype, {}
        )
        op.super_resolve(pipe, Image.new("RGB", (size // 4, size // 4)), size, size)

    return Tracer(residency, s.device)(run)


def omgsr_f_trace(s: Setup, size: int, process_size: int = 1024) -> Trace:
    """OMGSR-F's inference as op4ksr.py's --recipe omgsr-f runs it on a size x size processed input:
    `omgsr_f_latent` (F8 encode, one Flux pass per latent tile of process_size / 8 with overlap half a
    tile: 7 x 7 = 49 at 4096^2, the Gaussian blend), then the decode. Everything resident. Flux runs for
    the first tile; the others (same shapes, same work) are charged its FLOPs and time and get an empty
    velocity."""
    transformer = s.build(lambda: op.Flux(op.FluxConfig(**vars(s.flux))))
    vae = s.build(lambda: op.AutoEncoder(op.VAEConfig(**vars(s.vae))))
    residency = Residency(
        {"transformer": (transformer, [transformer]), "vae": (vae, [vae.encoder, vae.decoder])}
    )
    tracer, velocity, done = Tracer(residency, s.device), transformer.velocity, {}

    def first_tile_only(z, *args):
        if z.shape in done:
            tracer.live.charge(*done[z.shape])
            return torch.empty(z.shape, device=z.device, dtype=z.dtype)
        before = tracer.live.total.flops, dict(tracer.live.total.seconds)
        out = velocity(z, *args)
        seconds = {gpu: tracer.live.total.seconds[gpu] - before[1][gpu] for gpu in GPUS}
        done[z.shape] = tracer.live.total.flops - before[0], seconds
        return out

    def run(_):
        prompt = flux_condition(s, s.device)
        pipe = op.SRPipeline(transformer, vae, prompt["txt"], prompt["y"], op.OMGSR_SIGMA, 1.0, 4.0,
                             torch.device(s.device), s.dtype, {})
        latent = op.omgsr_f_latent(pipe, s.randn(1, 3, size, size), process_size)
        with torch.inference_mode():
            vae.decode(latent.to(s.dtype))

    transformer.velocity = first_tile_only  # this instance only
    return tracer(run)


def cupscale_trace(s: Setup, size: int) -> tuple[Trace, int]:
    """cupscale.upscale of a size/4 input with GSP and RAP (no regional prompts: RSP off), run for
    one of its denoising steps. In that step the model runs for the first region batch of each
    size; the other batches (same shapes, same work) are charged that batch's FLOPs and time and
    return an output of its shape. Returns the trace and the number of steps of a full run."""
    transformer = s.build(lambda: cu.MMDiT(cu.SD3Config(**vars(s.sd3))))
    vae = s.build(lambda: cu.AutoEncoder(cu.VAEConfig(**vars(s.sd3_vae))))
    pipe = cu.Pipeline("sd3", transformer, vae, {}, {}, torch.device(s.device), s.dtype, "plan")
    config = cu.CUpscaleConfig()
    sigmas, denoise_regions = cu.start_sigmas, cu.denoise_regions
    steps = len(sigmas(config.strength, config.num_steps, config.shift)) - 1
    residency = Residency(
        {"transformer": (transformer, [transformer]), "vae": (vae, [vae.encoder, vae.decoder])},
        ("none", "model"),
    )
    conditions = {"global": sd3_condition(s), "negative": sd3_condition(s), "regions": None}
    image = Image.new("RGB", (size // 4, size // 4))
    tracer = Tracer(residency, s.device)
    done = {}  # batch size -> (FLOPs, seconds) of its first run

    def denoise(model, canvas, regions, *args, **kwargs):
        if len(regions) in done:
            tracer.live.charge(*done[len(regions)])
            shape = (len(regions), canvas.shape[0], regions[0].height, regions[0].width)
            return torch.empty(shape, device=canvas.device)
        before = tracer.live.total.flops, dict(tracer.live.total.seconds)
        out = denoise_regions(model, canvas, regions, *args, **kwargs)
        seconds = {gpu: tracer.live.total.seconds[gpu] - before[1][gpu] for gpu in GPUS}
        done[len(regions)] = tracer.live.total.flops - before[0], seconds
        return out

    cu.start_sigmas, cu.denoise_regions = lambda *args, **kwargs: sigmas(*args, **kwargs)[:2], denoise
    try:
        return tracer(lambda _: cu.upscale(pipe, image, size, size, conditions, config, seed=0)), steps
    finally:
        cu.start_sigmas, cu.denoise_regions = sigmas, denoise_regions


class Autocast:
    """`with autocast.block():` where the training code has `with autocast:` (CUDA bf16 autocast
    when the plan is for the GPU), and the same for the blocks that gradient checkpointing
    recomputes in backward, as torch.utils.checkpoint restores autocast there."""

    def __init__(self, s: Setup, cache=True):
        self.device, self.cache = s.device if s.autocast else None, cache

    def block(self):
        return CudaAutocast(self.device, self.cache) if self.device else contextlib.nullcontext()

    def __enter__(self):
        self.checkpoint = d.checkpoint
        recompute = lambda: (contextlib.nullcontext(), self.block())  # noqa: E731
        d.checkpoint = functools.partial(d.checkpoint, context_fn=recompute)
        return self

    def __exit__(self, *exc):
        d.checkpoint = self.checkpoint


def wlf_step(s: Setup, model, vae, params, optimizer, condition: dict, size: int, autocast: Autocast):
    """One optimizer step of diffusion4k.wlf_loop with one micro-batch of 1 (Flux, default settings:
    posterior samples, 77 T5 tokens); further micro-batches of an accumulated step allocate alike."""
    g = torch.Generator().manual_seed(0)
    factor = vae.config.downsample_factor
    sigma = d.sample_sigmas(1, "uniform", 1.0, g)
    shape = (1, vae.config.z_channels, size // factor, size // factor)
    noise, eps = (torch.randn(shape, generator=g).to(s.device) for _ in range(2))
    images = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    d.wlf_micro_step(model, vae, images.to(s.device, s.dtype), noise, sigma.to(s.device), eps,
                     condition, 3.5, d.WLF_UPSTREAM, autocast.block)
    if optimizer is not None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def wlf_lora_trace(s: Setup, size: int) -> Trace:
    """WLF LoRA fine-tuning on one GPU: bf16 Flux, fp32 LoRA and AdamW, gradient checkpointing; the
    second step."""
    model = d.add_lora(s.build(lambda: d.Flux(s.flux)), "flux", s.lora_rank).train()
    model.gradient_checkpointing = True
    vae = s.build(lambda: d.AutoEncoder(s.f16(s.vae)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    residency = Residency({"transformer": (model, [model]), "vae": (vae, [vae.encoder])})

    def run(tracer):
        condition = flux_condition(s, s.device, s.train_text_tokens)
        with Autocast(s, cache=False) as autocast:
            for step in range(2):
                if step:
                    tracer.restart()
                wlf_step(s, model, vae, params, optimizer, condition, size, autocast)

    return Tracer(residency, s.device)(run)


ADAMW_BYTES = 32  # per sharded fp32 parameter: clipping reads g; AdamW reads p, g, m, v and writes p, m, v


def wlf_fsdp_trace(s: Setup, size: int, world: int = 8) -> tuple[Trace, dict]:
    """Full WLF fine-tuning under FSDP2 on `world` GPUs, per GPU (module docstring): fp32 master
    weights, bf16 autocast without its weight cache, gradient checkpointing. Returns the trace of
    forward + backward and the seconds of the sharded optimizer step on each GPU (memory-bound:
    ADAMW_BYTES per parameter)."""
    model = s.build(lambda: d.Flux(s.flux), torch.float32).requires_grad_(True).train()
    model.gradient_checkpointing = True
    vae = s.build(lambda: d.AutoEncoder(s.f16(s.vae)))
    blocks = [*model.double_blocks, *model.single_blocks]
    count = sum(p.numel() for p in model.parameters())
    block = max(weight_bytes(b) for b in blocks)
    root = weight_bytes(model) - weight_bytes(*blocks)  # the root's weights stay gathered until backward
    per_gpu = {"sharded states": 16 * count // world, "gathered weights": 2 * block + root,
               "full gradients": block}
    for p in model.parameters():  # the reduce-scatter: the full gradient leaves once accumulated
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    residency = Residency({**{name: (n, []) for name, n in per_gpu.items()}, "vae": (vae, [vae.encoder])})

    def run(_):
        with Autocast(s, cache=False) as autocast:
            condition = flux_condition(s, s.device, s.train_text_tokens)
            wlf_step(s, model, vae, None, None, condition, size, autocast)

    optimizer = {gpu: ADAMW_BYTES * count / world / spec["hbm"] for gpu, spec in GPUS.items()}
    return Tracer(residency, s.device)(run), optimizer


def sc_vae_trace(s: Setup, resolution: int = 512, batch: int = 8) -> Trace:
    """One step of diffusion4k.train_vae's loop with its defaults: batch 8 of 512^2 crops, MSE +
    scale consistency + 0.1 LPIPS, no GAN, EMA, fp32 weights, bf16 autocast; the second step."""
    teacher = s.build(lambda: d.AutoEncoder(s.vae), torch.float32)
    student = s.build(lambda: d.AutoEncoder(s.f16(s.vae)), torch.float32)
    decoder = student.decoder.train().requires_grad_(True)
    lpips = s.build(d.LPIPS, torch.float32)
    params = list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
    ema = [p.detach().clone() for p in params]
    residency = Residency(
        {"teacher": (teacher, []), "student": (student, []), "lpips": (lpips, []), "ema": (ema, [])}
    )

    def step(autocast):
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1).to(s.device)
        with autocast.block():
            with torch.no_grad():
                target = teacher.decoder.features(d.encode_raw(teacher, x, g))
                z = d.encode_raw(student, x, g)
            features = decoder.features(z)
            pred = decoder.head(features).float().clamp(-1, 1)
            loss = F.mse_loss(pred, x) + d.scale_consistency_loss(features, target)
            loss = loss + 0.1 * lpips(pred, x).float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for average, p in zip(ema, params, strict=True):
            average.lerp_(p.detach(), 1 - 0.999)

    def run(tracer):
        with Autocast(s) as autocast:
            step(autocast)
            tracer.restart()
            step(autocast)

    return Tracer(residency, s.device)(run)


def diffusers_trace(s: Setup, kind: str, size: int) -> Trace:
    """The same step (or F16 decode) with diffusers' models; the other component is resident in
    offload mode "none", as in ours, but does not run. kind: "flux", "sd3" or "decode"."""
    sys.path.insert(0, str(HERE.parent))
    import conftest  # noqa: F401  (makes diffusers importable beside a CUDA build of torchvision: see there)
    import diffusers

    latent = size // 16
    flux, sd3 = s.flux, s.sd3
    if kind == "flux":
        model = s.build(lambda: diffusers.FluxTransformer2DModel.from_config(d.diffusers_config(flux, "flux")))
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        other = ("vae", weight_bytes(s.build(lambda: d.AutoEncoder(s.f16(s.vae)))))

        def run(_):
            ids = d.latent_image_ids(latent, latent, s.device)
            model(
                hidden_states=s.randn(1, ids.shape[1], flux.in_channels),
                encoder_hidden_states=s.randn(1, s.text_tokens, flux.context_in_dim),
                pooled_projections=s.randn(1, flux.vec_in_dim),
                timestep=s.randn(1),
                img_ids=ids[0],
                txt_ids=torch.zeros(s.text_tokens, 3, device=s.device),
                guidance=s.randn(1) if flux.guidance_embed else None,
            )
    elif kind == "sd3":
        model = s.build(lambda: diffusers.SD3Transformer2DModel.from_config(d.diffusers_config(sd3, "sd3")))
        blocks = list(model.transformer_blocks)
        other = ("vae", weight_bytes(s.build(lambda: d.AutoEncoder(s.f16(s.sd3_vae)))))

        def run(_):
            out = model(
                hidden_states=s.randn(2, sd3.in_channels, latent, latent),
                encoder_hidden_states=s.randn(2, s.sd3_text_tokens, sd3.context_dim),
                pooled_projections=s.randn(2, sd3.adm_in_channels),
                timestep=s.randn(2),
            ).sample
            uncond, cond = out.float().chunk(2)
            return uncond + 7.0 * (cond - uncond)
    else:
        vae, levels = s.vae, len(s.vae.channel_multipliers)
        model = s.build(
            lambda: diffusers.AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=tuple(vae.base_channels * m for m in vae.channel_multipliers),
                layers_per_block=vae.num_res_blocks,
                latent_channels=vae.z_channels,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
        )
        with torch.device(s.device):  # F16: nearest x2 of the whole last map, then conv_out
            model.decoder.conv_out = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest"), model.decoder.conv_out
            )
        blocks = []
        other = ("transformer", weight_bytes(s.build(lambda: d.Flux(s.flux))))

        def run(_):
            model.decode(s.randn(1, vae.z_channels, latent, latent)).sample.float().cpu()

    name = "vae" if kind == "decode" else "transformer"
    modes = ("none", "model", "blocks") if blocks else ("none", "model")
    residency = Residency({name: (model, [model]), other[0]: (other[1], [])}, modes, blocks)
    with torch.no_grad():
        return Tracer(residency, s.device)(run)


# ============================================================================ results

REAL = Setup()
KEYS = ["flux-4096", "flux-2048", "sd3-4096", "decode-f16-4096", "decode-f16-8192", "op4ksr-4096",
        "op4ksr-f8-4096", "omgsr-f-4096",
        "cupscale-4096", "cupscale-8192", "wlf-lora-4096", "wlf-fsdp8-4096", "sc-vae", "flux-4096-diffusers",
        "flux-2048-diffusers", "sd3-4096-diffusers", "decode-f16-4096-diffusers"]
GOALS = {"op4ksr-4096": 30 * GIB, "flux-4096": 40 * GIB, "cupscale-8192": 40 * GIB}  # offload "none"


def result(stats: Stats, weights: int, flops=None, seconds=None, at_peak=None, copies=None) -> dict:
    out = {"flops": stats.flops if flops is None else flops, "weight_bytes": weights,
           "peak_bytes": stats.peak["none"], "peak_bytes_by_offload": dict(stats.peak),
           "est_seconds": seconds or dict(stats.seconds)}
    if copies:  # see "Transfers" in the module docstring
        out["copied_bytes_by_offload"] = copies
        copy = copies["blocks"] / PCIE
        out["est_seconds_blocks"] = {gpu: max(t, copy) for gpu, t in out["est_seconds"].items()}
    return {**out, "largest_at_peak": largest(at_peak)} if at_peak else out


def by_phase(kind: str, size: int, keys: dict) -> dict:
    """Keys for phases of one generate run: {phase: key}."""
    t = generate_trace(REAL, kind, size)
    copies = {"transformer": {"model": t.sizes["transformer"], "blocks": t.streamed},
              "vae": {"model": t.sizes["vae"], "blocks": t.sizes["vae"]}}
    return {key: result(t.phases[phase], t.sizes[phase], at_peak=t.at_peak.get(phase), copies=copies[phase])
            for phase, key in keys.items()}


def whole(t: Trace) -> dict:
    return result(t.total, sum(t.sizes.values()), at_peak=t.at_peak.get("total"))


def cupscale_result(size: int) -> dict:
    t, steps = cupscale_trace(REAL, size)
    step = t.phases["transformer"]
    seconds = {gpu: t.total.seconds[gpu] + (steps - 1) * step.seconds[gpu] for gpu in GPUS}
    flops = t.total.flops + (steps - 1) * step.flops
    return result(t.total, sum(t.sizes.values()), flops, seconds, t.at_peak.get("total"))


def fsdp_result() -> dict:
    t, optimizer = wlf_fsdp_trace(REAL, 4096)
    full = 4 * sum(p.numel() for p in REAL.build(lambda: d.Flux(REAL.flux)).parameters())  # fp32
    seconds = {gpu: t.total.seconds[gpu] + optimizer[gpu] for gpu in GPUS}
    return result(t.total, full, seconds=seconds, at_peak=t.at_peak.get("total"))


def diffusers_result(kind: str, size: int) -> dict:
    t = diffusers_trace(REAL, kind, size)
    runs = "vae" if kind == "decode" else "transformer"
    return result(t.total, t.sizes[runs], at_peak=t.at_peak.get("total"))


PRODUCERS = {  # keys -> a function planning them together
    ("flux-4096", "decode-f16-4096"): lambda: by_phase("flux", 4096, {"transformer": "flux-4096",
                                                                       "vae": "decode-f16-4096"}),
    ("flux-2048",): lambda: by_phase("flux", 2048, {"transformer": "flux-2048"}),
    ("decode-f16-8192",): lambda: by_phase("flux", 8192, {"vae": "decode-f16-8192"}),
    ("sd3-4096",): lambda: by_phase("sd3", 4096, {"transformer": "sd3-4096"}),
    ("op4ksr-4096",): lambda: {"op4ksr-4096": whole(op4ksr_trace(REAL, 4096))},
    ("op4ksr-f8-4096",): lambda: {"op4ksr-f8-4096": whole(op4ksr_trace(REAL, 4096, f16=False))},
    ("omgsr-f-4096",): lambda: {"omgsr-f-4096": whole(omgsr_f_trace(REAL, 4096))},
    ("cupscale-4096",): lambda: {"cupscale-4096": cupscale_result(4096)},
    ("cupscale-8192",): lambda: {"cupscale-8192": cupscale_result(8192)},
    ("wlf-lora-4096",): lambda: {"wlf-lora-4096": whole(wlf_lora_trace(REAL, 4096))},
    ("wlf-fsdp8-4096",): lambda: {"wlf-fsdp8-4096": fsdp_result()},
    ("sc-vae",): lambda: {"sc-vae": whole(sc_vae_trace(REAL))},
    ("flux-4096-diffusers",): lambda: {"flux-4096-diffusers": diffusers_result("flux", 4096)},
    ("flux-2048-diffusers",): lambda: {"flux-2048-diffusers": diffusers_result("flux", 2048)},
    ("sd3-4096-diffusers",): lambda: {"sd3-4096-diffusers": diffusers_result("sd3", 4096)},
    ("decode-f16-4096-diffusers",): lambda: {"decode-f16-4096-diffusers": diffusers_result("decode", 4096)},
}


def plan(keys) -> dict:
    results = {}
    for produced, producer in PRODUCERS.items():
        if any(key in keys for key in produced):
            print(f"planning {', '.join(produced)}", file=sys.stderr)
            results.update(producer())
    return {key: results[key] for key in KEYS if key in keys}


def table(results: dict) -> str:
    gib = lambda n: f"{n / GIB:.1f}" if n is not None else "-"  # noqa: E731
    lines = [f"{'workload':<26} {'TFLOP':>8} {'weights':>8} {'peak GiB: none':>14} {'model':>6} "
             f"{'blocks':>6} {'H100 s':>7} {'H200 s':>7} {'PCIe s':>7} {'blocks s':>8}  goal (none)"]
    for key, r in results.items():
        peaks, goal, seconds = r["peak_bytes_by_offload"], GOALS.get(key), r["est_seconds"]
        verdict = f"<= {goal / GIB:.0f}: {'met' if r['peak_bytes'] <= goal else 'OVER'}" if goal else ""
        copied = r.get("copied_bytes_by_offload")
        pcie = f"{copied['blocks'] / PCIE:>7.3f} {r['est_seconds_blocks']['h100']:>8.3f}" if copied else " " * 16
        lines.append(f"{key:<26} {r['flops'] / 1e12:>8.1f} {gib(r['weight_bytes']):>8} "
                     f"{gib(peaks['none']):>14} {gib(peaks.get('model')):>6} {gib(peaks.get('blocks')):>6} "
                     f"{seconds['h100']:>7.3f} {seconds['h200']:>7.3f} {pcie}  {verdict}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated workloads (default: all): " + ", ".join(KEYS))
    parser.add_argument("--explain", action="store_true",
                        help="list the largest tensors live at each peak (slower)")
    parser.add_argument("--json", help="also write {workload: {flops, weight_bytes, peak_bytes, "
                                       "peak_bytes_by_offload, est_seconds}} to this file")
    args = parser.parse_args(argv)
    global EXPLAIN
    EXPLAIN = args.explain
    keys = args.only.split(",") if args.only else KEYS
    if unknown := [key for key in keys if key not in KEYS]:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(KEYS)}")
    results = plan(keys)
    print(table(results))
    print("weights and peaks in GiB (2^30 bytes), without allocator overhead or the CUDA context (--help)")
    for key, r in results.items():
        if "largest_at_peak" in r:
            print(f"{key}: largest tensors live at the peak (offload none)", *r["largest_at_peak"],
                  sep="\n  ")
    if "flux-4096" in results:
        analytic = flux_forward_flops(REAL.flux, 16384, 512)
        planned = results["flux-4096"]["flops"]
        print(f"flux-4096 FLOPs: planned {planned:.4e}, bench_flux.py's formula {analytic:.4e} "
              f"({planned / analytic - 1:+.2%})")
    if "op4ksr-4096" in results and "omgsr-f-4096" in results:
        free, tiled = results["op4ksr-4096"], results["omgsr-f-4096"]
        ratio = {key: tiled[key] / free[key] for key in ("flops", "peak_bytes")}
        ratio["h100"] = tiled["est_seconds"]["h100"] / free["est_seconds"]["h100"]
        print(f"OP4KSR's Fig. 3 at 4096^2, the same Flux: OMGSR-F's 49 tiles (F8) / one patch-free pass "
              f"(F16) = {ratio['flops']:.2f}x the FLOPs, {ratio['h100']:.2f}x the H100 roofline time, "
              f"{ratio['peak_bytes']:.2f}x the peak memory")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()

"""Device audit: run the project's own code with its weights on a stand-in device and record every
op that mixes devices in a way CUDA refuses. Used by tests/test_device_audit.py.

The `meta` device stands in for "cuda": the CLIs run as they are, with `--device meta` (or
device="meta" where a function takes a device), so weights load onto meta, the model runs there and
whatever the code leaves on the CPU stays a CPU tensor. `DeviceAudit`, a TorchDispatchMode, sees
every aten op and records each one whose tensor arguments hold both a meta tensor and a CPU tensor
that CUDA would refuse. CUDA accepts, and so the audit lets through:
  * explicit copies between devices (`.to`, `.cpu()`, `copy_`, ...);
  * CPU scalars: 0-dim CPU tensors next to device tensors (TensorIterator reads them as numbers);
  * CPU index tensors in advanced indexing (`x[idx]`, `x[idx] = v`: aten.index / index_put);
and it records a CPU `torch.Generator` handed to an op that makes meta tensors (CUDA refuses it).

Meta tensors hold no values. What the GPU would hand back to the host reads as zeros: copies to the
CPU (`.cpu()`, `.tolist()`, `.numpy()` through `.cpu()`) give zeros of the right shape and dtype,
`.item()` gives 0 (True for a bool, so finiteness checks pass), `nonzero` finds nothing. Like
tests/benchmarks/plan.py, composite ops that inference mode hands over whole run as their C++
decomposition, as on a GPU. After recording an op the audit runs it with the CPU tensors moved to
meta, so that one run lists every offending line.

Of the code under test only the CLIs' `--device` argparse type is replaced (`accept_meta_device`: it
also takes "meta"). The other shims make meta behave as CUDA does where meta differs:
  * `standin_safetensors`: `safe_open(device="meta")` reads on the CPU and hands out meta tensors
    (safetensors has no meta device; on CUDA it reads straight to the GPU);
  * `standin_torch`: `t.data = x` between the CPU and meta, which CUDA allows (both dense backends)
    and meta does not, swaps the tensor's contents instead (the same object, as on CUDA);
    `module.to(device)` keeps its Parameter objects, as on CUDA; meta has no autocast, so
    `torch.is_autocast_enabled("meta")` is False and a disabled `torch.autocast("meta")` does nothing
    (an enabled one cannot run: training is audited in fp32);
  * `fake_torchrun`: the environment of `torchrun --nproc_per_node WORLD` for rank 0 with a process
    group whose only backend is bound to meta ("meta:fake", c10d's fake backend), as nccl is bound to
    cuda: c10d itself refuses a CPU tensor there ("No backend type associated with device type cpu"),
    as nccl does. Every collective of torch.distributed is wrapped by a checker that records a tensor
    not on the group's device and skips that call; the others run on the fake backend, which moves no
    data (world 2: each rank's numbers stay its own, fine for an audit); c10d ops reached otherwise
    (DTensor's functional collectives) are checked by the dispatch mode. For FSDP2, torch gets a
    device module for meta (`torch.meta`, streams and events as on the CPU) and FSDP's refusal of
    meta parameters is lifted.
Not audited: branches the code takes on CUDA only (`device.type == "cuda"`, `q.is_cuda`: pinned
memory, side streams, CUDA autocast); the stand-in runs the code's other branch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
STANDIN = "meta"  # the device that stands for "cuda"
aten = torch.ops.aten
COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd

COPIES = {aten._to_copy, aten.copy_, aten.copy, aten._copy_from, aten._copy_from_and_resize, aten.to,
          aten.lift_fresh_copy, aten._foreach_copy_}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_, aten._unsafe_index,
            aten._unsafe_index_put}  # argument 1 (`indices`) may hold CPU tensors on CUDA


# ============================================================================ findings


@dataclass
class Finding:
    """One op (or collective) that CUDA would refuse, with where it ran."""

    what: str  # the aten op or collective
    tensors: list  # (device, shape) of its tensor arguments
    where: str  # the innermost frames of the project's files, innermost first
    count: int = 1

    def __str__(self):
        args = ", ".join(f"{device}{list(shape)}" for device, shape in self.tensors)
        times = f" (x{self.count})" if self.count > 1 else ""
        return f"{self.what}({args}){times}\n      at {self.where}"


def project_frames(depth: int = 4) -> str:
    """The innermost `depth` Python frames in the project's files (not the tests), innermost first;
    else the innermost frame outside torch (a library such as diffusers), or autograd's engine."""
    frame, found, library = sys._getframe(1), [], None
    while frame is not None and len(found) < depth:
        path = Path(frame.f_code.co_filename)
        where = f"{path.name}:{frame.f_lineno} {frame.f_code.co_name}"
        if path.is_relative_to(ROOT) and not path.is_relative_to(TESTS):
            found.append(f"{path.relative_to(ROOT)}:{frame.f_lineno} {frame.f_code.co_name}")
        elif library is None and "/torch/" not in str(path) and path.name != Path(__file__).name:
            library = where
        frame = frame.f_back
    if found:
        return " <- ".join(found)
    return library or "(no Python frame: autograd's backward or a C++ path)"


def tensors_in(value, out: list):
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            tensors_in(item, out)
    return out


def describe(tensors) -> list:
    return [(t.device.type, tuple(t.shape)) for t in tensors]


def to_standin(t: torch.Tensor) -> torch.Tensor:
    return t.to(STANDIN) if t.device.type == "cpu" and t.dim() > 0 else t


# ============================================================================ the dispatch mode


@functools.cache
def composite(func) -> bool:
    """An op that runs as its composite parts (CompositeImplicitAutograd and no kernel of its own):
    inference mode hands it to the mode whole; its C++ decomposition is what CUDA runs."""
    has = lambda key: torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)  # noqa: E731
    return has(COMPOSITE) and not has("CPU") and not has("Meta")


class DeviceAudit(TorchDispatchMode):
    """Records the ops that mix the stand-in device with CPU tensors (module docstring); answers what
    the device would hand to the host with zeros. `group_device`: set by `fake_torchrun`, the device
    every tensor of a c10d collective must be on."""

    def __init__(self):
        super().__init__()
        self.findings: dict[tuple, Finding] = {}
        self.group_device: str | None = None
        self.ops = self.standin_ops = 0  # ops seen; ops with a tensor on the stand-in device
        self.collective_ops: dict[str, int] = {}  # c10d ops seen under `fake_torchrun`

    def record(self, what: str, tensors: list):
        where = project_frames()
        key = (what, where)
        if key in self.findings:
            self.findings[key].count += 1
        else:
            self.findings[key] = Finding(what, describe(tensors), where)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        host = host_side(func, args, kwargs)
        if host is not NotImplemented:
            return host
        if self.check(func, args, kwargs):  # recorded; go on as if the CPU tensors were on the device
            args, kwargs = tree_map_only(torch.Tensor, to_standin, (args, kwargs))
        if composite(func):
            with self:
                return func._op_dk(COMPOSITE, *args, **kwargs)
        return func(*args, **kwargs)

    def check(self, func, args, kwargs) -> bool:
        """Record `func` if CUDA would refuse its arguments' devices; True when it did."""
        packet = func.overloadpacket
        if packet in COPIES:
            return False
        if func.namespace in ("c10d", "_c10d_functional") and self.group_device is not None:
            self.collective_ops[str(packet)] = self.collective_ops.get(str(packet), 0) + 1
            tensors = tensors_in((args, list(kwargs.values())), [])
            if any(t.device.type != self.group_device for t in tensors):
                self.record(f"collective {func} (group device {self.group_device})", tensors)
            return False
        indexing = packet in INDEXING
        tensors, exempt = [], []
        for i, value in enumerate(args):
            tensors_in(value, exempt if indexing and i == 1 else tensors)
        for name, value in kwargs.items():
            tensors_in(value, exempt if indexing and name == "indices" else tensors)
        standin = [t for t in tensors + exempt if t.device.type == STANDIN]
        device = kwargs.get("device")
        makes_standin = device is not None and torch.device(device).type == STANDIN
        if standin:
            self.standin_ops += 1
        generator = kwargs.get("generator")
        if generator is not None and generator.device.type == "cpu" and (standin or makes_standin):
            self.record(f"{func} with a CPU torch.Generator", tensors)
        host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        if standin and host:
            self.record(str(func), tensors + exempt)
            return True
        return False

    def report(self) -> str:
        return "\n".join(f"  {finding}" for finding in self.findings.values())


def host_side(func, args, kwargs):
    """What the GPU would hand to the host, for meta tensors: zeros (module docstring)."""
    packet = func.overloadpacket
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if first is None:
        return NotImplemented
    if packet is aten._to_copy and first.device.type == STANDIN:
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cpu":
            dtype = kwargs.get("dtype") or first.dtype
            return torch.zeros(first.shape, dtype=dtype)
    elif func is aten._local_scalar_dense.default and first.device.type == STANDIN:
        if first.dtype == torch.bool:
            return True
        return 0.0 if first.is_floating_point() or first.is_complex() else 0
    elif packet is aten.copy_ and first.device.type == "cpu" and args[1].device.type == STANDIN:
        return first.zero_()
    elif packet is aten.nonzero and first.device.type == STANDIN:
        return torch.empty(0, first.dim(), dtype=torch.long, device=STANDIN)
    return NotImplemented


# ============================================================================ shims


class _StandinSafeOpen:
    """safe_open(..., device="meta"): read on the CPU, hand out meta tensors."""

    def __init__(self, inner):
        self.inner = inner

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def get_tensor(self, key):
        return self.inner.get_tensor(key).to(STANDIN)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@contextlib.contextmanager
def standin_safetensors():
    import safetensors

    original = safetensors.safe_open

    def safe_open(filename, framework, device="cpu"):
        if torch.device(device).type == STANDIN:
            return _StandinSafeOpen(original(filename, framework, device="cpu"))
        return original(filename, framework, device=device)

    safetensors.safe_open = safe_open
    try:
        yield
    finally:
        safetensors.safe_open = original


@contextlib.contextmanager
def accept_meta_device(*modules):
    """The CLIs' `--device` type (common.io.device_name) also accepts "meta"."""
    originals = [module.device_name for module in modules]

    def device_name(text):
        return text if text == STANDIN else originals[0](text)

    for module in modules:
        module.device_name = device_name
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.device_name = original


_TENSOR_DATA = torch._C.TensorBase.data  # the C descriptor behind `tensor.data`


def _set_data(tensor, new):
    """`tensor.data = new`, also across CPU and meta: CUDA and the CPU are both dense backends, so
    CUDA code may point a CPU tensor at GPU memory; meta is not, so the audit swaps the contents
    instead (torch.utils.swap_tensors: the same object, now holding `new`'s storage)."""
    if torch._has_compatible_shallow_copy_type(tensor, new):
        _TENSOR_DATA.__set__(tensor, new)
        return
    requires_grad, alias = tensor.requires_grad, new.detach()
    if isinstance(tensor, torch.nn.Parameter):
        alias = torch.nn.Parameter(alias, requires_grad=requires_grad)
    torch.utils.swap_tensors(tensor, alias)
    tensor.requires_grad_(requires_grad)


class _Autocast(torch.autocast):
    """torch.autocast that takes meta when disabled (as a disabled CPU autocast: nothing happens).
    Meta has no autocast, so an enabled one cannot run: the audit runs training in fp32."""

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        if device_type == STANDIN:
            if enabled:
                raise RuntimeError(f"device audit: {STANDIN} has no autocast; run this path in fp32")
            device_type = "cpu"
        super().__init__(device_type, dtype, enabled, cache_enabled)


@contextlib.contextmanager
def standin_torch():
    """Moving weights between the CPU and meta as CUDA moves them between the CPU and the GPU: `.data`
    assignments (`_set_data`), and `module.to(device)` keeps each Parameter object (on CUDA it
    assigns `.data`; here torch's swap_module_params_on_conversion). Meta has no autocast:
    `torch.is_autocast_enabled("meta")` answers False and a disabled `torch.autocast("meta")` does
    nothing (`_Autocast`)."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    is_autocast_enabled, autocast = torch.is_autocast_enabled, torch.autocast

    def autocast_enabled(*args):
        if args and isinstance(args[0], str) and args[0] == STANDIN:
            return False
        return is_autocast_enabled(*args)

    torch.Tensor.data = property(_TENSOR_DATA.__get__, _set_data)
    torch.__future__.set_swap_module_params_on_conversion(True)
    torch.is_autocast_enabled, torch.autocast = autocast_enabled, _Autocast
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.autocast = is_autocast_enabled, autocast
        torch.__future__.set_swap_module_params_on_conversion(swap)
        del torch.Tensor.data


class AuditStopped(RuntimeError):
    """A run that failed after the audit had recorded ops that CUDA refuses."""


@contextlib.contextmanager
def audit(*cli_modules):
    """Run a block on the stand-in device; yields the DeviceAudit whose `findings` it collected. A run
    that fails after a finding raises AuditStopped, listing the findings."""
    mode = DeviceAudit()
    try:
        with standin_safetensors(), accept_meta_device(*cli_modules), standin_torch(), mode:
            yield mode
    except Exception as error:
        if not mode.findings:
            raise
        raise AuditStopped(f"{type(error).__name__}: {error}\nafter these ops that CUDA refuses:\n"
                           f"{mode.report()}") from error


# ============================================================================ torchrun


COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "broadcast", "reduce", "all_gather",
               "all_gather_coalesced", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single", "gather",
               "scatter", "send", "recv", "isend", "irecv", "barrier", "monitored_barrier",
               "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
               "send_object_list", "recv_object_list", "batch_isend_irecv")  # FSDP2: *_single


NO_DATA = ("barrier", "monitored_barrier")  # collectives that take no tensor: nothing to check or do


@dataclass
class CollectiveLog:
    calls: dict = field(default_factory=dict)  # collective name -> count of calls

    def add(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1


def _meta_device_module():
    """What FSDP2 and DeviceMesh ask of a device's torch module (torch.cuda for cuda), for meta."""
    cpu = torch.cpu
    return types.SimpleNamespace(
        current_device=lambda: 0, device_count=lambda: 1, is_available=lambda: True,
        is_initialized=lambda: True, set_device=lambda device: None, synchronize=lambda device=None: None,
        Stream=cpu.Stream, stream=cpu.stream, current_stream=cpu.current_stream, Event=cpu.Event,
    )


@contextlib.contextmanager
def fake_torchrun(mode: DeviceAudit, world: int = 2):
    """Rank 0 of `torchrun --nproc_per_node world` with a process group bound to meta (module
    docstring); every collective checked by `mode`. Yields a CollectiveLog of the calls made."""
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.testing._internal.distributed.fake_pg import FakeStore

    env = {"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(world)}
    saved_env = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    log = CollectiveLog()
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    validate, device_module = FSDPParamGroup._validate_no_meta_params, getattr(torch, STANDIN, None)

    def checked(name, collective):
        @functools.wraps(collective)
        def wrapper(*args, **kwargs):
            log.add(name)
            tensors = tensors_in((args, list(kwargs.values())), [])
            if any(t.device.type != STANDIN for t in tensors):
                mode.record(f"torch.distributed.{name} (process group on {STANDIN}, as nccl on cuda)",
                            tensors)
                return None
            if name in NO_DATA:  # torch makes its own tensor, on the machine's accelerator (none here)
                return None
            return collective(*args, **kwargs)
        return wrapper

    dist.init_process_group(f"{STANDIN}:fake", store=FakeStore(), rank=0, world_size=world)
    torch.meta = _meta_device_module()
    FSDPParamGroup._validate_no_meta_params = lambda self: None
    for name, collective in originals.items():
        setattr(dist, name, checked(name, collective))
    mode.group_device = STANDIN
    try:
        yield log
    finally:
        mode.group_device = None
        for name, collective in originals.items():
            setattr(dist, name, collective)
        FSDPParamGroup._validate_no_meta_params = validate
        if device_module is None:
            del torch.meta
        else:
            torch.meta = device_module
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

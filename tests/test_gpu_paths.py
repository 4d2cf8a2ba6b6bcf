"""Code paths that only a GPU run takes, checked on the CPU: attention under bf16 autocast, block
streaming and model offloading (which copies go which way), the progress bar's synchronisation,
the out-of-memory advice, fp16 refused for Flux, prompt batches and the mode of written files."""

import os
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common.attention as attention_module
import common.io as io
import diffusion4k as d4k
from conftest import randomize_
from tiny_pipelines import reference_sdpa

ROOT = Path(__file__).resolve().parent.parent
TINY_FLUX = d4k.FluxConfig(in_channels=16, hidden_size=32, num_heads=2, depth=1, depth_single_blocks=2,
                           vec_in_dim=8, context_in_dim=16, axes_dim=(4, 6, 6))


def tiny_flux(dtype=torch.float32) -> d4k.Flux:
    return randomize_(d4k.Flux(TINY_FLUX), 0.2, seed=1).to(dtype)


def flux_condition(device="cpu"):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 8, 8, generator=g)
    condition = {"txt": torch.randn(1, 5, 16, generator=g), "y": torch.randn(1, 8, generator=g)}
    return z.to(device), {k: v.to(device) for k, v in condition.items()}


@pytest.fixture
def sdpa_calls(monkeypatch):
    """(q, k, v dtypes, queries) of every SDPA call; the score budget is cut so that a call that SDPA
    would run on its math backend is split into many (the old bug: one chunk per query here)."""
    calls, real_sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention_module, "MAX_SCORE_ELEMENTS", 64)
    # Dispatch as where the CPU flash kernel works (a CUDA stand-in); where it raises in bf16, the
    # call then runs on the math backend.
    monkeypatch.setattr(attention_module, "cpu_flash_breaks", lambda: False)

    def spy(q, k, v, *args, **kwargs):
        calls.append(((q.dtype, k.dtype, v.dtype), q.shape[-2]))
        with reference_sdpa():
            return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    return calls


# -------------------------------------------------------------------- attention under autocast

@pytest.mark.parametrize("lora", [False, True], ids=["full fine-tuning", "LoRA"])
def test_autocast_training_attention_is_one_fused_call_in_one_dtype(sdpa_calls, lora):
    """WLF training: fp32 master weights (full) or a frozen bf16 base with fp32 LoRAs, under bf16
    autocast. The fp32 RMSNorm scales used to make q, k fp32 beside a bf16 v: SDPA's math backend,
    split into chunks. Every attention must reach SDPA once, whole, with q, k, v in bf16."""
    model = tiny_flux(torch.bfloat16 if lora else torch.float32)
    if lora:
        d4k.add_lora(model, "flux", rank=2)
    z, condition = flux_condition()
    sigma = torch.tensor([0.6])
    with torch.autocast("cpu", torch.bfloat16, cache_enabled=False):
        loss = d4k.training_loss(model, z, torch.randn_like(z), sigma, condition, guidance=3.5)
    loss.backward()
    tokens = (8 // 2) * (8 // 2) + 5
    blocks = TINY_FLUX.depth + TINY_FLUX.depth_single_blocks
    assert sdpa_calls == [((torch.bfloat16,) * 3, tokens)] * blocks


def test_attention_follows_autocast_for_float_masks(sdpa_calls):
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    mask = torch.randn(1, 1, 6, 6)
    with torch.autocast("cpu", torch.bfloat16):
        out = attention_module.attention(q.float(), k.bfloat16(), v.float(), mask)
    assert out.dtype == torch.bfloat16 and sdpa_calls == [((torch.bfloat16,) * 3, 6)]


# ----------------------------------------------------------------------- offloading, with meta as the GPU

class Copies(TorchDispatchMode):
    """Bytes copied between devices, by (source, destination) device type."""

    def __init__(self):
        super().__init__()
        self.bytes, self.weight_bytes = {}, 0  # weight_bytes: of parameters only (not RoPE tables etc.)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source, target = (args[1], args[0]) if func is torch.ops.aten.copy_.default else (args[0], out)
            if source.device.type != target.device.type:
                key, size = (source.device.type, target.device.type), source.numel() * source.element_size()
                self.bytes[key] = self.bytes.get(key, 0) + size
                self.weight_bytes += size if isinstance(source, torch.nn.Parameter) else 0
        return out


def block_bytes(blocks) -> int:
    return sum(t.numel() * t.element_size() for b in blocks for t in (*b.parameters(), *b.buffers()))


@torch.no_grad()
def test_streamed_blocks_arrive_once_per_step_and_never_go_back():
    """--offload blocks, with the meta device standing for the GPU: nothing is copied back, and each block
    is copied to the device once per forward; the first step also sends the next step's first block."""
    model = tiny_flux()
    d4k.stream_blocks(model, "meta")
    blocks = [*model.double_blocks, *model.single_blocks]
    z, condition = flux_condition("meta")
    ids, txt_ids = d4k.latent_image_ids(8, 8, "meta"), torch.zeros(1, 5, 3, device="meta")
    t, g = torch.full((1,), 0.5, device="meta"), torch.full((1,), 3.5, device="meta")
    for step in range(3):
        with Copies() as copies:
            model(d4k.pack_latents(z), ids, condition["txt"], txt_ids, t, condition["y"], g)
        assert copies.bytes.get(("meta", "cpu"), 0) == 0
        expected = block_bytes(blocks) + (block_bytes(blocks[:1]) if step == 0 else 0)
        assert copies.weight_bytes == expected, f"step {step}"
    assert all(p.device.type == "cpu" for block in blocks for p in block.parameters())
    assert all(p.device.type == "meta" for p in model.final_layer.parameters())

class FakeStream:
    """A CUDA stream's bookkeeping: which events it records and which it waits for."""

    def __init__(self, name):
        self.name, self.recorded, self.waited = name, [], []

    def record_event(self):
        self.recorded.append(object())
        return self.recorded[-1]

    def wait_event(self, event):
        self.waited.append(event)


@torch.no_grad()
def test_streamed_blocks_wait_for_their_copy_on_the_compute_stream(monkeypatch):
    """The CUDA side of --offload blocks, with fake streams: every copy is issued non-blocking on
    the side stream and records an event; before a block runs, the compute stream waits for that
    block's event, and each copied tensor is marked as used by the compute stream (else the caching
    allocator could reuse its memory while the block still reads it)."""
    model = tiny_flux()
    d4k.stream_blocks(model, "meta")
    blocks = [*model.double_blocks, *model.single_blocks]
    stream = next(iter(blocks[0]._forward_pre_hooks.values())).func.__self__  # the BlockStream
    copier, compute, current, marked = FakeStream("copier"), FakeStream("compute"), [], []
    stream.cuda, stream.copier = True, copier

    class On:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            current.append(self.s)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(torch.cuda, "stream", On)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: marked.append(s), raising=False)
    issued = []
    real_to = torch.Tensor.to

    def to(t, *args, **kwargs):
        issued.append((current[-1].name if current else None, kwargs.get("non_blocking")))
        return real_to(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    z, condition = flux_condition("meta")
    ids, txt_ids = d4k.latent_image_ids(8, 8, "meta"), torch.zeros(1, 5, 3, device="meta")
    t, g = torch.full((1,), 0.5, device="meta"), torch.full((1,), 3.5, device="meta")
    issued.clear()
    model(d4k.pack_latents(z), ids, condition["txt"], txt_ids, t, condition["y"], g)
    copies = [i for i in issued if i[0] == "copier"]
    assert copies and all(non_blocking for _, non_blocking in copies)
    assert compute.waited == copier.recorded[: len(blocks)]  # each block waits for its own copy
    assert len(copier.recorded) == len(blocks) + 1  # and the next step's first block is on its way
    tensors = sum(len(slots) for slots in stream.slots)
    assert marked == [compute] * tensors


@torch.no_grad()
def test_a_visit_drops_the_device_copy_instead_of_copying_back():
    """--offload model: a component visits the GPU and goes home with its untouched CPU weights."""
    model = tiny_flux()
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with Copies() as copies, d4k.on_device(model, "meta", "cpu"):
        assert all(p.device.type == "meta" for p in model.parameters())
    assert copies.bytes == {("cpu", "meta"): weights}
    assert before == {name: p.data_ptr() for name, p in model.named_parameters()}


def test_progress_waits_for_the_gpu_before_each_update(monkeypatch):
    """The bar's s/step must time the GPU's work: the Euler loop synchronises before each update."""
    events = []
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    d4k.euler_sample(lambda z, sigma: z, torch.zeros(2), torch.tensor([1.0, 0.5, 0.0]),
                     lambda done, total: events.append(done))
    assert events == ["sync", 1, "sync", 2]


# ----------------------------------------------------------------------- command-line details

@pytest.mark.parametrize("script", ["diffusion4k.py", "op4ksr.py", "cupscale.py", "metrics.py"])
def test_out_of_memory_advice_names_only_options_the_cli_has(script, capsys):
    source = (ROOT / script).read_text()
    hint = re.search(r'memory_hint=(?:"([^"]+)"|(\w+))', source)
    text = hint[1] or re.search(rf'{hint[2]} = "([^"]+)"', source)[1]
    for option in re.findall(r"--[a-z][a-z0-9-]+", text):
        field = option[2:].replace("-", "_")  # or a recipe field that becomes the option
        recipe_field = re.search(rf"^    {field}: [^=]+= option\(", source, re.M)
        assert f'"{option}"' in source or recipe_field, f"{script} advises {option}, which it does not have"

    def main(argv):
        raise torch.OutOfMemoryError("CUDA out of memory")

    assert io.run_cli(main, [], memory_hint=text) == 3
    assert capsys.readouterr().err == f"error: out of GPU memory; {text}\n"


def test_flux_refuses_fp16(tmp_path, capsys):
    """Flux's activations overflow fp16; the refusal comes before any weight is read."""
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    code = d4k.run_cli(d4k.main, ["--model", str(folder), "--prompt", "cat", "--dtype", "fp16",
                                  "--output", str(tmp_path / "x.png")])
    assert code == 2 and "overflow fp16" in capsys.readouterr().err


def test_prompt_files_are_encoded_in_batches(monkeypatch, tmp_path):
    """T5-XXL's memory grows with its batch: a long --prompts file is encoded PROMPT_BATCH at a time."""
    batches = []
    monkeypatch.setattr(d4k, "encode_prompts", lambda pipe, prompts: batches.append(len(prompts))
                        or [{"n": p} for p in prompts])
    monkeypatch.setattr(d4k, "generate", lambda pipe, condition, *args: torch.zeros(3, 32, 32))
    monkeypatch.setattr(d4k, "check_size", lambda pipe, h, w: (h, w))
    pipe = d4k.Pipeline("flux", None, None, {}, {}, torch.device("cpu"), torch.float32, "tiny")
    monkeypatch.setattr(d4k.Pipeline, "schnell", property(lambda self: False))
    count = 2 * d4k.PROMPT_BATCH + 3
    args = d4k.generate_parser().parse_args(["--prompt", "x", "--height", "32", "--width", "32"])
    outputs = [tmp_path / f"{i}.png" for i in range(count)]
    d4k.generate_images(args, pipe, [f"p{i}" for i in range(count)], outputs, list(range(count)), {}, None)
    assert batches == [d4k.PROMPT_BATCH, d4k.PROMPT_BATCH, 3]
    assert all(path.exists() for path in outputs)


def test_safetensors_outputs_follow_the_umask(tmp_path):
    """safetensors writes its own temporary file with mode 0600 and renames it over ours."""
    old = os.umask(0o022)
    try:
        d4k.save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644

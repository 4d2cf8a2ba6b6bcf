"""--compile: regional torch.compile of the transformer blocks (`compile_blocks`), on tiny models.

Inductor compiles for the CPU here (C++, with the system compiler): compiled and eager fp32
outputs must agree within 1e-5. Block streaming's hooks and C-Upscale's regional attention must
stay out of the compiled graphs (they move weights, or loop over blocks and regions in Python).
Each CLI runs with --compile: its image must equal the eager one up to rounding.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common.attention
import cupscale as cu
import diffusion4k as d4k
import op4ksr
from common.io import run_cli
from conftest import randomize_, report
from tiny_pipelines import make_flux_pipeline, make_sd3_pipeline

if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
    pytest.skip("torch.compile is not available on this platform", allow_module_level=True)

TINY_FLUX = d4k.FluxConfig(in_channels=16, vec_in_dim=8, context_in_dim=16, hidden_size=32, num_heads=2,
                           depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6))
TINY_SD3 = d4k.SD3Config(in_channels=4, out_channels=4, hidden_size=32, num_heads=2, depth=2, context_dim=16,
                         adm_in_channels=8, pos_embed_max_size=16)


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """Each test compiles on its own (dynamo's caches are per code object, shared by all models).

    Under ATEN_CPU_CAPABILITY=default, inductor still emits at::vec code but builds it without the
    vector headers (a C++ compile error), so the tests then ask for scalar code (simdlen 1)."""
    import torch._inductor.config

    scalar = {"cpp.simdlen": 1} if os.environ.get("ATEN_CPU_CAPABILITY") == "default" else {}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(scalar):
        yield
    torch._dynamo.reset()


@pytest.fixture
def attention_as_at_4k(monkeypatch):
    """Scores larger than common.attention's chunk, as at 4K, where `attention` outside a compiled
    block asks SDPA for its backend (a question that would split the block's graph)."""
    monkeypatch.setattr(common.attention, "MAX_SCORE_ELEMENTS", 64)


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["frames"]["ok"]


def tiny_flux():
    return randomize_(d4k.Flux(TINY_FLUX).eval(), 0.2, seed=1)


def flux_inputs():
    g = torch.Generator().manual_seed(2)
    return dict(img=torch.randn(1, 24, 16, generator=g), img_ids=d4k.latent_image_ids(8, 12),
                txt=torch.randn(1, 5, 16, generator=g), txt_ids=torch.zeros(1, 5, 3),
                timesteps=torch.tensor([0.7]), y=torch.randn(1, 8, generator=g), guidance=torch.tensor([3.5]))


@torch.no_grad()
def test_compiled_flux_blocks_match_eager(attention_as_at_4k):
    model, inputs = tiny_flux(), flux_inputs()
    eager = model(**inputs)
    compiled = d4k.compile_blocks(model)(**inputs)
    assert report("compiled Flux", compiled, eager) < 1e-5
    assert compiled_graphs() == 2  # one per block class (double, single), each whole


@torch.no_grad()
def test_compiled_sd3_blocks_match_eager(attention_as_at_4k):
    """Two joint blocks: the last one, whose text stream stops after attention, is a second graph."""
    model = randomize_(d4k.MMDiT(TINY_SD3).eval(), 0.1, seed=3)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 16, 12, generator=g), torch.tensor([700.0, 300.0])
    context, pooled = torch.randn(2, 7, 16, generator=g), torch.randn(2, 8, generator=g)
    eager = model(x, t, context, pooled)
    compiled = d4k.compile_blocks(model)(x, t, context, pooled)
    assert report("compiled SD3", compiled, eager) < 1e-5
    assert compiled_graphs() == 2


@torch.no_grad()
def test_block_streaming_hooks_stay_eager(monkeypatch):
    """--offload blocks with --compile: the hooks that move each block run outside the graphs."""
    model, inputs = tiny_flux(), flux_inputs()
    eager = model(**inputs)
    moves, send = [], d4k.BlockStream.send
    monkeypatch.setattr(d4k.BlockStream, "send",
                        lambda *a: moves.append(torch.compiler.is_compiling()) or send(*a))
    d4k.stream_blocks(model, "cpu")
    d4k.compile_blocks(model)
    compiled = model(**inputs)
    assert len(moves) == 2 * 2 and not any(moves)  # each arrival sends for itself and the next, eagerly
    assert report("compiled Flux, streamed blocks", compiled, eager) < 1e-5


# ------------------------------------------------------------------------------- the CLIs


@pytest.fixture
def traced_only(monkeypatch):
    """The CLI tests check what --compile does to a run: dynamo traces the blocks exactly as for
    inductor (graph breaks, eager hooks, guards), but the graphs run through AOT autograd without
    code generation (inductor's C++ build, seconds per kernel here, is what the tests above check)."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_module(self, backend="aot_eager"))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # no silent fall-back to eager
        yield
    assert compiled_graphs() > 0  # the blocks were compiled


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_image(compiled, eager):
    """Equal up to rounding: a compiled kernel may sum in another order (fp32, ~1e-6)."""
    a, b = pixels(compiled), pixels(eager)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_generate_cli_with_compile_and_streamed_blocks(tmp_path, traced_only):
    folder = make_flux_pipeline(tmp_path / "flux")
    common = ["--model", folder, "--prompt", "a lighthouse at dawn", "--height", 32, "--width", 48,
              "--steps", 2, "--device", "cpu"]
    eager, compiled = tmp_path / "eager.png", tmp_path / "compiled.png"
    assert run_cli(d4k.main, list(map(str, [*common, "--output", eager]))) == 0
    argv = [*common, "--output", compiled, "--compile", "--offload", "blocks"]
    assert run_cli(d4k.main, list(map(str, argv))) == 0
    assert_same_image(compiled, eager)


def test_super_resolution_cli_with_compile(tmp_path, traced_only):
    from test_op4ksr import lr_image, train_argv, write_hr

    folder = make_flux_pipeline(tmp_path / "flux")
    run = tmp_path / "run"
    assert run_cli(op4ksr.main, train_argv(folder, write_hr(tmp_path / "hr"), run, "--steps", 1)) == 0
    source = lr_image(tmp_path / "lr.png", (20, 12))
    common = ["--input", str(source), "--weights", str(run / "op4ksr.safetensors"), "--device", "cpu"]
    eager, compiled = tmp_path / "eager.png", tmp_path / "compiled.png"
    assert run_cli(op4ksr.main, [*common, "--output", str(eager)]) == 0
    assert run_cli(op4ksr.main, [*common, "--output", str(compiled), "--compile"]) == 0
    assert_same_image(compiled, eager)


def test_upscale_cli_with_compile_keeps_the_regional_attention(tmp_path, traced_only, monkeypatch):
    """RAP and the composer (regional prompts) hook each joint block's attention; those hooks run
    eagerly between the compiled parts of the blocks."""
    from test_cupscale import TINY, region_prompt_file

    folder = make_sd3_pipeline(tmp_path / "sd3")
    colours = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    lr = F.interpolate(colours, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)[0]
    source = tmp_path / "lr.png"
    Image.fromarray((lr.permute(1, 2, 0) * 255).round().byte().numpy()).save(source)
    common = ["--input", str(source), "--prompt", "a photo of cat", "--scale", "2", "--model", str(folder),
              *TINY, "--region-prompts", str(region_prompt_file(tmp_path / "regions.json", 3, 3))]
    eager, compiled = tmp_path / "eager.png", tmp_path / "compiled.png"
    assert run_cli(cu.main, [*common, "--output", str(eager)]) == 0
    traced = []

    def recording(function):
        def run(*args, **kwargs):
            traced.append(torch.compiler.is_compiling())
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(cu, "regional_attention", recording(cu.regional_attention))  # RAP and the composer
    monkeypatch.setattr(cu, "text_distribution", recording(cu.text_distribution))  # RAP's LR pass
    assert run_cli(cu.main, [*common, "--output", str(compiled), "--compile"]) == 0
    assert traced and not any(traced)
    assert_same_image(compiled, eager)

"""op4ksr.py with OMGSR-F's public LoRAs (wuer5/OMGSR@8996613): the adapter folder as peft writes it,
--recipe omgsr-f against a port of OMGSR-F's inference (diffusers + peft), --recipe op4ksr patch-free
with the F16 and the F8 VAE, the prompt cache, train --init, and refused adapters.

The tiny pipeline's VAE is replaced by a tiny F8 one (4 levels), so that OMGSR-F's pixel rules (tiles of
process_size / 8 latent pixels, multiples of 8 px) mean what they mean at full size."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import op4ksr
from common.io import run_cli
from conftest import randomize_, report
from tiny_pipelines import make_flux_pipeline

pytest.importorskip("peft")

PROCESS = 64  # --process-size: latent tiles of 8 x 8 (4 x 4 tokens), overlap 4; the small-input side 16
RANK = 4
FLUX_TARGETS = list(op4ksr.OMGSR_F_FLUX_TARGETS)
VAE_TARGETS = list(op4ksr.OMGSR_F_VAE_TARGETS)


def tiny_f8_vae(seed=7):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159)
    return randomize_(vae.eval(), 0.05, seed)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = make_flux_pipeline(tmp_path_factory.mktemp("omgsr") / "pipe", guidance=True, seed=0)
    shutil.rmtree(folder / "vae")
    tiny_f8_vae().save_pretrained(folder / "vae")
    return folder


def write_adapter(flux_folder: Path, root: Path, rank=RANK, alpha=RANK, seed=3, **options) -> Path:
    """OMGSR-F's adapter folder as its training script saves it: peft `save_pretrained` of the Flux
    transformer and of the VAE encoder with its LoraConfigs (B randomised: peft starts it at 0)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from peft import LoraConfig, PeftModel

    halves = (
        ("flux_adapter", FluxTransformer2DModel.from_pretrained(str(flux_folder / "transformer")), FLUX_TARGETS),
        ("vae_encoder_adapter", AutoencoderKL.from_pretrained(str(flux_folder / "vae")).encoder, VAE_TARGETS),
    )
    g = torch.Generator().manual_seed(seed)
    for name, model, targets in halves:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian",
                            **options)
        peft_model = PeftModel(model, config, adapter_name=name)
        with torch.no_grad():
            for key, p in peft_model.named_parameters():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        peft_model.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def adapter(flux_folder, tmp_path_factory):
    return write_adapter(flux_folder, tmp_path_factory.mktemp("adapter") / "omgsr-f-adapter")


@pytest.fixture(autouse=True)
def prompt_cache(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "prompt-cache"
    monkeypatch.setenv("OP4KSR_CACHE", str(folder))
    return folder


def lr_image(path: Path, size):
    g = np.random.default_rng(sum(size))
    base = np.linspace(0, 255, size[0])[None, :, None] * np.ones((size[1], 1, 3))
    Image.fromarray(np.clip(base + g.normal(0, 50, (size[1], size[0], 3)), 0, 255).astype(np.uint8)).save(path)
    return path


# ------------------------------------------------------- a port of OMGSR-F's inference (diffusers + peft)


class Upstream:
    """OMGSR-F's `infer_omgsr_f.py` + `OMGSR_F_Infer` (wuer5/OMGSR@8996613) rewritten for the test, fp32
    on the CPU; the one change: the encoder posterior's mode instead of an unseeded sample."""

    def __init__(self, flux_folder, adapter, process_size=PROCESS, mid_timestep=244):
        from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
        from peft import PeftModel

        self.vae = AutoencoderKL.from_pretrained(str(flux_folder / "vae")).eval()
        transformer = FluxTransformer2DModel.from_pretrained(str(flux_folder / "transformer")).eval()
        transformer = PeftModel.from_pretrained(transformer, str(adapter / "flux_adapter")).merge_and_unload()
        encoder = PeftModel.from_pretrained(self.vae.encoder, str(adapter / "vae_encoder_adapter"))
        self.vae.encoder = encoder.merge_and_unload()
        self.transformer = transformer
        # Flux's schedule shifted with the mu of a 1024^2 image (4096 tokens), in float32 as upstream
        t = torch.linspace(1, 0, 1000)
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (4096 - 256)
        self.t_curr = float(math.exp(mu) / (math.exp(mu) + (1 / t[-(mid_timestep + 1)] - 1)))
        text = FluxPipeline.from_pretrained(flux_folder, transformer=None, vae=None)
        with torch.no_grad():
            self.txt, self.y, self.txt_ids = text.encode_prompt("", prompt_2=None)
        n = process_size // 8 // 2
        rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        self.img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
        self.process_size = process_size

    def velocity(self, latent):
        b, c, h, w = latent.shape
        packed = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        out = self.transformer(hidden_states=packed, timestep=torch.tensor([self.t_curr]),
                               guidance=torch.full((b,), 1.0), pooled_projections=self.y,
                               encoder_hidden_states=self.txt, txt_ids=self.txt_ids, img_ids=self.img_ids,
                               return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    @staticmethod
    def gaussian(size):
        var = 0.01
        mid_x, mid_y = (size - 1) / 2, size / 2
        xs = [math.exp(-(x - mid_x) ** 2 / size**2 / (2 * var)) / math.sqrt(2 * math.pi * var) for x in range(size)]
        ys = [math.exp(-(y - mid_y) ** 2 / size**2 / (2 * var)) / math.sqrt(2 * math.pi * var) for y in range(size)]
        return torch.tensor(np.outer(ys, xs))

    def tiled(self, latent, tile, overlap):
        _, _, h, w = latent.shape
        tile = min(tile, min(h, w))
        weights = self.gaussian(tile)

        def count(size):
            n, reach = 0, 0
            while reach < size:
                reach = max(n * tile - overlap * n, 0) + tile
                n += 1
            return n

        across, down = count(w), count(h)
        offsets = []
        for i in range(across):
            for j in range(down):
                x = w - tile if i == across - 1 else max(i * tile - overlap * i, 0)
                y = h - tile if j == down - 1 else max(j * tile - overlap * j, 0)
                offsets.append((x, y))
        total, contributors = torch.zeros(latent.shape), torch.zeros(latent.shape)
        for x, y in offsets:
            v = self.velocity(latent[:, :, y : y + tile, x : x + tile])
            total[:, :, y : y + tile, x : x + tile] += v * weights
            contributors[:, :, y : y + tile, x : x + tile] += weights
        return total / contributors

    @torch.no_grad()
    def decoded(self, lq: Image.Image):
        from torchvision.transforms.functional import to_tensor

        x = to_tensor(lq)[None] * 2 - 1
        z = self.vae.encode(x).latent_dist.mode()
        z = (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        tile = self.process_size // 8
        h, w = z.shape[-2:]
        v = self.velocity(z) if h * w <= tile * tile else self.tiled(z, tile, tile // 2)
        z = z + (0.0 - self.t_curr) * v
        return self.vae.decode(z / self.vae.config.scaling_factor + self.vae.config.shift_factor).sample[0]

    def __call__(self, image: Image.Image, upscale=4, align="adain"):
        """(processed input, decoded tensor, final image)."""
        from torchvision.transforms import ToPILImage

        w0, h0 = image.size
        flagged = w0 < self.process_size // upscale or h0 < self.process_size // upscale
        if flagged:
            scale = (self.process_size // upscale) / min(w0, h0)
            image = image.resize((int(scale * w0), int(scale * h0)))
        image = image.resize((image.width * upscale, image.height * upscale))
        lq = image.resize((image.width - image.width % 8, image.height - image.height % 8), Image.LANCZOS)
        decoded = self.decoded(lq)
        out = ToPILImage()(torch.clip(decoded * 0.5 + 0.5, 0, 1))
        if align != "nofix":
            out = upstream_color_fix(out, lq, align)
        if flagged:
            out = out.resize((int(upscale * w0), int(upscale * h0)))
        return lq, decoded, out


def upstream_color_fix(target: Image.Image, source: Image.Image, align: str) -> Image.Image:
    """OMGSR-F's colour fixes (StableSR's colorfix), on 8-bit images."""
    from torchvision.transforms import ToPILImage
    from torchvision.transforms.functional import to_tensor

    t, s = to_tensor(target)[None], to_tensor(source)[None]
    if align == "adain":
        def stats(x):
            flat = x.reshape(1, 3, -1)
            return flat.mean(2).reshape(1, 3, 1, 1), (flat.var(2) + 1e-5).sqrt().reshape(1, 3, 1, 1)

        (tm, ts), (sm, ss) = stats(t), stats(s)
        result = (t - tm) / ts * ss + sm
    else:
        kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]])
        kernel = kernel[None, None].repeat(3, 1, 1, 1)

        def decompose(x):
            high = torch.zeros_like(x)
            for i in range(5):
                r = 2**i
                low = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (r, r, r, r), mode="replicate"),
                                                 kernel, groups=3, dilation=r)
                high, x = high + x - low, low
            return high, x

        result = decompose(t)[0] + decompose(s)[1]
    return ToPILImage()(result[0].clamp_(0.0, 1.0))


@pytest.fixture(scope="module")
def upstream(flux_folder, adapter):
    return Upstream(flux_folder, adapter)


def level_differences(a: Image.Image, b: Image.Image):
    """(max level difference, fraction of differing values) of two 8-bit images of one size."""
    assert a.size == b.size
    d = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return int(d.max()), float((d > 0).mean())


# ----------------------------------------------------------------------------- --recipe omgsr-f


def test_tile_rules_of_omgsr_f():
    """49 tiles at 4096^2 (a 512^2 F8 latent, tiles of 128, overlap 64); the weights' mid-points."""
    starts = op4ksr.omgsr_f_tile_starts(512, 128, 64)
    assert starts == [0, 64, 128, 192, 256, 320, 384] and len(starts) ** 2 == 49
    assert op4ksr.omgsr_f_tile_starts(130, 128, 64) == [0, 2]
    assert op4ksr.omgsr_f_tile_starts(128, 128, 64) == [0]
    w = op4ksr.omgsr_f_tile_weights(8)
    assert torch.allclose(w, Upstream.gaussian(8))
    assert w[:, 0].argmax() == 4 and torch.allclose(w[:, 3], w[:, 4])  # rows peak at 4, columns at 3.5
    assert op4ksr.omgsr_f_sizes(256, 300, 4) == ((1024, 1200), (1024, 1200))
    assert op4ksr.omgsr_f_sizes(301, 300, 4) == ((1200, 1200), (1200, 1200))  # floored to multiples of 8
    assert op4ksr.omgsr_f_sizes(100, 300, 4) == ((1024, 3072), (400, 1200))  # small input: resized back


@pytest.mark.parametrize("size", [(16, 16), (40, 28), (18, 18), (10, 13)],
                         ids=["one-pass", "tiled", "odd-latent-tiled", "small-input"])
def test_omgsr_f_recipe_matches_upstream(flux_folder, adapter, upstream, size, tmp_path):
    """The decoded image of our --recipe omgsr-f against the port of OMGSR-F's code: <= 1e-5 (fp32). The
    final 8-bit images: without colour fix within a level (a float ~1e-8 apart can truncate apart); AdaIN
    multiplies such a straddle by its std ratio (large on the tiny VAE's almost flat output), so there
    only its rarity is checked (the colour fixes alone: `test_omgsr_f_colour_fixes_match_upstream`)."""
    pipe = op4ksr.load_omgsr_f_pipeline(adapter, flux_folder, device="cpu", dtype=torch.float32)
    image = Image.open(lr_image(tmp_path / "lr.png", size)).convert("RGB")
    lq_theirs, theirs, _ = upstream(image)
    lq = op4ksr.omgsr_f_input(image, 4, PROCESS)
    assert np.array_equal(np.asarray(lq), np.asarray(lq_theirs))
    x = op4ksr.unit_tensor(lq)[None] * 2 - 1
    with torch.inference_mode():
        ours = pipe.vae.decode(op4ksr.omgsr_f_latent(pipe, x, PROCESS))[0]
    error = report(f"OMGSR-F recipe {size[0]}x{size[1]} -> {lq.width}x{lq.height}", ours, theirs)
    assert error <= 1e-5
    for align in ("nofix", "adain"):
        final = op4ksr.omgsr_f_image(pipe, image, 4, {"nofix": "none"}.get(align, align), PROCESS)
        final_theirs = upstream(image, align=align)[2]
        assert final.size == final_theirs.size == op4ksr.omgsr_f_sizes(*size, 4, PROCESS)[1]
        most, share = level_differences(final, final_theirs)
        print(f"[parity] final 8-bit image, {align}: {share:.2%} of the values differ, by at most {most}")
        assert share < 1e-3 and (most <= 1 or align == "adain"), (most, share)


@pytest.mark.parametrize("align", ["adain", "wavelet", "nofix"])
def test_omgsr_f_colour_fixes_match_upstream(align):
    """The same decoded tensor through our and OMGSR-F's output steps: the same 8-bit image (wavelet: a
    level where the float sums round apart)."""
    g = torch.Generator().manual_seed(0)
    decoded = torch.rand(1, 3, 40, 48, generator=g) * 2.4 - 1.2
    lq = Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy())
    ours = op4ksr.omgsr_f_output(decoded, lq, {"nofix": "none"}.get(align, align), (48, 40))
    from torchvision.transforms import ToPILImage

    theirs = ToPILImage()(torch.clip(decoded[0] * 0.5 + 0.5, 0, 1))
    if align != "nofix":
        theirs = upstream_color_fix(theirs, lq, align)
    most, share = level_differences(ours, theirs)
    assert most == 0 if align != "wavelet" else (most <= 1 and share < 0.01)


def test_cli_omgsr_f_recipe_end_to_end(flux_folder, adapter, upstream, prompt_cache, tmp_path, monkeypatch):
    """The CLI writes OMGSR-F's image (same bytes as the port, up to a level), labels it, caches the empty
    prompt once (the second run loads no text encoder) and is deterministic."""
    lr = lr_image(tmp_path / "lr.png", (40, 28))
    argv = ["--input", lr, "--weights", adapter, "--flux", flux_folder, "--recipe", "omgsr-f",
            "--process-size", PROCESS, "--device", "cpu"]
    assert run_cli(op4ksr.main, [*map(str, argv), "--output", str(tmp_path / "a.png")]) == 0
    assert list(prompt_cache.glob("prompt-*.safetensors"))

    def no_text_encoders(*args, **kwargs):
        raise AssertionError("the cached prompt was not used")

    monkeypatch.setattr(op4ksr, "encode_fixed_prompt", no_text_encoders)
    assert run_cli(op4ksr.main, [*map(str, argv), "--output", str(tmp_path / "b.png")]) == 0
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.tobytes() == b.tobytes() and a.size == (160, 112)
    settings = json.loads(a.info["settings"])
    assert a.info["method"] == "OMGSR-F" and settings["recipe"] == "omgsr-f"
    assert "not OP4KSR's trained weights" in settings["weights_are"] and settings["color_fix"] == "adain"
    _, share = level_differences(a.convert("RGB"), upstream(Image.open(lr).convert("RGB"))[2])
    assert share < 1e-3  # a truncation straddle, rare, is magnified by AdaIN's std ratio (see above)


def test_cached_prompt_is_diffusers_empty_prompt(flux_folder, adapter, upstream):
    pipe = op4ksr.load_omgsr_f_pipeline(adapter, flux_folder, device="cpu", dtype=torch.float32)
    assert report("empty prompt T5", pipe.txt, upstream.txt) < 1e-5
    assert report("empty prompt CLIP pooled", pipe.y, upstream.y) < 1e-5


# ------------------------------------------------------------------- --recipe op4ksr with these weights


@pytest.mark.parametrize("mode", ["f16", "f8"])
def test_cli_op4ksr_recipe_with_omgsr_f_weights(flux_folder, adapter, mode, tmp_path):
    """One patch-free pass at 4x (RoPE base 100) with the F16 or F8 VAE; labelled as OMGSR-F's weights.
    F8: Flux from its transformer/ folder alone, the text encoders from --text-encoders."""
    lr = lr_image(tmp_path / "lr.png", (20, 16))
    flux = ["--flux", flux_folder] if mode == "f16" else ["--flux", flux_folder / "transformer",
                                                          "--text-encoders", flux_folder]
    argv = ["--input", lr, "--weights", adapter, *flux, "--vae", flux_folder,
            "--vae-mode", mode, "--output", tmp_path / "sr.png", "--device", "cpu"]
    assert run_cli(op4ksr.main, list(map(str, argv))) == 0
    out = Image.open(tmp_path / "sr.png")
    settings = json.loads(out.info["settings"])
    assert out.size == (80, 64) and settings["theta"] == 100.0 and settings["vae"].startswith(mode.upper())
    assert out.info["method"] == "OP4KSR's patch-free pass with OMGSR-F's weights"
    assert "not OP4KSR's trained weights" in settings["weights_are"]


def test_op4ksr_recipe_is_one_pass_of_the_merged_model(flux_folder, adapter):
    """The pipeline's models are the bases plus (alpha / r) B A of each adapter module, and theta is RFR's."""
    from diffusers import FluxTransformer2DModel
    from peft import PeftModel

    pipe = op4ksr.load_omgsr_f_pipeline(adapter, flux_folder, flux_folder, "cpu", torch.float32, theta=100.0,
                                        stride=2)
    assert pipe.transformer.config.theta == 100.0 and pipe.vae.config.stride == 2
    reference = FluxTransformer2DModel.from_pretrained(str(flux_folder / "transformer"))
    merged = PeftModel.from_pretrained(reference, str(adapter / "flux_adapter")).merge_and_unload().state_dict()
    ours = op4ksr.to_original_layout(merged, op4ksr.flux_table_for(merged), "merged")
    state, base = pipe.transformer.state_dict(), op4ksr.load_flux(flux_folder, torch.float32).state_dict()
    error = max((state[k] - v).abs().max().item() for k, v in ours.items())
    effect = max((state[k] - base[k]).abs().max().item() for k in ours)
    print(f"[parity] OMGSR-F Flux adapter merged by us vs peft's merge_and_unload: max abs error {error:.1e}; "
          f"the adapter moves the weights by up to {effect:.2f}")
    assert error < 1e-6 and effect > 0.01


def test_lora_alpha_scales_as_peft(flux_folder, tmp_path):
    """alpha != r: the encoder merged by us equals peft's merge_and_unload (scale alpha / r = 3)."""
    from diffusers import AutoencoderKL
    from peft import PeftModel

    adapter = write_adapter(flux_folder, tmp_path / "alpha", rank=2, alpha=6, seed=5)
    pipe = op4ksr.load_omgsr_f_pipeline(adapter, flux_folder, device="cpu", dtype=torch.float32)
    reference = AutoencoderKL.from_pretrained(str(flux_folder / "vae")).eval()
    encoder = PeftModel.from_pretrained(reference.encoder, str(adapter / "vae_encoder_adapter")).merge_and_unload()
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        error = report("encoder merged with alpha / r = 3", pipe.vae.encoder(x), encoder(x))
    assert error < 1e-5


# ---------------------------------------------------------------------------------- train --init


def test_train_init_starts_from_the_adapter(flux_folder, adapter, tmp_path):
    """LoRAs initialised from OMGSR-F's give the merged model at step 0; the run writes OP4KSR's format."""
    transformer = op4ksr.add_flux_lora(op4ksr.load_flux(flux_folder, torch.float32), RANK, alpha=2 * RANK)
    vae = op4ksr.add_encoder_lora(op4ksr.load_vae(flux_folder, stride=2), RANK)
    op4ksr.init_loras_from(transformer, vae, op4ksr.read_omgsr_f_adapters(adapter), str(adapter))
    merged = op4ksr.load_omgsr_f_pipeline(adapter, flux_folder, flux_folder, "cpu", torch.float32, stride=2)
    exported = op4ksr.export_flux_lora(transformer) | op4ksr.export_vae_lora(vae.encoder, vae)
    base_t, base_v = op4ksr.load_flux(flux_folder, torch.float32), op4ksr.load_vae(flux_folder, stride=2)
    op4ksr.merge_op4ksr_lora(exported, base_t, base_v, "exported")
    for ours, theirs in ((base_t, merged.transformer), (base_v.encoder, merged.vae.encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6

    data = tmp_path / "hr"
    data.mkdir()
    for i in range(2):
        lr_image(data / f"{i}.png", (64, 64))
    output = tmp_path / "run"
    argv = ["train", "--flux", flux_folder, "--vae", flux_folder, "--data", data, "--output", output,
            "--crop", 64, "--lora-rank", RANK, "--max-sequence-length", 8, "--lpips-weight", 0,
            "--periodicity-weight", 0, "--steps", 1, "--init", adapter, "--device", "cpu"]
    assert run_cli(op4ksr.main, list(map(str, argv))) == 0
    path, meta = op4ksr.read_op4ksr_metadata(output / "op4ksr.safetensors")
    assert meta["format"] == "op4ksr" and int(meta["lora_rank"]) == RANK


# ------------------------------------------------------------------------------------- bad input


def broken_adapters(adapter: Path, flux_folder: Path, root: Path) -> dict:
    """{case: (folder, expected fragment)}: each a copy of the adapter with one thing wrong."""
    cases = {}

    def copy(name, change):
        folder = root / name
        shutil.copytree(adapter, folder)
        change(folder)
        return folder

    def set_option(half, option, value):
        def change(folder):
            path = folder / half / "adapter_config.json"
            path.write_text(json.dumps(json.loads(path.read_text()) | {option: value}))
        return change

    def retensor(half, edit):
        def change(folder):
            path = folder / half / "adapter_model.safetensors"
            save_file(edit(load_file(path)), path)
        return change

    def drop_half(folder):
        shutil.rmtree(folder / "vae_encoder_adapter")

    def drop_weights(folder):
        (folder / "flux_adapter" / "adapter_model.safetensors").unlink()

    def wider(state):
        key = next(k for k in state if k.endswith("x_embedder.lora_A.weight"))
        return state | {key: torch.zeros(RANK, 99)}

    def lower_rank(state):
        key = next(k for k in state if k.endswith("x_embedder.lora_B.weight"))
        return state | {key: torch.zeros(state[key].shape[0], RANK - 1)}

    def foreign(state):
        return state | {"base_model.model.norm_out.linear.lora_A.weight": torch.zeros(RANK, 32)}

    (root / "empty").mkdir(parents=True)
    cases["not an adapter"] = (root / "empty", "not an OMGSR-F adapter folder")
    cases["missing half"] = (copy("half", drop_half), "no vae_encoder_adapter/")
    cases["no weights file"] = (copy("noweights", drop_weights), "no adapter_model.safetensors")
    cases["rslora"] = (copy("rslora", set_option("flux_adapter", "use_rslora", True)), "use_rslora=True")
    cases["dora"] = (copy("dora", set_option("vae_encoder_adapter", "use_dora", True)), "use_dora=True")
    cases["rank pattern"] = (copy("pattern", set_option("flux_adapter", "rank_pattern", {"x_embedder": 8})),
                             "rank_pattern=")
    cases["alpha pattern"] = (copy("apattern", set_option("flux_adapter", "alpha_pattern", {"x": 8})),
                              "alpha_pattern=")
    cases["bad rank"] = (copy("badr", set_option("flux_adapter", "r", "four")), "must be a positive integer")
    cases["shape"] = (copy("shape", retensor("flux_adapter", wider)), "x_embedder")
    cases["rank"] = (copy("rank", retensor("flux_adapter", lower_rank)), f"not of the rank r={RANK}")
    cases["untargeted"] = (copy("foreign", retensor("flux_adapter", foreign)), "does not select")
    return cases


def test_broken_adapters_are_refused_in_one_line(flux_folder, adapter, tmp_path, capsys):
    for case, (folder, fragment) in broken_adapters(adapter, flux_folder, tmp_path / "cases").items():
        lr = lr_image(tmp_path / "lr.png", (20, 16))
        out = tmp_path / f"{case}.png"
        argv = ["--input", lr, "--weights", folder, "--flux", flux_folder, "--vae", flux_folder,
                "--output", out, "--device", "cpu"]
        assert run_cli(op4ksr.main, list(map(str, argv))) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert fragment in err[-1], (case, err)
        assert not out.exists(), case


@pytest.mark.parametrize("extra, fragment", [
    (["--recipe", "omgsr-f", "--size", "64"], "takes no --size"),
    (["--recipe", "omgsr-f", "--scale", "2.5"], "not an integer"),
    (["--recipe", "omgsr-f", "--theta", "100"], "takes no --theta"),
    (["--recipe", "omgsr-f", "--vae-mode", "f16"], "takes no --vae-mode f16"),
    (["--process-size", "128"], "is --recipe omgsr-f's"),
    (["--weights", "{op4ksr}", "--theta", "100"], "--theta needs OMGSR-F's adapter folder"),
    (["--weights", "{op4ksr}", "--recipe", "omgsr-f"], "--recipe omgsr-f needs OMGSR-F's adapter folder"),
])
def test_recipe_options_are_checked(flux_folder, adapter, tmp_path, capsys, extra, fragment):
    lr = lr_image(tmp_path / "lr.png", (20, 16))
    checkpoint = tmp_path / "op4ksr.safetensors"
    save_file({"prompt.y": torch.zeros(1, 32)}, checkpoint, {"format": "op4ksr"})
    extra = [str(checkpoint) if arg == "{op4ksr}" else arg for arg in extra]
    argv = ["--input", lr, "--weights", adapter, "--flux", flux_folder, "--output", tmp_path / "o.png", *extra]
    assert run_cli(op4ksr.main, list(map(str, argv))) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_train_init_refuses_a_file_and_a_rank_mismatch(flux_folder, adapter, tmp_path, capsys):
    data = tmp_path / "hr"
    data.mkdir()
    lr_image(data / "0.png", (64, 64))
    base = ["train", "--flux", flux_folder, "--vae", flux_folder, "--data", data, "--crop", 64,
            "--lpips-weight", 0, "--periodicity-weight", 0, "--steps", 1, "--device", "cpu"]
    not_folder = [*base, "--output", tmp_path / "a", "--init", data / "0.png"]
    assert run_cli(op4ksr.main, list(map(str, not_folder))) == 2
    assert "not a folder" in capsys.readouterr().err and not (tmp_path / "a").exists()
    wrong_rank = [*base, "--output", tmp_path / "b", "--init", adapter, "--lora-rank", 8,
                  "--max-sequence-length", 8]
    assert run_cli(op4ksr.main, list(map(str, wrong_rank))) == 2
    assert "--lora-rank must be the adapter's rank" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()

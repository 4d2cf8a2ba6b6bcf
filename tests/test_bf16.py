"""bf16 parity: every model and every whole pipeline, ours in bf16 against the reference library in bf16.

The reference library in fp32 is the truth. The reference in bf16 (weights loaded with
`from_pretrained(..., dtype=bf16)`, inputs cast as its pipelines cast them, as diffusers / transformers
run on CUDA) shows what bf16 costs by itself: err_ref = mean |ref_bf16 - ref_fp32|. Ours, loaded through
our own loaders with dtype=torch.bfloat16, gives err_ours = mean |ours_bf16 - ref_fp32|, which must stay
within RATIO x err_ref. Every check prints its figures (mean and max of both errors, their ratio) and
puts them in its assertion message. No check needs an absolute floor: the smallest err_ref here is ~2e-4.

Models: tiny random configs with every parameter randomised, from the fp32 parity tests (test_models.py,
test_text_encoders.py). Pipelines: the tiny random pipelines of tiny_pipelines.py, compared on the
sampled latent and the decoded image. Then each command line once with --dtype bf16. CPU only.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from diffusers.models.attention_processor import JointAttnProcessor2_0
from PIL import Image
from safetensors.torch import load_file
from test_diffusion4k_train import write_dataset
from test_diffusion4k_train_vae import synthetic_images
from test_models import (
    flux_inputs,
    make_flux_reference,
    make_sd3_reference,
    make_vae_reference,
    run_flux_reference,
)
from test_op4ksr import OMGSR_F_VAE, lr_image, write_hr
from test_op4ksr import train_argv as op4ksr_train_argv
from test_text_encoders import (
    clip_ids,
    clip_reference,
    t5_ids,
    t5_reference,
    tiny_clip_config,
    tiny_t5,
)
from tiny_pipelines import make_flux_pipeline, make_sd3_pipeline, reference_sdpa

import cupscale as cu
import diffusion4k as d4k
import op4ksr
from common.io import run_cli

BF16, F32 = torch.bfloat16, torch.float32
RATIO = 2.0  # ours may be at most this many times further from fp32 than the reference's own bf16 run
LORA_RANK = 3


def figures(name: str, ours, reference_bf16, truth) -> str:
    """Assert mean |ours - truth| <= RATIO * mean |reference_bf16 - truth|; print and return the figures."""
    truth = truth.detach().float()
    ours_error = (ours.detach().float() - truth).abs()
    ref_error = (reference_bf16.detach().float() - truth).abs()
    err_ours, err_ref = ours_error.mean().item(), ref_error.mean().item()
    message = (f"[bf16] {name}: err_ours mean {err_ours:.3e} max {ours_error.max().item():.3e} | "
               f"err_ref mean {err_ref:.3e} max {ref_error.max().item():.3e} | ratio "
               f"{err_ours / err_ref if err_ref else float('inf'):.2f} (limit {RATIO:g}) | "
               f"magnitude {truth.abs().mean().item():.3e}")
    print(message)
    assert torch.isfinite(ours.float()).all(), message
    assert err_ours <= RATIO * err_ref, message
    return message


def spy(monkeypatch, owner, name) -> list:
    """Record (args, kwargs, result) of every call of owner.name, which keeps working."""
    calls, real = [], getattr(owner, name)

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(owner, name, recording)
    return calls


def to_bf16(inputs: dict, keep=()) -> dict:
    """The floating inputs cast to bf16, as a bf16 pipeline hands them to its model; `keep` stays as is."""
    return {k: v.to(BF16) if torch.is_tensor(v) and v.is_floating_point() and k not in keep else v
            for k, v in inputs.items()}


@pytest.fixture(autouse=True)
def sdpa_that_runs_here():
    with reference_sdpa():
        yield


# ============================================================================================ models


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
    """Flux dev (guidance embedding): the fp32 parity test's reference, saved and reloaded in bf16."""
    from diffusers import FluxTransformer2DModel

    reference = make_flux_reference(guidance=True)
    folder = tmp_path_factory.mktemp("flux_model") / "transformer"
    reference.save_pretrained(folder)
    return reference, FluxTransformer2DModel.from_pretrained(folder, dtype=BF16).eval(), folder


def test_flux_transformer_bf16(flux_model):
    reference, reference_bf16, folder = flux_model
    # sigma and guidance reach the model in bf16 and are multiplied by 1000 there (BFL's sampler,
    # diffusers and ours alike): 3.5 would become 3504, whose time embedding differs completely from
    # fp32's 3500, in both runs alike (err_ref 1.19 of a magnitude 2.8: nothing else would show).
    # Values still exact after x1000 leave the model's own bf16 arithmetic to compare.
    inputs = dict(flux_inputs(guidance=True), timesteps=torch.tensor([0.5, 0.25]),
                  guidance=torch.tensor([4.0, 2.0]))
    half = to_bf16(inputs, keep=("img_ids", "txt_ids"))  # ids: small integers, exact in bf16 anyway
    ours = d4k.load_flux(folder, dtype=BF16)
    assert ours.img_in.weight.dtype == BF16
    with torch.no_grad():
        figures("Flux dev transformer", ours(**half), run_flux_reference(reference_bf16, half),
                run_flux_reference(reference, inputs))


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    reference = make_sd3_reference()
    folder = tmp_path_factory.mktemp("sd3_model") / "transformer"
    reference.save_pretrained(folder)
    return reference, SD3Transformer2DModel.from_pretrained(folder, dtype=BF16).eval(), folder


def test_sd3_transformer_bf16(sd3_model):
    reference, reference_bf16, folder = sd3_model
    g = torch.Generator().manual_seed(6)
    # sigma * 1000 stays fp32 in both pipelines (diffusers hands over the scheduler's fp32 timesteps)
    inputs = dict(x=torch.randn(2, 4, 12, 10, generator=g), timesteps=torch.tensor([857.69, 125.5]),
                  context=torch.randn(2, 9, 32, generator=g), y=torch.randn(2, 24, generator=g))
    half = to_bf16(inputs, keep=("timesteps",))

    def run_reference(model, x, timesteps, context, y):
        return model(hidden_states=x, timestep=timesteps, encoder_hidden_states=context,
                     pooled_projections=y, return_dict=False)[0]

    ours = d4k.load_sd3(folder, dtype=BF16)
    with torch.no_grad():
        figures("SD3 MMDiT", ours(**half), run_reference(reference_bf16, **half),
                run_reference(reference, **inputs))


@pytest.fixture(scope="module")
def vae_model(tmp_path_factory):
    from diffusers import AutoencoderKL

    reference = make_vae_reference()
    folder = tmp_path_factory.mktemp("vae_model") / "vae"
    reference.save_pretrained(folder)
    return (reference, AutoencoderKL.from_pretrained(folder, dtype=BF16).eval(),
            d4k.load_vae(folder, dtype=BF16))


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_vae_bf16(vae_model, part):
    reference, reference_bf16, ours = vae_model
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 32, 24, generator=g) if part == "encoder" else torch.randn(2, 16, 8, 6, generator=g)
    with torch.no_grad():
        figures(f"VAE {part}", getattr(ours, part)(x.to(BF16)), getattr(reference_bf16, part)(x.to(BF16)),
                getattr(reference, part)(x))


def test_t5_encoder_bf16(tmp_path):
    import transformers

    reference = tiny_t5()
    reference.save_pretrained(tmp_path)
    reference_bf16 = transformers.T5EncoderModel.from_pretrained(tmp_path, dtype=BF16).eval()
    ours = d4k.load_t5(tmp_path, BF16)
    ids = t5_ids()  # 150 tokens: every relative-position bucket branch
    with torch.no_grad():
        figures("T5 encoder", ours(ids), t5_reference(reference_bf16, ids), t5_reference(reference, ids))


@pytest.mark.parametrize("name", ["CLIP-L", "CLIP-G"])
def test_clip_text_encoders_bf16(tmp_path, name):
    import transformers

    # CLIP-L: CLIPTextModel with quick_gelu; CLIP-G: CLIPTextModelWithProjection with gelu (as in SD3)
    cls, act = ((transformers.CLIPTextModel, "quick_gelu") if name == "CLIP-L"
                else (transformers.CLIPTextModelWithProjection, "gelu"))
    reference = randomize_(cls(tiny_clip_config(act)), std=0.2, seed=3).eval()
    reference.save_pretrained(tmp_path)
    reference_bf16 = cls.from_pretrained(tmp_path, dtype=BF16).eval()
    ours = d4k.load_clip(tmp_path, BF16)
    ids = clip_ids()
    with torch.no_grad():
        out = ours(ids)
    mine = [out.last_hidden_state, out.penultimate, out.pooled, out.text_embeds if name == "CLIP-G" else None]
    labels = ("last_hidden_state", "penultimate", "pooled", "text_embeds")
    theirs, truth = clip_reference(reference_bf16, ids), clip_reference(reference, ids)
    for label, a, b, c in zip(labels, mine, theirs, truth):
        if c is not None:
            figures(f"{name} {label}", a, b, c)


# ========================================================================================= pipelines


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return make_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe")


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return make_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


def diffusers_run(cls, folder, dtype, **kwargs) -> tuple:
    """(the sampled latent, the decoded image in [0, 1]) of a diffusers pipeline loaded in `dtype`."""
    pipe, latents = cls.from_pretrained(folder, dtype=dtype), []

    def keep(pipe, step, timestep, tensors):
        latents.append(tensors["latents"])
        return tensors

    with torch.no_grad():
        image = pipe(output_type="pt", callback_on_step_end=keep, **kwargs).images[0]
    return latents[-1].float(), image.float()


def pipeline_figures(name: str, ours: tuple, reference_bf16: tuple, truth: tuple):
    """The criterion on the sampled latent and on the decoded image, each (latent, image in [0, 1]). The
    tiny random VAE (weights of std 0.05) decodes every latent to nearly flat grey (std 0.04), and its own
    bf16 rounding swamps in the image what the sampler did; the latent shows it (0d828c4's SD3 timestep
    rounding: ratio 1.8 in the image, 8.6 in the latent)."""
    figures(f"{name}: sampled latent", ours[0], reference_bf16[0], truth[0])
    figures(f"{name}: decoded image in [0, 1]", ours[1], reference_bf16[1], truth[1])


def test_flux_pipeline_bf16(flux_folder, monkeypatch):
    from diffusers import FluxPipeline

    height, width, steps, guidance, seed, prompt = 64, 48, 4, 4.0, 3, "a photo of a cat on a mat"
    ours = d4k.load_pipeline(str(flux_folder), vae="f8", device="cpu", dtype=BF16)
    assert ours.transformer.img_in.weight.dtype == ours.text_encoders["t5"].shared.weight.dtype == BF16
    decoded = spy(monkeypatch, d4k, "tiled_vae")  # its second argument: the sampled latent
    image = d4k.generate(ours, d4k.encode_prompts(ours, [prompt])[0], height, width, steps, guidance, seed)
    noise = torch.randn(1, 4, height // 2, width // 2, generator=torch.Generator().manual_seed(seed))
    kwargs = dict(prompt=prompt, height=height, width=width, num_inference_steps=steps,
                  guidance_scale=guidance, latents=d4k.pack_latents(noise))

    def reference(dtype):  # diffusers' latents are packed
        latent, decoded_image = diffusers_run(FluxPipeline, flux_folder, dtype, **kwargs)
        return d4k.unpack_latents(latent, height // 2, width // 2), decoded_image

    ours_run = (decoded[-1][0][1], (image + 1) / 2)
    pipeline_figures("Flux dev pipeline", ours_run, reference(BF16), reference(F32))


def test_sd3_pipeline_bf16(sd3_folder, monkeypatch):
    """Fails on 0d828c4, where sigma * 1000 was cast to bf16 before the time embedding (857.69 -> 856):
    there the sampled latent is 8.6x further from fp32 than diffusers' bf16 run."""
    from diffusers import StableDiffusion3Pipeline

    prompt, negative, seed = "a lighthouse at dawn", "cat", 2
    ours = d4k.load_pipeline(str(sd3_folder), vae="f8", device="cpu", dtype=BF16)
    condition, uncondition = d4k.encode_prompts(ours, [prompt, negative])
    decoded = spy(monkeypatch, d4k, "tiled_vae")
    image = d4k.generate(ours, condition, 64, 48, 4, 5.0, seed, negative=uncondition)  # t: 1000, 857.69, ...
    noise = torch.randn(1, 4, 32, 24, generator=torch.Generator().manual_seed(seed))
    kwargs = dict(prompt=prompt, negative_prompt=negative, height=64, width=48, num_inference_steps=4,
                  guidance_scale=5.0, latents=noise)
    pipeline_figures("SD3 pipeline", (decoded[-1][0][1], (image + 1) / 2),
                     diffusers_run(StableDiffusion3Pipeline, sd3_folder, BF16, **kwargs),
                     diffusers_run(StableDiffusion3Pipeline, sd3_folder, F32, **kwargs))


# --------------------------------------------------------------------------------- OP4KSR inference


@pytest.fixture(scope="module")
def op4ksr_checkpoint(flux_folder, tmp_path_factory):
    """An OP4KSR file with random LoRAs on Flux (RFR: theta 100) and on the F16 encoder, as in
    test_op4ksr's diffusers + peft test (untrained: no check here depends on trained values)."""
    transformer = op4ksr.load_flux(flux_folder, F32, theta=100.0)
    vae = op4ksr.load_vae(flux_folder, F32, stride=2)
    op4ksr.add_flux_lora(transformer, LORA_RANK, alpha=6, seed=1)
    op4ksr.add_encoder_lora(vae, LORA_RANK, seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in [*transformer.modules(), *vae.encoder.modules()]:
            if isinstance(module, (op4ksr.SplitLoRALinear, op4ksr.LoRAConv2d)):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.1)
    prompt = {"txt": torch.randn(1, 5, 32, generator=g), "y": torch.randn(1, 32, generator=g), "text": "x"}
    path = tmp_path_factory.mktemp("op4ksr") / "op4ksr.safetensors"
    settings = {"sigma": op4ksr.OMGSR_SIGMA, "guidance": 1.0, "scale": 2, "base_flux": str(flux_folder),
                "base_vae": str(flux_folder)}
    op4ksr.save_op4ksr(path, transformer, vae, prompt, settings)
    return path


def diffusers_op4ksr(flux_folder, checkpoint, dtype) -> tuple:
    """OP4KSR's models in diffusers + peft: FluxTransformer2DModel at theta 100 with the file's LoRA
    (`load_lora_adapter`), and AutoencoderKL made F16 (stride-2 conv_in, nearest x2 before conv_out: the
    centred decode) with the encoder LoRA injected by peft with OMGSR-F's target list."""
    import peft
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    state = load_file(checkpoint)
    transformer = FluxTransformer2DModel.from_pretrained(flux_folder / "transformer", dtype=dtype).eval()
    transformer.pos_embed.theta = 100
    transformer.load_lora_adapter({k: v for k, v in state.items() if k.startswith("transformer.")},
                                  prefix="transformer", adapter_name="op4ksr")
    vae = AutoencoderKL.from_pretrained(flux_folder / "vae", dtype=dtype).eval()
    vae.encoder.conv_in.stride = (2, 2)
    vae.decoder.conv_out.register_forward_pre_hook(
        lambda module, args: (F.interpolate(args[0], scale_factor=2.0, mode="nearest"),))
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=OMGSR_F_VAE)  # scale is in B
    peft.inject_adapter_in_model(config, vae.encoder)
    encoder = {k.removeprefix("vae.encoder."): v.to(dtype) for k, v in state.items() if k.startswith("vae.")}
    assert not peft.set_peft_model_state_dict(vae.encoder, encoder).unexpected_keys
    return transformer, vae, state["prompt.txt"], state["prompt.y"]


def diffusers_super_resolve(models: tuple, up: torch.Tensor, sigma: float, guidance: float) -> tuple:
    """The one step as a diffusers Flux pipeline writes it: encode (posterior mean, shift, scale), pack,
    one velocity with sigma and guidance handed over in the model's dtype, x0 = z - sigma v, decode.
    Returns (the x0 latent, the image in [-1, 1])."""
    from diffusers import FluxPipeline

    transformer, vae, txt, y = models
    dtype, shift, scale = transformer.dtype, vae.config.shift_factor, vae.config.scaling_factor
    with torch.no_grad():
        z = (vae.encode(up.to(dtype)).latent_dist.mean - shift) * scale
        b, c, h, w = z.shape
        x = FluxPipeline._pack_latents(z, b, c, h, w)
        v = transformer(hidden_states=x, encoder_hidden_states=txt.to(dtype), pooled_projections=y.to(dtype),
                        timestep=torch.full((b,), sigma, dtype=dtype), guidance=torch.full((b,), guidance),
                        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", dtype),
                        txt_ids=torch.zeros(txt.shape[1], 3, dtype=dtype), return_dict=False)[0]
        latent = FluxPipeline._unpack_latents(x - sigma * v, h * 8, w * 8, 8)
        image = vae.decode(latent / scale + shift).sample
    return latent.float(), image[0].float().clamp(-1, 1)


def test_op4ksr_inference_bf16(flux_folder, op4ksr_checkpoint, monkeypatch):
    pytest.importorskip("peft")
    lr = Image.fromarray(np.random.default_rng(1).integers(0, 255, (12, 16, 3), dtype=np.uint8))
    width, height = 40, 28  # 2.5x; super_resolve pads to whole tokens (8 px here) and crops back

    stepped = spy(monkeypatch, op4ksr, "sr_latent")

    def ours(dtype):  # (the x0 latent, the image in [0, 1])
        pipe = op4ksr.load_sr_pipeline(op4ksr_checkpoint, device="cpu", dtype=dtype)
        assert pipe.transformer.img_in.weight.dtype == dtype and pipe.transformer.config.theta == 100.0
        pipe.vae.decoder.partitioned = False  # the centred decode, as the diffusers F16 variant above
        image = op4ksr.super_resolve(pipe, lr, width, height)
        return stepped[-1][2], (image + 1) / 2

    # the input as super_resolve prepares it: bicubic, then padded by replication to whole tokens
    up = F.interpolate(op4ksr.image_to_tensor(lr)[None], size=(height, width), mode="bicubic",
                       align_corners=False).clamp(-1, 1)
    token = 2 * op4ksr.load_vae(flux_folder, stride=2).config.downsample_factor  # 2x2-packed latent pixels
    up = F.pad(up, (0, -width % token, 0, -height % token), mode="replicate")

    def reference(dtype):
        models = diffusers_op4ksr(flux_folder, op4ksr_checkpoint, dtype)
        latent, image = diffusers_super_resolve(models, up, op4ksr.OMGSR_SIGMA, 1.0)
        return latent, (image[:, :height, :width] + 1) / 2

    truth = reference(F32)
    check = max((a - b).abs().max().item() for a, b in zip(ours(F32), truth))
    print(f"[bf16] OP4KSR, ours in fp32 vs diffusers + peft in fp32: max abs error {check:.2e}")
    assert check < 1e-4  # the reference is OP4KSR's own computation: its bf16 error is bf16's alone
    # sigma 0.5051 (OMGSR-F's) reaches both transformers in bf16 (0.5039), which makes t = 504, not 505.1
    pipeline_figures("OP4KSR inference", ours(BF16), reference(BF16), truth)


# ------------------------------------------------------------------------------------------ C-Upscale
# No library implements C-Upscale, and the fp32 C-Upscale tests have no external reference for the whole
# run either (they check its parts). So the reference run is our C-Upscale loop (regions, GSP, RAP, the
# Attention Composer) with every model swapped for diffusers' / transformers' own in bf16: the
# SD3Transformer2DModel (its joint attention opened to C-Upscale's per-block hook by the processor
# below), the AutoencoderKL, and the text conditioning of StableDiffusion3Pipeline.encode_prompt. The
# truth is our whole run in fp32, which the same swap reproduces in fp32 to 1e-4 (checked first, so that
# a fault of the swap cannot pass for bf16 error).


class HookedJointAttention(JointAttnProcessor2_0):
    """diffusers' joint attention, handing [context, image] q, k, v (B, H, L, D) to `owner.attend`
    whenever C-Upscale's `attention_hook` has set one (as it sets our JointBlock.attend)."""

    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        attend = getattr(self.owner, "attend", None)
        if attend is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args,
                                    **kwargs)
        assert attn.norm_q is None and attn.norm_added_q is None  # SD3-Medium: no QK norm

        def heads(x):
            return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        image = [heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v)]
        context = [heads(f(encoder_hidden_states))
                   for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        n = encoder_hidden_states.shape[1]
        out = attend(*(torch.cat(pair, dim=2) for pair in zip(context, image)), n)
        out = out.transpose(1, 2).flatten(2).to(hidden_states.dtype)
        context_out, image_out = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return attn.to_out[0](image_out), context_out


class DiffusersMMDiT(torch.nn.Module):
    """SD3Transformer2DModel behind our MMDiT's interface: model(x, timesteps, context, y) and our own
    `MMDiT.velocity` over it, a config with the fields C-Upscale reads, and joint blocks whose `attend`
    C-Upscale sets. Records the dtypes of the timesteps it is handed."""

    def __init__(self, model):
        super().__init__()
        self.model, c = model, model.config
        self.config = SimpleNamespace(patch_size=c.patch_size, pos_embed_max_size=c.pos_embed_max_size,
                                      num_heads=c.num_attention_heads, depth=c.num_layers)
        self.joint_blocks = [SimpleNamespace() for _ in model.transformer_blocks]
        for owner, block in zip(self.joint_blocks, model.transformer_blocks):
            block.attn.set_processor(HookedJointAttention(owner))
        self.timestep_dtypes = set()

    def forward(self, x, timesteps, context, y):
        self.timestep_dtypes.add(timesteps.dtype)
        return self.model(hidden_states=x, timestep=timesteps, encoder_hidden_states=context,
                          pooled_projections=y, return_dict=False)[0]

    velocity = cu.MMDiT.velocity  # the one call C-Upscale makes (sigma -> fp32 timesteps)


class DiffusersVAE(torch.nn.Module):
    """AutoencoderKL behind our AutoEncoder's interface: encode (posterior mean, shifted, scaled), decode."""

    def __init__(self, vae):
        super().__init__()
        self.vae, c = vae, vae.config
        self.config = SimpleNamespace(downsample_factor=2 ** (len(c.block_out_channels) - 1))
        self.scale, self.shift = c.scaling_factor, c.shift_factor

    def encode(self, x):
        return (self.vae.encode(x).latent_dist.mean - self.shift) * self.scale

    def decode(self, z):
        return self.vae.decode(z / self.scale + self.shift).sample


# 48x32 px -> 96x64 px: 1x2 regions of 64 px (32 latent px); strength 0.45 of 4 steps runs the last 2 (t =
# 602.2 and 8.9, neither a bf16 number); GSP, RAP and RSP (the Attention Composer) all on
CUPSCALE = dict(vae_scale=2, region_px=64, overlap_px=32, num_steps=4, region_batch=16, vae_tile_px=128,
                vae_overlap_px=16)
CUPSCALE_PROMPT = "a photo of cat sitting on mat"


def diffusers_cupscale_pipeline(folder, dtype, region_prompts: dict) -> tuple:
    """A C-Upscale pipeline of diffusers' models, and conditions from diffusers' own prompt encoding."""
    from diffusers import StableDiffusion3Pipeline

    reference = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype)
    conditions = {}
    for name, prompt in [("global", CUPSCALE_PROMPT), *region_prompts.items()]:
        with torch.no_grad():
            context, negative, pooled, negative_pooled = reference.encode_prompt(
                prompt, None, None, negative_prompt="", do_classifier_free_guidance=True)
        conditions[name] = {"context": context, "pooled": pooled}
        conditions.setdefault("negative", {"context": negative, "pooled": negative_pooled})
    conditions["regions"] = {key: conditions.pop(key) for key in region_prompts}
    transformer, vae = DiffusersMMDiT(reference.transformer.eval()), DiffusersVAE(reference.vae.eval())
    pipe = cu.Pipeline("sd3", transformer, vae, {}, {}, torch.device("cpu"), dtype, str(folder))
    return pipe, conditions


def test_cupscale_bf16(sd3_folder, monkeypatch):
    lr = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    config = cu.CUpscaleConfig(**CUPSCALE)
    regions = cu.plan_regions(64 // 2, 96 // 2, config.region, config.stride)
    region_prompts = {r.key: f"red rocket over tokyo {r.row} {r.col}" for r in regions}
    assert len(regions) == 2 and len(cu.start_sigmas(config.strength, config.num_steps, config.shift)) == 3
    sampled = spy(monkeypatch, cu, "sample_regions")

    def run(pipe, conditions):  # (the sampled latent, the image in [0, 1])
        image = cu.upscale(pipe, lr, 96, 64, conditions, config, seed=0)
        return sampled[-1][2], (image + 1) / 2

    def ours(dtype):
        pipe = cu.load_sd3_pipeline(sd3_folder, "cpu", dtype)
        return run(pipe, cu.encode_conditions(pipe, CUPSCALE_PROMPT, "", region_prompts))

    def swapped(dtype):
        result = run(*diffusers_cupscale_pipeline(sd3_folder, dtype, region_prompts))
        # diffusers' SD3 pipelines hand the transformer the scheduler's fp32 timesteps; a loop that casts
        # sigma * 1000 to bf16 (857.7 -> 856, as 0d828c4 did) would feed the swap the same rounding
        dtypes = sampled[-1][0][0].timestep_dtypes
        assert dtypes == {F32}, f"C-Upscale hands the transformer {dtypes} timesteps; diffusers, fp32"
        return result

    truth = ours(F32)
    check = max((a - b).abs().max().item() for a, b in zip(swapped(F32), truth))
    print(f"[bf16] C-Upscale with diffusers' models in fp32 vs ours in fp32: max abs error {check:.2e}")
    assert check < 1e-4
    pipeline_figures("C-Upscale", ours(BF16), swapped(BF16), truth)


# ================================================================================ the CLIs in bf16
# Each command line runs once with --dtype bf16 on the CPU, in this process (as the CLI tests run them),
# on the tiny pipelines: it must exit 0, run in bf16 and write finite results. metrics.py has no dtype
# option (it computes in fp32 only), so it has no bf16 run.


def finite_images(calls) -> list:
    """The tensors a CLI handed to tensor_to_image: finite, and not one flat colour."""
    tensors = [args[0] for args, _, _ in calls]
    assert tensors and all(torch.isfinite(t).all() and t.std() > 1e-3 for t in tensors)
    return tensors


def finite_safetensors(folder: Path) -> list:
    files = sorted(folder.rglob("*.safetensors"))
    assert files, f"no weights written under {folder}"
    for file in files:
        assert all(torch.isfinite(t.float()).all() for t in load_file(file).values()), file
    return files


def read_losses(output: Path) -> list:
    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_generate_cli_bf16(kind, flux_folder, sd3_folder, tmp_path, capsys, monkeypatch):
    generated, images = spy(monkeypatch, d4k, "generate"), spy(monkeypatch, d4k, "tensor_to_image")
    output = tmp_path / "out.png"
    argv = ["--model", flux_folder if kind == "flux" else sd3_folder, "--prompt", "a lighthouse at dawn",
            "--height", 64, "--width", 48, "--steps", 2, "--device", "cpu", "--dtype", "bf16",
            "--output", output]
    assert d4k.run_cli(d4k.main, list(map(str, argv))) == 0, capsys.readouterr().err
    pipe = generated[0][0][0]  # the default F16 VAE with the partitioned decode
    assert pipe.dtype == BF16 and next(pipe.transformer.parameters()).dtype == BF16
    finite_images(images)
    with Image.open(output) as image:
        assert image.size == (48, 64) and image.mode == "RGB"


def test_train_cli_bf16(flux_folder, tmp_path, capsys, monkeypatch):
    loaded = spy(monkeypatch, d4k, "load_pipeline")
    output = tmp_path / "run"
    argv = ["train", "--model", flux_folder, "--data", write_dataset(tmp_path / "data"), "--output", output,
            "--resolution", 32, "--vae", "f8", "--batch-size", 2, "--grad-accum", 1, "--steps", 2,
            "--lr", 1e-4, "--max-sequence-length", 32, "--device", "cpu", "--dtype", "bf16"]
    assert d4k.run_cli(d4k.main, list(map(str, argv))) == 0, capsys.readouterr().err
    assert loaded[0][2].dtype == BF16  # frozen parts in bf16; the transformer: fp32 weights, bf16 autocast
    losses = read_losses(output)
    assert len(losses) == 2 and np.isfinite(losses).all()
    finite_safetensors(output / "transformer")
    assert d4k.load_flux(output, F32).config == d4k.load_flux(flux_folder, F32).config


def test_train_vae_cli_bf16(flux_folder, tmp_path, capsys, monkeypatch):
    autocasts = spy(monkeypatch, torch, "autocast")
    output = tmp_path / "run"
    data = synthetic_images(tmp_path / "data", 2, (32, 32))
    argv = ["train-vae", "--base", flux_folder / "vae", "--data", data, "--output", output,
            "--resolution", 32, "--batch-size", 2, "--grad-accum", 1, "--steps", 1,
            "--no-gradient-checkpointing", "--lpips-weight", 0, "--gan-weight", 0, "--ema", 0, "--workers", 1,
            "--device", "cpu", "--dtype", "bf16"]
    assert d4k.run_cli(d4k.main, list(map(str, argv))) == 0, capsys.readouterr().err
    assert any(BF16 in (*args, *kwargs.values()) and kwargs.get("enabled", True)
               for args, kwargs, _ in autocasts)  # bf16 autocast, switched on
    finite_safetensors(output / "vae")
    assert d4k.load_vae(output, F32).config.stride == 2


def test_op4ksr_cli_bf16(op4ksr_checkpoint, tmp_path, capsys, monkeypatch):
    resolved, images = spy(monkeypatch, op4ksr, "super_resolve"), spy(monkeypatch, op4ksr, "tensor_to_image")
    source, output = lr_image(tmp_path / "lr.png", (24, 16)), tmp_path / "sr.png"
    argv = ["--input", source, "--weights", op4ksr_checkpoint, "--output", output, "--device", "cpu",
            "--dtype", "bf16"]
    assert run_cli(op4ksr.main, list(map(str, argv))) == 0, capsys.readouterr().err
    pipe = resolved[0][0][0]  # the default partitioned F16 decode
    assert pipe.dtype == BF16 and pipe.transformer.img_in.weight.dtype == BF16
    finite_images(images)
    with Image.open(output) as image:
        assert image.size == (48, 32) and image.mode == "RGB"  # the checkpoint's scale 2


def test_op4ksr_train_cli_bf16(flux_folder, tmp_path, capsys, monkeypatch):
    loaded = spy(monkeypatch, op4ksr, "load_flux")
    output = tmp_path / "run"
    argv = op4ksr_train_argv(flux_folder, write_hr(tmp_path / "hr", count=1, size=64), output, "--steps", 1,
                             "--lr", 1e-3, "--device", "cpu", "--dtype", "bf16")
    assert run_cli(op4ksr.main, argv) == 0, capsys.readouterr().err
    assert loaded[0][0][1] == BF16  # the frozen bases in bf16; the LoRAs train in fp32 under autocast
    losses = read_losses(output)
    assert len(losses) == 1 and np.isfinite(losses).all()
    finite_safetensors(output)


def test_cupscale_cli_bf16(sd3_folder, tmp_path, capsys, monkeypatch):
    images = spy(monkeypatch, cu, "tensor_to_image")
    source, output = tmp_path / "lr.png", tmp_path / "hr.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    argv = ["--input", source, "--prompt", CUPSCALE_PROMPT, "--scale", 1.5, "--output", output,
            "--model", sd3_folder, "--region-size", 64, "--region-overlap", 32, "--vae-tile", 128,
            "--vae-overlap", 16, "--steps", 3, "--device", "cpu", "--dtype", "bf16"]
    assert run_cli(cu.main, list(map(str, argv))) == 0, capsys.readouterr().err
    finite_images(images)
    with Image.open(output) as image:
        assert image.size == (96, 96) and json.loads(image.text["settings"])["dtype"] == "torch.bfloat16"

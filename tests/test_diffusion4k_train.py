"""Diffusion-4K fine-tuning (WLF): loss identity, data, sampling, overfitting, resume, outputs
that diffusers loads, LoRA export, 2-process FSDP2 on CPU, bad input. Tiny random pipelines, CPU, fp32."""

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import diffusion4k as d4k
from common.io import load_safetensors, run_cli
from conftest import free_port
from tiny_pipelines import make_flux_pipeline, make_sd3_pipeline

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = ["a red rocket over tokyo", "a lighthouse at dawn", "a cat sitting on a mat"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return make_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe")


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return make_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


def write_dataset(folder: Path, size=(32, 32), broken=False) -> Path:
    """3 smooth synthetic images (+ optionally a missing file, a corrupt file and a bad line)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols = np.mgrid[0 : size[0], 0 : size[1]] / max(size)
    lines = []
    for i, text in enumerate(CAPTIONS):
        image = np.stack([np.sin(3 * (i + 1) * rows), np.cos(2 * (i + 1) * cols), rows * cols], -1)
        Image.fromarray(((image + 1) * 127.5).clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    if broken:
        (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        lines += [json.dumps({"file_name": "missing.png", "text": "x"}), json.dumps({"file_name": "corrupt.png", "text": "y"}),
                  "{not json", json.dumps({"text": "no file name"})]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def train_args(model, data, output, *extra):
    return d4k.train_parser().parse_args([
        "--model", str(model), "--data", str(data), "--output", str(output), "--resolution", "32", "--vae", "f8",
        "--batch-size", "2", "--grad-accum", "1", "--device", "cpu", "--log-every", "1000",
        "--max-sequence-length", "32", *map(str, extra),
    ])


def log_losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------ loss identity


def test_wlf_with_equal_weights_is_x0_mse_and_sigma2_velocity_mse():
    g = torch.Generator().manual_seed(0)
    x0, noise, v_hat = (torch.randn(3, 4, 8, 6, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64).view(-1, 1, 1, 1)
    z = (1 - sigma) * x0 + sigma * noise
    pred_x0 = z - sigma * v_hat
    assert torch.allclose(d4k.haar_dwt(x0).square().sum(), x0.square().sum())  # orthonormal
    wlf = d4k.wlf_loss(pred_x0.double(), x0.double())
    x0_mse = F.mse_loss(pred_x0, x0)
    velocity_mse = (sigma.flatten() ** 2 * (v_hat - (noise - x0)).square().mean(dim=(1, 2, 3))).mean()
    print(f"WLF {wlf.item():.8f}  x0 MSE {x0_mse.item():.8f}  sigma^2 v-MSE {velocity_mse.item():.8f}")
    assert abs(wlf.item() - x0_mse.item()) < 1e-6 * x0_mse.item()  # fp32 DWT inside; exact up to rounding
    assert abs(x0_mse.item() - velocity_mse.item()) < 1e-12
    # high-frequency emphasis: a different objective, = (LL + 2 (LH + HL + HH)) / 4 band means
    emphasis = d4k.wlf_loss(pred_x0, x0, (1.0, 2.0, 2.0, 2.0))
    bands = d4k.haar_dwt(pred_x0 - x0).square().mean(dim=(0, 1, 3, 4))
    assert torch.allclose(emphasis.double(), (bands * torch.tensor([1, 2, 2, 2.0], dtype=torch.float64)).mean(), rtol=1e-6)
    assert emphasis.item() > 1.2 * wlf.item()
    # a pure high-frequency error (checkerboard) has no LL part: emphasis doubles it exactly
    checker = (torch.arange(8)[:, None] + torch.arange(6)[None]) % 2 * 2.0 - 1
    assert torch.allclose(d4k.wlf_loss(checker, torch.zeros(8, 6), (1, 2, 2, 2)), 2 * d4k.wlf_loss(checker, torch.zeros(8, 6)))


def test_sigma_sampling_matches_upstream_schemes():
    g = torch.Generator().manual_seed(0)
    uniform = d4k.sample_sigmas(20000, "uniform", 1.0, g)
    assert 0.001 <= uniform.min() and uniform.max() <= 1 and abs(uniform.mean() - 0.5) < 0.01
    grid = uniform.double() * 1000
    assert (grid - grid.round()).abs().max() < 1e-3  # entries of upstream's 1000-entry table (stored in fp32)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    raw = d4k.sample_sigmas(20000, "logit_normal", 1.0, g1)
    shifted = d4k.sample_sigmas(20000, "logit_normal", 3.0, g2)
    assert torch.allclose(shifted, 3 * raw / (1 + 2 * raw), atol=1e-6)  # SD3: sigma' = 3s / (1 + 2s)
    assert abs(shifted.median() - 0.75) < 0.01  # logit-normal median 0.5 -> 0.75


@pytest.mark.parametrize("scheme, shift", [("uniform", 1.0), ("logit_normal", 3.0)])
def test_sigmas_are_upstreams_table_entries(scheme, shift):
    """Upstream: u -> index floor(1000 u) into the scheduler's sigmas (FlowMatchEulerDiscreteScheduler,
    1000 train steps, SD3's static shift 3). The same u gives the same sigma here."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    table = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).sigmas
    g = torch.Generator().manual_seed(2)
    ours = d4k.sample_sigmas(5000, scheme, shift, g)
    g = torch.Generator().manual_seed(2)
    u = torch.rand(5000, generator=g, dtype=torch.float64) if scheme == "uniform" else \
        torch.sigmoid(torch.randn(5000, generator=g, dtype=torch.float64))
    expected = table[(u * 1000).long()]
    assert (ours - expected).abs().max() < 1e-6


def test_posterior_sample_matches_diffusers(flux_folder):
    """encode_latents with eps is diffusers' latent_dist.sample() with the same N(0, 1) draw, normalised
    as upstream's train_flux_4k_wavelet.py does; without eps it is the mean (AutoEncoder.encode)."""
    import diffusers

    ours = d4k.load_vae(flux_folder, torch.float32, stride=1)
    ref = diffusers.AutoencoderKL.from_pretrained(flux_folder / "vae").eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(images).latent_dist
        expected = posterior.sample(torch.Generator().manual_seed(5))
        eps = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5))
        got = d4k.encode_latents(ours, images, eps)
        mean = d4k.encode_latents(ours, images)
    normalise = lambda x: (x - ref.config.shift_factor) * ref.config.scaling_factor  # noqa: E731
    assert (got - normalise(expected)).abs().max() < 1e-5
    assert (mean - normalise(posterior.mean)).abs().max() < 1e-5 and (got - mean).abs().max() > 1e-3


def test_training_defaults_are_upstreams(flux_folder, sd3_folder, tmp_path):
    args = d4k.train_parser().parse_args(["--data", str(tmp_path), "--output", str(tmp_path / "o")])
    defaults = (args.posterior, args.max_sequence_length, args.lr, args.warmup_steps, args.weight_decay,
                args.max_grad_norm, args.guidance, args.seed, args.steps, args.wavelet_weights, args.crop)
    assert defaults == ("sample", 77, 1e-6, 0, 1e-4, 1.0, 3.5, 0, 20000, (1.0, 1.0, 1.0, 1.0), None)
    args = d4k.recipe(d4k.WLFRecipe, args)
    args.model = flux_folder  # global batch 32 (Flux) and 64 (SD3), however it is split
    assert d4k.accumulation_steps(args, world=1) == 32
    args.batch_size = 4
    assert d4k.accumulation_steps(args, world=8) == 1 and d4k.accumulation_steps(args, world=2) == 4
    args.model = sd3_folder
    assert d4k.accumulation_steps(args, world=8) == 2
    args.batch_size = 3
    with pytest.raises(d4k.UserError, match="does not divide upstream's global batch of 64"):
        d4k.accumulation_steps(args, world=1)


def test_accumulated_micro_batches_equal_the_whole_batch(flux_folder):
    """wlf_micro_step over 4 micro-batches of 1 (each loss / 4) == one batch of 4: same mean loss,
    same gradients, same AdamW update."""
    model = d4k.load_flux(flux_folder, torch.float32).train()
    vae = d4k.load_vae(flux_folder, torch.float32, stride=1)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    side = 32 // vae.config.downsample_factor
    noise, eps = (torch.randn(4, vae.config.z_channels, side, side, generator=g) for _ in range(2))
    sigma = d4k.sample_sigmas(4, "uniform", 1.0, g)
    condition = {"txt": torch.randn(4, 5, 32, generator=g), "y": torch.randn(4, 32, generator=g)}

    def gradients(parts: int):
        model.zero_grad(set_to_none=True)
        losses = []
        for i in torch.arange(4).chunk(parts):
            part = {name: value[i] for name, value in condition.items()}
            loss = d4k.wlf_micro_step(model, vae, images[i], noise[i], sigma[i], eps[i], part, 3.5,
                                      d4k.WLF_UPSTREAM, contextlib.nullcontext, parts)
            losses.append(loss)
        return torch.stack(losses).mean(), {name: p.grad.clone() for name, p in model.named_parameters()}

    def adamw_update(grads):
        params = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
        for name, p in params.items():
            p.grad = grads[name]
        torch.optim.AdamW(params.values(), lr=1e-3, weight_decay=1e-4).step()
        return {name: p.detach() - model.get_parameter(name).detach() for name, p in params.items()}

    (whole_loss, whole), (split_loss, split) = gradients(1), gradients(4)
    loss_error = abs(whole_loss.item() - split_loss.item()) / whole_loss.item()
    grad_error = max(((whole[n] - split[n]).abs().max() / whole[n].abs().max().clamp_min(1e-30)).item()
                     for n in whole)
    steps = adamw_update(whole), adamw_update(split)
    update_error = max((steps[0][n] - steps[1][n]).abs().max().item() for n in whole)
    print(f"accumulation: loss rel. error {loss_error:.1e}, worst gradient rel. error {grad_error:.1e}, "
          f"worst update difference {update_error:.1e} (lr 1e-3)")
    why = "only fp32 rounding may differ: the sums run in another order (one matmul of 4 rows vs 4 of 1 row)"
    assert loss_error < 1e-6 and grad_error < 1e-5, why
    # AdamW's first step is lr * g / (|g| + eps): rounding shows only where |g| is near eps = 1e-8
    assert update_error < 0.01 * 1e-3, why


# --------------------------------------------------------------------------------- data


def test_dataset_skips_bad_entries_with_one_warning_each(tmp_path, capsys):
    examples = d4k.read_dataset(write_dataset(tmp_path / "data", broken=True))
    err = capsys.readouterr().err
    assert [e.text for e in examples] == CAPTIONS
    assert err.count("warning:") == 4 and "4 entries skipped" in err
    crop = d4k.load_crop(examples[0].path, 16, 16, (0.0, 1.0), flip=True)
    assert crop.shape == (3, 16, 16) and crop.min() >= -1 and crop.max() <= 1


def test_crop_resizes_shorter_side_then_crops(tmp_path):
    data = write_dataset(tmp_path / "data", size=(40, 64))
    image = d4k.load_crop(data / "0.png", 32, 32, (0.5, 0.99), flip=False)
    assert image.shape == (3, 32, 32)  # 40x64 -> 32x51, crop 32x32 near the right edge


# ---------------------------------------------------------------------- training runs


def fixed_eval_loss(model, pipe, data, guidance):
    """Loss on the 3 training images (unflipped) at fixed sigmas and noise."""
    examples = d4k.read_dataset(data, verbose=False)
    pipe.tokenizers["t5"].max_length = 32  # as trained (train_args)
    images = torch.stack([d4k.load_crop(e.path, 32, 32, (0.0, 0.0), False) for e in examples])
    conditions = d4k.encode_captions(pipe, [e.text for e in examples])
    condition = {n: torch.stack([conditions[e.text][n] for e in examples]) for n in conditions[examples[0].text]}
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        x0 = pipe.vae.encode(images)
        for sigma in (0.2, 0.5, 0.8):
            noise = torch.randn(x0.shape, generator=g)
            loss = d4k.training_loss(model, x0, noise, torch.full((3,), sigma), condition, guidance)
            total += loss.item() / 3
    return total


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_tiny_model_overfits_tiny_set_and_output_loads(kind, flux_folder, sd3_folder, tmp_path):
    """40 full fine-tuning steps at lr 2e-3 (batch 2, 3 images of 32 px): the fixed-noise eval loss falls > 5x (Flux;
    observed 9.5x) and > 2.5x (SD3; observed 3.6x)."""
    folder = flux_folder if kind == "flux" else sd3_folder
    data = write_dataset(tmp_path / "data")
    output = tmp_path / "out"
    d4k.train_command(train_args(folder, data, output, "--steps", 40, "--lr", 2e-3, "--checkpoint-every", 40))
    base = d4k.load_pipeline(str(folder), vae="f8", device="cpu", dtype=torch.float32)
    tuned = d4k.load_pipeline(str(output), vae="f8", device="cpu", dtype=torch.float32)  # OUTPUT is a complete pipeline
    guidance = 3.5 if kind == "flux" else None
    before = fixed_eval_loss(base.transformer, base, data, guidance)
    after = fixed_eval_loss(tuned.transformer, tuned, data, guidance)
    print(f"{kind}: eval loss {before:.4f} -> {after:.4f} ({before / after:.1f}x); train log {log_losses(output)[:2]} ... {log_losses(output)[-2:]}")
    assert before / after > (5 if kind == "flux" else 2.5)

    # diffusers loads OUTPUT/transformer and computes what ours computes
    import diffusers

    ours = tuned.transformer
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if kind == "flux":
            ref = diffusers.FluxTransformer2DModel.from_pretrained(output / "transformer").eval()
            z = torch.randn(1, 4, 8, 8, generator=g)
            txt, y = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
            t, gd = torch.tensor([0.6]), torch.tensor([3.5])
            expected = ref(hidden_states=d4k.pack_latents(z), encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                           img_ids=d4k.latent_image_ids(8, 8)[0], txt_ids=torch.zeros(5, 3), guidance=gd, return_dict=False)[0]
            got = ours(d4k.pack_latents(z), d4k.latent_image_ids(8, 8), txt, torch.zeros(1, 5, 3), t, y, gd)
        else:
            ref = diffusers.SD3Transformer2DModel.from_pretrained(output / "transformer").eval()
            z, context, y = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 6, 64, generator=g), torch.randn(1, 64, generator=g)
            expected = ref(hidden_states=z, encoder_hidden_states=context, pooled_projections=y, timestep=torch.tensor([600.0]),
                           return_dict=False)[0]
            got = ours(z, torch.tensor([600.0]), context, y)
    error = (got - expected).abs().max().item()
    print(f"{kind}: ours vs diffusers on the fine-tuned transformer: max abs error {error:.2e} (output magnitude {expected.abs().max():.2e})")
    assert error < 1e-4
    written = json.loads((output / "transformer" / "config.json").read_text())
    base_config = json.loads((folder / "transformer" / "config.json").read_text())
    assert {key: base_config.get(key) for key in written} == written  # the config we write = the one diffusers wrote


def test_resume_continues_identically(flux_folder, tmp_path):
    """With gradient accumulation (2 micro-batches of 1): checkpoints at optimizer steps only, and a
    run resumed at step 2 continues bit-identically."""
    data = write_dataset(tmp_path / "data")
    common = ("--lr", 1e-3, "--checkpoint-every", 2, "--keep-checkpoints", 0,
              "--batch-size", 1, "--grad-accum", 2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    d4k.train_command(train_args(flux_folder, data, straight, "--steps", 4, *common))
    d4k.train_command(train_args(flux_folder, data, split, "--steps", 2, *common))
    d4k.train_command(train_args(flux_folder, data, split, "--steps", 4, "--resume", *common))
    assert log_losses(straight) == log_losses(split)  # bit-identical losses, steps 1-4
    saved = sorted(f.name for f in (straight / "checkpoints").iterdir())
    assert saved == ["step-00000002", "step-00000004"]  # optimizer steps, not micro-batches
    a = load_safetensors(straight / "checkpoints" / "step-00000004" / "trainable.safetensors")
    b = load_safetensors(split / "checkpoints" / "step-00000004" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["img_in.weight"], load_safetensors(straight / "checkpoints" / "step-00000002" / "trainable.safetensors")["img_in.weight"])


# --------------------------------------------------------------------------------- LoRA


def random_lora(model, kind, rank=3, seed=1):
    d4k.add_lora(model, kind, rank, alpha=2 * rank, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, d4k.LoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.3)
    return model


def merge_lora(model):
    """Replace every LoRALinear by a plain Linear with W + scale * B A (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, d4k.LoRALinear):
            merged = copy.deepcopy(module.base)
            with torch.no_grad():
                merged.weight += (module.lora_B @ module.lora_A) * module.scale
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, merged)
    return model


def test_lora_export_matches_diffusers(flux_folder):
    """Our LoRA on fused qkv / linear1 == diffusers' FluxTransformer2DModel + load_lora_adapter
    (peft) with the exported to_q/to_k/to_v/proj_mlp LoRAs; and == the merged weights."""
    import diffusers

    ours = random_lora(d4k.load_flux(flux_folder, torch.float32), "flux")
    assert len(d4k.lora_targets(d4k.load_flux(flux_folder, torch.float32), "flux")) == 1 * 8 + 2 * 2
    lora, scale = d4k.trainable_state(ours, lora=True), 2.0  # random_lora's alpha = 2 rank
    exported = d4k.export_lora_diffusers(lora, "flux", ours.config, scale)
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in exported
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight" in exported
    g = torch.Generator().manual_seed(0)
    z, txt, y = torch.randn(1, 4, 8, 6, generator=g), torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    t, gd = torch.tensor([0.4]), torch.tensor([3.5])
    with torch.no_grad():
        got = ours(d4k.pack_latents(z), d4k.latent_image_ids(8, 6), txt, torch.zeros(1, 5, 3), t, y, gd)
        merged = merge_lora(ours)(d4k.pack_latents(z), d4k.latent_image_ids(8, 6), txt, torch.zeros(1, 5, 3), t, y, gd)
    assert (got - merged).abs().max() < 1e-5
    pytest.importorskip("peft", reason="diffusers' load_lora_adapter needs peft (tests/requirements.txt)")
    ref = diffusers.FluxTransformer2DModel.from_pretrained(flux_folder / "transformer").eval()
    with torch.no_grad():
        plain = ref(hidden_states=d4k.pack_latents(z), encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                    img_ids=d4k.latent_image_ids(8, 6)[0], txt_ids=torch.zeros(5, 3), guidance=gd, return_dict=False)[0]
        ref.load_lora_adapter(exported, prefix="transformer", adapter_name="wlf")
        expected = ref(hidden_states=d4k.pack_latents(z), encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                       img_ids=d4k.latent_image_ids(8, 6)[0], txt_ids=torch.zeros(5, 3), guidance=gd, return_dict=False)[0]
    error = (got - expected).abs().max().item()
    print(f"LoRA: ours vs diffusers+peft max abs error {error:.2e} (the LoRA moves the output by {(got - plain).abs().max():.2e})")
    assert error < 1e-4 and (got - plain).abs().max() > 100 * error


def test_lora_training_writes_both_formats(sd3_folder, tmp_path):
    data = write_dataset(tmp_path / "data")
    output = tmp_path / "lora"
    d4k.train_command(train_args(sd3_folder, data, output, "--steps", 3, "--lr", 1e-2, "--lora-rank", 2))
    ours = load_safetensors(output / "lora.safetensors")
    diffusers_file = load_safetensors(output / "pytorch_lora_weights.safetensors")
    assert ours and all(k.endswith((".lora_A", ".lora_B")) for k in ours)
    assert any(v.abs().max() > 0 for k, v in ours.items() if k.endswith("lora_B"))  # B moved off zero
    assert all(k.startswith("transformer.") and k.endswith(("lora_A.weight", "lora_B.weight")) for k in diffusers_file)
    assert not (output / "transformer").exists()


# ------------------------------------------------------------------------------ torchrun


def test_torchrun_two_processes_match_one(flux_folder, tmp_path):
    """FSDP2 over 2 CPU processes (gloo), each accumulating 2 micro-batches of 1 == 1 process with one
    batch of 4: same losses and weights."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this PyTorch build")
    data = write_dataset(tmp_path / "data")

    def argv(output, batch, accumulation):
        return ["--model", flux_folder, "--data", data, "--output", output, "--resolution", 32, "--vae", "f8", "--device", "cpu",
                "--batch-size", batch, "--grad-accum", accumulation, "--steps", 2, "--lr", 1e-3,
                "--checkpoint-every", 2, "--max-sequence-length", 32]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(ROOT / "diffusion4k.py"), "train"]
    result = subprocess.run(command + [str(a) for a in argv(tmp_path / "two", 1, 2)], capture_output=True,
                            text=True, timeout=150, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    d4k.train_command(d4k.train_parser().parse_args([str(a) for a in argv(tmp_path / "one", 4, 1)]))
    two, one = log_losses(tmp_path / "two"), log_losses(tmp_path / "one")
    print(f"losses 2 processes {two}, 1 process {one}")
    assert np.allclose(two, one, rtol=1e-5)
    a = load_safetensors(tmp_path / "two" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_safetensors(tmp_path / "one" / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_safetensors(flux_folder / "transformer")
    error = max((a[k] - b[k]).abs().max().item() for k in a)
    update = max((b[k] - base[k]).abs().max().item() for k in a)
    print(f"weights after 2 steps: max abs difference {error:.2e}, largest update {update:.2e}")
    # the gradients differ only by fp32 summation order; Adam divides by sqrt(v), which magnifies
    # that on near-zero gradients, so the weights agree to a small fraction of the update
    assert error < 0.02 * update


# ----------------------------------------------------------------------------- bad input


def run(argv):
    return run_cli(lambda a: d4k.train_command(d4k.train_parser().parse_args(a)), [str(x) for x in argv])


def test_bad_input_fails_with_one_line(tmp_path, capsys):
    data = write_dataset(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text("\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = {
        "no such data folder": ["--data", tmp_path / "nope", "--output", tmp_path / "o1"],
        "no usable images": ["--data", tmp_path / "empty", "--output", tmp_path / "o2"],
        "cannot write into": ["--data", data, "--output", blocker / "sub"],
        "--wavelet-weights": ["--data", data, "--output", tmp_path / "o3", "--wavelet-weights", "1,2"],
        "argument --steps: must be >= 1": ["--data", data, "--output", tmp_path / "o4", "--steps", 0],
    }
    for message, argv in cases.items():
        assert run(["--model", tmp_path / "unused", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and message in err[-1], err
        assert not (tmp_path / "o1").exists() and not (tmp_path / "o3" / "transformer").exists()

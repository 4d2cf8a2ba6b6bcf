"""Device audit: every CLI path runs with its weights on a stand-in device (meta, for "cuda"), and
any op that mixes devices in a way CUDA refuses fails the test, naming the op and the line of the
method file that ran it (tests/device_audit.py explains the stand-in and what CUDA accepts).

Paths: generate with Flux and SD3 in each offload mode (none, model, blocks) and with the tiled
decode; OP4KSR inference, training and calibrate-sigma; C-Upscale with GSP, RAP and RSP (offload
none and model); WLF `train` (full and LoRA); `train-vae` (LPIPS, GAN, EMA, --resume); the metrics
networks (FID Inception, CLIP, aesthetic MLP, LPIPS, CLIPIQA, periodicity). Under a simulated
`torchrun` (rank 0 of 2, a process group bound to the stand-in device as nccl is bound to cuda),
every tensor handed to a collective must be on that device: WLF full fine-tuning and LoRA (both
sharded by FSDP2), OP4KSR training.

Training runs in fp32: meta has no autocast, so `--dtype bf16`'s autocast cannot run there (where
tensors live does not depend on it). `train --resume` is not audited: torch's distributed-checkpoint
loader takes meta tensors for unmaterialised ones. Tiny random pipelines; under a minute on 2 cores.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cupscale as cu
import diffusion4k as d4k
import metrics as M
import op4ksr
from device_audit import STANDIN, audit, fake_torchrun
from tiny_pipelines import make_flux_pipeline, make_sd3_pipeline

CAPTIONS = ["a red rocket over tokyo", "a lighthouse at dawn", "a cat sitting on a mat"]


def assert_clean(found, what: str):
    """Nothing mixed devices, and the run did put work on the stand-in device."""
    assert found.standin_ops > 0, f"{what}: no op ran on {STANDIN}: the audit did not reach the device"
    if found.findings:
        pytest.fail(f"{what}: {len(found.findings)} op(s) that CUDA refuses ({STANDIN} stands for cuda; "
                    f"the innermost lines of the method files first):\n{found.report()}", pytrace=False)


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("audit")


@pytest.fixture(scope="module")
def flux_folder(root):
    return make_flux_pipeline(root / "flux")


@pytest.fixture(scope="module")
def sd3_folder(root):
    return make_sd3_pipeline(root / "sd3")


def smooth_image(seed: int, size: int) -> np.ndarray:
    rows, cols = np.mgrid[0:size, 0:size] / size
    image = np.stack([np.sin(3 * (seed + 1) * rows), np.cos(2 * (seed + 1) * cols), rows * cols], -1)
    return ((image + 1) * 127.5).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(root):
    """Three captioned 128 px images (the discriminator of train-vae needs 128 px crops)."""
    folder = root / "data"
    folder.mkdir()
    lines = []
    for i, text in enumerate(CAPTIONS):
        Image.fromarray(smooth_image(i, 128)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def lpips_files(root):
    """Random LPIPS-VGG weights in the published layouts (VGG16 .safetensors, lin0..lin4 .pth)."""
    from safetensors.torch import save_file

    model = d4k.LPIPS()
    backbone = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    save_file(backbone, str(root / "vgg16.safetensors"))
    torch.save({f"lin{i}.model.1.weight": lin.weight.detach().clone() for i, lin in enumerate(model.lins)},
               root / "lin.pth")
    return ["--lpips-linear", str(root / "lin.pth"), "--lpips-backbone", str(root / "vgg16.safetensors")]


@pytest.fixture(scope="module")
def op4ksr_weights(flux_folder, root):
    """An OP4KSR file with random LoRAs on Flux and the F16 encoder, for the tiny Flux."""
    transformer = op4ksr.load_flux(flux_folder, torch.float32, theta=100.0)
    vae = op4ksr.load_vae(flux_folder, torch.float32, stride=2)
    op4ksr.add_flux_lora(transformer, 2, seed=1)
    op4ksr.add_encoder_lora(vae, 2, seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in [*transformer.modules(), *vae.encoder.modules()]:
            if isinstance(module, (op4ksr.SplitLoRALinear, op4ksr.LoRAConv2d)):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.1)
    prompt = {"txt": torch.randn(1, 5, 32, generator=g), "y": torch.randn(1, 32, generator=g), "text": "x"}
    path = root / "op4ksr.safetensors"
    settings = {"sigma": 0.5, "guidance": 1.0, "scale": 2, "base_flux": str(flux_folder),
                "base_vae": str(flux_folder)}
    op4ksr.save_op4ksr(path, transformer, vae, prompt, settings)
    return path


# ----------------------------------------------------------------------------- the audit itself


def test_audit_flags_what_cuda_refuses_and_passes_what_it_accepts():
    with audit() as found:
        weight, x = torch.ones(4, 4, device=STANDIN), torch.ones(4, 4)
        weight @ x  # refused: a CPU matrix
        weight[torch.tensor([0, 2])] += x[:2]  # refused: CPU values into device rows (the 5dd4772 bug)
        torch.randn(4, generator=torch.Generator().manual_seed(0), device=STANDIN)  # refused: CPU generator
        refused = len(found.findings)
        weight * torch.tensor(2.0)  # CPU scalar: accepted
        weight[torch.tensor([0, 2])]  # CPU index: accepted
        weight[torch.tensor([1])] = torch.ones(1, 4, device=STANDIN)
        weight.cpu(), x.to(STANDIN), x.copy_(weight), weight.copy_(x)  # copies: accepted
        value, listed = weight.sum().item(), weight[0].tolist()
    assert refused == 3 and len(found.findings) == 3, found.report()
    assert value == 0 and listed == [0.0] * 4  # what the device hands back reads as zeros
    where = [finding.where for finding in found.findings.values()]
    assert all("test_device_audit.py" in w for w in where), where
    assert "aten.mm" in found.report() and "aten.add_" in found.report() and "Generator" in found.report()


def test_weights_move_as_on_cuda():
    """module.to and `.data =` keep the Parameter objects (as CUDA does), and a weight left behind on
    the CPU is flagged where the model uses it."""
    layer = torch.nn.Linear(4, 4)
    weight = layer.weight
    with audit() as found:
        layer.to(STANDIN)
        assert layer.weight is weight and weight.device.type == STANDIN and weight.requires_grad
        weight.data = torch.zeros(4, 4)  # as an offloading hook parks a weight in host memory
        assert layer.weight is weight and weight.device.type == "cpu"
        layer(torch.ones(1, 4, device=STANDIN))
    assert len(found.findings) == 1 and "aten.addmm" in found.report(), found.report()


def needs_fake_process_group():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this PyTorch build")
    pytest.importorskip("torch.testing._internal.distributed.fake_pg")


def test_collective_checker_requires_the_group_device():
    import torch.distributed as dist

    needs_fake_process_group()
    with audit() as found, fake_torchrun(found) as log:
        dist.all_reduce(torch.ones(3, device=STANDIN))
        dist.barrier()
        assert not found.findings, found.report()
        dist.all_reduce(torch.ones(3))  # nccl refuses: "No backend type associated with device type cpu"
    assert log.calls == {"all_reduce": 2, "barrier": 1}
    assert len(found.findings) == 1 and "torch.distributed.all_reduce" in found.report()
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------- generate


GENERATE = [(kind, offload, []) for kind in ("flux", "sd3") for offload in ("none", "model", "blocks")]
GENERATE += [(kind, "none", ["--vae-tile", "8"]) for kind in ("flux", "sd3")]  # tiled decode: 3x3 tiles


@pytest.mark.parametrize("kind, offload, extra", GENERATE,
                         ids=[f"{k}-{o}{'-tiled' if e else ''}" for k, o, e in GENERATE])
def test_generate(kind, offload, extra, flux_folder, sd3_folder, tmp_path):
    folder = {"flux": flux_folder, "sd3": sd3_folder}[kind]
    argv = ["--model", folder, "--prompt", "a cat", "--negative-prompt", "a dog", "--height", 64,
            "--width", 64, "--steps", 2, "--device", STANDIN, "--dtype", "bf16", "--offload", offload,
            "--output", tmp_path / "out.png", *extra]
    with audit(d4k) as found:
        d4k.main([str(a) for a in argv])
    assert (tmp_path / "out.png").is_file()
    assert_clean(found, f"diffusion4k.py {kind} --offload {offload} {' '.join(extra)}")


# ----------------------------------------------------------------------------- OP4KSR


def test_op4ksr_super_resolve(op4ksr_weights, tmp_path):
    Image.fromarray(smooth_image(0, 24)).save(tmp_path / "lr.png")
    argv = ["--input", tmp_path / "lr.png", "--weights", op4ksr_weights, "--output", tmp_path / "sr.png",
            "--color-fix", "wavelet", "--device", STANDIN, "--dtype", "bf16"]
    with audit(op4ksr) as found:
        op4ksr.main([str(a) for a in argv])
    assert (tmp_path / "sr.png").is_file()
    assert_clean(found, "op4ksr.py (super-resolution)")


def op4ksr_train_argv(flux_folder, data, output, lpips_files):
    return ["train", "--flux", flux_folder, "--vae", flux_folder, "--data", data, "--output", output,
            "--crop", 64, "--lora-rank", 2, "--max-sequence-length", 16, "--steps", 2, "--batch-size", 1,
            "--checkpoint-every", 1, "--lpips-crop", 32, "--device", STANDIN, *lpips_files]


def test_op4ksr_train(flux_folder, data, lpips_files, tmp_path):
    with audit(op4ksr) as found:
        op4ksr.main([str(a) for a in op4ksr_train_argv(flux_folder, data, tmp_path / "run", lpips_files)])
    assert (tmp_path / "run" / "op4ksr.safetensors").is_file()
    assert_clean(found, "op4ksr.py train")


def test_op4ksr_calibrate_sigma(flux_folder, data):
    argv = ["calibrate-sigma", "--data", data, "--vae", flux_folder, "--crop", 64, "--scale", 4,
            "--max-images", 2, "--device", STANDIN]
    with audit(op4ksr) as found:
        op4ksr.main([str(a) for a in argv])
    assert_clean(found, "op4ksr.py calibrate-sigma")


# ----------------------------------------------------------------------------- C-Upscale


@pytest.mark.parametrize("offload", ["none", "model"])
def test_cupscale_with_gsp_rap_rsp(offload, sd3_folder, tmp_path):
    """128 px from 64 px: a 64^2 latent in 3x3 regions of 32 with RSP's regional prompts, 3 batches of
    regions, one denoising step (of a 2-step schedule), VAE in 64 px tiles."""
    Image.fromarray(smooth_image(1, 64)).save(tmp_path / "lr.png")
    (tmp_path / "regions.json").write_text(json.dumps({f"{r},{c}": f"a cat {r} {c}" for r in range(3)
                                                       for c in range(3)}))
    argv = ["--input", tmp_path / "lr.png", "--output", tmp_path / "up.png", "--prompt", "a cat",
            "--scale", 2, "--region-prompts", tmp_path / "regions.json", "--region-size", 64,
            "--region-overlap", 32, "--region-batch", 4, "--vae-tile", 64, "--vae-overlap", 16, "--steps", 2,
            "--model", sd3_folder, "--device", STANDIN, "--dtype", "bf16", "--offload", offload]
    with audit(cu) as found:
        cu.main([str(a) for a in argv])
    record = json.loads((tmp_path / "up.regions.json").read_text())
    assert record["rsp"] and len(record["regions"]) == 9
    assert_clean(found, f"cupscale.py (GSP, RAP, RSP; --offload {offload})")


# ----------------------------------------------------------------------------- training


def train_argv(folder, data, output, *extra):
    return ["train", "--model", folder, "--data", data, "--output", output, "--resolution", 32, "--vae", "f8",
            "--batch-size", 1, "--grad-accum", 2, "--steps", 2, "--checkpoint-every", 1,
            "--max-sequence-length", 16, "--device", STANDIN, "--dtype", "fp32", *extra]


TRAIN = [("flux", []), ("flux", ["--lora-rank", 2]), ("sd3", ["--lora-rank", 2])]


@pytest.mark.parametrize("kind, extra", TRAIN, ids=[f"{k}-{'lora' if e else 'full'}" for k, e in TRAIN])
def test_train(kind, extra, flux_folder, sd3_folder, data, tmp_path):
    folder = {"flux": flux_folder, "sd3": sd3_folder}[kind]
    with audit(d4k) as found:
        d4k.main([str(a) for a in train_argv(folder, data, tmp_path / "run", *extra)])
    assert (tmp_path / "run" / "train_log.jsonl").is_file()
    assert_clean(found, f"diffusion4k.py train ({kind}, {'LoRA' if extra else 'full'})")


def test_train_vae(flux_folder, data, lpips_files, tmp_path):
    """SC-VAE with every term on: MSE, scale consistency, LPIPS, the GAN (the discriminator's turn at
    step 1, the adaptive weight at step 2), EMA; then --resume from the step-2 checkpoint."""
    argv = ["train-vae", "--base", flux_folder, "--data", data, "--output", tmp_path / "vae",
            "--resolution", 128, "--batch-size", 1, "--grad-accum", 1, "--steps", 2, "--gan-start", 1,
            "--gan-weight", 0.1, "--lpips-weight", 0.1, "--ema", 0.9, "--workers", 1,
            "--save-every", 2, "--device", STANDIN, *lpips_files]
    with audit(d4k) as found:
        d4k.main([str(a) for a in argv])
        argv[argv.index("--steps") + 1] = 3
        d4k.main([str(a) for a in argv + ["--resume"]])
    assert (tmp_path / "vae" / "vae").is_dir()
    assert_clean(found, "diffusion4k.py train-vae (and --resume)")


# ----------------------------------------------------------------------------- metrics


def tiny_clip_vit(folder, towers=("vision", "text")) -> M.ClipViT:
    """A small OpenAI-CLIP-shaped ClipViT (its tokenizer.json word-level), built on the CPU."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = ["<unk>", "a", "cat", "red", "rocket", "lighthouse", "at", "dawn"]
    vocab = {w: i for i, w in enumerate(words + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    cfg = M.ClipTowerConfig(width=32, layers=1, heads=2)
    vision = M.ClipVisionTower(cfg, patch=8, image_size=32, embed_dim=24) if "vision" in towers else None
    text = M.ClipTextTower(cfg, len(vocab), 77, 24) if "text" in towers else None
    tokens = M.ClipScoreTokenizer(folder / "tokenizer.json", 77) if "text" in towers else None
    return M.ClipViT(vision, text, tokens).eval()


@pytest.fixture
def metric_networks(tmp_path, monkeypatch):
    """The networks `evaluate` loads, built on the CPU in small shapes in place of their weight files
    (their loaders read to the CPU; `evaluate` moves each to --device)."""
    torch.manual_seed(0)
    text = M.ClipTowerConfig(width=64, layers=1, heads=1)
    networks = {
        M.InceptionV3: lambda *a, **k: M.InceptionV3().eval(),
        M.ClipViT: lambda source, towers=("vision", "text"): tiny_clip_vit(tmp_path, towers),
        M.AestheticMLP: lambda *a, **k: M.AestheticMLP(24).eval(),
        M.LPIPSMetric: lambda net="alex", *a, **k: M.LPIPSMetric(net).eval(),
        M.CLIPIQA: lambda *a, **k: M.CLIPIQA(M.ClipResNet((1, 1, 1, 1), 16, 32, 2),
                                             M.ClipTextTower(text, 49408, 77, 32)).eval(),
    }
    for cls, build in networks.items():
        loader = classmethod(lambda cls, *args, build=build, **kwargs: build(*args, **kwargs))
        monkeypatch.setattr(cls, "from_pretrained", loader)
    # FID's last step is host arithmetic on the statistics already copied to the CPU: two 2048^2
    # float64 eigendecompositions, 15 s on 2 cores, with nothing on the device
    monkeypatch.setattr(M, "frechet_distance", lambda mu1, cov1, mu2, cov2: 0.0)


@pytest.mark.filterwarnings("ignore:FID. (pred|ref) has:UserWarning")  # a handful of samples
def test_metrics_networks(metric_networks, tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    for i in range(3):
        Image.fromarray(smooth_image(i, 64)).save(pred / f"{i}.png")
        Image.fromarray(smooth_image(i + 3, 64)).save(ref / f"{i}.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n"
                               for i, text in enumerate(CAPTIONS)))
    argv = ["--pred", pred, "--ref", ref, "--prompts", prompts, "--out", tmp_path / "m.json",
            "--metrics", "fid,clip,aesthetic,lpips,clipiqa,periodicity", "--tile", 32, "--clipiqa-tile", 32,
            "--fid-patch", 32, "--periods", "4,8", "--device", STANDIN]
    with audit(M) as found:
        M.main([str(a) for a in argv])
    assert set(json.loads((tmp_path / "m.json").read_text())["metrics"]) == {
        "fid", "clip", "aesthetic", "lpips", "clipiqa", "periodicity"}
    assert_clean(found, "metrics.py (FID Inception, CLIP, aesthetic MLP, LPIPS, CLIPIQA, periodicity)")


# ----------------------------------------------------------------------------- collectives under torchrun


TORCHRUN = ["diffusion4k-full", "diffusion4k-lora", "op4ksr"]


@pytest.mark.parametrize("run", TORCHRUN)
def test_torchrun_collectives_use_the_process_group_device(run, flux_folder, data, lpips_files, tmp_path,
                                                           capsys):
    """Rank 0 of 2 with a process group bound to the stand-in device (nccl: cuda only): every tensor
    handed to a collective is on the model's device. WLF (full and LoRA) shards with FSDP2."""
    needs_fake_process_group()
    output = tmp_path / "run"
    if run == "op4ksr":
        module, argv = op4ksr, op4ksr_train_argv(flux_folder, data, output, lpips_files)
    else:
        lora = ["--lora-rank", 2] if run.endswith("lora") else []
        module, argv = d4k, train_argv(flux_folder, data, output, *lora)
    with audit(module) as found, fake_torchrun(found) as collectives:
        module.main([str(a) for a in argv])
    assert "2 process(es)" in capsys.readouterr().err  # setup_distributed's Distributed(0, 2, meta)
    print(f"{run}: torch.distributed calls {collectives.calls}; c10d ops {found.collective_ops}")
    assert collectives.calls.get("all_reduce", 0) > 0, collectives.calls  # the loss mean, gradients
    if run.startswith("diffusion4k"):  # FSDP2 gathers the weights and reduce-scatters the gradients
        assert {"all_gather_single", "reduce_scatter_single"} <= set(collectives.calls), collectives.calls
    assert_clean(found, f"{run} under torchrun (2 processes)")

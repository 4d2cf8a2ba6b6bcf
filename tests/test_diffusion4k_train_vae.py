"""SC-VAE decoder training (`diffusion4k.py train-vae`) on a tiny random VAE, CPU, fp32, offline.

The tiny VAE (diffusers AutoencoderKL, 2 levels, 32/64 channels, 4 latent channels) downsamples
by 2 as "F8" and by 4 as "F16"; everything else is the real code path.
"""

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import diffusion4k as d4k
from tiny_pipelines import tiny_vae


STEPS = 40
FACTORS = {"loss": 1.8, "mse": 1.7, "sc": 2.5}  # required fall; observed 2.30x, 2.12x, 3.08x (CPU, torch 2.13)


def run_main(argv):
    return d4k.run_cli(lambda a: d4k.train_vae_command(d4k.train_vae_parser().parse_args(a)), argv)


def make_args(base, data, output, *extra):
    fast = ["--resolution", "32", "--batch-size", "2", "--grad-accum", "1",
            "--no-gradient-checkpointing", "--lpips-weight", "0", "--gan-weight", "0", "--ema", "0",
            "--workers", "1", "--device", "cpu"]
    return d4k.train_vae_parser().parse_args(["--base", str(base), "--data", str(data), "--output", str(output), *fast, *map(str, extra)])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These convolutions are too small to gain from a second thread, and on a busy 2-core
    machine two OpenMP threads run them several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_vae(1, 0.3611, 0.1159).save_pretrained(folder)
    return folder


def synthetic_images(folder, count, size=(40, 48), subfolder=False):
    """Smooth synthetic images (gradients + rectangles); with `subfolder` the last one is nested."""
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = size[0] + (0 if size == (32, 32) else 4 * i), size[1]
        yy, xx = np.mgrid[0:h, 0:w] / 32.0
        image = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), xx * yy], -1)
        for _ in range(3):
            top, left = rng.integers(0, h - 8), rng.integers(0, w - 12)
            image[top : top + 8, left : left + 12] = rng.uniform(-1, 1, 3)
        path = folder / ("sub" if subfolder and i == count - 1 else "") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8)).save(path)
    return folder


@pytest.fixture(scope="module")
def base3(tmp_path_factory):
    """Three levels (F8 = /4, F16 = /8): at the 128 px the discriminator needs, the mid-block
    attention of the two-level VAE would dominate the run time."""
    from diffusers import AutoencoderKL
    from tiny_pipelines import randomize_

    folder = tmp_path_factory.mktemp("base3")
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    )
    randomize_(vae.eval(), 0.05, 1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_images(tmp_path_factory.mktemp("images"), 6, subfolder=True)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return synthetic_images(tmp_path_factory.mktemp("two"), 2, size=(32, 32))


@pytest.fixture(scope="module")
def trained(base, two, tmp_path_factory):
    """40 steps without the GAN on two 32x32 images (each crop is a whole image, only flips vary)
    at a high learning rate, posterior means, the scale-consistency term weighted up to the size
    of the MSE (the tiny random teacher's features are small); with the BFL file too."""
    output = tmp_path_factory.mktemp("run") / "out"
    args = make_args(base, two, output, "--steps", STEPS, "--lr", 3e-3, "--sc-weight", 300,
                     "--posterior", "mean", "--save-every", 10, "--ae-file")
    return d4k.train_vae_command(args), output


GAN_STEPS, ACCUMULATION = 12, 2


@pytest.fixture(scope="module")
def gan_run(base3, two, tmp_path_factory):
    """The defaults (GAN on and alternating, EMA 0.9999, partitioned decode, posterior samples)
    at 128 px with 2 accumulated micro-batches a step, but no LPIPS (no weights offline), a high
    learning rate and the scale-consistency weight as above. Records which model each
    micro-batch trained and the decoder after every step."""
    micro, after_step = [], []
    real_sc, real_disc, real_ema = d4k.scale_consistency_loss, d4k.discriminator_loss, d4k.ema_update

    def ema_update(ema, params, step, decay):
        after_step.append((step, [p.detach().clone() for p in params]))
        return real_ema(ema, params, step, decay)

    args = d4k.train_vae_parser().parse_args(map(str, [
        "--base", base3, "--data", two, "--output", tmp_path_factory.mktemp("gan") / "out",
        "--resolution", 128, "--batch-size", 1, "--grad-accum", ACCUMULATION,
        "--no-gradient-checkpointing", "--workers", 1, "--device", "cpu", "--lpips-weight", 0,
        "--lr", 3e-3, "--sc-weight", 300, "--steps", GAN_STEPS]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(d4k, "scale_consistency_loss", lambda *a: micro.append("G") or real_sc(*a))
        patch.setattr(d4k, "discriminator_loss", lambda *a: micro.append("D") or real_disc(*a))
        patch.setattr(d4k, "ema_update", ema_update)
        result = d4k.train_vae_command(args)
    return result, micro, after_step


# ------------------------------------------------------------------------------ pieces


@pytest.mark.parametrize("stride", [1, 2])
def test_features_then_head_is_the_decoder(base, stride):
    vae = d4k.load_vae(base, stride=stride)
    z = torch.randn(2, 4, 8, 6)
    with torch.no_grad():
        features = vae.decoder.features(z)
        out = vae.decoder.head(features)
        assert features.shape == (2, 32, 16, 12)  # the last up block's resolution, for F8 and F16 alike
        assert out.shape[-2:] == ((16, 12) if stride == 1 else (32, 24))
        assert torch.equal(out, vae.decoder(z))

    # gradient checkpointing (active only with autograd on): same features, same gradients
    def features_and_grads(checkpointing):
        vae.decoder.gradient_checkpointing = checkpointing
        vae.decoder.zero_grad(set_to_none=True)
        out = vae.decoder.features(z.requires_grad_(True))
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in vae.decoder.parameters() if p.grad is not None]

    vae.decoder.requires_grad_(True)
    plain, plain_grads = features_and_grads(False)
    checkpointed, checkpointed_grads = features_and_grads(True)
    assert torch.equal(checkpointed, plain) and torch.equal(plain, features)
    assert len(plain_grads) == len(checkpointed_grads) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_grads, checkpointed_grads))


def test_scale_consistency_is_upstreams_loss_minus_a_constant():
    """Upstream: MSE(nearest_up2(student), teacher). Ours: MSE(student, avgpool2(teacher)).
    They differ by the teacher's mean within-block variance, so the gradients are equal."""
    s = torch.randn(2, 8, 6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 8, 12, 10, dtype=torch.float64)
    upstream = F.mse_loss(F.interpolate(s, scale_factor=2, mode="nearest"), t)
    ours = d4k.scale_consistency_loss(s.double(), t)
    variance = (F.avg_pool2d(t * t, 2) - F.avg_pool2d(t, 2) ** 2).mean()
    torch.testing.assert_close(upstream, ours.double() + variance, rtol=1e-6, atol=0)  # ours computes in fp32
    g_up, = torch.autograd.grad(upstream, s)
    s2 = s.detach().float().requires_grad_(True)
    g_ours, = torch.autograd.grad(d4k.scale_consistency_loss(s2, t.float()), s2)
    torch.testing.assert_close(g_up.float(), g_ours, rtol=1e-5, atol=1e-7)


def write_lpips_files(folder):
    """Random LPIPS-vgg weights in the published layouts: timm/torchvision VGG16 (extra head
    keys included) as .safetensors and the lpips package's lin0..lin4 .pth."""
    from safetensors.torch import save_file

    model = d4k.LPIPS()
    with torch.no_grad():
        for lin in model.lins:
            lin.weight.uniform_(0, 0.1)
    backbone = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    backbone["head.fc.weight"] = torch.zeros(10, 4)
    save_file(backbone, str(folder / "vgg16.safetensors"))
    torch.save({f"lin{i}.model.1.weight": lin.weight.detach().clone() for i, lin in enumerate(model.lins)}, folder / "lin.pth")
    return model, folder / "lin.pth", folder / "vgg16.safetensors"


def test_lpips_loads_published_layouts_and_matches_metrics(tmp_path):
    import metrics

    reference, linear, backbone = write_lpips_files(tmp_path)
    ours = d4k.load_lpips(str(linear), str(backbone))
    theirs = metrics.LPIPSMetric.from_pretrained("vgg", str(linear), str(backbone))
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(a, b), theirs(a, b), rtol=1e-5, atol=1e-7)
        assert torch.equal(ours(a, a), torch.zeros(2))
    with pytest.raises(ValueError, match="--lpips-weight 0"):
        d4k.load_lpips(str(tmp_path / "missing.pth"), str(backbone))


def test_discriminator_shapes_and_gradient_penalty():
    disc = d4k.Discriminator()
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 512, 512, 1]
    assert [c.stride for c in convs] == [(2, 2)] * 6 + [(1, 1)]
    assert sum(torch.nn.utils.parametrize.is_parametrized(c, "weight") for c in convs) == 6
    assert sum(isinstance(m, torch.nn.InstanceNorm2d) for m in disc.modules()) == 5
    real, fake = torch.rand(2, 3, 128, 128) * 2 - 1, torch.rand(2, 3, 128, 128) * 2 - 1
    out = disc(real)
    assert out.shape == (2, 1, 2, 2) and 0 < out.min() and out.max() < 1
    hinge, penalty = d4k.discriminator_loss(disc, real, fake)
    assert torch.isfinite(hinge) and torch.isfinite(penalty) and penalty >= 0
    with torch.no_grad():  # D in (0, 1): the hinge never clips (see the module notes)
        torch.testing.assert_close(hinge, disc(fake).mean() - disc(real).mean() + 2)
    (hinge + penalty).backward()
    grads = [p.grad for p in disc.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_gradient_penalty_is_upstreams_gradient_of_the_map_sum():
    """Upstream: grad of D(real) with grad_outputs of ones, flattened per image, weight 10 *
    mean (||g|| - 1)^2. The gradient of the map's mean would be smaller by the map size."""
    disc = d4k.Discriminator().eval()  # eval: spectral norm skips its power iteration, so D stays fixed
    real, fake = torch.rand(3, 3, 192, 128) * 2 - 1, torch.rand(3, 3, 192, 128) * 2 - 1
    _, penalty = d4k.discriminator_loss(disc, real, fake)
    x = real.clone().requires_grad_(True)
    out = disc(x)
    assert out.shape == (3, 1, 3, 2)
    (g,) = torch.autograd.grad(out, x, grad_outputs=torch.ones(out.size()), create_graph=True)
    torch.testing.assert_close(penalty, 10 * ((g.reshape(3, -1).norm(2, dim=1) - 1) ** 2).mean())
    (g_mean,) = torch.autograd.grad(disc(x).mean((1, 2, 3)).sum(), x)
    torch.testing.assert_close(g_mean * 6, g.detach())
    for i in range(3):  # one image at a time gives the same gradients (images are independent)
        (g_i,) = torch.autograd.grad(disc(x[i : i + 1]).sum(), x)
        torch.testing.assert_close(g_i[i], g[i].detach(), rtol=1e-4, atol=1e-7)


def test_adaptive_weight_is_upstreams():
    last = torch.randn(4, 3, requires_grad=True)
    reconstruction, generator = (last * torch.randn(4, 3)).sum().square(), (last * torch.randn(4, 3)).sum()
    (a,) = torch.autograd.grad(reconstruction, last, retain_graph=True)
    (b,) = torch.autograd.grad(generator, last, retain_graph=True)
    torch.testing.assert_close(d4k.adaptive_weight(reconstruction, generator, last), a.norm() / b.norm())
    flat = (last * 0).sum()  # no gradient: upstream divides by 1e-8, then caps at 1e4
    assert d4k.adaptive_weight(reconstruction, flat, last) == 1e4
    assert d4k.adaptive_weight(flat, flat, last) == 0


@pytest.mark.parametrize("decay", [0.9999, 0.7])
def test_ema_update_is_diffusers_ema_model(decay):
    """Upstream's EMA is diffusers' EMAModel (default decay 0.9999): a copy at the first step,
    then min(decay, (1 + n) / (10 + n)); with decay 0.7 the cap binds from n = 20 on."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    reference = EMAModel(model.parameters(), decay=decay)
    ours = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(25):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d4k.ema_update(ours, model.parameters(), step, decay)
        reference.step(model.parameters())
        for average, shadow in zip(ours.values(), reference.shadow_params):
            torch.testing.assert_close(average, shadow, rtol=1e-6, atol=1e-6)
    assert reference.cur_decay_value == min(decay, 25 / 34)


# -------------------------------------------------------------------------------- training


def test_losses_fall_and_frozen_parts_stay_bitwise(trained, base):
    result, output = trained
    for key, factor in FACTORS.items():  # first step against the mean of the last five
        before, after = result.history[0][key], np.mean([r[key] for r in result.history[-5:]])
        print(f"{key}: {before:.4g} -> {after:.4g} ({before / after:.2f}x)")
        assert after < before / factor, (key, before, after)
    fresh_teacher, fresh_student = d4k.load_vae(base, stride=1), d4k.load_vae(base, stride=2)
    for key, value in fresh_teacher.state_dict().items():
        assert torch.equal(result.teacher.state_dict()[key], value), key
    for key, value in fresh_student.encoder.state_dict().items():
        assert torch.equal(result.student.encoder.state_dict()[key], value), key
    assert not torch.equal(result.student.decoder.conv_out.weight, fresh_student.decoder.conv_out.weight)
    assert len(list((output / "checkpoints").glob("step-*"))) == 2  # --keep-checkpoints
    assert d4k.latest_checkpoint(output).name == f"step-{STEPS:08d}"


def test_defaults_train_alternating_as_upstream(gan_run, base3):
    """One optimizer step of the decoder, then one of the discriminator, each over ACCUMULATION
    fresh micro-batches: upstream's generator_step = (micro_step // accumulation) % 2 == 0."""
    result, micro, after_step = gan_run
    upstream = ["G" if (m // ACCUMULATION) % 2 == 0 else "D" for m in range(GAN_STEPS * ACCUMULATION)]
    assert micro == upstream
    assert [r["turn"] for r in result.history] == ["decoder", "discriminator"] * (GAN_STEPS // 2)
    decoder_steps = [r for r in result.history if r["turn"] == "decoder"]
    assert all({"mse", "sc", "gen", "balance"} <= r.keys() for r in decoder_steps)
    assert all(np.isfinite(r["gp"]) and r["gp"] >= 0 for r in result.history if r["turn"] == "discriminator")
    for key in ("mse", "sc"):  # the decoder still learns with the adversarial term on
        before, after = decoder_steps[0][key], np.mean([r[key] for r in decoder_steps[-2:]])
        print(f"{key}: {before:.4g} -> {after:.4g} ({before / after:.2f}x)")
        assert after < before / 1.1, (key, before, after)
    # the decoder changes on its own steps only; the EMA follows every step, as EMAModel.step does
    assert [step for step, _ in after_step] == list(range(GAN_STEPS))
    previous = list(d4k.load_vae(base3, stride=2).decoder.parameters())
    for (step, params), record in zip(after_step, result.history):
        changed = any(not torch.equal(a, b) for a, b in zip(params, previous))
        assert changed == (record["turn"] == "decoder"), step
        previous = params


def test_output_loads_in_ours_and_diffusers(trained):
    from diffusers import AutoencoderKL

    result, output = trained
    config = json.loads((output / "vae" / "config.json").read_text())
    assert config["stride"] == 2 and config["scaling_factor"] == 0.3611 and config["shift_factor"] == 0.1159
    ours = d4k.load_vae(output)
    assert ours.config.stride == 2 and ours.config.scale_factor == 0.3611
    expected = result.student.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in ours.state_dict().items())
    single = d4k.load_vae(output / "ae.safetensors", stride=2)
    assert all(torch.equal(v, expected[k]) for k, v in single.state_dict().items())

    theirs = AutoencoderKL.from_pretrained(output / "vae").eval()  # diffusers ignores "stride": an F8 VAE
    state = theirs.state_dict()
    converted = d4k.to_original_layout(state, d4k.vae_table_for(state), "diffusers")
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    f8 = d4k.load_vae(output, stride=1)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        reference = theirs.decode(z / 0.3611 + 0.1159).sample
        mine = f8.decode(z)
    torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)


def test_resume_continues_identically_with_gan_and_ema(base3, data, tmp_path):
    """Resumed after the decoder's turn (the checkpoint carries the fakes the discriminator's
    next turn is shown) and after the discriminator's; the GAN from step 2 on."""
    gan = ("--resolution", 128, "--batch-size", 1, "--gan-weight", 0.05, "--gan-start", 1, "--ema", 0.9,
           "--lr", 1e-3)
    straight = d4k.train_vae_command(make_args(base3, data, tmp_path / "a", "--steps", 4, *gan))
    assert [r["turn"] for r in straight.history] == ["decoder", "decoder", "discriminator", "decoder"]
    d4k.train_vae_command(make_args(base3, data, tmp_path / "b", "--steps", 2, *gan))
    saved_fakes = d4k.read_vae_checkpoint(tmp_path / "b" / "checkpoints" / "step-00000002")["fakes"]
    assert saved_fakes.shape == (1, 3, 128, 128)
    resumed = [d4k.train_vae_command(make_args(base3, data, tmp_path / "b", "--steps", n, "--resume", *gan))
               for n in (3, 4)]
    assert [r["step"] for run in resumed for r in run.history] == [3, 4]
    assert resumed[0].history + resumed[1].history == straight.history[2:]
    assert {"gen", "balance"} <= straight.history[1].keys() and "gen" not in straight.history[0]
    for key, value in straight.student.decoder.state_dict().items():
        assert torch.equal(resumed[1].student.decoder.state_dict()[key], value), key
    assert all(torch.equal(resumed[1].ema[k], v) for k, v in straight.ema.items())
    saved = [(tmp_path / run / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() for run in ("a", "b")]
    assert saved[0] == saved[1]
    # the EMA decoder, not the raw one, is what was saved
    ema_vae = d4k.load_vae(tmp_path / "a")
    assert torch.equal(ema_vae.decoder.conv_out.weight, straight.ema["conv_out.weight"])
    assert not torch.equal(ema_vae.decoder.conv_out.weight, straight.student.decoder.conv_out.weight)


@pytest.mark.parametrize("mode", ["partitioned", "centred"])
def test_f16_decode_choice_is_the_training_decode(base, two, tmp_path, monkeypatch, mode):
    seen, real = [], d4k.decoder_head

    def recording(h, conv_out, stride, partitioned=False, *rest):
        if stride > 1:  # the F16 student's head
            seen.append(partitioned)
        return real(h, conv_out, stride, partitioned, *rest)

    monkeypatch.setattr(d4k, "decoder_head", recording)
    chosen = ["--f16-decode", mode] if mode == "centred" else []  # partitioned: the default
    result = d4k.train_vae_command(make_args(base, two, tmp_path / "out", "--steps", 1, *chosen))
    assert seen == [mode == "partitioned"] and result.student.decoder.partitioned == (mode == "partitioned")


def test_lpips_term_trains(base, data, tmp_path):
    _, linear, backbone = write_lpips_files(tmp_path)
    args = make_args(base, data, tmp_path / "out", "--steps", 2, "--lpips-weight", 0.1,
                     "--lpips-linear", linear, "--lpips-backbone", backbone, "--posterior", "mean", "--gradient-checkpointing")
    history = d4k.train_vae_command(args).history
    assert all(np.isfinite(r["lpips"]) and r["lpips"] > 0 for r in history)


def test_cli_runs_and_help(base, data, tmp_path, capsys):
    argv = ["--base", str(base), "--data", str(data), "--output", str(tmp_path / "out"), "--resolution", "32",
            "--batch-size", "1", "--grad-accum", "1", "--steps", "1", "--lpips-weight", "0",
            "--gan-weight", "0", "--device", "cpu"]
    assert run_main(argv) == 0
    assert "wrote" in capsys.readouterr().err and d4k.load_vae(tmp_path / "out").config.stride == 2
    help_text = d4k.train_vae_parser().format_help()
    for option in ("--data", "--output", "--base", "--resolution", "--lpips-weight", "--gan-weight", "--ema",
                   "--resume", "--grad-accum", "--f16-decode", "--dtype"):
        assert option in help_text


# ------------------------------------------------------------------------------- bad input


def test_images_that_fail_to_decode_later_are_replaced(tmp_path, data, capsys):
    synthetic_images(tmp_path, 2)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # passes verify()
    stream = d4k.CropStream(d4k.vae_image_files(tmp_path), 32, seed=0, workers=1)
    assert len(stream.files) == 3
    batch = stream.batch(6)
    assert batch.shape == (6, 3, 32, 32) and stream.bad == {[f.name for f in stream.files].index("truncated.jpg")}
    assert capsys.readouterr().err.count("warning:") == 1  # once, then never drawn again


def test_unreadable_images_are_skipped_and_counted(tmp_path, data, capsys):
    for name in ("0.png", "1.png"):
        (tmp_path / name).write_bytes((data / name).read_bytes())
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    files = d4k.vae_image_files(tmp_path)
    err = capsys.readouterr().err
    assert sorted(f.name for f in files) == ["0.png", "1.png"]
    assert err.count("warning:") == 1 and "broken.png" in err and "1 skipped" in err
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "1.png", "text": "x"}\nnot json\n{"file_name": "broken.png"}\n')
    assert [f.name for f in d4k.vae_image_files(tmp_path)] == ["1.png"]
    assert capsys.readouterr().err.count("warning:") == 2


def test_bad_input_gives_one_line_and_exit_2(base, data, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    not_a_vae = tmp_path / "not_a_vae.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(not_a_vae))
    (tmp_path / "taken" / "vae").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    (tmp_path / "previous" / "checkpoints" / "step-00000001").mkdir(parents=True)
    (tmp_path / "previous" / "checkpoints" / "step-00000001" / "state.pt").write_bytes(b"")

    def common(out="out"):
        return ["--base", str(base), "--data", str(data), "--output", str(tmp_path / out), "--device", "cpu", "--lpips-weight", "0"]

    cases = {
        "no such data folder": ["--base", str(base), "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o1")],
        "no usable images": ["--base", str(base), "--data", str(broken), "--output", str(tmp_path / "o2"), "--lpips-weight", "0"],
        "multiple of 16": common() + ["--resolution", "100"],
        "128 or more": common() + ["--resolution", "64", "--gan-weight", "0.05"],
        "EMA off": common() + ["--ema", "1"],
        "argument --ema: must be in [0, 1]": common() + ["--ema", "1.5"],
        "not a 16-channel Flux/SD3 VAE": common("o3") + ["--base", str(not_a_vae)],
        "is not empty": common("taken"),
        "is a file": common("file"),
        "pass --resume": common("previous"),
    }
    for expected, argv in cases.items():
        assert run_main(argv) == 2, expected
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and expected in err[-1], (expected, err)
        assert not (tmp_path / "o3" / "vae").exists()

"""metrics.py against every reference implementation it matches, side by side on the CPU, in one run.

    python tests/benchmarks/bench_metrics.py            # about 9 minutes on a busy 2-core CPU
    python tests/benchmarks/bench_metrics.py --quick    # about 3 minutes: smaller sizes, lighter cases

Each row times one image (or one folder, for the CLI rows) through ours and through the reference,
alternately (interleaved, so that a busy machine slows both alike), --repeats times, and prints the
medians, the ratio ours / reference (below 1: ours is faster) and the largest difference of the
values. Both sides run with --threads torch threads (default 1: a per-core comparison that a shared
machine does not distort; scikit-image and scipy run on one core anyway).

- glcm+cr: Diffusion-4K's eval.py approach (cv2 decode, BGR2GRAY, //4, scikit-image graycomatrix +
  shannon_entropy per 64-px patch, the file size) against Pillow decode + glcm_score + the file size,
  on JPEG-95 files.
- cli d4k: `metrics.py --protocol diffusion4k --metrics glcm,cr` on a folder of JPEG-95 files against
  an eval.py-style script on the same folder (separate processes: wall time, peak resident memory).
- psnr, ssim: scikit-image (structural_similarity with basicsr's settings).
- lpips-alex, lpips-vgg: the lpips package (its im2tensor, the same 512-px tiles and batches), random
  backbone weights and the package's own linear layers, shared with ours.
- niqe: pyiqa's 'niqe' (when installed). fid-inception: torch-fidelity's feature extractor, random
  weights shared. clip-b16: transformers' CLIP vision tower, random weights shared, the same pixels.
- scaling (only when asked: --only scaling): 8 and 32 JPEG-95 images of 1024 px through the CLI and
  the eval.py-style script: wall time, time per added image, peak resident memory.
Images: scikit-image's astronaut photo upscaled (bicubic) to each size, and a noise texture. Missing
references are reported and skipped. Speed is measured here, never asserted in tests.
"""

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import metrics as M  # noqa: E402

ANGLES = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]

# An eval.py-style script (Diffusion-4K's approach, written out here): prints the two numbers.
EVAL_SCRIPT = textwrap.dedent("""\
    import os, sys
    import cv2
    import numpy as np
    from skimage.feature import graycomatrix
    from skimage.measure import shannon_entropy

    root, size, patch = sys.argv[1], int(sys.argv[2]), 64
    scores, sizes = [], []
    for name in sorted(os.listdir(root)):
        grey = cv2.cvtColor(cv2.imread(os.path.join(root, name)), cv2.COLOR_BGR2GRAY) // 4
        tiles = [grey[i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
                 for i in range(size // patch) for j in range(size // patch)]
        angles = [0, np.pi / 4, np.pi / 2, np.pi * 3 / 4]
        scores.append(np.mean([shannon_entropy(graycomatrix(t, [1, 2, 3, 4], angles, levels=64, normed=True))
                               for t in tiles]))
        sizes.append(os.path.getsize(os.path.join(root, name)))
    print(np.mean(scores), size * size * 3 * len(sizes) / np.sum(sizes))
""")


def photo(size):
    from skimage import data

    return np.array(Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC))


def noise(size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def degraded(rgb):
    """The reference side of a full-reference pair: down by 2, up again, plus a little noise."""
    h, w = rgb.shape[:2]
    small = Image.fromarray(rgb).resize((w // 2, h // 2), Image.BICUBIC).resize((w, h), Image.BICUBIC)
    jitter = np.random.default_rng(1).integers(-3, 4, rgb.shape)
    return np.clip(np.asarray(small).astype(int) + jitter, 0, 255).astype(np.uint8)


def interleaved(ours, reference, repeats):
    """Median seconds of each, run alternately after one warm-up call each; and their last values."""
    values = [ours(), reference()]
    times = [[], []]
    for _ in range(repeats):
        for i, fn in enumerate((ours, reference)):
            start = time.perf_counter()
            values[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], values


ROWS = []


def report(metric, size, seconds, values, note=""):
    ours, reference = seconds
    difference = float(np.max(np.abs(np.asarray(values[0], float) - np.asarray(values[1], float))))
    ROWS.append((metric, size, ours, reference, difference, note))
    line = f"{metric:<16} {size:>6} {ours * 1000:>10.0f} {reference * 1000:>10.0f} {ours / reference:>8.2f}"
    print(f"{line} {difference:>10.1e}  {note}", flush=True)


def header(threads):
    print(f"torch {torch.__version__}, {threads} thread(s), {os.cpu_count()} CPUs; times are medians")
    print(f"{'metric':<16} {'px':>6} {'ours ms':>10} {'ref ms':>10} {'ratio':>8} {'max diff':>10}  note")


# ----------------------------------------------------------------------------- the metrics


def bench_glcm(sizes, repeats):
    import cv2
    from skimage.feature import graycomatrix
    from skimage.measure import shannon_entropy

    def reference(data):
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) // 4
        rows, cols = grey.shape[0] // 64, grey.shape[1] // 64
        score = np.mean([shannon_entropy(graycomatrix(grey[i * 64 : i * 64 + 64, j * 64 : j * 64 + 64],
                                                      [1, 2, 3, 4], ANGLES, levels=64, normed=True))
                         for i in range(rows) for j in range(cols)])
        return score, len(data)

    def ours(data):
        return M.glcm_score(Image.open(io.BytesIO(data))), len(data)

    for size in sizes:
        for kind, rgb in (("photo", photo(size)), ("noise", noise(size))):
            data = M.jpeg95(Image.fromarray(rgb))
            seconds, values = interleaved(lambda: ours(data), lambda: reference(data), repeats)
            report("glcm+cr", size, seconds, values, f"{kind}, JPEG-95, function level")


def bench_cli(cases, repeats):
    """`metrics.py --protocol diffusion4k` against the eval.py-style script: wall time and peak RSS."""

    for size, count in cases:
        with tempfile.TemporaryDirectory() as folder:
            images = [photo(size), noise(size)] * count
            for i, rgb in enumerate(images[:count]):
                Image.fromarray(np.roll(rgb, 97 * i, axis=1)).save(f"{folder}/{i:03d}.jpg", quality=95)
            script, out = Path(folder).parent / f"eval_style_{os.getpid()}.py", f"{folder}.json"
            script.write_text(EVAL_SCRIPT)
            ours_argv = [sys.executable, "metrics.py", "--protocol", "diffusion4k", "--metrics", "glcm,cr",
                         "--pred", folder, "--out", out, "--overwrite"]
            theirs_argv = [sys.executable, str(script), folder, str(size)]
            times, memory = [[], []], [[], []]
            for _ in range(repeats):
                for i, argv in enumerate((ours_argv, theirs_argv)):
                    seconds, peak, output = run_child(argv)
                    times[i].append(seconds)
                    memory[i].append(peak)
                    if i == 1:
                        reference = [float(v) for v in output.split()]
            result = json.loads(Path(out).read_text())["metrics"]
            script.unlink()
            Path(out).unlink()
        seconds = [statistics.median(t) for t in times]
        peaks = [max(m) for m in memory]
        note = f"{count} images; peak RSS {peaks[0]:.0f} / {peaks[1]:.0f} MB = {peaks[0] / peaks[1]:.2f}"
        report("cli d4k glcm+cr", size, seconds, [[result["glcm"], result["cr"]], reference], note)


def bench_scaling(size, counts, repeats):
    """A folder run's cost against its number of images: `metrics.py --protocol diffusion4k --metrics
    glcm,cr` and the eval.py-style script on `counts` JPEG-95 images, and metrics.py with psnr,ssim too
    (the folder paired with a copy of itself); the median wall time, the time per added image (the
    slope, free of start-up costs) and the peak resident memory."""
    with tempfile.TemporaryDirectory() as root:
        script = Path(root) / "eval_style.py"
        script.write_text(EVAL_SCRIPT)
        images = [photo(size), noise(size)]
        runs = {}
        for count in counts:
            folder = Path(root) / f"n{count}"
            folder.mkdir()
            for i in range(count):
                rgb = np.roll(images[i % 2], 97 * i, axis=1)
                Image.fromarray(rgb).save(folder / f"{i:03d}.jpg", quality=95)
            out = f"{root}/out.json"
            ours = [sys.executable, "metrics.py", "--protocol", "diffusion4k", "--metrics", "glcm,cr",
                    "--pred", str(folder), "--out", out, "--overwrite"]
            paired = ours[:5] + ["glcm,cr,psnr,ssim", "--ref", str(folder)] + ours[6:]
            for name, argv in (("ours glcm,cr", ours), ("eval.py-style", [sys.executable, str(script),
                               str(folder), str(size)]), ("ours glcm,cr,psnr,ssim", paired)):
                measured = [run_child(argv) for _ in range(repeats)]
                runs[name, count] = (statistics.median(m[0] for m in measured), max(m[1] for m in measured))
    low, high = counts
    for name in ("ours glcm,cr", "eval.py-style", "ours glcm,cr,psnr,ssim"):
        (t_low, m_low), (t_high, m_high) = runs[name, low], runs[name, high]
        slope = (t_high - t_low) / (high - low)
        print(f"{name:<24} {size} px: {low} images {t_low:6.1f} s {m_low:5.0f} MB; {high} images "
              f"{t_high:6.1f} s {m_high:5.0f} MB; {slope * 1000:5.0f} ms per added image", flush=True)


def run_child(argv):
    """Wall seconds and peak resident MB of a child process, measured by GNU time: on Linux a forked
    child's own ru_maxrss starts at the parent's size, which here holds the test images. The child gets
    this process's number of torch threads."""
    threads = str(torch.get_num_threads())
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with tempfile.NamedTemporaryFile("r") as peak:
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", peak.name, *argv], capture_output=True,
                              text=True, cwd=ROOT, env=env)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr[-300:]}")
        return seconds, int(peak.read().split()[-1]) / 1024, done.stdout


def bench_psnr_ssim(sizes, repeats):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    for size in sizes:
        a = photo(size)
        b = degraded(a)
        reference = lambda: peak_signal_noise_ratio(b, a, data_range=255)  # noqa: E731
        seconds, values = interleaved(lambda: M.psnr(a, b), reference, repeats)
        report("psnr", size, seconds, values, "RGB")
        settings = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
                        channel_axis=2)
        reference = lambda: structural_similarity(a, b, **settings)  # noqa: E731
        seconds, values = interleaved(lambda: M.ssim(a, b), reference, repeats)
        report("ssim", size, seconds, values, "RGB, basicsr settings")


def lpips_pair(net, folder):
    """The lpips package's model (random backbone, its own v0.1 linear layers) and ours, same weights."""
    import lpips

    torch.manual_seed(0)
    reference = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    backbone = {}
    for key, value in reference.net.state_dict().items():  # slice{k}.{index}.* -> features.{index}.*
        _, index, kind = key.split(".")
        backbone[f"features.{index}.{kind}"] = value
    torch.save(backbone, f"{folder}/backbone.pth")
    linear = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    return lpips, reference, M.LPIPSMetric.from_pretrained(net, str(linear), f"{folder}/backbone.pth")


def bench_lpips(cases, repeats):
    for net, size in cases:
        with tempfile.TemporaryDirectory() as folder:
            lpips, reference, ours = lpips_pair(net, folder)
        a = photo(size)
        b = degraded(a)

        @torch.no_grad()
        def theirs():
            ta, tb = lpips.im2tensor(a), lpips.im2tensor(b)
            boxes = M.tiles(size, size, 512)
            values = []
            for i in range(0, len(boxes), 8):
                xa, xb = (torch.cat([t[..., r : r + h, c : c + w] for r, c, h, w in boxes[i : i + 8]])
                          for t in (ta, tb))
                values.append(reference(xa, xb).flatten())
            return torch.cat(values).mean().item()

        seconds, values = interleaved(lambda: M.lpips_tiled(ours, a, b, 512), theirs, repeats)
        report(f"lpips-{net}", size, seconds, values, f"{len(M.tiles(size, size, 512))} tiles of 512")


def bench_niqe(sizes, repeats):
    import packaging.version

    sys.modules.setdefault("pkg_resources", types.SimpleNamespace(packaging=packaging))
    from pyiqa.archs.niqe_arch import NIQE
    from scipy.io import savemat

    params = M.niqe_params(str(ROOT / "tests" / "data" / "metrics" / "niqe_pris_params.npz"))
    with tempfile.TemporaryDirectory() as folder:
        savemat(f"{folder}/niqe.mat", {"mu_prisparam": params[0][None], "cov_prisparam": params[1]})
        reference = NIQE(pretrained_model_path=f"{folder}/niqe.mat")
    for size in sizes:
        rgb = photo(size)

        @torch.no_grad()
        def theirs():
            return reference(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255).item()

        seconds, values = interleaved(lambda: M.niqe(rgb, params), theirs, repeats)
        report("niqe", size, seconds, values, "pyiqa convention")


def randomise(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.fill_(1.0)
                m.running_mean.zero_()
                m.weight.fill_(1.0)
    return module.eval()


def bench_inception(sizes, repeats):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ours = randomise(M.InceptionV3())
    with tempfile.TemporaryDirectory() as folder:
        state = ours.state_dict()
        state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
        torch.save(state, f"{folder}/w.pth")
        reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                feature_extractor_weights_path=f"{folder}/w.pth").eval()
        ours = M.InceptionV3.from_pretrained(f"{folder}/w.pth")  # as the CLI loads it
    for size in sizes:
        rgb = photo(size)

        @torch.no_grad()
        def theirs():
            return reference(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0][0].numpy()

        seconds, values = interleaved(lambda: M.fid_features(ours, rgb)[0].numpy(), theirs, repeats)
        report("fid-inception", size, seconds, values, "pool3 features, tf1 resize; random weights")


def bench_clip(repeats):
    import transformers

    width, layers, heads, patch, embed = 768, 12, 12, 16, 512
    config = transformers.CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width,
                                           num_hidden_layers=layers, num_attention_heads=heads,
                                           patch_size=patch, image_size=224, projection_dim=embed)
    reference = transformers.CLIPVisionModelWithProjection(config).eval()
    ours = M.ClipVisionTower(M.ClipTowerConfig(width, layers, heads), patch, 224, embed)
    state = M.clip_state_from_transformers(reference.state_dict())
    ours.load_state_dict({k.removeprefix("vision."): v for k, v in state.items()})
    pixels = M.clip_preprocess(Image.fromarray(photo(1024)), 224)[None]
    with torch.no_grad():
        seconds, values = interleaved(lambda: ours.eval()(pixels)[0].numpy(),
                                      lambda: reference(pixel_values=pixels).image_embeds[0].numpy(), repeats)
    report("clip-b16", 224, seconds, values, "image tower, same pixels; random weights")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer cases (about 3 minutes)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    parser.add_argument("--only", default="glcm,cli,psnr,lpips,niqe,fid,clip",
                        help="comma list of glcm, cli, psnr (with ssim), lpips, niqe, fid, clip, and "
                        "scaling (not by default: 8 and 32 images through the CLI, a few minutes)")
    args = parser.parse_args()
    import conftest  # noqa: F401  (makes the CUDA torchvision wheel importable on CPU torch: lpips, pyiqa)

    torch.set_num_threads(args.threads)
    header(args.threads)
    quick, parts = args.quick, args.only.split(",")
    cases = {
        "glcm": lambda: bench_glcm([1024, 2048] if quick else [1024, 2048, 4096], args.repeats),
        "cli": lambda: bench_cli([(1024, 4)] if quick else [(2048, 4), (4096, 2)], args.repeats),
        "psnr": lambda: bench_psnr_ssim([1024, 2048], args.repeats),
        "lpips": lambda: bench_lpips([("alex", 1024), ("vgg", 512)] if quick else
                                     [("alex", 1024), ("alex", 2048), ("vgg", 512)], args.repeats),
        "niqe": lambda: bench_niqe([1024] if quick else [1024, 2048], args.repeats),
        "fid": lambda: bench_inception([1024], args.repeats),
        "clip": lambda: bench_clip(args.repeats),
        "scaling": lambda: bench_scaling(1024, (8, 32), 2 if quick else 3),
    }
    for name in parts:
        try:
            cases[name]()
        except ImportError as error:
            print(f"{name}: reference not available ({error}); skipped")
    ratios = [ours / reference for _, _, ours, reference, _, _ in ROWS]
    if ratios:
        print(f"largest ratio ours / reference: {max(ratios):.2f}")


if __name__ == "__main__":
    main()

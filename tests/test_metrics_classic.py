"""metrics.py, the metrics without networks: GLCM Score, Compression Ratio, PSNR, SSIM, the
Frechet distance, each against its reference implementation or published value (the
periodicity statistic: tests/test_metrics_periodicity.py)."""

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

import metrics as M

DATA = Path(__file__).parent / "data" / "metrics"
TID = DATA / "tid2013"
TID_NAMES = ["I03", "I04", "I06", "I08", "I19"]
# IQA-PyTorch ResultsCalibra/results_official.csv (chaofengc/IQA-PyTorch@01ae427): the official
# scores of these TID2013 pairs, PSNR from scikit-image on RGB and SSIM from the MATLAB ssim.m
# on rounded rgb2gray without downsampling.
OFFICIAL_PSNR = [21.11, 20.99, 27.01, 23.30, 21.62]
OFFICIAL_SSIM = [0.6993, 0.9978, 0.9989, 0.9669, 0.6519]


def rgb(name, folder):
    return np.asarray(Image.open(TID / folder / f"{name}.png").convert("RGB"))


def textured(h=192, w=256, seed=0):
    """A deterministic natural-ish test image: smooth gradients, edges and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / 17.0)[..., None] * np.cos(y / 23.0)[..., None] * np.array([1.0, 0.7, 0.4])
    base += (x > w // 2)[..., None] * 40 + rng.normal(0, 12, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- GLCM and CR


def test_grey_conversion_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    image = np.concatenate([rng.integers(0, 256, (64, 256, 3)), textured(64, 256)]).astype(np.uint8)
    # all 2^24 colours would be the full proof; a dense random sample plus the extremes is enough here
    assert np.array_equal(M.grey_opencv(image), cv2.cvtColor(np.ascontiguousarray(image[..., ::-1]), cv2.COLOR_BGR2GRAY))


def test_pillow_decodes_jpeg95_like_opencv():
    """Diffusion-4K decodes its JPEGs with cv2.imread; the CLI decodes with Pillow."""
    cv2 = pytest.importorskip("cv2")
    encoded = M.jpeg95(Image.fromarray(textured()))
    ours = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    theirs = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert np.array_equal(ours, theirs)


def skimage_patch_score(q, prop="entropy"):
    from skimage.feature import graycomatrix, graycoprops
    from skimage.measure import shannon_entropy

    g = graycomatrix(q, [1, 2, 3, 4], [0, np.pi / 4, np.pi / 2, np.pi * 3 / 4], levels=64, normed=True)
    return shannon_entropy(g) if prop == "entropy" else np.mean(graycoprops(g, prop).round(4))


def test_glcm_bit_exact_against_scikit_image():
    feature = pytest.importorskip("skimage.feature")
    rng = np.random.default_rng(2)
    q = M.grey_opencv(textured(128, 128)) >> 2
    patches = [q[:64, :64], q[64:, 64:], rng.integers(0, 64, (64, 64)).astype(np.uint8), np.full((64, 64), 7, np.uint8), q[:64, 64:] // 16]
    for patch in patches:
        reference = feature.graycomatrix(patch, [1, 2, 3, 4], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=64, normed=True)
        normed = M.glcm_counts(patch[None])[0] / M.glcm_pair_counts(*patch.shape)[:, None, None]
        normed = normed.reshape(4, 4, 64, 64).transpose(2, 3, 0, 1)  # (levels, levels, distances, angles)
        assert np.array_equal(normed, reference)  # bit-exact, including dtype and layout
        ours = M.glcm_entropy(patch[None])[0]
        assert abs(ours - skimage_patch_score(patch)) < 1e-12


def test_glcm_known_values():
    flat = np.full((64, 64, 3), 200, np.uint8)
    assert M.glcm_score(flat) == pytest.approx(0.0032818649698048933, abs=1e-14)
    # uniformly random 64-level patches: ~3.5346 (notes), the image mean over 64 patches
    rng = np.random.default_rng(0)
    noise = (rng.integers(0, 64, (512, 512)) * 4).astype(np.uint8)
    assert M.glcm_score(np.repeat(noise[..., None], 3, 2)) == pytest.approx(3.5346, abs=0.01)


@pytest.mark.parametrize("prop", ["contrast", "homogeneity", "energy", "correlation", "ASM", "dissimilarity"])
def test_glcm_props_match_scikit_image(prop):
    pytest.importorskip("skimage")
    image = textured(128, 192)
    q = M.grey_opencv(image) >> 2
    reference = np.mean([skimage_patch_score(q[r : r + 64, c : c + 64], prop) for r in (0, 64) for c in (0, 64, 128)])
    assert M.glcm_score(image, prop=prop) == pytest.approx(reference, abs=1e-12)


def test_glcm_score_non_square_and_diffusion4k_loop():
    """The patch grid is floor(H/64) x floor(W/64), in Diffusion-4K's row-major order."""
    pytest.importorskip("skimage")
    image = textured(150, 200)  # 2 x 3 patches, remainders dropped
    q = M.grey_opencv(image) >> 2
    reference = np.mean([skimage_patch_score(q[i * 64 : i * 64 + 64, j * 64 : j * 64 + 64]) for i in range(2) for j in range(3)])
    assert abs(M.glcm_score(image) - reference) < 1e-12
    with pytest.raises(ValueError, match="smaller than one"):
        M.glcm_score(textured(40, 200))


def test_compression_ratio_is_aggregate():
    sizes, shapes = [100, 300], [(10, 10), (10, 10)]
    assert M.compression_ratio(sizes, shapes) == 600 / 400  # not mean(300/100, 300/300) = 2
    image = Image.fromarray(textured())
    encoded = M.jpeg95(image)
    reloaded = Image.open(io.BytesIO(encoded))
    assert reloaded.format == "JPEG" and JpegImagePlugin.get_sampling(reloaded) == 2  # 4:2:0, Pillow's default


# ----------------------------------------------------------------------------- PSNR and SSIM


def test_psnr_ssim_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = textured(seed=0), textured(seed=1)
    assert M.psnr(a, b) == pytest.approx(metrics.peak_signal_noise_ratio(b, a, data_range=255), abs=1e-10)
    reference = metrics.structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=2
    )
    ours = M.ssim(a, b)
    print(f"[parity] ssim vs skimage: {abs(ours - reference):.3e}")
    assert ours == pytest.approx(reference, abs=1e-10)
    # Y channel with border crop against the same references on the converted arrays
    ya, yb = M.y_channel(a)[4:-4, 4:-4], M.y_channel(b)[4:-4, 4:-4]
    assert M.psnr(a, b, 4, "y") == pytest.approx(metrics.peak_signal_noise_ratio(yb, ya, data_range=255), abs=1e-10)
    ref_y = metrics.structural_similarity(ya, yb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    assert M.ssim(a, b, 4, "y") == pytest.approx(ref_y, abs=1e-10)


def test_y_channel_is_basicsr_bt601():
    # basicsr's bgr2ycbcr(y_only=True) on the three primaries and white: 16 + (65.481, 128.553, 24.966), 235
    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    assert np.allclose(M.y_channel(primaries), [[81.481, 144.553, 40.966, 235.0]])


def test_psnr_ssim_published_values():
    """The official scores of five TID2013 pairs shipped with IQA-PyTorch (2 decimals / 4 decimals)."""
    for name, want_psnr, want_ssim in zip(TID_NAMES, OFFICIAL_PSNR, OFFICIAL_SSIM):
        dist, ref = rgb(name, "dist"), rgb(name, "ref")
        assert round(M.psnr(dist, ref), 2) == want_psnr
        assert round(M.ssim(dist, ref, mode="gray"), 4) == want_ssim


def test_psnr_identical_and_size_mismatch():
    a = textured()
    assert M.psnr(a, a) == math.inf and M.ssim(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sizes differ"):
        M.psnr(a, a[:-1])


# ----------------------------------------------------------------------------- FID statistics


def scipy_frechet(mu1, s1, mu2, s2):
    """pytorch-fid's calculate_frechet_distance, the reference formula."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("n", [40, 400])  # rank-deficient (n < d) and full-rank covariances
def test_frechet_distance_matches_scipy(n, capsys):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(n)
    d = 64
    mix = rng.normal(size=(d, d)) / 4
    f1, f2 = rng.normal(size=(n, d)) @ mix, rng.normal(size=(n, d)) @ mix * 1.1 + 0.3
    stats = [M.FeatureStats(), M.FeatureStats()]
    stats[0].update(torch.from_numpy(f1[: n // 2]))
    stats[0].update(torch.from_numpy(f1[n // 2 :]))  # streaming in two chunks
    stats[1].update(torch.from_numpy(f2))
    mu1, s1 = stats[0].mean_cov()
    assert np.allclose(mu1.numpy(), f1.mean(0)) and np.allclose(s1.numpy(), np.cov(f1, rowvar=False))
    reference = scipy_frechet(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    ours = M.fid_from_stats(*stats)
    assert ("needs at least 65" in capsys.readouterr().err) == (n <= d)
    print(f"[parity] frechet n={n}: ours {ours:.10f} scipy {reference:.10f} rel {abs(ours - reference) / reference:.2e}")
    assert ours == pytest.approx(reference, rel=1e-7)


def test_fid_crops_grid_and_half_shift():
    x = torch.arange(600 * 520, dtype=torch.float32).view(1, 1, 600, 520).expand(1, 3, -1, -1)
    assert len(M.fid_crops(x, 256, False)) == 2 * 2
    crops = M.fid_crops(x, 256, True)
    assert len(crops) == 4 + 1  # shifted grid starts at 128: rows 128 only (128+256 <= 600, 384+256 > 600), cols 128 only
    assert torch.equal(crops[-1], x[..., 128:384, 128:384][0])

"""The F16 VAE's last stage against upstream Diffusion-4K's partitioned decode.

Upstream (`vae.py`, `Decoder.forward(partitioned=True)`, the default of its pipelines and of SC-VAE
training) runs nearest x2 + `conv_out` on a 2x2 grid of partitions of the H/2 feature map, each
with a one-pixel overlap, zero padding on its outer side only, and a one-pixel crop.
`upstream_partitioned` below is an independent port of that loop, kept literal on purpose.
"""

import pytest
import torch
import torch.nn.functional as F

import diffusion4k as d4k


def upstream_partitioned(h, conv_out, stride=2):
    overlap = 1
    part_h, part_w = h.shape[2] // stride, h.shape[3] // stride
    rows = []
    for i in range(0, h.shape[2], part_h):
        row = []
        for j in range(0, h.shape[3], part_w):
            tile = h[:, :, max(i - overlap, 0) : min(i + part_h + overlap, h.shape[2]),
                     max(j - overlap, 0) : min(j + part_w + overlap, h.shape[3])]
            left, right = (1, 0) if j == 0 else (0, 1)  # F.pad order: left, right, top, bottom
            top, bottom = (1, 0) if i == 0 else (0, 1)
            tile = F.pad(tile, (left, right, top, bottom))
            tile = conv_out(F.interpolate(tile, scale_factor=stride, mode="nearest"))
            row.append(tile[:, :, overlap : part_h * 2 + overlap, overlap : part_w * 2 + overlap])
        rows.append(torch.cat(row, dim=3))
    return torch.cat(rows, dim=2)


def decoder():
    torch.manual_seed(0)
    config = d4k.VAEConfig(base_channels=32, channel_multipliers=(1, 2), num_res_blocks=1, z_channels=4, stride=2)
    return d4k.Decoder(config)


# Feature maps of the F16 decoder are 8x the latent, so always even; 2x2 to 64x40 covers one-row
# bands, bands that straddle the partition line and non-square maps.
@pytest.mark.parametrize("rows, cols", [(2, 2), (8, 8), (16, 10), (24, 40), (64, 40)])
@pytest.mark.parametrize("band_rows", [1, 3, 64])
def test_default_decode_is_upstreams_partitioned_output(rows, cols, band_rows):
    head = decoder()
    h = torch.randn(2, 32, rows, cols, generator=torch.Generator().manual_seed(rows * cols))
    with torch.no_grad():
        expected = upstream_partitioned(h, head.conv_out)
        ours = d4k.decoder_head(h, head.conv_out, 2, head.partitioned, band_rows)
    assert ours.shape == expected.shape == (2, 3, 2 * rows, 2 * cols)
    error = (ours - expected).abs().max().item()
    assert error <= 1e-5, f"partitioned decode differs from upstream's loop by {error:.2e} (> fp32 rounding)"


@pytest.mark.parametrize("band_rows", [1, 2, 3, 64])
def test_centred_decode_is_the_full_upsample_and_partitioned_is_it_shifted(band_rows):
    """The banded `decoder_head` computes the whole-map F16 head (nearest x2, then conv_out),
    centred or shifted."""
    head = decoder()
    h = torch.randn(2, 32, 12, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = head.conv_out(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # the definition
        assert torch.equal(d4k.decoder_head(h, head.conv_out, 1), head.conv_out(h))  # F8: conv_out
        centred = d4k.decoder_head(h, head.conv_out, 2, False, band_rows)
        shifted = d4k.decoder_head(h, head.conv_out, 2, True, band_rows)
    # A band is a smaller convolution, which the CPU kernels may block and sum in another order.
    assert torch.allclose(centred, full, rtol=0, atol=1e-5)
    # The partitioned output is the centred one moved one pixel down and right; its first row and
    # column see the zero border instead.
    assert torch.allclose(shifted[..., 1:, 1:], full[..., :-1, :-1], rtol=0, atol=1e-5)
    assert not torch.allclose(shifted[..., 0, :], full[..., 0, :], atol=1e-3)


def test_whole_decoder_uses_the_partitioned_head_by_default():
    head = decoder()
    z = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = head.features(z)
        assert torch.allclose(head(z), upstream_partitioned(features, head.conv_out), rtol=0, atol=1e-5)

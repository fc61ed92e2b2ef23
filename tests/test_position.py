"""Position functions of the reference model against closed forms written with math.sin/cos loops."""

from __future__ import annotations

import math

import pytest
import torch

from reference.torch_model import feature_mask, inverse_sigmoid, mask2pos, pos2posemb1d, pos2posemb2d


def padded_mask(h: int, w: int, valid: tuple[int, int]) -> torch.Tensor:
    m = torch.ones(h, w, dtype=torch.bool)
    m[: valid[0], : valid[1]] = False
    return m


def sine_closed_form(p: float, d: int) -> list[float]:
    out = []
    for i in range(d):
        angle = 2 * math.pi * p / 10000 ** (2 * (i // 2) / d)
        out.append(math.sin(angle) if i % 2 == 0 else math.cos(angle))
    return out


@pytest.mark.parametrize("h,w,valid", [(7, 9, (7, 9)), (7, 9, (5, 4)), (12, 5, (1, 5)), (4, 6, (4, 1))])
def test_mask2pos_normalises_by_the_valid_size(h, w, valid):
    pos_col, pos_row = mask2pos(padded_mask(h, w, valid)[None])
    assert pos_col.shape == (1, h) and pos_row.shape == (1, w)
    hv, wv = valid
    # Pixel centres of the valid area in (0, 1); padded cells keep the last valid value.
    expect_col = [(min(y, hv - 1) + 0.5) / hv for y in range(h)]
    expect_row = [(min(x, wv - 1) + 0.5) / wv for x in range(w)]
    torch.testing.assert_close(pos_col[0], torch.tensor(expect_col), atol=1e-7, rtol=0)
    torch.testing.assert_close(pos_row[0], torch.tensor(expect_row), atol=1e-7, rtol=0)


def test_mask2pos_reads_first_row_and_column_per_image():
    masks = torch.stack([padded_mask(6, 8, (6, 8)), padded_mask(6, 8, (3, 5))])
    pos_col, pos_row = mask2pos(masks)
    torch.testing.assert_close(pos_col[1, :3], torch.tensor([0.5, 1.5, 2.5]) / 3)
    torch.testing.assert_close(pos_row[1, :5], torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5]) / 5)
    torch.testing.assert_close(pos_row[0], (torch.arange(8) + 0.5) / 8)


@pytest.mark.parametrize("d", [256, 128, 8])
def test_pos2posemb1d_matches_closed_form(d):
    pos = torch.tensor([0.0, 0.013, 0.25, 0.5, 0.77, 0.999])
    emb = pos2posemb1d(pos, d)
    assert emb.shape == (6, d)
    expect = torch.tensor([sine_closed_form(float(p), d) for p in pos])
    # float32 angles up to 2*pi: a few ulps of the angle
    torch.testing.assert_close(emb, expect, atol=2e-6, rtol=0)


def test_pos2posemb2d_is_y_then_x():
    pts = torch.tensor([[0.1, 0.9], [0.7, 0.3], [0.5, 0.5]])
    emb = pos2posemb2d(pts)
    assert emb.shape == (3, 256)
    expect = torch.tensor([sine_closed_form(float(y), 128) + sine_closed_form(float(x), 128) for x, y in pts])
    torch.testing.assert_close(emb, expect, atol=2e-6, rtol=0)


def test_pos2posemb_keeps_leading_dims():
    pos = torch.rand(2, 3, 5)
    assert pos2posemb1d(pos).shape == (2, 3, 5, 256)
    assert pos2posemb2d(torch.rand(2, 4, 2)).shape == (2, 4, 256)


def test_inverse_sigmoid_closed_form_and_clamps():
    x = torch.tensor([-0.5, 0.0, 1e-7, 0.2, 0.5, 0.9, 1.0, 1.5])
    eps = 1e-5

    def closed(v: float) -> float:
        v = min(max(v, 0.0), 1.0)
        return math.log(max(v, eps) / max(1 - v, eps))

    torch.testing.assert_close(inverse_sigmoid(x), torch.tensor([closed(float(v)) for v in x]), atol=1e-5, rtol=1e-6)
    inner = torch.tensor([0.05, 0.3, 0.95])
    torch.testing.assert_close(inverse_sigmoid(inner).sigmoid(), inner)


@pytest.mark.parametrize("size,feat,valid", [((96, 128), (6, 8), (70, 100)), ((100, 75), (7, 5), (61, 75)),
                                             ((800, 1216), (50, 76), (800, 1199))])
def test_feature_mask_is_nearest_sampling(size, feat, valid):
    """Feature cell (i, j) takes the image pixel (floor(i*H/h), floor(j*W/w)): the form the builder uses."""
    mask = padded_mask(*size, valid)[None]
    got = feature_mask(mask, feat)[0]
    (H, W), (h, w) = size, feat
    expect = torch.tensor([[bool(mask[0, i * H // h, j * W // w]) for j in range(w)] for i in range(h)])
    assert torch.equal(got, expect)

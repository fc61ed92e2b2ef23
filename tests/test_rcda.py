"""Attention of the reference model against independent formulations.

RCDA factorises a 2-D attention: logits of key (y, x) are the sum of a row logit (x) and a column logit
(y), so the softmax over all h*w keys is the product of the two 1-D softmaxes. The dense form below
computes that 2-D softmax directly, one head at a time with explicit loops over heads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.config import AnchorDETRConfig
from reference.torch_model import RCDA, MultiheadAttention, multihead_attention, rcda
from weights import naming

NHEADS = 4


def rect_mask(b: int, h: int, w: int, valid: list[tuple[int, int]]) -> torch.Tensor:
    m = torch.ones(b, h, w, dtype=torch.bool)
    for i, (hv, wv) in enumerate(valid):
        m[i, :hv, :wv] = False
    return m


def dense_rcda(q_row, q_col, k_row, k_col, v, mask, nheads):
    """2-D softmax over every key (y, x) with logit = row logit(x) + column logit(y)."""
    b, nq, c = q_row.shape
    _, h, w, _ = v.shape
    d = c // nheads
    kr, kc = k_row.mean(1), k_col.mean(2)  # pooled over all rows / columns, padding included
    out = torch.zeros(b, nq, c, dtype=torch.float64)
    for n in range(nheads):
        s = slice(n * d, (n + 1) * d)
        row = q_row[..., s].double() @ kr[..., s].double().transpose(1, 2) / d**0.5  # (b,Q,w)
        col = q_col[..., s].double() @ kc[..., s].double().transpose(1, 2) / d**0.5  # (b,Q,h)
        logits = col[:, :, :, None] + row[:, :, None, :]  # (b,Q,h,w)
        if mask is not None:
            logits = logits.masked_fill(mask[:, None], float("-inf"))
        weights = logits.flatten(2).softmax(-1)  # over all h*w keys
        out[..., s] = weights @ v[..., s].double().flatten(1, 2)
    return out.float()


def peaked_inputs(b, nq, h, w, c, seed):
    g = torch.Generator().manual_seed(seed)
    # Scale 3 makes logits of std ~9 (peaked softmax), so a wrong pairing of keys shows.
    q_row, q_col = (3 * torch.randn(b, nq, c, generator=g) for _ in range(2))
    k_row, k_col, v = (torch.randn(b, h, w, c, generator=g) for _ in range(3))
    k_row, k_col = 3 * k_row, 3 * k_col
    return q_row, q_col, k_row, k_col, v


@pytest.mark.parametrize("h,w", [(5, 7), (8, 3), (4, 4)])
def test_rcda_equals_dense_2d_attention(h, w):
    args = peaked_inputs(2, 11, h, w, 32, seed=h * 10 + w)
    mask = rect_mask(2, h, w, [(h, w), (h - 1, max(w - 2, 1))])
    got = rcda(*args, mask, NHEADS)
    torch.testing.assert_close(got, dense_rcda(*args, mask, NHEADS), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(rcda(*args, None, NHEADS), dense_rcda(*args, None, NHEADS), atol=2e-5, rtol=1e-5)
    # The mask matters here: the test would notice it being ignored.
    assert (got[1] - rcda(*args, None, NHEADS)[1]).abs().max() > 1e-2


def test_rcda_ignores_values_under_the_mask_but_pools_padded_keys():
    h, w = 6, 7
    q_row, q_col, k_row, k_col, v = peaked_inputs(1, 9, h, w, 32, seed=5)
    mask = rect_mask(1, h, w, [(4, 5)])
    base = rcda(q_row, q_col, k_row, k_col, v, mask, NHEADS)

    v2 = v.clone()
    v2[mask] = 100.0
    torch.testing.assert_close(rcda(q_row, q_col, k_row, k_col, v2, mask, NHEADS), base)

    # Row keys are averaged over all h rows, padded rows included (official behaviour): keys under
    # padded rows still move the result although those rows themselves get no weight.
    k_row2 = k_row.clone()
    k_row2[:, 4:] += 5 * torch.randn(2, w, 32, generator=torch.Generator().manual_seed(6))
    assert (rcda(q_row, q_col, k_row2, k_col, v, mask, NHEADS) - base).abs().max() > 1e-2


def test_multihead_attention_equals_torch():
    g = torch.Generator().manual_seed(0)
    b, nq, nk, c = 2, 5, 9, 32
    q, k, v = (torch.randn(b, n, c, generator=g) * 3 for n in (nq, nk, nk))
    mask = torch.zeros(b, nk, dtype=torch.bool)
    mask[1, 6:] = True
    eye, zero = torch.eye(c), torch.zeros(c)
    ref, _ = F.multi_head_attention_forward(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), c, NHEADS,
        torch.cat([eye, eye, eye]), torch.zeros(3 * c), None, None, False, 0.0, eye, zero,
        training=False, key_padding_mask=mask, need_weights=False,
    )
    torch.testing.assert_close(multihead_attention(q, k, v, mask, NHEADS), ref.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_multihead_attention_module_matches_torch_module():
    """Same parameter names and packing as torch.nn.MultiheadAttention, so checkpoints load into both."""
    torch.manual_seed(1)
    theirs = torch.nn.MultiheadAttention(32, NHEADS).eval()
    ours = MultiheadAttention(32, NHEADS)
    ours.load_state_dict(theirs.state_dict())
    q, k = torch.randn(2, 5, 32), torch.randn(2, 8, 32)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 5:] = True
    with torch.no_grad():
        ref = theirs(q.transpose(0, 1), k.transpose(0, 1), k.transpose(0, 1), key_padding_mask=mask)[0]
        torch.testing.assert_close(ours(q, k, k, mask), ref.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_rcda_module_uses_the_builder_slices():
    """in_proj row blocks are q_row, q_col, k_row, k_col, v: the slices weights.naming gives the builder."""
    cfg = AnchorDETRConfig(d_model=64, nheads=4, enc_layers=0, dec_layers=1)
    g = torch.Generator().manual_seed(2)
    attn = RCDA(64, 4)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in attn.state_dict().items()}
    attn.load_state_dict(sd)
    prefix = "transformer.decoder_layers.0.cross_attn"
    full = {f"{prefix}.{k}": v for k, v in sd.items()}
    # the decoder layer's self-attention is sliced too; it only has to be present
    full.update({f"transformer.decoder_layers.0.self_attn.{k}": v for k, v in MultiheadAttention(64, 4).state_dict().items()})
    sliced = naming.to_builder(full, cfg)
    h, w = 4, 6
    inputs = peaked_inputs(1, 7, h, w, 64, seed=3)
    mask = rect_mask(1, h, w, [(3, 5)])
    projected = [F.linear(x, sliced[f"{prefix}.{name}.weight"], sliced[f"{prefix}.{name}.bias"])
                 for name, x in zip(naming.RCDA_PROJ, inputs)]
    expect = F.linear(dense_rcda(*projected, mask, 4), sliced[f"{prefix}.out_proj.weight"], sliced[f"{prefix}.out_proj.bias"])
    with torch.no_grad():
        torch.testing.assert_close(attn(*inputs, mask), expect, atol=1e-4, rtol=1e-5)

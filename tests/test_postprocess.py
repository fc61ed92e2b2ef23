"""runtime.postprocess against an independent PyTorch formulation and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.postprocess import postprocess, top_k_flat_indices, top_k_indices


def torch_postprocess(logits, boxes, sizes, k=100):
    """The official recipe written with torch ops: sigmoid, topk over Q*C, gather, cxcywh->xyxy, scale."""
    logits, boxes, sizes = torch.from_numpy(logits), torch.from_numpy(boxes), torch.from_numpy(sizes)
    prob = logits.sigmoid()
    batch, _, num_classes = logits.shape
    scores, index = prob.flatten(1).topk(k, dim=1)
    query = torch.div(index, num_classes, rounding_mode="floor")
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    picked = torch.gather(xyxy, 1, query[..., None].expand(-1, -1, 4))
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], 1).to(torch.float32)
    return scores.numpy(), (index % num_classes).numpy(), (picked * scale[:, None]).numpy()


def random_outputs(seed, batch=2, queries=900, classes=91):
    rng = np.random.default_rng(seed)
    logits = rng.normal(-4, 2, (batch, queries, classes)).astype(np.float32)
    boxes = rng.uniform(0.05, 0.95, (batch, queries, 4)).astype(np.float32)
    sizes = rng.integers(100, 1400, (batch, 2))
    return logits, boxes, sizes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torch_formulation(seed):
    logits, boxes, sizes = random_outputs(seed)
    ours = postprocess(logits, boxes, sizes)
    scores, labels, pixels = torch_postprocess(logits, boxes, sizes)
    for b, result in enumerate(ours):
        assert result["scores"].dtype == np.float32 and result["labels"].dtype == np.int64
        np.testing.assert_array_equal(result["labels"], labels[b])
        np.testing.assert_allclose(result["scores"], scores[b], rtol=1e-6, atol=0)
        np.testing.assert_allclose(result["boxes"], pixels[b], rtol=1e-6, atol=1e-4)
        assert np.all(np.diff(result["scores"]) <= 0)


def test_hand_computed_small_case():
    # Q=2 queries, C=3 classes; flat order q0c0 q0c1 q0c2 q1c0 q1c1 q1c2
    logits = np.array([[[0.0, 2.0, -1.0], [3.0, -2.0, 1.0]]], dtype=np.float32)
    boxes = np.array([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]], dtype=np.float32)
    (result,) = postprocess(logits, boxes, np.array([[100, 200]]), k=3)  # h=100, w=200
    np.testing.assert_array_equal(result["labels"], [0, 1, 2])  # logits 3 (q1), 2 (q0), 1 (q1)
    np.testing.assert_allclose(result["scores"], 1 / (1 + np.exp(-np.array([3.0, 2.0, 1.0]))), rtol=1e-6)
    q1 = [0.0 * 200, 0.5 * 100, 0.5 * 200, 1.0 * 100]
    q0 = [0.4 * 200, 0.3 * 100, 0.6 * 200, 0.7 * 100]
    np.testing.assert_allclose(result["boxes"], [q1, q0, q1], atol=1e-4)


def test_ties_are_ordered_by_index_and_scores_match_torch():
    logits, boxes, sizes = random_outputs(3, batch=1)
    # 150 saturated entries: all score exactly 1.0 in float32, more than k, so the choice among them matters.
    tied = np.random.default_rng(4).choice(logits.size, 150, replace=False)
    logits.reshape(-1)[tied] = 40.0
    (ours,) = postprocess(logits, boxes, sizes)
    scores, _, _ = torch_postprocess(logits, boxes, sizes)
    expected = np.sort(tied)[:100]  # lowest flat indices first
    np.testing.assert_array_equal(ours["labels"], expected % 91)
    cx, cy, w, h = boxes[0, expected // 91].T
    (height, width), = sizes
    xyxy = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)
    np.testing.assert_allclose(ours["boxes"], xyxy, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(ours["scores"], scores[0])  # all 1.0, same values as torch.topk


def test_logit_ranking_breaks_float32_score_ties():
    # Both saturate to score 1.0 in float32, but the larger logit is the better detection.
    logits = np.full((1, 3, 2), -10.0, dtype=np.float32)
    logits[0, 0, 1], logits[0, 2, 0] = 20.0, 30.0
    boxes = np.full((1, 3, 4), 0.5, dtype=np.float32)
    (result,) = postprocess(logits, boxes, np.array([[10, 10]]), k=2)
    assert result["scores"].tolist() == [1.0, 1.0]
    np.testing.assert_array_equal(result["labels"], [0, 1])  # query 2 (logit 30) before query 0 (logit 20)


def test_top_k_indices_deterministic_at_boundary():
    values = np.array([5, 1, 3, 3, 3, 0, 3], dtype=np.float32)
    np.testing.assert_array_equal(top_k_indices(values, 3), [0, 2, 3])
    np.testing.assert_array_equal(top_k_indices(values, 10), [0, 2, 3, 4, 6, 1, 5])


def test_k_is_capped_and_bad_shapes_refused():
    logits, boxes, sizes = random_outputs(5, batch=1, queries=4, classes=5)
    (result,) = postprocess(logits, boxes, sizes, k=100)
    assert len(result["scores"]) == 20
    with pytest.raises(ValueError, match="orig_sizes"):
        postprocess(logits, boxes, np.array([100, 200]))
    with pytest.raises(ValueError, match="boxes"):
        postprocess(logits, boxes[:, :3], sizes)


@pytest.mark.parametrize("ties", [False, True])
def test_query_pruned_top_k_equals_the_full_selection(ties):
    # The pruning by per-query maxima must pick the same indices in the same order as the selection over all
    # Q*C values, ties included (small integer logits tie everywhere), for k below, at and above Q.
    rng = np.random.default_rng(7)
    for _ in range(200):
        q, c = int(rng.integers(1, 40)), int(rng.integers(1, 12))
        k = int(rng.integers(1, q * c + 3))
        x = rng.integers(-2, 3, (q, c)).astype(np.float32) if ties else rng.standard_normal((q, c), dtype=np.float32)
        np.testing.assert_array_equal(top_k_flat_indices(x, k), top_k_indices(x.reshape(-1), k))

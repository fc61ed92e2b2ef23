"""AnchorDETR post-processing in NumPy: the official top-k over queries x classes.

The runtime and the COCO evaluation share this module, so it needs nothing beyond NumPy.

Ranking and ties: candidates are ranked by their logit, which orders them exactly as the sigmoid
scores do (sigmoid is monotone) but without the float32 rounding that makes large logits collide at a
score of 1.0. Equal logits are ordered by their flat index (query-major, then class), lowest first.
`torch.topk` documents no order for equal values and in practice returns them in an order that depends
on the sort algorithm and the device, so where the official code and this module can differ is only
among candidates whose float32 scores are equal; the set and the scores of the detections are the same.
"""

from __future__ import annotations

import numpy as np

from core.config import NUM_TOPK as TOP_K


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function in the input's float dtype, without overflow warnings for large |x|."""
    x = np.asarray(x)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    cx, cy, w, h = np.moveaxis(boxes, -1, 0)
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def _check_sizes(orig_sizes, batch: int) -> np.ndarray:
    sizes = np.asarray(orig_sizes)
    if sizes.shape != (batch, 2):
        raise ValueError(f"orig_sizes must have shape ({batch}, 2) as (height, width) per image, got {sizes.shape}")
    return sizes


def scale_boxes(boxes_xyxy: np.ndarray, orig_sizes) -> np.ndarray:
    """Normalised x0,y0,x1,y1 (B,K,4) to pixels of each image's original (height, width)."""
    sizes = _check_sizes(orig_sizes, boxes_xyxy.shape[0]).astype(boxes_xyxy.dtype)
    h, w = sizes[:, 0], sizes[:, 1]
    return boxes_xyxy * np.stack([w, h, w, h], axis=1)[:, None, :]


def top_k_indices(logits_flat: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of a 1-D array, largest first, equal values by lowest index."""
    if k >= logits_flat.size:
        candidates = np.arange(logits_flat.size)
    else:
        # argpartition alone picks an arbitrary subset among values equal to the k-th; taking every value
        # >= the k-th and sorting them makes the choice deterministic.
        kth = logits_flat[np.argpartition(-logits_flat, k - 1)[k - 1]]
        candidates = np.flatnonzero(logits_flat >= kth)
    order = np.lexsort((candidates, -logits_flat[candidates]))
    return candidates[order[:k]]


def top_k_flat_indices(logits_qc: np.ndarray, k: int) -> np.ndarray:
    """top_k_indices of a (Q,C) array's flat view, searching only the queries that can hold a top-k value.

    If k <= Q, the k-th largest of the per-query maxima is a lower bound of the k-th largest value overall
    (k queries reach it), so every top-k value lies in a query whose maximum reaches that bound. That is ~k of
    the Q queries: the full selection over Q*C values (most of the host post-processing's time) becomes one over
    ~k*C. Flat indices are kept, so ranks and ties are those of top_k_indices on the whole array.
    """
    num_queries, num_classes = logits_qc.shape
    if k > num_queries:
        return top_k_indices(logits_qc.reshape(-1), k)
    query_max = logits_qc.max(axis=1)
    bound = np.partition(query_max, num_queries - k)[num_queries - k]
    queries = np.flatnonzero(query_max >= bound)
    flat = (queries[:, None] * num_classes + np.arange(num_classes)).reshape(-1)
    return flat[top_k_indices(logits_qc[queries].reshape(-1), k)]


def postprocess(logits, boxes, orig_sizes, k: int = TOP_K) -> list[dict[str, np.ndarray]]:
    """Official AnchorDETR post-processing.

    logits (B,Q,C) and boxes (B,Q,4) as (cx,cy,w,h) relative to each unpadded image; orig_sizes (B,2) as
    (height, width) in pixels. Returns per image {"scores" (k,) float32, "labels" (k,) int64,
    "boxes" (k,4) float32 x0,y0,x1,y1 in pixels}, best first. k is capped at Q*C.
    """
    logits = np.asarray(logits, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    if logits.ndim != 3 or boxes.shape != logits.shape[:2] + (4,):
        raise ValueError(f"expected logits (B,Q,C) and boxes (B,Q,4), got {logits.shape} and {boxes.shape}")
    batch, _, num_classes = logits.shape
    pixels = scale_boxes(cxcywh_to_xyxy(boxes), orig_sizes)
    results = []
    for b in range(batch):
        index = top_k_flat_indices(logits[b], k)
        query, label = np.divmod(index, num_classes)
        results.append(
            {
                "scores": sigmoid(logits[b].reshape(-1)[index]),
                "labels": label.astype(np.int64),
                "boxes": pixels[b, query],
            }
        )
    return results


def from_engine_outputs(scores, labels, boxes_xyxy, orig_sizes) -> list[dict[str, np.ndarray]]:
    """The same result structure from an engine built with the post-processing inside it.

    The engine emits scores (B,K), labels (B,K) and boxes (B,K,4) x0,y0,x1,y1 normalised; only the scaling to
    each original image size is left to do.
    """
    scores = np.asarray(scores, dtype=np.float32)
    pixels = scale_boxes(np.asarray(boxes_xyxy, dtype=np.float32), orig_sizes)
    labels = np.asarray(labels).astype(np.int64)
    return [{"scores": scores[b], "labels": labels[b], "boxes": pixels[b]} for b in range(scores.shape[0])]

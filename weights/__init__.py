"""Our weights file: one safetensors file of builder-named FP32 tensors with the configuration in its metadata.

- ``load(path) -> (AnchorDETRConfig, {name: np.ndarray})``: what the network builder consumes.
- ``save(path, cfg, tensors, source=..., source_sha256=...)``: atomic (temp file in the same folder, renamed) and
  reproducible (the same tensors and metadata give the same bytes).
- ``default_weights_path(variant)``: where ``python -m weights.extract`` writes unless told otherwise.
- ``file_sha256(path)``, ``official_shapes(cfg)`` (the official state-dict layout), ``builder_shapes(cfg)``.
- ``random_state_dict(cfg, seed)``: an official-layout state dict with peaked random weights (needs torch).

Metadata (all strings): ``format="anchortrt-weights"``, ``format_version="1"``, ``config`` (cfg.to_json()),
``source`` (checkpoint file name or a random-init description), ``source_sha256``, ``labels`` (class names,
core.labels; read them with ``class_names(path)``), and ``random_init="true"`` in files of random weights
(``is_random_init``: the runtime warns that their detections mean nothing). Importing this package
needs numpy and safetensors only: the runtime loads weights without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from core import labels
from core.config import AnchorDETRConfig, ConfigError
from core.errors import BadInput
from core.sidecar import replace_atomically
from weights.checkpoint import builder_shapes, compare_keys, official_shapes

__all__ = [
    "FORMAT", "FORMAT_VERSION", "WeightsError", "load", "save", "file_sha256", "default_weights_path",
    "official_shapes", "builder_shapes", "random_state_dict", "is_random_init", "require_weights_file", "class_names",
]

FORMAT = "anchortrt-weights"
FORMAT_VERSION = "1"
RANDOM_INIT = "random_init"  # metadata key, "true" in a file of random weights


class WeightsError(BadInput, ValueError):
    """A weights file that cannot be used; the message is one line naming the problem and the fix."""


def default_weights_path(variant: str) -> Path:
    """``weights/anchor_detr_<variant>.safetensors``, relative to the repository root (the README's layout)."""
    return Path("weights") / f"anchor_detr_{variant}.safetensors"


def require_weights_file(path: str | os.PathLike, option: str = "--weights", fix: str | None = None) -> Path:
    """``path`` if it is a file; else WeightsError naming what is there (a folder, nothing) and the fix: for a
    missing file ``fix``, by default how to make one with weights.extract."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise WeightsError(f"{option} {path} is a folder, not a weights file: name the .safetensors file that "
                           f"`python -m weights.extract` wrote, e.g. {path / default_weights_path('r50_dc5').name}")
    fix = fix or (f"extract a checkpoint with `python -m weights.extract CKPT.pth -o {path}` or make random-init "
                  f"weights with `python -m weights.extract --random-init r50_dc5 -o {path}`")
    raise WeightsError(f"{option} {path} not found: {fix}")


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _as_float32(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # a torch tensor; torch itself is not imported here
        t = t.detach().cpu().float().numpy()
    return np.ascontiguousarray(t, dtype="<f4")  # safetensors data is little-endian


def _write_safetensors(path: str, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """The safetensors layout (8-byte header length, JSON header, data) in a fixed order: tensors by name, metadata
    keys sorted. safetensors' own save_file orders the metadata by a hash seeded per process, so extracting the
    same checkpoint twice gave files with different sha256."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    names = sorted(arrays)
    offset = 0
    for name in names:
        size = arrays[name].nbytes
        header[name] = {"dtype": "F32", "shape": list(arrays[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # tensor data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            f.write(arrays[name].data)


def save(
    path: str | os.PathLike,
    cfg: AnchorDETRConfig,
    tensors: Mapping[str, Any],
    source: str = "",
    source_sha256: str = "",
    random_init: bool = False,
    names: Mapping[int, str] | None = None,
) -> None:
    """Write builder tensors (numpy or torch) as FP32; the file appears complete or not at all. ``random_init``:
    the tensors are random (weights.extract --random-init), recorded in the metadata. ``names``: the class
    names (core.labels; default: COCO's for 91 classes, none otherwise)."""
    path = os.fspath(path)
    problems = compare_keys(tensors, builder_shapes(cfg))
    if problems:
        raise WeightsError(f"tensors do not match a {cfg.variant} model: " + "; ".join(problems))
    arrays = {k: _as_float32(v) for k, v in tensors.items()}
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_json(),
        "source": source, "source_sha256": source_sha256,
        labels.KEY: labels.to_json(labels.default_names(cfg.num_classes) if names is None else names),
    }
    if random_init:  # only then: a checkpoint's file keeps the bytes it always had
        metadata[RANDOM_INIT] = "true"
    replace_atomically(path, lambda tmp: _write_safetensors(tmp, arrays, metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of one of our files, checked for format and version."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(require_weights_file(path, "weights file"))
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path} is not a safetensors file ({exc}): extract it again with `python -m weights.extract`") from exc
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path} is a safetensors file but not an anchortrt weights file: extract it with `python -m weights.extract`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightsError(
            f"{path} has weights format version {meta.get('format_version')!r}, this anchortrt reads version "
            f"{FORMAT_VERSION}: extract it again with this version's `python -m weights.extract`"
        )
    return meta


def stored_config(meta: Mapping[str, str], path: str | os.PathLike) -> AnchorDETRConfig:
    """The configuration in the metadata ``meta`` of the file ``path``; WeightsError if it is not valid."""
    try:
        return AnchorDETRConfig.from_json(meta["config"])
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path} has no valid configuration in its metadata ({exc}): extract it again") from exc


def is_random_init(path: str | os.PathLike) -> bool:
    """Whether the weights file holds random weights (written by ``weights.extract --random-init``)."""
    return read_metadata(path).get(RANDOM_INIT) == "true"


def class_names(path: str | os.PathLike) -> dict[int, str]:
    """The class names stored in one of our files (the default for its class count in a file from before names)."""
    meta = read_metadata(path)
    return labels.from_stored(meta.get(labels.KEY), stored_config(meta, path).num_classes)


def load(path: str | os.PathLike) -> tuple[AnchorDETRConfig, dict[str, np.ndarray]]:
    """(configuration, builder-named FP32 arrays) from one of our files; WeightsError if it is not usable."""
    from safetensors.numpy import load_file

    cfg = stored_config(read_metadata(path), path)
    tensors = load_file(os.fspath(path))
    problems = compare_keys(tensors, builder_shapes(cfg))
    bad_dtype = sorted(k for k, v in tensors.items() if v.dtype != np.float32)
    if bad_dtype:
        problems.append(f"not float32: {', '.join(bad_dtype[:10])}")
    if problems:
        raise WeightsError(f"{path} does not hold a {cfg.variant} model: " + "; ".join(problems) + ": extract it again")
    return cfg, tensors


def __getattr__(name: str) -> Any:
    if name == "random_state_dict":  # imports torch, so only on demand
        from weights.random_init import random_state_dict

        return random_state_dict
    raise AttributeError(f"module 'weights' has no attribute {name!r}")

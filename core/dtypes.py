"""Tensor data types by name: the one table of the dtypes our networks, plugins and sidecars use.

A name is numpy's (``np.dtype(...).name``), so sidecar I/O descriptions, plugin signatures and the interpreter
all speak the same words. TensorRT's DataType enum is reached through the bindings module passed in (core never
imports TensorRT itself).
"""

from __future__ import annotations

import numpy as np

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name) for name in ("float32", "float16", "int32", "int64", "bool")
}


def element_size(name: str) -> int:
    """Bytes per element of dtype `name`."""
    return DTYPES[name].itemsize


def trt_dtype_names(trt) -> dict:
    """trt.DataType -> our dtype name, for the types in DTYPES (TensorRT has more: BF16, INT8, FP8, ...)."""
    return {trt.float32: "float32", trt.float16: "float16", trt.int32: "int32", trt.int64: "int64",
            trt.bool: "bool"}

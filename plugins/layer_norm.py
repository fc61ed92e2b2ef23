"""LayerNorm over the last axis with fp32 statistics and fp32 gamma/beta, for fp32 or fp16 activations.

x (..., C) -> same shape and dtype: (x - mean) / sqrt(var + eps) * gamma + beta. C and eps are baked into the
kernel; gamma and beta are fp32 inputs (constants in a network).
"""

from __future__ import annotations

import numpy as np

from . import launch as _launch
from . import trt_glue
from .spec import (
    FLOAT_TYPES, KernelSpec, Launch, PluginError, Port, like_first_input, prod, same_dim, suffix, vector_width,
)

ROWS_PER_BLOCK = 8  # one warp per row
MAX_CHANNELS = 1024  # the row lives in registers: at most 32 values per lane


def _check(shapes, attrs):
    x, gamma, beta = shapes
    channels = attrs["channels"]
    if not 0 < channels <= MAX_CHANNELS:
        raise PluginError(f"layer_norm: {channels} channels; the kernel supports 1..{MAX_CHANNELS}")
    if not (same_dim(x[-1], channels) and gamma == (channels,) and beta == (channels,)):
        raise PluginError(f"layer_norm: x {x}, gamma {gamma} and beta {beta} must share {channels} channels")


def _kernel(dtypes, attrs):
    channels = attrs["channels"]
    defines = {"CHANNELS": channels, "VEC": vector_width(dtypes[0], channels), "EPS": attrs["eps"],
               "ROWS_PER_BLOCK": ROWS_PER_BLOCK}
    return f"layer_norm_{suffix(dtypes[0])}", defines


def _launch_rule(shapes, dtypes, attrs, ops):
    rows = prod(shapes[0][:-1])
    return Launch(grid=(ops.cdiv(rows, ROWS_PER_BLOCK), 1, 1), block=(32 * ROWS_PER_BLOCK, 1, 1), args=(rows,))


SPEC = KernelSpec(
    name="layer_norm",
    source="layer_norm.cu",
    inputs=(Port("x", FLOAT_TYPES, None), Port("gamma", ("float32",), 1), Port("beta", ("float32",), 1)),
    outputs=("out",),
    attrs=(("eps", float), ("channels", int)),
    output_rule=like_first_input,
    kernel_rule=_kernel,
    launch_rule=_launch_rule,
    check_rule=_check,
)


def launch(x_ptr: int, gamma_ptr: int, beta_ptr: int, out_ptr: int, shape, dtype: str, eps: float = 1e-5,
           stream: int = 0) -> None:
    """Run on device pointers: x/out of `shape` (..., C) and `dtype`, gamma/beta (C,) float32."""
    c = shape[-1]
    attrs = {"eps": eps, "channels": c}
    _launch.launch_kernel(SPEC, [dtype, "float32", "float32"], attrs, [x_ptr, gamma_ptr, beta_ptr, out_ptr],
                          [shape, (c,), (c,)], stream)


def add_layer(trt, network, x, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5):
    """Plugin layer normalising x (..., C) over C; gamma/beta become fp32 constants."""
    attrs = {"eps": eps, "channels": np.size(gamma)}
    return trt_glue.add_plugin_layer(trt, network, SPEC, [x], attrs, constants=(gamma, beta))

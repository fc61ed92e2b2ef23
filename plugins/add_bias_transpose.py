"""AddBiasTranspose: a projection's bias, the query scaling and the split into heads, in one pass.

x (B, Q, C) float32/float16, bias (C,) fp32 -> out (B, heads, Q, C / heads) = ((x + bias) * scale) split into
heads, in x's dtype. C, heads and scale are baked into the kernel.
"""

from __future__ import annotations

import numpy as np

from . import launch as _launch
from . import trt_glue
from .spec import FLOAT_TYPES, KernelSpec, Launch, PluginError, Port, same_dim, suffix, vector_width

BLOCK = 256


def _check(shapes, attrs):
    x, bias = shapes
    channels, heads = attrs["channels"], attrs["heads"]
    if heads <= 0 or channels <= 0 or channels % heads:
        raise PluginError(f"add_bias_transpose: {channels} channels do not split into {heads} heads")
    if not (same_dim(x[2], channels) and bias == (channels,)):
        raise PluginError(f"add_bias_transpose: x {x} and bias {bias} must have {channels} channels")


def _outputs(shapes, dtypes, attrs):
    b, q, _ = shapes[0]
    return [((b, attrs["heads"], q, attrs["channels"] // attrs["heads"]), dtypes[0])]


def _kernel(dtypes, attrs):
    channels, heads = attrs["channels"], attrs["heads"]
    defines = {"CHANNELS": channels, "HEADS": heads, "VEC": vector_width(dtypes[0], channels // heads),
               "SCALE": attrs["scale"]}
    return f"add_bias_transpose_{suffix(dtypes[0])}", defines


def _launch_rule(shapes, dtypes, attrs, ops):
    b, q, _ = shapes[0]
    channels = attrs["channels"]
    packs = b * q * (channels // vector_width(dtypes[0], channels // attrs["heads"]))
    return Launch(grid=(ops.cdiv(packs, BLOCK), 1, 1), block=(BLOCK, 1, 1), args=(q, packs))


SPEC = KernelSpec(
    name="add_bias_transpose",
    source="add_bias_transpose.cu",
    inputs=(Port("x", FLOAT_TYPES, 3), Port("bias", ("float32",), 1)),
    outputs=("out",),
    attrs=(("heads", int), ("scale", float), ("channels", int)),
    output_rule=_outputs,
    kernel_rule=_kernel,
    launch_rule=_launch_rule,
    check_rule=_check,
)


def launch(x_ptr: int, bias_ptr: int, out_ptr: int, shape, dtype: str, heads: int, scale: float,
           stream: int = 0) -> None:
    """Run on device pointers: x of `shape` (B, Q, C) and `dtype`, bias (C,) float32, out (B, heads, Q, C/heads)."""
    c = shape[-1]
    attrs = {"heads": heads, "scale": scale, "channels": c}
    _launch.launch_kernel(SPEC, [dtype, "float32"], attrs, [x_ptr, bias_ptr, out_ptr], [shape, (c,)], stream)


def add_layer(trt, network, x, bias: np.ndarray, heads: int, scale: float):
    """Plugin layer: x (B, Q, C) -> ((x + bias) * scale) as (B, heads, Q, C / heads); bias becomes an fp32 constant."""
    attrs = {"heads": heads, "scale": scale, "channels": np.size(bias)}
    return trt_glue.add_plugin_layer(trt, network, SPEC, [x], attrs, constants=(bias,))

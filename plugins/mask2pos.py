"""Mask2Pos: the feature mask's normalised row/column positions and their 1-D sine embeddings, in one kernel.

mask (B, h, w) bool, True = padding -> emb_col (B, h, d) and emb_row (B, w, d):
pos_col = (cumsum of the valid rows of mask[:, :, 0] - 0.5) / number of valid rows (pos_row likewise over
mask[:, 0, :]), then feature i = sin(2*pi*pos / SINE_TEMPERATURE^(2*floor(i/2)/d)) for even i and cos(...) for odd i.
These are the inputs of adapt_pos1d for posemb_col/posemb_row. Output dtype: float32, or float16 with fp16=True.
"""

from __future__ import annotations

from core.config import SINE_TEMPERATURE

from . import launch as _launch
from . import trt_glue
from .spec import KernelSpec, Launch, PluginError, Port

POS_PER_BLOCK = 4
BLOCK = 256


def _dtype(attrs) -> str:
    return "float16" if attrs["fp16"] else "float32"


def _check(shapes, attrs):
    if attrs["d"] <= 0:
        raise PluginError(f"mask2pos: embedding size d={attrs['d']} must be positive")


def _outputs(shapes, dtypes, attrs):
    b, h, w = shapes[0]
    return [((b, h, attrs["d"]), _dtype(attrs)), ((b, w, attrs["d"]), _dtype(attrs))]


def _kernel(dtypes, attrs):
    return f"mask2pos_{'f16' if attrs['fp16'] else 'f32'}", {
        "DIM": attrs["d"], "POS_PER_BLOCK": POS_PER_BLOCK, "TEMPERATURE": float(SINE_TEMPERATURE)}


def _launch_rule(shapes, dtypes, attrs, ops):
    b, h, w = shapes[0]
    chunks = ops.cdiv(h, POS_PER_BLOCK) + ops.cdiv(w, POS_PER_BLOCK)  # column chunks, then row chunks
    return Launch(grid=(b, chunks, 1), block=(BLOCK, 1, 1), args=(h, w))


SPEC = KernelSpec(
    name="mask2pos",
    source="mask2pos.cu",
    inputs=(Port("mask", ("bool",), 3),),
    outputs=("emb_col", "emb_row"),
    attrs=(("d", int), ("fp16", bool)),
    output_rule=_outputs,
    kernel_rule=_kernel,
    launch_rule=_launch_rule,
    check_rule=_check,
)


def launch(mask_ptr: int, emb_col_ptr: int, emb_row_ptr: int, shape, d: int, fp16: bool = False,
           stream: int = 0) -> None:
    """Run on device pointers: mask of `shape` (B, h, w) bool, emb_col (B, h, d), emb_row (B, w, d)."""
    _launch.launch_kernel(SPEC, ["bool"], {"d": d, "fp16": fp16}, [mask_ptr, emb_col_ptr, emb_row_ptr], [shape], stream)


def add_layer(trt, network, mask, d: int, *, fp16: bool = False):
    """Plugin layer: mask (B, h, w) bool -> emb_col (output 0, (B, h, d)) and emb_row (output 1, (B, w, d))."""
    return trt_glue.add_plugin_layer(trt, network, SPEC, [mask], {"d": d, "fp16": fp16})

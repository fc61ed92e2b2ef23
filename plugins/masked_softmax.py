"""MaskedSoftmax: attention probabilities over the keys with padded keys excluded.

logits (B, heads, Q, K) float32/float16, key_mask (B, K) bool, True = padding -> probs like logits:
softmax over K where masked keys get 0, and a row whose keys are all padding is all zeros (the native
masked_fill(-inf) + softmax gives NaN there). In RCDA the row logits take `mask[:, 0, :]` and the column logits
`mask[:, :, 0]`.
"""

from __future__ import annotations

from . import launch as _launch
from . import trt_glue
from .spec import FLOAT_TYPES, KernelSpec, Launch, PluginError, Port, like_first_input, same_dim, suffix

# The grid has one warp per row whatever K is; the kernel packs rows of K <= 64 two to a warp (K <= 32: four) and
# leaves the blocks this frees idle, so that one PTX and one symbolic grid serve every K of a TensorRT profile.
ROWS_PER_BLOCK = 8  # warps per block
KEYS_PER_LANE = 4  # rows up to 128 keys (feature maps up to 2048 pixels a side at stride 16) stay in registers


def _check(shapes, attrs):
    (b, *_, k), (mb, mk) = shapes
    if not (same_dim(b, mb) and same_dim(k, mk)):
        raise PluginError(f"masked_softmax: key_mask {shapes[1]} must be (B, K) of logits {shapes[0]}")


def _kernel(dtypes, attrs):
    return f"masked_softmax_{suffix(dtypes[0])}", {"ROWS_PER_BLOCK": ROWS_PER_BLOCK, "KEYS_PER_LANE": KEYS_PER_LANE}


def _launch_rule(shapes, dtypes, attrs, ops):
    b, heads, queries, keys = shapes[0]
    rows_per_batch = heads * queries
    rows = b * rows_per_batch
    return Launch(grid=(ops.cdiv(rows, ROWS_PER_BLOCK), 1, 1), block=(32 * ROWS_PER_BLOCK, 1, 1),
                  args=(rows, rows_per_batch, keys))


SPEC = KernelSpec(
    name="masked_softmax",
    source="masked_softmax.cu",
    inputs=(Port("logits", FLOAT_TYPES, 4), Port("key_mask", ("bool",), 2)),
    outputs=("probs",),
    attrs=(),
    output_rule=like_first_input,
    kernel_rule=_kernel,
    launch_rule=_launch_rule,
    check_rule=_check,
)


def launch(logits_ptr: int, key_mask_ptr: int, probs_ptr: int, shape, dtype: str, stream: int = 0) -> None:
    """Run on device pointers: logits/probs of `shape` (B, heads, Q, K) and `dtype`, key_mask (B, K) bool."""
    b, _, _, k = shape
    _launch.launch_kernel(SPEC, [dtype, "bool"], {}, [logits_ptr, key_mask_ptr, probs_ptr], [shape, (b, k)], stream)


def add_layer(trt, network, logits, key_mask):
    """Plugin layer computing probs (output 0) from logits (B, heads, Q, K) and key_mask (B, K) bool."""
    return trt_glue.add_plugin_layer(trt, network, SPEC, [logits, key_mask], {})

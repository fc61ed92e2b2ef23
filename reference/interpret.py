"""Evaluate a TensorRT network definition in PyTorch, without a TensorRT runtime.

Every layer is read back through the TensorRT API (``layer.type``, the layer's own attributes, weights as numpy,
inputs and outputs) and computed with TensorRT's documented semantics, so a network can be checked against the
PyTorch reference on a machine where no engine can run (TensorRT-RTX on a CPU, or no GPU at all).

Data types follow the network: every tensor is stored in the dtype TensorRT declares for it (``tensor.dtype``, the
strongly typed inference), so an fp16 tensor holds fp16-rounded values. Floating-point layers compute in float32
and round their outputs to the declared type. This assumes that TensorRT's fp16 kernels accumulate matmuls,
convolutions, reductions, softmax and normalisation statistics in fp32 (usual for its kernels, not verified per
tactic); single elementwise operations lose nothing by it, since fp16 -> fp32 is exact and one rounding of the
float32 result gives the native fp16 answer. (A consequence: no CPU half kernel is ever needed.)

Each layer's result is checked against the shape and dtype TensorRT itself infers for the output tensor (dimensions
that are -1 before the engine runs are not checked), so an interpreter rule that disagrees with TensorRT's shape
inference fails loudly instead of producing a plausible tensor.

The interpreter covers the layer types, operations and modes that ``netdef.network`` defines (at every variant,
precision, with and without constant folding, postprocessing and plugins); any other layer, operation or mode
is refused with an error naming the layer and what is unsupported, never guessed.

Entry points: ``interpret_network(network, inputs)`` and ``evaluate(weights_path, images, masks)``.
"""

from __future__ import annotations

import difflib
import importlib
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.dtypes import trt_dtype_names
from core.errors import Failed
from reference.dtypes import TORCH_DTYPES
from reference.plugins import interpret as interpret_plugin


class InterpretError(Failed, RuntimeError):
    """A network, input or layer the interpreter cannot evaluate; the message names the layer or tensor (command
    lines exit 1: no verdict on parity)."""


# --------------------------------------------------------------------------------------------------------------
# Layer handlers: one small function per LayerType, registered by the type's name, covering the layers, operations
# and modes that netdef.network defines (anything else is refused by name). A handler gets the layer (its class
# already set to the specific I...Layer, so its attributes are readable), the evaluated inputs (None where an
# optional input is unset; floating inputs upcast to float32) and the run context; it returns one tensor per output.

_HANDLERS: dict[str, Callable[..., Any]] = {}


def _handles(*type_names: str):
    def register(fn):
        for name in type_names:
            _HANDLERS[name] = fn
        return fn
    return register


def supported_layer_types() -> list[str]:
    return sorted(_HANDLERS)


def _unsupported(layer, what: str) -> InterpretError:
    return InterpretError(f"layer {layer.name!r}: {what} is not supported by the interpreter")


def _pick(table: Mapping[str, Any], layer, kind: str, name: str):
    """table[name], or a refusal naming the layer, the operation and what the interpreter does support."""
    if name not in table:
        raise InterpretError(
            f"layer {layer.name!r}: {kind} {name} is not supported by the interpreter (supported: {', '.join(table)})"
        )
    return table[name]


def _axes_from_mask(mask: int, rank: int) -> list[int]:
    return [i for i in range(rank) if mask >> i & 1]


def _one_axis(layer, mask: int, rank: int) -> int:
    axes = _axes_from_mask(mask, rank)
    if len(axes) != 1:
        raise InterpretError(f"layer {layer.name!r}: axes mask {mask:#b} must select exactly one of {rank} axes")
    return axes[0]


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _dims(dims) -> list[int] | None:
    """A TensorRT Dims/Permutation read back from Python (None when unset) as a list."""
    return None if dims is None else [int(d) for d in dims]


def _no_inputs_after(layer, ins, count: int, what: str) -> None:
    """Refuse optional inputs (dynamic parameters) that the network never sets."""
    if any(t is not None for t in ins[count:]):
        raise _unsupported(layer, what)


@_handles("CONSTANT")
def _constant(ctx, layer, ins):
    array = np.asarray(layer.weights)
    shape = tuple(layer.shape)
    if array.size != math.prod(shape):
        raise InterpretError(f"constant {layer.name!r}: {array.size} weights for shape {shape}")
    return torch.from_numpy(array.reshape(shape).copy()).to(ctx.device)


@_handles("CAST")
def _cast(ctx, layer, ins):
    # Float -> int truncates (the Cast operator's documented example: 8.9 -> 8); toward zero for negatives is
    # inferred.
    return ins[0].to(ctx.out_dtype(layer, 0))


@_handles("SHAPE")
def _shape(ctx, layer, ins):
    return torch.tensor(ins[0].shape, dtype=torch.int64, device=ctx.device)


_ELEMENTWISE = {
    "SUM": torch.add,
    "PROD": torch.mul,
    "SUB": torch.sub,
    "FLOOR_DIV": lambda a, b: torch.div(a, b, rounding_mode="floor"),
    # Integer DIV truncates toward zero (C semantics; the header only says "divide"): inferred, not documented.
    "DIV": lambda a, b: torch.div(a, b) if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc"),
}


@_handles("ELEMENTWISE")
def _elementwise(ctx, layer, ins):
    a, b = ins
    op = _pick(_ELEMENTWISE, layer, "elementwise operation", layer.op.name)
    ctx.same_dtypes(layer, [0, 1])
    _check_broadcast(layer, [a, b])
    return op(a, b)


def _check_broadcast(layer, tensors: Sequence[torch.Tensor]) -> None:
    """TensorRT broadcasts only between tensors of equal rank, along dimensions of length 1."""
    ranks = {t.dim() for t in tensors}
    if len(ranks) != 1:
        raise InterpretError(
            f"layer {layer.name!r}: inputs of ranks {sorted(ranks)}; TensorRT broadcasts only "
            "between equal ranks (reshape or unsqueeze first)"
        )
    for dims in zip(*(t.shape for t in tensors)):
        if len(set(dims) - {1}) > 1:
            raise InterpretError(
                f"layer {layer.name!r}: shapes {[list(t.shape) for t in tensors]} do not broadcast"
            )


_UNARY = {"LOG": torch.log, "SIN": torch.sin, "COS": torch.cos, "NOT": torch.logical_not}


@_handles("UNARY")
def _unary(ctx, layer, ins):
    return _pick(_UNARY, layer, "unary operation", layer.op.name)(ins[0])


# Formulas from the ActivationType documentation in NvInfer.h.
_ACTIVATION = {
    "RELU": lambda x, a, b: torch.relu(x),
    "SIGMOID": lambda x, a, b: torch.sigmoid(x),
    "CLIP": lambda x, a, b: torch.clamp(x, a, b),
}


@_handles("ACTIVATION")
def _activation(ctx, layer, ins):
    # IActivationLayer.type is the ActivationType (it shadows ILayer.type once the class is set).
    activation = _pick(_ACTIVATION, layer, "activation", layer.type.name)
    return activation(ins[0], float(layer.alpha), float(layer.beta))


@_handles("SOFTMAX")
def _softmax(ctx, layer, ins):
    x = ins[0]
    return torch.softmax(x, _one_axis(layer, layer.axes, x.dim()))


_REDUCE = {
    "SUM": lambda x, axes, keep: x.sum(axes, keepdim=keep),
    "AVG": lambda x, axes, keep: x.mean(axes, keepdim=keep),
}


@_handles("REDUCE")
def _reduce(ctx, layer, ins):
    x = ins[0]
    reduce = _pick(_REDUCE, layer, "reduce operation", layer.op.name)
    axes = _axes_from_mask(layer.axes, x.dim())
    if not axes:  # an empty axis list would make torch reduce over everything
        return x
    return reduce(x, axes, bool(layer.keep_dims))


@_handles("SELECT")
def _select(ctx, layer, ins):
    cond, then, other = ins
    ctx.same_dtypes(layer, [1, 2])
    _check_broadcast(layer, ins)
    return torch.where(cond, then, other)


@_handles("CONCATENATION")
def _concatenation(ctx, layer, ins):
    ctx.same_dtypes(layer, range(len(ins)))
    return torch.cat(ins, dim=layer.axis % ins[0].dim())


@_handles("SHUFFLE")
def _shuffle(ctx, layer, ins):
    x = ins[0]
    x = x.permute(_permutation(layer, layer.first_transpose, x.dim()))
    if len(ins) > 1 and ins[1] is not None:
        dims = _ints(ins[1])
    else:
        dims = _dims(layer.reshape_dims)
    if dims is not None:
        x = x.reshape(_reshape_dims(layer, x.shape, dims))
    return x.permute(_permutation(layer, layer.second_transpose, x.dim()))


def _permutation(layer, perm, rank: int) -> list[int]:
    order = [int(p) for p in perm][:rank]
    if sorted(order) != list(range(rank)):
        raise InterpretError(f"shuffle {layer.name!r}: {order} is not a permutation of {rank} axes")
    return order


def _reshape_dims(layer, in_shape, dims: list[int]) -> list[int]:
    if layer.zero_is_placeholder:
        if any(d == 0 and i >= len(in_shape) for i, d in enumerate(dims)):
            raise InterpretError(
                f"shuffle {layer.name!r}: reshape {dims} copies (0) a dimension the rank-{len(in_shape)} input lacks"
            )
        dims = [in_shape[i] if d == 0 else d for i, d in enumerate(dims)]
    if dims.count(-1) > 1 or any(d < -1 for d in dims):
        raise InterpretError(f"shuffle {layer.name!r}: bad reshape dimensions {dims}")
    known = math.prod(d for d in dims if d != -1)
    volume = math.prod(in_shape)
    if -1 in dims:
        if known == 0 or volume % known:
            raise InterpretError(f"shuffle {layer.name!r}: cannot reshape {list(in_shape)} to {dims}")
        dims = [volume // known if d == -1 else d for d in dims]
    elif known != volume:
        raise InterpretError(f"shuffle {layer.name!r}: cannot reshape {list(in_shape)} ({volume} values) to {dims}")
    return dims


@_handles("SLICE")
def _slice(ctx, layer, ins):
    x = ins[0]
    _no_inputs_after(layer, ins, 1, "a slice with dynamic start, size, stride or axes")
    if layer.mode.name != "STRICT_BOUNDS":
        raise _unsupported(layer, f"slice mode {layer.mode.name}")
    start, size, stride, axes = _dims(layer.start), _dims(layer.shape), _dims(layer.stride), _dims(layer.axes)
    axes = list(range(x.dim())) if axes is None else [a % x.dim() for a in axes]
    if not len(start) == len(size) == len(stride) == len(axes):
        raise InterpretError(
            f"slice {layer.name!r}: start {start}, size {size}, stride {stride} must have one entry per axis {axes}"
        )
    for axis, s, n, step in zip(axes, start, size, stride):
        length = x.shape[axis]
        index = s + step * torch.arange(n, device=x.device)
        if not bool(((index >= 0) & (index < length)).all()):
            raise InterpretError(
                f"slice {layer.name!r}: axis {axis} reads indices {s}..{s + step * (n - 1)} of a length-{length} "
                "axis (STRICT_BOUNDS mode)"
            )
        x = x.index_select(axis, index)
    return x


@_handles("GATHER")
def _gather(ctx, layer, ins):
    data, indices = ins
    if layer.mode.name != "DEFAULT":
        raise _unsupported(layer, f"gather mode {layer.mode.name}")
    axis, batch_dims = layer.axis % data.dim(), int(layer.num_elementwise_dims)
    if batch_dims not in (0, 1) or (batch_dims == 1 and axis == 0):
        raise InterpretError(f"gather {layer.name!r}: num_elementwise_dims {batch_dims} with axis {axis}")
    if batch_dims == 0:  # one shared batch of size 1
        data, indices = data.unsqueeze(0), indices.unsqueeze(0)
        axis += 1
    batch = max(data.shape[0], indices.shape[0])
    data = data.expand(batch, *data.shape[1:])
    indices = indices.expand(batch, *indices.shape[1:])
    before, length, after = data.shape[1:axis], data.shape[axis], data.shape[axis + 1:]
    # Negative indices count from the end; out-of-bounds reads give zero (IGatherLayer notes).
    index = indices.reshape(batch, 1, -1, 1).long()
    index = torch.where(index < 0, index + length, index)
    inside = (index >= 0) & (index < length)
    index = index.clamp(0, max(length - 1, 0))
    flat = data.reshape(batch, math.prod(before), length, math.prod(after))
    picked = torch.gather(flat, 2, index.expand(batch, flat.shape[1], index.shape[2], flat.shape[3]))
    picked = picked.masked_fill(~inside, 0).reshape(batch, *before, *indices.shape[1:], *after)
    return picked.squeeze(0) if batch_dims == 0 else picked


@_handles("MATRIX_MULTIPLY")
def _matrix_multiply(ctx, layer, ins):
    a, b = ins
    ctx.same_dtypes(layer, [0, 1])
    transpose = {"NONE": False, "TRANSPOSE": True}
    if _pick(transpose, layer, "matrix operation", layer.op0.name):
        a = a.transpose(-1, -2)
    if _pick(transpose, layer, "matrix operation", layer.op1.name):
        b = b.transpose(-1, -2)
    if a.dim() != b.dim():
        raise InterpretError(
            f"matrix multiply {layer.name!r}: inputs have {a.dim() - 2} and {b.dim() - 2} batch dimensions; "
            "TensorRT needs the same number (broadcast only along length-1 dimensions)"
        )
    _check_broadcast(layer, [a[..., :1, :1], b[..., :1, :1]])
    return torch.matmul(a, b)


def _explicit_padding(layer) -> tuple[list[int], list[int]]:
    """(pre, post) padding per spatial axis; the network sets it explicitly (no SAME_* padding modes)."""
    if layer.padding_mode.name != "EXPLICIT_ROUND_DOWN":
        raise _unsupported(layer, f"padding mode {layer.padding_mode.name}")
    return _dims(layer.pre_padding), _dims(layer.post_padding)


def _pad(x: torch.Tensor, pre: Sequence[int], post: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad (or crop, for negative amounts) the trailing len(pre) axes."""
    widths = []
    for p, q in zip(reversed(pre), reversed(post)):
        widths += [p, q]
    return F.pad(x, widths, value=value) if any(widths) else x


@_handles("CONVOLUTION")
def _convolution(ctx, layer, ins):
    x = ins[0]
    _no_inputs_after(layer, ins, 1, "a convolution with kernel or bias as tensor inputs")
    kernel_size = _dims(layer.kernel_size_nd)
    if len(kernel_size) != 2 or x.dim() != 4:
        raise InterpretError(f"convolution {layer.name!r}: {len(kernel_size)}-D kernel on a rank-{x.dim()} input; "
                             "the interpreter evaluates 2-D convolutions only")
    groups, maps = int(layer.num_groups), int(layer.num_output_maps)
    kernel = ctx.weights(layer, layer.kernel).reshape(maps, x.shape[1] // groups, *kernel_size)
    bias = ctx.weights(layer, layer.bias)
    x = _pad(x, *_explicit_padding(layer))
    return F.conv2d(x, kernel, bias, _dims(layer.stride_nd), 0, _dims(layer.dilation_nd), groups)


@_handles("POOLING")
def _pooling(ctx, layer, ins):
    x = ins[0]
    window, stride = _dims(layer.window_size_nd), _dims(layer.stride_nd)
    kind = layer.type.name  # the PoolingType, as for activations
    if kind != "MAX" or len(window) != 2:
        raise _unsupported(layer, f"{len(window)}-D {kind} pooling")
    return F.max_pool2d(_pad(x, *_explicit_padding(layer), -math.inf), window, stride)


@_handles("NORMALIZATION")
def _normalization(ctx, layer, ins):
    x, scale, bias = ins
    ctx.same_dtypes(layer, [0, 1, 2])
    eps, groups = float(layer.epsilon), int(layer.num_groups)
    axes = _axes_from_mask(layer.axes, x.dim())
    if groups == 1:
        mean = x.mean(axes, keepdim=True)
        var = x.var(axes, correction=0, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps) * scale + bias
    # Group norm: channels (axis 1) split into groups; statistics over each group's channels and the axes.
    if 0 in axes or 1 in axes or x.shape[1] % groups:
        raise InterpretError(
            f"normalization {layer.name!r}: {groups} groups need spatial axes only and channels divisible by groups"
        )
    grouped = x.reshape(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:])
    dims = [2] + [a + 1 for a in axes]
    mean = grouped.mean(dims, keepdim=True)
    var = grouped.var(dims, correction=0, keepdim=True)
    normed = (grouped - mean) / torch.sqrt(var + eps)
    # INormalizationLayer.is_v2 arrived with add_normalization_v2 (TensorRT 10.15); before, every layer is v1.
    if getattr(layer, "is_v2", False):  # scale and bias per channel, [1, C, 1, ...]
        return normed.reshape(x.shape) * scale + bias
    # add_normalization (v1): scale and bias per group, [1, G, 1, ...] (its docstring).
    return (normed * scale.unsqueeze(2) + bias.unsqueeze(2)).reshape(x.shape)


_RESIZE_SETTINGS = ("resize_mode", "coordinate_transformation", "nearest_rounding", "selector_for_single_pixel")
_NEAREST_ASYMMETRIC_FLOOR = ("NEAREST", "ASYMMETRIC", "FLOOR", "FORMULA")


@_handles("RESIZE")
def _resize(ctx, layer, ins):
    """Nearest neighbour, asymmetric coordinates rounded down (F.interpolate's 'nearest'), to a shape input:
    how the network downsamples its padding mask."""
    x = ins[0]
    settings = tuple(getattr(layer, s).name for s in _RESIZE_SETTINGS)
    if settings != _NEAREST_ASYMMETRIC_FLOOR or len(ins) < 2 or ins[1] is None:
        raise _unsupported(layer, f"resize {dict(zip(_RESIZE_SETTINGS, settings))} without a shape input")
    out_shape = _ints(ins[1])
    if len(out_shape) != x.dim():
        raise InterpretError(f"resize {layer.name!r}: output shape {out_shape} for a rank-{x.dim()} input")
    for axis, (size, out) in enumerate(zip(x.shape, out_shape)):
        if size == out:
            continue
        # Input coordinate index * (size / out) in float32 with the ratio rounded first, as PyTorch's nearest
        # interpolation computes it; whether TensorRT rounds the same way at exact-integer products is not verified.
        ratio = torch.tensor(size / out, dtype=torch.float32)
        coord = torch.arange(out, device=x.device, dtype=torch.float32) * ratio
        x = x.index_select(axis, coord.floor().long().clamp(0, size - 1))
    return x


@_handles("TOPK")
def _topk(ctx, layer, ins):
    x = ins[0]
    _no_inputs_after(layer, ins, 1, "top-k with k as a tensor input")
    axis = _one_axis(layer, layer.axes, x.dim())
    # Ties: neither TensorRT nor torch documents which equal element comes first.
    values, indices = torch.topk(x, int(layer.k), dim=axis, largest=layer.op.name == "MAX", sorted=True)
    return values, indices


@_handles("CUMULATIVE")
def _cumulative(ctx, layer, ins):
    if layer.op.name != "SUM" or layer.reverse or layer.exclusive:
        raise _unsupported(layer, f"cumulative {layer.op.name} (reverse={layer.reverse}, exclusive={layer.exclusive})")
    return ins[0].cumsum(_ints(ins[1])[0] % ins[0].dim())


@_handles("UNSQUEEZE")
def _unsqueeze(ctx, layer, ins):
    x = ins[0]
    rank = x.dim() + ins[1].numel()
    for axis in sorted({a % rank for a in _ints(ins[1])}):
        x = x.unsqueeze(axis)
    return x


@_handles("PLUGIN_V3")
def _plugin(ctx, layer, ins):
    try:
        return interpret_plugin(layer.metadata, [t.to(dt) for t, dt in zip(ins, ctx.in_dtypes(layer))])
    except ValueError as exc:  # the layer is not one of our plugins
        raise InterpretError(f"plugin layer {layer.name!r}: {exc}") from None


# --------------------------------------------------------------------------------------------------------------
# The run: topological order over the layers the requested tensors need, tensor bookkeeping by name.


def _trt_module(network, trt=None):
    """The TensorRT (or TensorRT-RTX) bindings module that defined the network's classes."""
    if trt is not None:
        return trt
    module = sys.modules.get(type(network).__module__) or importlib.import_module(type(network).__module__)
    if not hasattr(module, "LayerType"):
        raise InterpretError(f"cannot find the TensorRT module of {type(network)!r}: pass trt= explicitly")
    return module


def _layer_class(trt, type_name: str):
    """I...Layer class for a LayerType name: CamelCase spelling differs (SOFTMAX -> ISoftMaxLayer), so match the
    class names case-insensitively with the underscores dropped."""
    wanted = "i" + type_name.replace("_", "").lower() + "layer"
    for attr in dir(trt):
        if attr.lower() == wanted:
            return getattr(trt, attr)
    return None


class _Run:
    """What handlers share: the device, and type helpers that read the layer's declared tensor types."""

    def __init__(self, device, trt):
        self.device = torch.device(device)
        self._names = trt_dtype_names(trt)

    def torch_dtype(self, trt_dtype) -> torch.dtype:
        """The torch dtype of a TensorRT DataType (BF16, INT8, FP8, ... are refused: the network uses none)."""
        if trt_dtype not in self._names:
            raise InterpretError(f"data type {trt_dtype.name} is not supported by the interpreter")
        return TORCH_DTYPES[self._names[trt_dtype]]

    def out_dtype(self, layer, index: int) -> torch.dtype:
        return self.torch_dtype(layer.get_output(index).dtype)

    def in_dtypes(self, layer) -> list[torch.dtype | None]:
        return [None if t is None else self.torch_dtype(t.dtype) for t in _layer_inputs(layer)]

    def same_dtypes(self, layer, indices: Iterable[int]) -> None:
        """Strongly typed TensorRT rejects mixed input types at build time; say so here, with the layer's name."""
        types = [layer.get_input(i).dtype.name for i in indices]
        if len(set(types)) > 1:
            raise InterpretError(
                f"layer {layer.name!r} mixes input types {types}; TensorRT's strongly typed "
                "build rejects this: add a cast"
            )

    def weights(self, layer, array) -> torch.Tensor | None:
        """A layer's own weights (conv kernel, bias) in float32; their type must be the input's (strong typing)."""
        array = np.asarray(array)
        if array.size == 0:
            return None
        weights = torch.from_numpy(array.copy())
        if weights.dtype != self.torch_dtype(layer.get_input(0).dtype):
            raise InterpretError(
                f"layer {layer.name!r}: {weights.dtype} weights on a {layer.get_input(0).dtype.name} input; "
                "TensorRT's strongly typed build rejects this: give the weights the input's dtype"
            )
        return _compute_input(weights.to(self.device))


def _layer_inputs(layer) -> list:
    return [layer.get_input(i) for i in range(layer.num_inputs)]


def _compute_input(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is not None and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def _kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "int"


def _store(run: _Run, layer, type_name: str, index: int, value: torch.Tensor) -> torch.Tensor:
    """Round `value` to the output's declared dtype and check it against TensorRT's inferred shape."""
    tensor = layer.get_output(index)
    declared = run.torch_dtype(tensor.dtype)
    if _kind(value.dtype) != _kind(declared):
        raise InterpretError(
            f"layer {layer.name!r} ({type_name}): interpreter produced {value.dtype} for tensor "
            f"{tensor.name!r}, which TensorRT declares {tensor.dtype.name}"
        )
    expected = tuple(tensor.shape)
    if len(expected) != value.dim() or any(e >= 0 and e != n for e, n in zip(expected, value.shape)):
        raise InterpretError(
            f"layer {layer.name!r} ({type_name}): interpreter produced shape {list(value.shape)} for tensor "
            f"{tensor.name!r}; TensorRT infers {list(expected)}"
        )
    return value.to(declared)


def _bind_inputs(network, inputs: Mapping[str, Any], needed: set[str], run: _Run) -> dict[str, torch.Tensor]:
    declared = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        raise InterpretError(f"unknown input(s) {unknown}; the network's inputs are {sorted(declared)}")
    missing = sorted(needed - set(inputs))
    if missing:
        raise InterpretError(f"missing input(s) {missing}; the network's inputs are {sorted(declared)}")
    values: dict[str, torch.Tensor] = {}
    named_dims: dict[str, tuple[str, int]] = {}
    for name, value in inputs.items():
        tensor = declared[name]
        value = torch.as_tensor(value)
        want_dtype = run.torch_dtype(tensor.dtype)
        if value.dtype != want_dtype:
            raise InterpretError(
                f"input {name!r} has dtype {value.dtype}; the network declares {want_dtype}: convert it first"
            )
        shape = tuple(tensor.shape)
        if value.dim() != len(shape) or any(d >= 0 and d != n for d, n in zip(shape, value.shape)):
            raise InterpretError(
                f"input {name!r} has shape {list(value.shape)}; the network declares {list(shape)} (-1 = any)"
            )
        for axis, size in enumerate(value.shape):
            dim_name = tensor.get_dimension_name(axis)
            if dim_name:
                first = named_dims.setdefault(dim_name, (name, size))
                if first[1] != size:
                    raise InterpretError(
                        f"dimension {dim_name!r} is {first[1]} in input {first[0]!r} but {size} in input {name!r}"
                    )
        values[name] = value.to(run.device)
    return values


class _Graph:
    """Producers and consumers of every tensor name, and the order in which to evaluate what a request needs."""

    def __init__(self, network, trt):
        self.inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        self.marked = [network.get_output(i).name for i in range(network.num_outputs)]
        self.layers = []
        self.types: list[str] = []  # LayerType names, read before the class change (some classes shadow .type)
        self.producer: dict[str, tuple[int, int]] = {}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            self.types.append(layer.type.name)
            cls = _layer_class(trt, layer.type.name)
            if cls is not None:
                layer.__class__ = cls  # makes the layer's own attributes readable
            self.layers.append(layer)
            for j in range(layer.num_outputs):
                self.producer[layer.get_output(j).name] = (i, j)
        self.names = sorted(self.inputs | set(self.producer))

    def input_names(self, index: int) -> list[str | None]:
        return [None if t is None else t.name for t in _layer_inputs(self.layers[index])]

    def resolve(self, requests: Iterable[str] | None, missing_ok: bool) -> list[str]:
        """Marked outputs, then each request: an exact tensor name, or a prefix ending in '*'."""
        wanted = list(self.marked)
        for request in requests or ():
            if request in self.producer or request in self.inputs:
                matches = [request]
            elif request.endswith("*"):
                matches = [n for n in self.names if n.startswith(request[:-1])]
            else:
                matches = []
            if not matches and not missing_ok:
                close = difflib.get_close_matches(request, self.names, n=3)
                hint = f"; similar names: {', '.join(close)}" if close else ""
                raise InterpretError(f"no tensor named {request!r} in the network{hint}")
            wanted += [m for m in matches if m not in wanted]
        return wanted

    def schedule(self, wanted: Sequence[str]) -> list[int]:
        """Layers needed for `wanted`, producers before consumers (set_input may point to later layers)."""
        order: list[int] = []
        state: dict[int, bool] = {}  # False: being visited, True: done
        for name in wanted:
            if name not in self.producer:
                continue
            stack = [(self.producer[name][0], False)]
            while stack:
                index, expanded = stack.pop()
                if expanded:
                    state[index] = True
                    order.append(index)
                    continue
                if index in state:
                    continue
                state[index] = False
                stack.append((index, True))
                for dep in self.input_names(index):
                    if dep in self.producer and self.producer[dep][0] not in state:
                        stack.append((self.producer[dep][0], False))
        return order


def interpret_network(
    network,
    inputs: Mapping[str, Any],
    device: str | torch.device = "cpu",
    outputs: Iterable[str] | None = None,
    *,
    missing_ok: bool = False,
    trt=None,
) -> dict[str, torch.Tensor]:
    """Evaluate `network` on concrete `inputs` (name -> tensor) in PyTorch.

    Returns the marked outputs plus every tensor named in `outputs` (exact names, or prefixes ending in '*', e.g.
    "encoder.0.*"), each in its declared dtype. A request that names no tensor raises, unless `missing_ok`.
    Only the layers the returned tensors depend on are evaluated; intermediates are freed after their last use.
    `trt` is the bindings module; by default the one that defined `network`'s class.
    """
    trt = _trt_module(network, trt)
    graph = _Graph(network, trt)
    wanted = graph.resolve(outputs, missing_ok)
    order = graph.schedule(wanted)
    needed_inputs = {n for i in order for n in graph.input_names(i) if n in graph.inputs}
    needed_inputs |= {n for n in wanted if n in graph.inputs}
    run = _Run(device, trt)
    values = _bind_inputs(network, inputs, needed_inputs, run)
    uses: dict[str, int] = {}
    for index in order:
        for name in graph.input_names(index):
            if name is not None:
                uses[name] = uses.get(name, 0) + 1
    keep = set(wanted)
    with torch.no_grad():
        for index in order:
            layer, type_name = graph.layers[index], graph.types[index]
            handler = _HANDLERS.get(type_name)
            if handler is None:
                raise InterpretError(
                    f"layer {layer.name!r} has type {type_name}, which the interpreter does not support "
                    f"(supported: {', '.join(supported_layer_types())})"
                )
            names = graph.input_names(index)
            result = handler(run, layer, [None if n is None else _compute_input(values[n]) for n in names])
            results = result if isinstance(result, (list, tuple)) else (result,)
            for j, value in enumerate(results):
                values[layer.get_output(j).name] = _store(run, layer, type_name, j, value)
            for name in names:
                if name is not None:
                    uses[name] -= 1
                    if uses[name] == 0 and name not in keep:
                        del values[name]
    return {name: values[name] for name in wanted}


def evaluate(
    weights_path: str | Path,
    images: torch.Tensor,
    masks: torch.Tensor,
    fp16: bool = False,
    plugins: Iterable[str] = (),
    device: str | torch.device = "cpu",
    outputs: Iterable[str] | None = None,
    *,
    missing_ok: bool = False,
    backend_name: str | None = None,
) -> dict[str, torch.Tensor]:
    """Our AnchorDETR network, built from a weights file with the installed backend, evaluated on one batch.

    `images` (B,3,H,W) float32, `masks` (B,H,W) bool (True = padding). Returns at least "pred_logits" and
    "pred_boxes" (plus any `outputs` requested by name or prefix, as in `interpret_network`), in the network's
    output dtypes.
    """
    import weights
    from core.backend import get_backend
    from netdef.build import create_network
    from core.sidecar import Profile

    backend = get_backend(backend_name)
    cfg, tensors = weights.load(weights_path)
    batch, _, height, width = images.shape
    shape = (batch, height, width)
    _, network, _, keepalive = create_network(
        backend, cfg, tensors, fp16=fp16, plugins=frozenset(plugins), profile=Profile(shape, shape, shape)
    )
    # Constant layers read their weights from numpy arrays that `keepalive` owns: keep it until the run ends.
    result = interpret_network(network, {"images": images, "masks": masks}, device, outputs,
                               missing_ok=missing_ok, trt=backend.trt)
    del keepalive
    return result

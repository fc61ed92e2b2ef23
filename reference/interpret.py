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

from reference.plugins import interpret as interpret_plugin


class InterpretError(RuntimeError):
    """A network, input or layer the interpreter cannot evaluate; the message names the layer or tensor."""


TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}


def torch_dtype(trt_dtype) -> torch.dtype:
    """The torch dtype for a TensorRT DataType (raises for FP8/INT4/FP4, which the interpreter does not model)."""
    try:
        return TORCH_DTYPES[trt_dtype.name]
    except KeyError:
        raise InterpretError(f"data type {trt_dtype.name} is not supported by the interpreter") from None


# --------------------------------------------------------------------------------------------------------------
# Layer handlers: one small function per LayerType, registered by the type's name. A handler gets the layer (its
# class already set to the specific I...Layer, so its attributes are readable), the evaluated inputs (None where an
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


@_handles("CONSTANT")
def _constant(ctx, layer, ins):
    array = np.asarray(layer.weights)
    shape = tuple(layer.shape)
    if array.size != math.prod(shape):
        raise InterpretError(f"constant {layer.name!r}: {array.size} weights for shape {shape}")
    return torch.from_numpy(array.reshape(shape).copy()).to(ctx.device)


@_handles("IDENTITY", "CAST")
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
    "MAX": torch.maximum,
    "MIN": torch.minimum,
    "SUB": torch.sub,
    "POW": torch.pow,
    "AND": torch.logical_and,
    "OR": torch.logical_or,
    "XOR": torch.logical_xor,
    "EQUAL": torch.eq,
    "GREATER": torch.gt,
    "LESS": torch.lt,
    "FLOOR_DIV": lambda a, b: torch.div(a, b, rounding_mode="floor"),
    # Integer DIV truncates toward zero (C semantics; the header only says "divide"): inferred, not documented.
    "DIV": lambda a, b: torch.div(a, b) if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc"),
}


@_handles("ELEMENTWISE")
def _elementwise(ctx, layer, ins):
    a, b = ins
    ctx.same_dtypes(layer, [0, 1])
    _check_broadcast(layer, [a, b])
    return _ELEMENTWISE[layer.op.name](a, b)


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


_UNARY = {
    "EXP": torch.exp, "LOG": torch.log, "SQRT": torch.sqrt, "RECIP": torch.reciprocal, "ABS": torch.abs,
    "NEG": torch.neg, "SIN": torch.sin, "COS": torch.cos, "TAN": torch.tan, "SINH": torch.sinh,
    "COSH": torch.cosh, "ASIN": torch.asin, "ACOS": torch.acos, "ATAN": torch.atan, "ASINH": torch.asinh,
    "ACOSH": torch.acosh, "ATANH": torch.atanh, "CEIL": torch.ceil, "FLOOR": torch.floor, "ERF": torch.erf,
    "NOT": torch.logical_not, "SIGN": torch.sign, "ISINF": torch.isinf, "ISNAN": torch.isnan,
    "ROUND": torch.round,  # both round half to even
}


@_handles("UNARY")
def _unary(ctx, layer, ins):
    return _UNARY[layer.op.name](ins[0])


# Formulas from the ActivationType documentation in NvInfer.h.
_ACTIVATION = {
    "RELU": lambda x, a, b: torch.relu(x),
    "SIGMOID": lambda x, a, b: torch.sigmoid(x),
    "TANH": lambda x, a, b: torch.tanh(x),
    "LEAKY_RELU": lambda x, a, b: torch.where(x >= 0, x, a * x),
    "ELU": lambda x, a, b: torch.where(x >= 0, x, a * torch.expm1(x)),
    "SELU": lambda x, a, b: torch.where(x > 0, b * x, b * a * torch.expm1(x)),
    "SOFTSIGN": lambda x, a, b: x / (1 + x.abs()),
    "SOFTPLUS": lambda x, a, b: a * torch.log1p(torch.exp(b * x)),
    "CLIP": lambda x, a, b: torch.clamp(x, a, b),
    "HARD_SIGMOID": lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0),
    "SCALED_TANH": lambda x, a, b: a * torch.tanh(b * x),
    "THRESHOLDED_RELU": lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)),
    "GELU_ERF": lambda x, a, b: 0.5 * x * (1 + torch.erf(x * math.sqrt(0.5))),
    "GELU_TANH": lambda x, a, b: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
}


@_handles("ACTIVATION")
def _activation(ctx, layer, ins):
    # IActivationLayer.type is the ActivationType (it shadows ILayer.type once the class is set).
    return _ACTIVATION[layer.type.name](ins[0], float(layer.alpha), float(layer.beta))


@_handles("SOFTMAX")
def _softmax(ctx, layer, ins):
    x = ins[0]
    return torch.softmax(x, _one_axis(layer, layer.axes, x.dim()))


_REDUCE = {
    "SUM": lambda x, axes, keep: x.sum(axes, keepdim=keep),
    "MAX": lambda x, axes, keep: x.amax(axes, keepdim=keep),
    "MIN": lambda x, axes, keep: x.amin(axes, keepdim=keep),
    "AVG": lambda x, axes, keep: x.mean(axes, keepdim=keep),
    # torch.prod takes one axis at a time; reduce from the last so the remaining indices stay valid.
    "PROD": lambda x, axes, keep: _prod(x, axes, keep),
}


def _prod(x, axes, keep):
    for axis in sorted(axes, reverse=True):
        x = x.prod(axis, keepdim=keep)
    return x


@_handles("REDUCE")
def _reduce(ctx, layer, ins):
    x = ins[0]
    axes = _axes_from_mask(layer.axes, x.dim())
    if not axes:  # an empty axis list would make torch reduce over everything
        return x
    return _REDUCE[layer.op.name](x, axes, bool(layer.keep_dims))


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
    ins = list(ins) + [None] * (6 - len(ins))

    def param(index, static):
        return _ints(ins[index]) if ins[index] is not None else _dims(static)

    start, size, stride = param(1, layer.start), param(2, layer.shape), param(3, layer.stride)
    axes = param(5, layer.axes)
    axes = list(range(x.dim())) if axes is None else [a % x.dim() for a in axes]
    if not len(start) == len(size) == len(stride) == len(axes):
        raise InterpretError(
            f"slice {layer.name!r}: start {start}, size {size}, stride {stride} must have one entry per axis {axes}"
        )
    mode = layer.mode.name
    fill = ins[4] if ins[4] is not None else torch.zeros((), dtype=x.dtype, device=x.device)
    for axis, s, n, step in zip(axes, start, size, stride):
        length = x.shape[axis]
        index = s + step * torch.arange(n, device=x.device)
        inside = (index >= 0) & (index < length)
        if mode == "STRICT_BOUNDS" and not bool(inside.all()):
            raise InterpretError(
                f"slice {layer.name!r}: axis {axis} reads indices {s}..{s + step * (n - 1)} of a length-{length} "
                "axis (STRICT_BOUNDS mode)"
            )
        if mode == "WRAP":
            index = index % length
        elif mode == "REFLECT":
            period = max(2 * (length - 1), 1)
            index = index % period
            index = torch.where(index >= length, period - index, index)
        elif mode not in ("STRICT_BOUNDS", "CLAMP", "FILL"):
            raise InterpretError(f"slice {layer.name!r}: sample mode {mode} is not supported by the interpreter")
        x = x.index_select(axis, index.clamp(0, max(length - 1, 0)))
        if mode == "FILL":
            shape = [1] * x.dim()
            shape[axis] = n
            x = torch.where(inside.reshape(shape), x, fill.to(x.dtype))
    return x


@_handles("GATHER")
def _gather(ctx, layer, ins):
    data, indices = ins
    mode, batch_dims = layer.mode.name, int(layer.num_elementwise_dims)
    if mode == "DEFAULT":
        return _gather_default(layer, data, indices, layer.axis % data.dim(), batch_dims)
    if mode == "ELEMENT":
        axis = layer.axis % data.dim()
        index, inside = _wrap_indices(indices.long(), data.shape[axis])
        return torch.gather(data, axis, index).masked_fill(~inside, 0)
    if mode == "ND":
        return _gather_nd(data, indices.long(), batch_dims)
    raise InterpretError(f"gather {layer.name!r}: mode {mode} is not supported by the interpreter")


def _wrap_indices(index: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative indices count from the end; out-of-bounds reads give zero (IGatherLayer notes)."""
    index = torch.where(index < 0, index + length, index)
    inside = (index >= 0) & (index < length)
    return index.clamp(0, max(length - 1, 0)), inside


def _gather_default(layer, data, indices, axis: int, batch_dims: int):
    if batch_dims not in (0, 1) or (batch_dims == 1 and axis == 0):
        raise InterpretError(f"gather {layer.name!r}: num_elementwise_dims {batch_dims} with axis {axis}")
    if batch_dims == 0:  # one shared batch of size 1
        data, indices = data.unsqueeze(0), indices.unsqueeze(0)
        axis += 1
    batch = max(data.shape[0], indices.shape[0])
    data = data.expand(batch, *data.shape[1:])
    indices = indices.expand(batch, *indices.shape[1:])
    before, length, after = data.shape[1:axis], data.shape[axis], data.shape[axis + 1:]
    index, inside = _wrap_indices(indices.reshape(batch, 1, -1, 1).long(), length)
    flat = data.reshape(batch, math.prod(before), length, math.prod(after))
    picked = torch.gather(flat, 2, index.expand(batch, flat.shape[1], index.shape[2], flat.shape[3]))
    picked = picked.masked_fill(~inside, 0).reshape(batch, *before, *indices.shape[1:], *after)
    return picked.squeeze(0) if batch_dims == 0 else picked


def _gather_nd(data, indices, batch_dims: int):
    depth = indices.shape[-1]
    batch = math.prod(data.shape[:batch_dims])
    flat = data.reshape(batch, *data.shape[batch_dims:])
    index = indices.reshape(batch, -1, depth)
    inside = torch.ones(index.shape[:2], dtype=torch.bool, device=data.device)
    picks = [torch.arange(batch, device=data.device)[:, None]]
    for j in range(depth):
        wrapped, ok = _wrap_indices(index[..., j], flat.shape[1 + j])
        picks.append(wrapped)
        inside &= ok
    picked = flat[tuple(picks)]  # (batch, points, rest...)
    picked = picked.masked_fill(~inside.reshape(*inside.shape, *[1] * (picked.dim() - 2)), 0)
    return picked.reshape(*indices.shape[:-1], *data.shape[batch_dims + depth:])


@_handles("MATRIX_MULTIPLY")
def _matrix_multiply(ctx, layer, ins):
    a, b = ins
    ctx.same_dtypes(layer, [0, 1])
    op0, op1 = layer.op0.name, layer.op1.name
    # kVECTOR: input 0 [..., K] acts as [..., 1, K], input 1 [..., K] as [..., K, 1] (MatrixOperation docs).
    a = a.unsqueeze(-2) if op0 == "VECTOR" else a.transpose(-1, -2) if op0 == "TRANSPOSE" else a
    b = b.unsqueeze(-1) if op1 == "VECTOR" else b.transpose(-1, -2) if op1 == "TRANSPOSE" else b
    if a.dim() != b.dim():
        raise InterpretError(
            f"matrix multiply {layer.name!r}: inputs have {a.dim() - 2} and {b.dim() - 2} batch dimensions; "
            "TensorRT needs the same number (broadcast only along length-1 dimensions)"
        )
    _check_broadcast(layer, [a[..., :1, :1], b[..., :1, :1]])
    y = torch.matmul(a, b)  # [..., M or 1, N or 1]: drop the unit axes that the vectors added
    if op1 == "VECTOR":
        y = y.squeeze(-1)
    if op0 == "VECTOR":
        y = y.squeeze(-1 if op1 == "VECTOR" else -2)
    return y


def _explicit_padding(layer, spatial: Sequence[int], window: Sequence[int], stride: Sequence[int]):
    """(pre, post) padding per spatial axis after applying the layer's padding mode."""
    mode = layer.padding_mode.name
    pre, post = _dims(layer.pre_padding), _dims(layer.post_padding)
    if mode == "EXPLICIT_ROUND_DOWN":
        return pre, post
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        pre, post = [], []
        for size, k, s in zip(spatial, window, stride):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            small, large = total // 2, total - total // 2
            pre.append(small if mode == "SAME_UPPER" else large)
            post.append(large if mode == "SAME_UPPER" else small)
        return pre, post
    raise InterpretError(f"layer {layer.name!r}: padding mode {mode} is not supported by the interpreter")


def _pad(x: torch.Tensor, pre: Sequence[int], post: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Pad (or crop, for negative amounts) the trailing len(pre) axes."""
    widths = []
    for p, q in zip(reversed(pre), reversed(post)):
        widths += [p, q]
    return F.pad(x, widths, value=value) if any(widths) else x


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@_handles("CONVOLUTION")
def _convolution(ctx, layer, ins):
    x = ins[0]
    kernel_size = _dims(layer.kernel_size_nd)
    nd, groups, maps = len(kernel_size), int(layer.num_groups), int(layer.num_output_maps)
    kernel = ins[1] if len(ins) > 1 and ins[1] is not None else ctx.weights(layer, layer.kernel)
    bias = ins[2] if len(ins) > 2 and ins[2] is not None else ctx.weights(layer, layer.bias)
    kernel = kernel.reshape(maps, x.shape[-nd - 1] // groups, *kernel_size)
    if nd not in _CONV or x.dim() != nd + 2:
        raise InterpretError(f"convolution {layer.name!r}: {nd}-D kernel on a rank-{x.dim()} input")
    stride, dilation = _dims(layer.stride_nd), _dims(layer.dilation_nd)
    effective = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    pre, post = _explicit_padding(layer, x.shape[2:], effective, stride)
    x = _pad(x, pre, post)
    return _CONV[nd](x, kernel, bias if bias is not None and bias.numel() else None, stride, 0, dilation, groups)


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@_handles("POOLING")
def _pooling(ctx, layer, ins):
    x = ins[0]
    window, stride = _dims(layer.window_size_nd), _dims(layer.stride_nd)
    nd, kind = len(window), layer.type.name  # the PoolingType, as for activations
    pre, post = _explicit_padding(layer, x.shape[-nd:], window, stride)
    if kind == "MAX":
        return _MAX_POOL[nd](_pad(x, pre, post, -math.inf), window, stride)
    if kind != "AVERAGE":
        raise InterpretError(f"pooling {layer.name!r}: {kind} is not supported by the interpreter")
    mean = _AVG_POOL[nd](_pad(x, pre, post), window, stride)
    if not layer.average_count_excludes_padding:
        return mean
    # Divide by the number of real (unpadded) elements in each window instead of the window size.
    ones = _pad(torch.ones_like(x[:1, :1]), pre, post)
    return mean / _AVG_POOL[nd](ones, window, stride)


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


@_handles("RESIZE")
def _resize(ctx, layer, ins):
    x = ins[0]
    if len(ins) > 1 and ins[1] is not None:
        out_shape = _ints(ins[1])
    elif layer.scales:
        out_shape = [math.floor(n * s) for n, s in zip(x.shape, layer.scales)]
    else:
        out_shape = _dims(layer.shape)
    if len(out_shape) != x.dim():
        raise InterpretError(f"resize {layer.name!r}: output shape {out_shape} for a rank-{x.dim()} input")
    mode = layer.resize_mode.name
    if mode not in ("NEAREST", "LINEAR"):
        raise InterpretError(f"resize {layer.name!r}: {mode} interpolation is not supported by the interpreter")
    for axis, (size, out) in enumerate(zip(x.shape, out_shape)):
        if size == out:
            continue  # every coordinate transformation maps an unresized axis onto itself
        coord = _source_coordinates(layer, size, out, x.device)
        if mode == "NEAREST":
            index = _round_nearest(layer, coord).clamp(0, size - 1)
            x = x.index_select(axis, index)
        else:
            coord = coord.clamp(0, size - 1)
            low = coord.floor().long()
            high = (low + 1).clamp(max=size - 1)
            shape = [1] * x.dim()
            shape[axis] = out
            weight = (coord - low).reshape(shape)
            x = x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight
    return x


def _source_coordinates(layer, size: int, out: int, device) -> torch.Tensor:
    """Input coordinate of each output index (ResizeCoordinateTransformation docs), in float32.

    TensorRT documents the formulas, not the arithmetic: float32 with the ratio rounded first is what PyTorch's
    nearest interpolation does; whether TensorRT rounds the same way at exact-integer products is not verified.
    """
    index = torch.arange(out, device=device, dtype=torch.float32)
    if out == 1 and layer.selector_for_single_pixel.name == "UPPER":
        return torch.zeros(1, device=device)
    transform = layer.coordinate_transformation.name
    if transform == "ALIGN_CORNERS":
        return index * (float((size - 1) / (out - 1)) if out > 1 else 0.0)
    ratio = torch.tensor(size / out, dtype=torch.float32)
    if transform == "ASYMMETRIC":
        return index * ratio
    return (index + 0.5) * ratio - 0.5  # HALF_PIXEL


def _round_nearest(layer, coord: torch.Tensor) -> torch.Tensor:
    rounding = layer.nearest_rounding.name
    rounded = {
        "FLOOR": torch.floor(coord),
        "CEIL": torch.ceil(coord),
        "HALF_UP": torch.floor(coord + 0.5),
        "HALF_DOWN": torch.ceil(coord - 0.5),
    }[rounding]
    return rounded.long()


@_handles("TOPK")
def _topk(ctx, layer, ins):
    x = ins[0]
    k = _ints(ins[1])[0] if len(ins) > 1 and ins[1] is not None else int(layer.k)
    axis = _one_axis(layer, layer.axes, x.dim())
    # Ties: neither TensorRT nor torch documents which equal element comes first.
    values, indices = torch.topk(x, k, dim=axis, largest=layer.op.name == "MAX", sorted=True)
    return values, indices


@_handles("FILL")
def _fill(ctx, layer, ins):
    ins = list(ins) + [None] * (3 - len(ins))
    if layer.operation.name != "LINSPACE":
        raise InterpretError(f"fill {layer.name!r}: {layer.operation.name} is not supported by the interpreter")
    shape = _ints(ins[0]) if ins[0] is not None else _dims(layer.shape)
    dtype = ctx.out_dtype(layer, 0)
    work = torch.float32 if dtype.is_floating_point else torch.int64
    if ins[1] is not None:
        alpha, delta = ins[1].to(work).reshape(()), ins[2].to(work).reshape(-1)
    elif len(shape) == 1:
        alpha = torch.tensor(layer.alpha, dtype=work, device=ctx.device)
        delta = torch.tensor([layer.beta], dtype=work, device=ctx.device)
    else:  # a static scalar beta has no documented meaning per axis
        raise InterpretError(f"fill {layer.name!r}: a rank-{len(shape)} LINSPACE needs a per-axis beta input (2)")
    out = alpha.expand(shape).clone()
    for axis, n in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = n
        out = out + (torch.arange(n, device=ctx.device, dtype=work) * delta[axis]).reshape(view)
    return out


@_handles("CUMULATIVE")
def _cumulative(ctx, layer, ins):
    x, axis = ins[0], _ints(ins[1])[0] % ins[0].dim()
    if layer.reverse:
        x = x.flip(axis)
    y = x.cumsum(axis)
    if layer.exclusive:  # shift by one: y[j] sums x[0..j-1]
        y = torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)), y.narrow(axis, 0, y.shape[axis] - 1)], axis)
    return y.flip(axis) if layer.reverse else y


@_handles("SQUEEZE")
def _squeeze(ctx, layer, ins):
    x = ins[0]
    if len(ins) > 1 and ins[1] is not None:
        axes = sorted({a % x.dim() for a in _ints(ins[1])})
    else:  # no axes input: the dimensions that are statically 1 in the definition (add_squeeze docstring)
        axes = [i for i, d in enumerate(layer.get_input(0).shape) if d == 1]
    if any(x.shape[a] != 1 for a in axes):
        raise InterpretError(f"squeeze {layer.name!r}: axes {axes} of shape {list(x.shape)} are not all 1")
    return x.reshape([n for i, n in enumerate(x.shape) if i not in axes])


@_handles("UNSQUEEZE")
def _unsqueeze(ctx, layer, ins):
    x = ins[0]
    rank = x.dim() + ins[1].numel()
    for axis in sorted({a % rank for a in _ints(ins[1])}):
        x = x.unsqueeze(axis)
    return x


@_handles("EINSUM")
def _einsum(ctx, layer, ins):
    return torch.einsum(layer.equation, *ins)


@_handles("ATTENTION_INPUT")
def _attention(ctx, layer, ins):
    # The whole IAttention is evaluated here; ATTENTION_OUTPUT only passes the result on.
    attention = layer.attention
    q, k, v = ins[:3]
    mask = ins[3] if len(ins) > 3 else None
    ctx.same_dtypes(layer, [0, 1, 2] if mask is None or mask.dtype == torch.bool else [0, 1, 2, 3])
    if any(t is not None for t in ins[4:]) or "PACKED_NHD" in (attention.query_form.name,
                                                                attention.key_value_form.name):
        raise InterpretError(
            f"attention {layer.name!r}: only PADDED_BHND q/k/v with an optional mask are supported by the interpreter"
        )
    if q.shape[1] % k.shape[1]:
        raise InterpretError(f"attention {layer.name!r}: {q.shape[1]} query heads, {k.shape[1]} key/value heads")
    repeat = q.shape[1] // k.shape[1]  # grouped-query attention shares each key/value head
    k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
    causal, softmax = attention.causal_kind.name, attention.norm_op.name == "SOFTMAX"
    if not softmax and (causal != "NONE" or (mask is not None and mask.dtype == torch.bool)):
        raise InterpretError(f"attention {layer.name!r}: masking without softmax is not documented by TensorRT")
    scores = q @ k.transpose(-1, -2)  # no 1/sqrt(d) scaling: the layer leaves that to the caller
    if causal != "NONE":
        sq, skv = scores.shape[-2:]
        offset = skv - sq if causal == "LOWER_RIGHT" else 0
        rows = torch.arange(sq, device=q.device)[:, None]
        allowed = torch.arange(skv, device=q.device)[None, :] <= rows + offset
        scores = scores.masked_fill(~allowed, -math.inf)
    if mask is not None:
        if mask.dtype == torch.bool:  # True = may attend
            scores = scores.masked_fill(~mask, -math.inf)
        else:
            scores = scores + mask
    if softmax:
        scores = torch.softmax(scores, -1)  # a fully masked row gives NaN here; TensorRT does not define it
    # The probabilities stay float32 for the second matmul; a fused fp16 kernel may round them to fp16 first.
    return scores @ v


@_handles("ATTENTION_OUTPUT")
def _attention_output(ctx, layer, ins):
    return ins[0]


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

    def __init__(self, device):
        self.device = torch.device(device)

    def out_dtype(self, layer, index: int) -> torch.dtype:
        return torch_dtype(layer.get_output(index).dtype)

    def in_dtypes(self, layer) -> list[torch.dtype | None]:
        return [None if t is None else torch_dtype(t.dtype) for t in _layer_inputs(layer)]

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
        if weights.dtype != torch_dtype(layer.get_input(0).dtype):
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


def _store(layer, type_name: str, index: int, value: torch.Tensor) -> torch.Tensor:
    """Round `value` to the output's declared dtype and check it against TensorRT's inferred shape."""
    tensor = layer.get_output(index)
    declared = torch_dtype(tensor.dtype)
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


def _bind_inputs(network, inputs: Mapping[str, Any], needed: set[str], device) -> dict[str, torch.Tensor]:
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
        want_dtype = torch_dtype(tensor.dtype)
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
        values[name] = value.to(device)
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
    values = _bind_inputs(network, inputs, needed_inputs, device)
    uses: dict[str, int] = {}
    for index in order:
        for name in graph.input_names(index):
            if name is not None:
                uses[name] = uses.get(name, 0) + 1
    keep = set(wanted)
    run = _Run(device)
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
                values[layer.get_output(j).name] = _store(layer, type_name, j, value)
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

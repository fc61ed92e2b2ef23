"""A thin functional layer over TensorRT's INetworkDefinition.

Model code composes small verbs (``net.linear``, ``net.layer_norm``, ``net.reshape`` ...) on a
:class:`Net`, never TensorRT calls, so one model definition serves ``tensorrt`` and ``tensorrt_rtx``
(the module is passed in). Each verb

* names its layer (and the layer's output tensor) after the PyTorch module it mirrors; names are
  checked unique, so a failing layer is found by name;
* that combines tensors (the elementwise verbs, ``select``, ``matmul``, ``concat``) checks that
  their dtypes and ranks agree, because a strongly typed network reports a mismatch only when the
  engine is built, with no hint of where it came from (weights and constants take the dtype of the
  tensor they meet; ``cast``, ``to_compute`` and ``to_float32`` are how dtypes change);
* keeps every numpy array handed to TensorRT alive (``trt.Weights`` does not copy): see ``keepalive``.

Values are TensorRT tensors or numpy arrays. A numpy array is a build-time constant: with
``fold_constants=True`` a verb whose inputs are all constants is evaluated in numpy (float32) and its
result stays a constant, so anything that depends only on weights costs no layer. With
``fold_constants=False`` constants become constant layers at once and the same model code computes
everything in the network (used to count what folding saves). A float constant that meets a tensor
takes that tensor's dtype; one that enters the network on its own is float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from core.dtypes import DTYPES, trt_dtype_names

# Masked logits: finite, so a fully masked row gives a uniform softmax instead of NaN, and far below
# any real logit, so exp() of a masked entry is exactly 0 in float32 after max subtraction.
MASK_FILL = -1e30


class NetworkDtypeError(TypeError):
    """Two tensors of different dtypes meet in one layer (TensorRT would fail only at build time)."""


def _np_dtype(trt, dtype) -> type:
    return DTYPES[trt_dtype_names(trt)[dtype]].type


class Net:
    """An INetworkDefinition with verbs. ``dtype`` is the compute dtype of convolutions and matmuls."""

    def __init__(self, trt, network, *, fp16: bool = False, fold_constants: bool = True):
        self.trt = trt
        self.network = network
        self.fp16 = fp16
        self.dtype = trt.float16 if fp16 else trt.float32
        self.fold = fold_constants
        self.keepalive: list[np.ndarray] = []
        self._names: set[str] = set()
        self._norm_v2 = hasattr(network, "add_normalization_v2")

    # ---------------------------------------------------------------- naming, constants, dtypes
    def _named(self, layer, name: str, inputs: dict[int, Any] | None = None, **attributes):
        """The naming funnel every layer passes: ``layer`` (what ``network.add_*`` returned) with its extra
        ``inputs`` (index -> tensor) and ``attributes`` set, named ``name``, its outputs named after it. A layer
        TensorRT refused (None) or an attribute it refuses fails here, with the layer's name."""
        if layer is None:
            raise ValueError(f"TensorRT refused layer {name!r} (its error is logged above)")
        if name in self._names:
            raise ValueError(f"layer name {name!r} used twice: every layer needs its own name")
        for index, tensor in (inputs or {}).items():
            try:
                layer.set_input(index, tensor)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"TensorRT refused input {index} of layer {name!r}: {e}") from None
        for attribute, value in attributes.items():
            try:
                setattr(layer, attribute, value)
            except (TypeError, ValueError, RuntimeError, AttributeError) as e:
                raise ValueError(f"TensorRT refused {attribute}={value!r} for layer {name!r}: {e}") from None
        self._names.add(name)
        layer.name = name
        for i in range(layer.num_outputs):
            layer.get_output(i).name = name if layer.num_outputs == 1 else f"{name}:{i}"
        return layer

    @staticmethod
    def rank(x) -> int:
        return np.ndim(x) if Net.is_const(x) else len(x.shape)

    @staticmethod
    def is_const(x) -> bool:
        return isinstance(x, (np.ndarray, np.generic, int, float, bool))

    @staticmethod
    def _lift(x):
        """Python scalars become float32/int/bool numpy scalars; arrays and tensors pass."""
        if isinstance(x, bool):
            return np.array(x)
        if isinstance(x, float):
            return np.array(x, np.float32)
        if isinstance(x, int):
            return np.array(x, np.int64)
        return x

    def _np_of(self, dtype) -> type:
        return _np_dtype(self.trt, dtype)

    def constant(self, array, name: str, dtype=None):
        """A constant layer holding ``array`` (converted to ``dtype`` if given)."""
        array = np.asarray(array)
        if dtype is not None:
            array = array.astype(self._np_of(dtype))
        elif array.dtype == np.float64:
            array = array.astype(np.float32)
        array = np.array(array, order="C")  # a copy; ascontiguousarray would make 0-D arrays 1-D
        self.keepalive.append(array)
        layer = self.network.add_constant(self.trt.Dims(array.shape), self.trt.Weights(array))
        return self._named(layer, name).get_output(0)

    def tensor(self, x, name: str, dtype=None, rank: int | None = None):
        """``x`` as a network tensor: constants become a constant layer (leading 1s up to ``rank``)."""
        x = self._lift(x)
        if not self.is_const(x):
            return x
        x = np.asarray(x)
        if x.dtype.kind == "f" and dtype is None:
            dtype = self.trt.float32
        if rank is not None and x.ndim < rank:
            x = x.reshape((1,) * (rank - x.ndim) + x.shape)
        return self.constant(x, name, dtype)

    def _partner(self, x, other, name: str):
        """Constant ``x`` as a tensor of ``other``'s rank, and of its dtype where both are floats
        (or both integers)."""
        x = self._lift(x)
        if not self.is_const(x):
            return x
        arr = np.asarray(x)
        other_kind = np.dtype(self._np_of(other.dtype)).kind
        same_kind = arr.dtype.kind == other_kind or {arr.dtype.kind, other_kind} <= {"i", "u"}
        return self.tensor(arr, name, dtype=other.dtype if same_kind else None, rank=len(other.shape))

    def _check_same(self, name: str, *tensors) -> None:
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            raise NetworkDtypeError(
                f"layer {name!r}: inputs have dtypes {[str(t.dtype) for t in tensors]}; "
                "cast one of them (strongly typed network)"
            )
        ranks = {len(t.shape) for t in tensors}
        if len(ranks) > 1:
            raise ValueError(f"layer {name!r}: inputs have ranks {sorted(ranks)}; reshape to equal ranks")

    def _fold_all(self, *xs) -> bool:
        return self.fold and all(self.is_const(self._lift(x)) for x in xs)

    def _operands(self, name: str, *xs):
        """Tensors for a layer: constants take the dtype/rank of the first tensor operand."""
        xs = [self._lift(x) for x in xs]
        anchor = next((x for x in xs if not self.is_const(x)), None)
        out = []
        for i, x in enumerate(xs):
            if anchor is None:
                out.append(self.tensor(x, f"{name}.in{i}"))
            else:
                out.append(self._partner(x, anchor, f"{name}.in{i}"))
        return out

    @staticmethod
    def _f32(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        return a.astype(np.float32) if a.dtype.kind == "f" else a

    @staticmethod
    def _wide(a) -> np.ndarray:
        """A folded operand in float64. NumPy's float32 transcendentals, reductions and BLAS matmuls take other
        code paths on AVX-512 than on AVX2 and differ in the last bit, so an engine's folded constants depended on
        the building CPU; computed in float64 and rounded once to float32 (`_f32`), they are the same everywhere."""
        a = np.asarray(a)
        return a.astype(np.float64) if a.dtype.kind == "f" else a

    # ---------------------------------------------------------------- inputs and outputs
    def input(self, name: str, dtype, shape: Sequence[int], dim_names: dict[int, str] | None = None):
        t = self.network.add_input(name, dtype, self.trt.Dims(tuple(shape)))
        for axis, dim in (dim_names or {}).items():
            t.set_dimension_name(axis, dim)
        return t

    def output(self, x, name: str):
        """Mark ``x`` as a network output called ``name``."""
        x.name = name
        self.network.mark_output(x)
        return x

    def rename(self, x, name: str):
        """Give ``x`` a well-known tensor name (the reference's intermediate keys)."""
        if not self.is_const(x):
            x.name = name
        return x

    # ---------------------------------------------------------------- elementwise
    def _binary(self, op: str, a, b, name: str, np_fn):
        if self._fold_all(a, b):
            return self._f32(np_fn(np.asarray(self._lift(a)), np.asarray(self._lift(b))))
        ta, tb = self._operands(name, a, b)
        self._check_same(name, ta, tb)
        layer = self.network.add_elementwise(ta, tb, getattr(self.trt.ElementWiseOperation, op))
        return self._named(layer, name).get_output(0)

    def add(self, a, b, name: str):
        return self._binary("SUM", a, b, name, np.add)

    def sub(self, a, b, name: str):
        return self._binary("SUB", a, b, name, np.subtract)

    def mul(self, a, b, name: str):
        return self._binary("PROD", a, b, name, np.multiply)

    def div(self, a, b, name: str):
        return self._binary("DIV", a, b, name, np.divide)

    def floor_div(self, a, b, name: str):
        return self._binary("FLOOR_DIV", a, b, name, np.floor_divide)

    def _unary(self, op: str, x, name: str, np_fn):
        if self._fold_all(x):
            return self._f32(np_fn(self._wide(self._lift(x))))
        (t,) = self._operands(name, x)
        layer = self.network.add_unary(t, getattr(self.trt.UnaryOperation, op))
        return self._named(layer, name).get_output(0)

    def log(self, x, name: str):
        return self._unary("LOG", x, name, np.log)

    def sin(self, x, name: str):
        return self._unary("SIN", x, name, np.sin)

    def cos(self, x, name: str):
        return self._unary("COS", x, name, np.cos)

    def logical_not(self, x, name: str):
        return self._unary("NOT", x, name, np.logical_not)

    def _activation(self, kind: str, x, name: str, np_fn, alpha=None, beta=None):
        if self._fold_all(x):
            return self._f32(np_fn(self._wide(self._lift(x))))
        (t,) = self._operands(name, x)
        layer = self.network.add_activation(t, getattr(self.trt.ActivationType, kind))
        bounds = {} if alpha is None else {"alpha": alpha, "beta": beta}
        return self._named(layer, name, **bounds).get_output(0)

    def relu(self, x, name: str):
        return self._activation("RELU", x, name, lambda a: np.maximum(a, np.float32(0)))

    def sigmoid(self, x, name: str):
        return self._activation("SIGMOID", x, name, lambda a: 1 / (1 + np.exp(-a)))

    def clamp(self, x, lo: float, hi: float, name: str):
        return self._activation("CLIP", x, name, lambda a: np.clip(a, np.float32(lo), np.float32(hi)), lo, hi)

    def select(self, cond, then, other, name: str):
        """``then`` where ``cond`` else ``other`` (broadcasting, equal ranks), e.g. masked_fill."""
        if self._fold_all(cond, then, other):
            return self._f32(np.where(cond, then, other))
        tt, to = self._operands(name, then, other)
        tc = self._partner(cond, tt, f"{name}.cond")
        if tc.dtype != self.trt.bool:
            raise NetworkDtypeError(f"layer {name!r}: condition must be bool, got {tc.dtype}")
        self._check_same(name, tt, to)
        if len(tc.shape) != len(tt.shape):
            raise ValueError(f"layer {name!r}: condition rank {len(tc.shape)} != value rank {len(tt.shape)}")
        layer = self.network.add_select(tc, tt, to)
        return self._named(layer, name).get_output(0)

    def cast(self, x, dtype, name: str):
        if self.is_const(self._lift(x)):
            arr, target = np.asarray(self._lift(x)), np.dtype(self._np_of(dtype))
            if self.fold:
                # A folded float constant keeps float32 precision; it is rounded to the partner's
                # dtype only where it meets a tensor.
                return self._f32(arr) if arr.dtype.kind == target.kind == "f" else arr.astype(target)
            x = self.tensor(arr, f"{name}.in0")
        if x.dtype == dtype:
            return x
        layer = self.network.add_cast(x, dtype)
        return self._named(layer, name).get_output(0)

    def to_compute(self, x, name: str):
        """Cast a float32 value to the compute dtype (no layer in FP32 networks)."""
        return self.cast(x, self.dtype, name) if self.fp16 else x

    def to_float32(self, x, name: str):
        return self.cast(x, self.trt.float32, name)

    # ---------------------------------------------------------------- matmuls, convolutions
    def matmul(self, a, b, name: str, transpose_a: bool = False, transpose_b: bool = False):
        if self._fold_all(a, b):
            a, b = self._wide(a), self._wide(b)
            a = np.swapaxes(a, -1, -2) if transpose_a else a
            b = np.swapaxes(b, -1, -2) if transpose_b else b
            return self._f32(np.matmul(a, b))
        ta, tb = self._operands(name, a, b)
        self._check_same(name, ta, tb)
        op = self.trt.MatrixOperation
        layer = self.network.add_matrix_multiply(
            ta, op.TRANSPOSE if transpose_a else op.NONE, tb, op.TRANSPOSE if transpose_b else op.NONE
        )
        return self._named(layer, name).get_output(0)

    def linear(self, x, weight: np.ndarray, bias: np.ndarray | None, name: str):
        """PyTorch Linear: ``x @ weight.T + bias``, weight (out, in) pre-transposed at build time."""
        wt = np.ascontiguousarray(np.asarray(weight, np.float32).T)
        if self._fold_all(x):
            y = self._wide(x) @ wt
            return self._f32(y if bias is None else y + bias)
        x = self.tensor(x, f"{name}.input")
        rank = len(x.shape)
        w = self.tensor(wt, f"{name}.weight", dtype=x.dtype, rank=rank)
        y = self.matmul(x, w, name)
        if bias is None:
            return y
        return self.add(y, self.tensor(bias, f"{name}.bias", dtype=x.dtype, rank=rank), f"{name}.add_bias")

    def conv2d(self, x, weight: np.ndarray, bias: np.ndarray | None, name: str,
               stride: int = 1, padding: int = 0, dilation: int = 1):
        np_t = self._np_of(x.dtype)
        w = np.ascontiguousarray(weight, np_t)
        self.keepalive.append(w)
        args = [x, w.shape[0], self.trt.Dims(w.shape[2:]), self.trt.Weights(w)]
        if bias is not None:
            b = np.ascontiguousarray(bias, np_t)
            self.keepalive.append(b)
            args.append(self.trt.Weights(b))
        layer = self.network.add_convolution_nd(*args)
        Dims = self.trt.Dims
        return self._named(layer, name, stride_nd=Dims((stride, stride)), padding_nd=Dims((padding, padding)),
                           dilation_nd=Dims((dilation, dilation))).get_output(0)

    def max_pool2d(self, x, kernel: int, stride: int, padding: int, name: str):
        layer = self.network.add_pooling_nd(x, self.trt.PoolingType.MAX, self.trt.Dims((kernel, kernel)))
        Dims = self.trt.Dims
        return self._named(layer, name, stride_nd=Dims((stride, stride)),
                           padding_nd=Dims((padding, padding))).get_output(0)

    # ---------------------------------------------------------------- normalisation, softmax
    def _normalization(self, x, scale: np.ndarray, bias: np.ndarray, axes: int, groups: int,
                       eps: float, name: str):
        # Statistics in float32: x**2 in the variance overflows fp16 after attention
        # (NVIDIA/TensorRT#2564), and INormalization has no compute precision in 11.x and RTX.
        x = self.tensor(x, f"{name}.input")
        half = x.dtype == self.trt.float16
        t = self.cast(x, self.trt.float32, f"{name}.to_float32") if half else x
        s = self.tensor(scale, f"{name}.weight", dtype=self.trt.float32)
        b = self.tensor(bias, f"{name}.bias", dtype=self.trt.float32)
        add = self.network.add_normalization_v2 if self._norm_v2 else self.network.add_normalization
        y = self._named(add(t, s, b, axes), name, epsilon=eps, num_groups=groups).get_output(0)
        return self.cast(y, x.dtype, f"{name}.to_half") if half else y

    def layer_norm(self, x, weight: np.ndarray, bias: np.ndarray, name: str, eps: float = 1e-5):
        """PyTorch LayerNorm over the last axis."""
        if self._fold_all(x):
            a = self._wide(np.asarray(x, np.float32))
            mean = a.mean(-1, keepdims=True)
            var = ((a - mean) ** 2).mean(-1, keepdims=True)
            return self._f32((a - mean) / np.sqrt(var + eps) * weight + bias)
        rank = self.rank(x)
        shape = (1,) * (rank - 1) + (-1,)
        return self._normalization(
            x, np.reshape(weight, shape), np.reshape(bias, shape), 1 << (rank - 1), 1, eps, name
        )

    def group_norm(self, x, num_groups: int, weight: np.ndarray, bias: np.ndarray, name: str,
                   eps: float = 1e-5):
        """PyTorch GroupNorm on (B, C, H, W): statistics over each group's channels and H, W."""
        channels = np.asarray(weight).shape[0]
        if not self._norm_v2:
            # Normalization v1 takes per-group scale/bias: normalise with identity, then apply per channel.
            ones = np.ones((1, num_groups, 1, 1), np.float32)
            y = self._normalization(x, ones, np.zeros_like(ones), 0b1100, num_groups, eps, name)
            y = self.mul(y, np.reshape(weight, (1, channels, 1, 1)), f"{name}.scale")
            return self.add(y, np.reshape(bias, (1, channels, 1, 1)), f"{name}.shift")
        return self._normalization(
            x, np.reshape(weight, (1, channels, 1, 1)), np.reshape(bias, (1, channels, 1, 1)),
            0b1100, num_groups, eps, name,
        )

    def softmax(self, x, axis: int, name: str):
        if self._fold_all(x):
            a = self._wide(np.asarray(x, np.float32))
            e = np.exp(a - a.max(axis, keepdims=True))
            return self._f32(e / e.sum(axis, keepdims=True))
        x = self.tensor(x, f"{name}.input")
        # The default axis is not the last one.
        return self._named(self.network.add_softmax(x), name, axes=1 << (axis % len(x.shape))).get_output(0)

    def reduce(self, x, op: str, axes: Sequence[int], name: str, keep_dims: bool = True):
        axes = [a % self.rank(x) for a in axes]
        if self._fold_all(x):
            fn = {"AVG": np.mean, "SUM": np.sum, "MAX": np.max}[op]
            return self._f32(fn(self._wide(x), axis=tuple(axes), keepdims=keep_dims))
        (t,) = self._operands(name, x)
        mask = sum(1 << a for a in axes)
        layer = self.network.add_reduce(t, getattr(self.trt.ReduceOperation, op), mask, keep_dims)
        return self._named(layer, name).get_output(0)

    def mean(self, x, axes: Sequence[int], name: str, keep_dims: bool = True):
        return self.reduce(x, "AVG", axes, name, keep_dims)

    def sum(self, x, axes: Sequence[int], name: str, keep_dims: bool = True):
        return self.reduce(x, "SUM", axes, name, keep_dims)

    def cumsum(self, x, axis: int, name: str):
        if self._fold_all(x):
            return self._f32(np.cumsum(self._wide(x), axis=axis))
        (t,) = self._operands(name, x)
        ax = self.constant(np.array(axis % len(t.shape), np.int64), f"{name}.axis")
        layer = self.network.add_cumulative(t, ax, self.trt.CumulativeOperation.SUM, False, False)
        return self._named(layer, name).get_output(0)

    # ---------------------------------------------------------------- shapes
    def shape(self, x, name: str):
        """The int64 shape tensor of ``x``."""
        return self._named(self.network.add_shape(x), name).get_output(0)

    def shape_of(self, x, axes: Sequence[int], name: str):
        """Selected dimensions of ``x`` as an int64 shape tensor."""
        s = self.shape(x, f"{name}.shape")
        idx = self.constant(np.asarray(axes, np.int64), f"{name}.axes")
        return self._named(self.network.add_gather(s, idx, 0), name).get_output(0)

    @staticmethod
    def _np_reshape(a: np.ndarray, dims: Sequence[int]) -> np.ndarray:
        # TensorRT semantics: 0 copies the input dimension at that index, -1 is inferred.
        dims = [a.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return a.reshape(dims)

    def shuffle(self, x, name: str, *, first=None, dims=None, second=None):
        """TensorRT shuffle: transpose ``first``, reshape to ``dims`` (ints with 0/-1 placeholders,
        or an int64 shape tensor), then transpose ``second``."""
        if self._fold_all(x) and (dims is None or isinstance(dims, (list, tuple))):
            a = np.asarray(x)
            a = a.transpose(first) if first is not None else a
            a = self._np_reshape(a, dims) if dims is not None else a
            a = a.transpose(second) if second is not None else a
            return np.ascontiguousarray(a)
        (t,) = self._operands(name, x)
        inputs, attributes = {}, {}
        if first is not None:
            attributes["first_transpose"] = self.trt.Permutation(list(first))
        if isinstance(dims, (list, tuple)):
            attributes["reshape_dims"] = self.trt.Dims(tuple(dims))
        elif dims is not None:
            inputs[1] = dims
        if second is not None:
            attributes["second_transpose"] = self.trt.Permutation(list(second))
        return self._named(self.network.add_shuffle(t), name, inputs, **attributes).get_output(0)

    def reshape(self, x, dims, name: str):
        return self.shuffle(x, name, dims=dims)

    def permute(self, x, perm: Sequence[int], name: str):
        return self.shuffle(x, name, first=perm)

    def unsqueeze(self, x, axes: Sequence[int], name: str):
        if self._fold_all(x):
            return np.expand_dims(np.asarray(x), tuple(axes))
        (t,) = self._operands(name, x)
        ax = self.constant(np.asarray(axes, np.int64), f"{name}.axes")
        return self._named(self.network.add_unsqueeze(t, ax), name).get_output(0)

    def take(self, x, index: int, axis: int, name: str):
        """``x`` indexed at ``index`` along ``axis`` (the axis disappears), e.g. ``mask[:, 0, :]``."""
        if self._fold_all(x):
            return np.take(np.asarray(x), index, axis=axis)
        (t,) = self._operands(name, x)
        idx = self.constant(np.array(index, np.int32), f"{name}.index")
        return self._named(self.network.add_gather(t, idx, axis % len(t.shape)), name).get_output(0)

    def gather(self, x, indices, axis: int, name: str, batch_dims: int = 0):
        """Default-mode gather; ``batch_dims=1`` pairs the leading axis of x and indices
        (``torch.gather`` style over the batch)."""
        layer = self.network.add_gather(x, indices, axis)
        return self._named(layer, name, num_elementwise_dims=batch_dims).get_output(0)

    def expand(self, x, shape: Sequence[int], name: str):
        """Broadcast size-1 axes of ``x`` to ``shape`` (static shapes): a stride-0 slice."""
        if self._fold_all(x):
            return np.ascontiguousarray(np.broadcast_to(np.asarray(x), tuple(shape)))
        (t,) = self._operands(name, x)
        stride = tuple(0 if d == 1 and s != 1 else 1 for d, s in zip(t.shape, shape))
        layer = self.network.add_slice(t, self.trt.Dims((0,) * len(shape)), self.trt.Dims(tuple(shape)),
                                       self.trt.Dims(stride))
        return self._named(layer, name).get_output(0)

    def concat(self, xs: Sequence[Any], axis: int, name: str):
        if self._fold_all(*xs):
            return self._f32(np.concatenate([np.asarray(x) for x in xs], axis=axis))
        ts = self._operands(name, *xs)
        self._check_same(name, *ts)
        layer = self.network.add_concatenation(ts)
        return self._named(layer, name, axis=axis % len(ts[0].shape)).get_output(0)

    def resize_nearest(self, x, shape, name: str):
        """PyTorch ``F.interpolate(mode="nearest")`` to the int64 ``shape`` tensor: output index i
        reads input index floor(i * in / out)."""
        trt = self.trt
        return self._named(self.network.add_resize(x), name, {1: shape}, resize_mode=trt.InterpolationMode.NEAREST,
                           coordinate_transformation=trt.ResizeCoordinateTransformation.ASYMMETRIC,
                           nearest_rounding=trt.ResizeRoundMode.FLOOR).get_output(0)

    def topk(self, x, k: int, axis: int, name: str):
        """Largest ``k`` along ``axis``: (values, int32 indices)."""
        layer = self.network.add_topk(x, self.trt.TopKOperation.MAX, k, 1 << (axis % len(x.shape)))
        self._named(layer, name)
        return layer.get_output(0), layer.get_output(1)

    def plugin(self, layer, name: str):
        """Name a layer made by a plugin's ``add_layer`` and return its outputs."""
        self._named(layer, name)
        return [layer.get_output(i) for i in range(layer.num_outputs)]

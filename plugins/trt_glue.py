"""One piece of TensorRT glue for every plugin: `tensorrt.plugin` (quickly deployable plugins) with `aot_impl`.

For each `KernelSpec` we register, once per process, `anchortrt::<name>` with
- a describe function (`@trtp.register`): output shapes and dtypes from the spec's output rule;
- an ahead-of-time implementation (`@trtp.aot_impl`): NVRTC PTX for the build GPU, the kernel's `extern "C"`
  name, symbolic grid/block from the spec's launch rule and its int32 scalars as `SymInt32` extra arguments.
TensorRT embeds the PTX and the symbolic launch in the engine, so the engine runs without Python (trtexec too).

TensorRT's plugin schema is checked by parameter names, so the two functions get generated signatures:
`(inputs..., attrs...)` for register and `(inputs..., attrs..., outputs, tactic)` for aot_impl, every attribute
declared in registration order (TensorRT 11.4 passes all attribute values positionally to aot_impl).
Attributes are not serialised with AOT plugins: float constants (eps, scale) and sizes are baked into the PTX as
#defines by the kernel rule; only int32 scalars travel as extra arguments.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Tuple

import numpy as np

from core import cuda
from core.backend import BackendError, backend_of
from core.dtypes import trt_dtype_names

from . import nvrtc
from .spec import KernelSpec, PluginError

NAMESPACE = "anchortrt"
# trt.Weights does not copy: constant arrays must outlive every engine build of this process. They are small
# (gamma, beta, biases of 256 floats), so we keep them for the process lifetime.
_KEEPALIVE: list[np.ndarray] = []


def to_trt_dtype(trt, name: str):
    return {v: k for k, v in trt_dtype_names(trt).items()}[name]


def _dtype_name(trt, dtype) -> str:
    # Names only: which dtypes each input takes is the spec's check (KernelSpec.check_inputs).
    names = trt_dtype_names(trt)
    if dtype not in names:
        raise PluginError(f"tensor dtype {dtype} is not supported by our plugins (use {', '.join(names.values())})")
    return names[dtype]


def require_plugin_support(trt) -> None:
    """Raise `BackendError` when this TensorRT module cannot hold our AOT plugin layers (Backend.plugin_problem)."""
    problem = backend_of(trt).plugin_problem()
    if problem:
        raise BackendError(problem)


def add_constant(trt, network, array: np.ndarray):
    """An fp32 constant tensor holding `array` (kept alive for the builds of this process)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    _KEEPALIVE.append(array)
    return network.add_constant(array.shape, trt.Weights(array)).get_output(0)


def add_plugin_layer(trt, network, spec: KernelSpec, tensors, attrs: dict, constants=()):
    """Add `spec` as an AOT plugin layer on `tensors` followed by fp32 constant inputs made from `constants`.

    Inputs are checked (dtype, rank, shapes) before anything is added, so a wrong call leaves the network as it was.
    The layer's `metadata` names the plugin and its attributes for the interpreter (`reference.plugins.interpret`).
    """
    attrs = spec.normalize_attrs(attrs)
    shapes = [tuple(t.shape) for t in tensors] + [tuple(np.shape(c)) for c in constants]
    dtypes = [_dtype_name(trt, t.dtype) for t in tensors] + ["float32"] * len(constants)
    spec.check_inputs(shapes, dtypes, attrs)
    require_plugin_support(trt)
    trtp = _registered(trt, spec)
    inputs = list(tensors) + [add_constant(trt, network, c) for c in constants]
    layer = network.add_plugin(getattr(getattr(trtp.op, NAMESPACE), spec.name)(*inputs, **attrs), aot=True)
    if layer is None:
        raise PluginError(f"TensorRT refused the {spec.name} plugin layer (see the TensorRT log above)")
    layer.metadata = spec.metadata(attrs)
    return layer


def plugin_module(trt):
    """``tensorrt.plugin`` (quickly deployable plugins) of this TensorRT module; BackendError in one line where it has
    none (the tensorrt-cu13 10.13 packages ship it only as ``tensorrt_bindings.plugin``, which Backend.plugin_problem
    refuses earlier, below 10.16)."""
    try:
        return importlib.import_module(f"{trt.__name__}.plugin")
    except ImportError as e:
        raise BackendError(f"{trt.__name__} {getattr(trt, '__version__', '?')} has no {trt.__name__}.plugin module "
                           f"({e}): install full TensorRT >= 11.2.1, or build with --plugins none") from None


def _registered(trt, spec: KernelSpec):
    """tensorrt.plugin with `anchortrt::<spec.name>` registered (once per process)."""
    trtp = plugin_module(trt)
    namespace = trtp.op.define_or_get(NAMESPACE)
    if not hasattr(namespace, spec.name):
        register_sig, aot_sig = signatures(spec, trtp.TensorDesc, trtp.KernelLaunchParams, trtp.SymIntExprs)
        trtp.register(f"{NAMESPACE}::{spec.name}")(_describe(trt, trtp, spec, register_sig))
        trtp.aot_impl(f"{NAMESPACE}::{spec.name}")(_aot_impl(trt, trtp, spec, aot_sig))
    return trtp


def signatures(spec: KernelSpec, tensor_desc, launch_params, sym_exprs):
    """The signatures TensorRT's plugin schema expects of the register and aot_impl functions."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    tensors = [inspect.Parameter(p.name, kind, annotation=tensor_desc) for p in spec.inputs]
    attrs = [inspect.Parameter(name, kind, annotation=t) for name, t in spec.attrs]
    outputs = tensor_desc if len(spec.outputs) == 1 else Tuple[(tensor_desc,) * len(spec.outputs)]
    register = inspect.Signature(tensors + attrs, return_annotation=outputs)
    aot = inspect.Signature(
        tensors + attrs + [inspect.Parameter("outputs", kind), inspect.Parameter("tactic", kind, annotation=int)],
        return_annotation=tuple[str | bytes, str | bytes, launch_params, sym_exprs],
    )
    return register, aot


def _split(spec: KernelSpec, signature: inspect.Signature, args, kwargs):
    """Bound arguments -> (input TensorDescs, attrs)."""
    bound = signature.bind(*args, **kwargs).arguments
    return [bound[p.name] for p in spec.inputs], {name: bound[name] for name, _ in spec.attrs}


def _describe(trt, trtp, spec: KernelSpec, signature: inspect.Signature):
    def describe(*args, **kwargs):
        descs, attrs = _split(spec, signature, args, kwargs)
        outputs = spec.output_rule(
            [tuple(d.shape_expr) for d in descs], [_dtype_name(trt, d.dtype) for d in descs], attrs
        )
        result = tuple(trtp.from_shape_expr(tuple(shape), dtype=to_trt_dtype(trt, dtype)) for shape, dtype in outputs)
        return result[0] if len(result) == 1 else result

    describe.__signature__ = signature
    describe.__name__ = f"{spec.name}_describe"
    return describe


class _SymOps:
    """The dimension operations of the launch rules, on TensorRT ShapeExprs."""

    def __init__(self, trtp):
        self._trtp = trtp

    def cdiv(self, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return -(-a // b)
        return self._trtp.cdiv(a, b)


def _aot_impl(trt, trtp, spec: KernelSpec, signature: inspect.Signature):
    def aot_impl(*args, **kwargs):
        descs, attrs = _split(spec, signature, args, kwargs)
        dtypes = [_dtype_name(trt, d.dtype) for d in descs]
        name, defines = spec.kernel_rule(dtypes, attrs)
        arch = nvrtc.target_arch(cuda.current_device().arch)
        ptx = nvrtc.compile_kernel(spec.source, defines, arch, "ptx")
        rule = spec.launch_rule([tuple(d.shape_expr) for d in descs], dtypes, attrs, _SymOps(trtp))
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = rule.grid
        params.block_x, params.block_y, params.block_z = rule.block
        params.shared_mem = rule.shared_mem
        extra = trtp.SymIntExprs.from_tuple(tuple(trtp.SymInt32(a) for a in rule.args))
        return name, ptx.decode(), params, extra

    aot_impl.__signature__ = signature
    aot_impl.__name__ = f"{spec.name}_aot_impl"
    return aot_impl

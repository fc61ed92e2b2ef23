"""Launch our kernels without TensorRT, through core.cuda.

`launch_kernel` takes raw device pointers (inputs, then outputs), integer shapes and a stream handle (an int),
computes grid, block and the int32 scalars with the spec's launch rule, and launches with the argument order
TensorRT's AOT plugins use (input pointers, int32 scalars, output pointers). A wrapper that takes framework
tensors (torch) belongs above plugins and only needs to allocate the outputs and call `launch_kernel`.

By default the launcher loads a cubin compiled for the device's exact architecture, so it never depends on the
driver's PTX JIT; `image="ptx"` loads the PTX that a TensorRT engine would embed instead.
"""

from __future__ import annotations

import functools

import numpy as np

from core import cuda

from . import nvrtc
from .spec import IntOps, KernelSpec


def kernel_function(spec: KernelSpec, dtypes, attrs: dict, image: str = "cubin"):
    """The loaded kernel for these input dtypes and attributes, compiled for the current device."""
    return _load(spec, tuple(dtypes), tuple(attrs.items()), image, cuda.current_device().index)


@functools.lru_cache(maxsize=None)
def _load(spec: KernelSpec, dtypes: tuple, attrs: tuple, image: str, device: int):
    name, defines = spec.kernel_rule(list(dtypes), dict(attrs))
    code = nvrtc.compile_kernel(spec.source, defines, nvrtc.target_arch(cuda.init(device).arch), image)
    try:
        return cuda.load_kernel(code, image, name)
    except cuda.CudaError as exc:
        if image == "ptx" and "UNSUPPORTED_PTX_VERSION" in str(exc):
            raise cuda.CudaError(
                f"{exc}: NVRTC {'.'.join(map(str, cuda.nvrtc_version()))} emits PTX newer than this driver loads; "
                "pip install 'nvidia-cuda-nvrtc==13.0.*' (or load the cubin)"
            ) from exc
        raise


def launch_kernel(spec: KernelSpec, dtypes, attrs: dict, pointers, shapes, stream: int = 0, image: str = "cubin"):
    """Launch the spec's kernel on raw device pointers (ints: the inputs, then the outputs) for these input
    dtypes and integer input shapes, on the stream with handle `stream`."""
    attrs = spec.normalize_attrs(attrs)
    shapes = [tuple(int(d) for d in s) for s in shapes]
    dtypes = list(dtypes)
    spec.check_inputs(shapes, dtypes, attrs)
    if len(pointers) != len(spec.inputs) + len(spec.outputs):
        raise ValueError(f"{spec.name}: expected {len(spec.inputs)} input and {len(spec.outputs)} output pointers")
    fn = kernel_function(spec, dtypes, attrs, image)
    rule = spec.launch_rule(shapes, dtypes, attrs, IntOps)
    n_in = len(spec.inputs)
    args = (*[np.uint64(p) for p in pointers[:n_in]], *[np.int32(a) for a in rule.args],
            *[np.uint64(p) for p in pointers[n_in:]])
    cuda.launch(fn, rule.grid, rule.block, stream, *args, shared_mem=rule.shared_mem, name=spec.name)

"""Launch our kernels without TensorRT, through the cuda-python driver API.

`run_spec` takes raw device pointers, integer shapes and a stream handle (an int), computes grid, block and the
int32 scalars with the spec's launch rule, and calls `cuLaunchKernel` with the argument order TensorRT's AOT
plugins use (input pointers, int32 scalars, output pointers). `apply_torch` is the convenience for tests and
benchmarks: CUDA torch tensors in, torch tensors out, on torch's current stream.

By default the launcher loads a cubin compiled for the device's exact architecture, so it never depends on the
driver's PTX JIT; `image="ptx"` loads the PTX that a TensorRT engine would embed instead.
"""

from __future__ import annotations

import ctypes
import functools

from . import nvrtc
from .spec import IntOps, KernelSpec


class LaunchError(RuntimeError):
    """No usable GPU/driver, or the driver rejected a kernel."""


def _driver():
    from cuda.bindings import driver

    return driver


def _check(result, what: str):
    cu = _driver()
    err = result[0]
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        hint = ""
        if err == cu.CUresult.CUDA_ERROR_UNSUPPORTED_PTX_VERSION:
            hint = (
                f": NVRTC {'.'.join(map(str, nvrtc.nvrtc_version()))} emits PTX newer than this driver loads; "
                "pip install 'nvidia-cuda-nvrtc==13.0.*' (or load the cubin)"
            )
        raise LaunchError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}{hint}")
    return result[1] if len(result) == 2 else result[1:]


@functools.cache
def _init() -> None:
    try:
        _check(_driver().cuInit(0), "cuInit")
    except RuntimeError as exc:  # also cuda-python's own error when libcuda is missing
        raise LaunchError(f"no NVIDIA driver/GPU is usable: {exc}") from exc


def current_device() -> int:
    """The device of this thread's current context; if none, device 0's primary context (the one TensorRT and
    PyTorch use) is made current first."""
    cu = _driver()
    _init()
    if int(_check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")) == 0:
        primary = _check(cu.cuDevicePrimaryCtxRetain(_check(cu.cuDeviceGet(0), "cuDeviceGet")), "primary context")
        _check(cu.cuCtxSetCurrent(primary), "cuCtxSetCurrent")
    return int(_check(cu.cuCtxGetDevice(), "cuCtxGetDevice"))


def compute_capability(device: int | None = None) -> int:
    """Compute capability of the device as an int, e.g. 90 for an H100."""
    cu = _driver()
    device = cu.CUdevice(current_device() if device is None else device)
    attr = cu.CUdevice_attribute
    major = _check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), "attribute")
    minor = _check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), "attribute")
    return major * 10 + minor


def kernel_function(spec: KernelSpec, dtypes, attrs: dict, image: str = "cubin"):
    """The loaded CUfunction for these input dtypes and attributes, compiled for the current device."""
    return _load(spec, tuple(dtypes), tuple(attrs.items()), image, current_device())


@functools.lru_cache(maxsize=None)
def _load(spec: KernelSpec, dtypes: tuple, attrs: tuple, image: str, device: int):
    cu = _driver()
    name, defines = spec.kernel_rule(list(dtypes), dict(attrs))
    code = nvrtc.compile_kernel(spec.source, defines, nvrtc.target_arch(compute_capability(device)), image)
    if image == "ptx":
        code += b"\0"  # the driver reads PTX as a C string
    module = _check(cu.cuModuleLoadData(code), f"loading the {image} of {name}")
    return _check(cu.cuModuleGetFunction(module, name.encode()), f"finding kernel {name}")


def run_spec(spec: KernelSpec, in_ptrs, shapes, dtypes, out_ptrs, attrs: dict, stream: int = 0, image: str = "cubin"):
    """Launch the spec's kernel on raw device pointers (ints) with integer input shapes."""
    attrs = spec.normalize_attrs(attrs)
    shapes = [tuple(int(d) for d in s) for s in shapes]
    spec.check_inputs(shapes, dtypes, attrs)
    if len(in_ptrs) != len(spec.inputs) or len(out_ptrs) != len(spec.outputs):
        raise ValueError(f"{spec.name}: expected {len(spec.inputs)} input and {len(spec.outputs)} output pointers")
    fn = kernel_function(spec, dtypes, attrs, image)
    rule = spec.launch_rule(shapes, list(dtypes), attrs, IntOps)
    values = (*[int(p) for p in in_ptrs], *[int(a) for a in rule.args], *[int(p) for p in out_ptrs])
    types = (
        *[ctypes.c_void_p] * len(in_ptrs),
        *[ctypes.c_int] * len(rule.args),
        *[ctypes.c_void_p] * len(out_ptrs),
    )
    cu = _driver()
    _check(
        cu.cuLaunchKernel(fn, *rule.grid, *rule.block, rule.shared_mem, cu.CUstream(int(stream)), (values, types), 0),
        f"launching {spec.name}",
    )


def apply_torch(spec: KernelSpec, tensors, attrs: dict, image: str = "cubin"):
    """Run the kernel on CUDA torch tensors (made contiguous and 16-byte aligned) on torch's current stream."""
    import torch

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bool": torch.bool}
    dtype_name = {t: n for n, t in torch_dtype.items()}
    prepared = []
    for t in tensors:
        if not t.is_cuda or t.dtype not in dtype_name:
            raise ValueError(f"{spec.name}: inputs must be CUDA tensors of {', '.join(torch_dtype)}, got {t.dtype}")
        t = t.contiguous()
        if t.data_ptr() % 16:  # vector loads need aligned rows
            t = t.clone()
        prepared.append(t)
    attrs = spec.normalize_attrs(attrs)
    shapes = [tuple(t.shape) for t in prepared]
    dtypes = [dtype_name[t.dtype] for t in prepared]
    spec.check_inputs(shapes, dtypes, attrs)
    device = prepared[0].device
    outs = [
        torch.empty(shape, dtype=torch_dtype[dtype], device=device)
        for shape, dtype in spec.output_rule(shapes, dtypes, attrs)
    ]
    stream = torch.cuda.current_stream(device).cuda_stream
    run_spec(spec, [t.data_ptr() for t in prepared], shapes, dtypes, [o.data_ptr() for o in outs], attrs, stream, image)
    return outs

"""A small layer over cuda-python's driver API: errors, device memory, pinned host memory, streams, events, graphs.

Every object owns one CUDA resource, frees it in ``close()`` (also on ``with`` exit) and is safe to close twice.
TensorRT works in the device's primary context, so `init` retains that context and makes it current; call
`Device.activate` again from any other thread that uses these objects.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from cuda.bindings import driver as cu

from core.errors import Unavailable

NO_GPU_HINT = "the runtime needs an NVIDIA GPU with its driver (check `nvidia-smi` and CUDA_VISIBLE_DEVICES)"


class CudaError(Unavailable):
    """A CUDA call that failed; the message names the call and CUDA's error name."""


class NoGpuError(Unavailable):
    """No usable NVIDIA driver or device."""


def _error_name(err: Any) -> str:
    if isinstance(err, cu.CUresult):
        status, name = cu.cuGetErrorName(err)
        if status == cu.CUresult.CUDA_SUCCESS:
            return name.decode()
        return err.name
    return getattr(err, "name", str(err))


def check(result: tuple, what: str = "CUDA call") -> Any:
    """Unpack a cuda-python result ``(err, *values)``: raise CudaError on failure, else the value(s) or None."""
    err, *values = result
    if int(err) != 0:
        raise CudaError(f"{what} failed: {_error_name(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    compute_capability: str  # "9.0"
    total_memory: int
    _context: Any

    def activate(self) -> None:
        check(cu.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")


_devices: dict[int, Device] = {}


def init(index: int = 0) -> Device:
    """Initialise the driver and make the primary context of device `index` current (once per process)."""
    if index in _devices:
        _devices[index].activate()
        return _devices[index]
    try:
        (err,) = cu.cuInit(0)
    except RuntimeError as exc:  # cuda-python raises when libcuda itself cannot be loaded
        raise NoGpuError(f"no NVIDIA driver: {exc.__class__.__name__}; {NO_GPU_HINT}") from None
    if err != cu.CUresult.CUDA_SUCCESS:
        raise NoGpuError(f"no usable NVIDIA GPU: cuInit gave {_error_name(err)}; {NO_GPU_HINT}")
    count = check(cu.cuDeviceGetCount(), "cuDeviceGetCount")
    if index >= count:
        raise NoGpuError(f"no CUDA device {index}: {count} visible; {NO_GPU_HINT}")
    dev = check(cu.cuDeviceGet(index), "cuDeviceGet")
    attr = cu.CUdevice_attribute
    major = check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute")
    minor = check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute")
    name = check(cu.cuDeviceGetName(128, dev), "cuDeviceGetName").split(b"\0", 1)[0].decode()
    total = check(cu.cuDeviceTotalMem(dev), "cuDeviceTotalMem")
    context = check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    device = Device(index, name, f"{major}.{minor}", int(total), context)
    device.activate()
    _devices[index] = device
    return device


def memory_info() -> tuple[int, int]:
    """(free, total) bytes of the current device."""
    free, total = check(cu.cuMemGetInfo(), "cuMemGetInfo")
    return int(free), int(total)


class _Resource:
    """Closes on `with` exit; subclasses free their handle in `_release`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Stream(_Resource):
    """A non-blocking stream (TensorRT recommends against the legacy default stream)."""

    def __init__(self) -> None:
        self._stream = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING), "cuStreamCreate")

    @property
    def handle(self) -> int:
        return int(self._stream)

    def synchronize(self) -> None:
        check(cu.cuStreamSynchronize(self._stream), "cuStreamSynchronize")

    def close(self) -> None:
        if self._stream is not None:
            check(cu.cuStreamDestroy(self._stream), "cuStreamDestroy")
            self._stream = None


class Event(_Resource):
    """A CUDA event with timing; `elapsed_ms(start, end)` is the GPU time between two recorded events."""

    def __init__(self) -> None:
        self._event = check(cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DEFAULT), "cuEventCreate")

    def record(self, stream: Stream) -> None:
        check(cu.cuEventRecord(self._event, stream.handle), "cuEventRecord")

    def synchronize(self) -> None:
        check(cu.cuEventSynchronize(self._event), "cuEventSynchronize")

    @staticmethod
    def elapsed_ms(start: "Event", end: "Event") -> float:
        return float(check(cu.cuEventElapsedTime(start._event, end._event), "cuEventElapsedTime"))

    def close(self) -> None:
        if self._event is not None:
            check(cu.cuEventDestroy(self._event), "cuEventDestroy")
            self._event = None


class DeviceBuffer(_Resource):
    """``nbytes`` of device memory; copies to and from host arrays are asynchronous on a stream."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self._ptr = check(cu.cuMemAlloc(max(self.nbytes, 1)), f"cuMemAlloc({self.nbytes} bytes)")

    @property
    def ptr(self) -> int:
        return int(self._ptr)

    def _fits(self, host: np.ndarray) -> None:
        if not host.flags.c_contiguous:
            raise ValueError("host array must be C-contiguous")
        if host.nbytes > self.nbytes:
            raise ValueError(f"{host.nbytes} bytes do not fit in a device buffer of {self.nbytes}")

    def upload(self, host: np.ndarray, stream: Stream) -> None:
        """Copy all of `host` to the start of this buffer (truly asynchronous only from pinned memory)."""
        self._fits(host)
        check(cu.cuMemcpyHtoDAsync(self._ptr, host.ctypes.data, host.nbytes, stream.handle), "cuMemcpyHtoDAsync")

    def download(self, host: np.ndarray, stream: Stream) -> None:
        """Fill `host` from the start of this buffer."""
        self._fits(host)
        check(cu.cuMemcpyDtoHAsync(host.ctypes.data, self._ptr, host.nbytes, stream.handle), "cuMemcpyDtoHAsync")

    def close(self) -> None:
        if self._ptr is not None:
            check(cu.cuMemFree(self._ptr), "cuMemFree")
            self._ptr = None


class PinnedBuffer(_Resource):
    """Page-locked host memory seen as a flat numpy array; `view(shape)` is its leading part in that shape.

    Views must not be used after `close()`: they point into the freed memory.
    """

    def __init__(self, size: int, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self.size = int(size)
        nbytes = max(self.size * self.dtype.itemsize, 1)
        self._ptr = check(cu.cuMemHostAlloc(nbytes, 0), f"cuMemHostAlloc({nbytes} bytes)")
        raw = (ctypes.c_byte * nbytes).from_address(int(self._ptr))
        self.array = np.frombuffer(raw, dtype=self.dtype, count=self.size)

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape))
        if count > self.size:
            raise ValueError(f"shape {shape} needs {count} elements, pinned buffer holds {self.size}")
        return self.array[:count].reshape(shape)

    def close(self) -> None:
        if self._ptr is not None:
            self.array = None
            check(cu.cuMemFreeHost(self._ptr), "cuMemFreeHost")
            self._ptr = None


class Graph(_Resource):
    """An instantiated CUDA graph of the work `enqueue` puts on `stream` while captured.

    Capture is thread-local (as trtexec does it): other threads may keep using CUDA meanwhile. Everything
    captured is frozen: kernel arguments, pointers and copy sizes. Replay with new data by writing into the
    same buffers.
    """

    def __init__(self, stream: Stream, enqueue: Callable[[], Any]) -> None:
        mode = cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        check(cu.cuStreamBeginCapture(stream.handle, mode), "cuStreamBeginCapture")
        try:
            enqueue()
        except BaseException:
            err, graph = cu.cuStreamEndCapture(stream.handle)  # leave capture mode whatever happened
            if err == cu.CUresult.CUDA_SUCCESS and graph is not None:
                cu.cuGraphDestroy(graph)
            raise
        self._graph = check(cu.cuStreamEndCapture(stream.handle), "cuStreamEndCapture")
        try:
            self._exec = check(cu.cuGraphInstantiate(self._graph, 0), "cuGraphInstantiate")
        except CudaError:
            check(cu.cuGraphDestroy(self._graph), "cuGraphDestroy")
            self._graph = None
            raise

    def launch(self, stream: Stream) -> None:
        check(cu.cuGraphLaunch(self._exec, stream.handle), "cuGraphLaunch")

    def close(self) -> None:
        if self._graph is not None:
            check(cu.cuGraphExecDestroy(self._exec), "cuGraphExecDestroy")
            check(cu.cuGraphDestroy(self._graph), "cuGraphDestroy")
            self._graph = None

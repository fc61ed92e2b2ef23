"""The CUDA layer, on cuda.core: the GPU probe, device, streams, events, memory, NVRTC, kernels, graphs.

Every object owns one CUDA resource, frees it in ``close()`` (also on ``with`` exit) and is safe to close twice.
TensorRT works in the device's primary context, which cuda.core's ``Device.set_current`` retains and makes
current: `init` does so once per process; call `Device.activate` again from any other thread that uses these
objects. Every failure is a `CudaError` naming the call (`check` for the few cuda.bindings calls, `_named` for
cuda.core's own errors); no GPU is a `NoGpuError`, and `probe` answers None instead of raising.

cuda.core 1.2 lacks, so cuda.bindings is called directly for: the free/total memory query (cuMemGetInfo) and
the total memory of a device (cuDeviceTotalMem); synchronous device memory (cuda.core's public resource is a
stream-ordered pool that keeps freed memory, which would hide frees from `memory_info`) with copies to and from
any host address; and NVRTC, because ``Program.compile("ptx")`` first asks the driver its version and so
fails on machines without a driver, where our plugins' PTX must still compile. `compile_cached` keeps what
NVRTC made on disk, for the plugins (plugins.nvrtc) and the GPU preprocessing kernel alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import cuda.core as _core
from cuda.bindings import driver as cu

from core.errors import BadInput, Unavailable
from core.sidecar import write_atomic

NO_GPU_HINT = "the runtime needs an NVIDIA GPU with its driver (check `nvidia-smi` and CUDA_VISIBLE_DEVICES)"
NVRTC_HINT = "pip install 'nvidia-cuda-nvrtc==13.0.*'"


class CudaError(Unavailable):
    """A CUDA call that failed; the message names the call and CUDA's error name."""


class NoGpuError(Unavailable):
    """No usable NVIDIA driver or device."""


class CompileError(CudaError):
    """NVRTC is missing or rejected a kernel."""


def check(result: tuple, what: str = "CUDA call") -> Any:
    """Unpack a cuda.bindings result ``(err, *values)`` (driver or NVRTC): raise CudaError on failure, else the
    value(s) or None."""
    err, *values = result
    if int(err) != 0:
        raise CudaError(f"{what} failed: {_error_name(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _error_name(err: Any) -> str:
    if isinstance(err, cu.CUresult):
        with contextlib.suppress(Exception):  # the driver's own spelling, when there is a driver to ask
            status, name = cu.cuGetErrorName(err)
            if status == cu.CUresult.CUDA_SUCCESS:
                return name.decode()
    return getattr(err, "name", str(err))


@contextlib.contextmanager
def _named(what: str) -> Iterator[None]:
    """cuda.core's errors (messages start with CUDA's error name) as CudaError naming `what`."""
    try:
        yield
    except CudaError:
        raise
    except Exception as exc:  # cuda.core raises its CUDAError (not public), RuntimeError or ValueError
        raise CudaError(f"{what} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


# ---------------------------------------------------------------- the GPU probe and the device


# The device whose primary context each thread last made current through Device.activate.
_activated = threading.local()


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    compute_capability: str  # "9.0"
    total_memory: int
    _device: Any  # the cuda.core Device

    @property
    def arch(self) -> int:
        """The compute capability as NVRTC numbers architectures, e.g. 90."""
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)

    def activate(self) -> None:
        """Make this device's primary context current on the calling thread. cuda.core keeps one Device object per
        thread, and only one whose `set_current` ran on that thread makes streams and events there: so this
        thread's object, not the one `_find` kept (a pipeline thread creating an event failed with it). Once per
        thread and device in a row: the GPU path calls this for every image it places, and each `set_current` cost
        the pipeline's one busy thread about a tenth of its GIL time (py-spy on the H200)."""
        if getattr(_activated, "index", None) == self.index:
            return
        with _named("making the primary context current"):
            _core.Device(self.index).set_current()
        _activated.index = self.index


def _find(index: int) -> Device:
    """Device `index`, not yet made current; NoGpuError naming why not."""
    try:
        count = len(_core.Device.get_all_devices())  # cuInit, then the device count
    except Exception as exc:  # cuInit's error names it; without libcuda cuda-python raises DynamicLibNotFoundError
        if "CUDA_ERROR" in str(exc):
            raise NoGpuError(f"no usable NVIDIA GPU: {str(exc).splitlines()[0]}; {NO_GPU_HINT}") from None
        raise NoGpuError(f"no NVIDIA driver: {type(exc).__name__}; {NO_GPU_HINT}") from None
    if not 0 <= index < count:
        raise NoGpuError(f"no CUDA device {index}: {count} visible; {NO_GPU_HINT}")
    with _named(f"querying CUDA device {index}"):
        device = _core.Device(index)
        major, minor = device.compute_capability
        name = device.name
    total = check(cu.cuDeviceTotalMem(cu.CUdevice(index)), "cuDeviceTotalMem")
    return Device(index, name, f"{major}.{minor}", int(total), device)


def probe(index: int = 0) -> Device | None:
    """Name, compute capability and total memory of CUDA device `index`, or None without a driver or device.

    The one place that asks whether there is a GPU (sidecar, build, test skips, plugins); it never raises and
    makes no context current."""
    try:
        return _find(index)
    except Unavailable:
        return None


_devices: dict[int, Device] = {}


def init(index: int = 0) -> Device:
    """Device `index` with its primary context made current on this thread (found once per process)."""
    if index not in _devices:
        _devices[index] = _find(index)
    _devices[index].activate()
    return _devices[index]


def current_device() -> Device:
    """The device of this thread's current context (device 0's primary context, made current, if none)."""
    with _named("finding the current device"):
        index = _core.Device().device_id
    return init(index)


def memory_info() -> tuple[int, int]:
    """(free, total) bytes of the current device."""
    free, total = check(cu.cuMemGetInfo(), "cuMemGetInfo")
    return int(free), int(total)


# ---------------------------------------------------------------- streams, events, memory


class _Resource:
    """Closes on `with` exit; subclasses free their handle in `close`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Stream(_Resource):
    """A non-blocking stream on the current device (TensorRT recommends against the legacy default stream), or,
    with `handle`, a stream another library owns (torch's): used here, never destroyed here."""

    def __init__(self, handle: int | None = None) -> None:
        self._owned = handle is None
        with _named("creating a stream"):
            if self._owned:
                self._stream = _core.Device().create_stream(options=_core.StreamOptions(nonblocking=True))
            else:
                self._stream = _core.Stream.from_handle(int(handle))

    @property
    def handle(self) -> int:
        return int(self._stream.handle)

    def synchronize(self) -> None:
        with _named("synchronizing a stream"):
            self._stream.sync()

    def wait(self, event: "Event") -> None:
        """Work queued here from now on starts after `event` (recorded on another stream): no host wait."""
        with _named("waiting for an event"):
            self._stream.wait(event._event)

    def close(self) -> None:
        if self._stream is not None and self._owned:
            with _named("destroying a stream"):
                self._stream.close()
        self._stream = None


class Event(_Resource):
    """A CUDA event, with timing unless `timing=False` (cheaper, for ordering only); `elapsed_ms(start, end)` is the
    GPU time between two recorded events."""

    def __init__(self, timing: bool = True) -> None:
        with _named("creating an event"):
            self._event = _core.Device().create_event(options=_core.EventOptions(timing_enabled=timing))

    def record(self, stream: Stream) -> None:
        with _named("recording an event"):
            stream._stream.record(self._event)

    def synchronize(self) -> None:
        with _named("synchronizing an event"):
            self._event.sync()

    @staticmethod
    def elapsed_ms(start: "Event", end: "Event") -> float:
        with _named("timing events"):
            return float(end._event - start._event)

    def close(self) -> None:
        if self._event is not None:
            with _named("destroying an event"):
                self._event.close()
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
        with _named(f"cuMemAllocHost({nbytes} bytes)"):
            self._buffer = _core.LegacyPinnedMemoryResource().allocate(nbytes)
        raw = (ctypes.c_byte * nbytes).from_address(int(self._buffer.handle))
        self.array = np.frombuffer(raw, dtype=self.dtype, count=self.size)

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape))
        if count > self.size:
            raise ValueError(f"shape {shape} needs {count} elements, pinned buffer holds {self.size}")
        return self.array[:count].reshape(shape)

    def close(self) -> None:
        if self._buffer is not None:
            self.array = None
            with _named("cuMemFreeHost"):
                self._buffer.close()
            self._buffer = None


# ---------------------------------------------------------------- NVRTC, kernels, launches


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise CompileError(f"cuda-python is not installed: pip install cuda-python; {NVRTC_HINT}") from exc
    return nvrtc


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    try:
        return tuple(check(_nvrtc().nvrtcVersion(), "nvrtcVersion"))
    except RuntimeError as exc:  # cuda-python raises when libnvrtc itself cannot be found
        raise CompileError(f"NVRTC cannot be loaded ({type(exc).__name__}): {NVRTC_HINT}") from None


@functools.cache
def nvrtc_archs() -> tuple[int, ...]:
    """The architectures (e.g. 90) the installed NVRTC compiles for."""
    nvrtc_version()  # a clear error when libnvrtc is missing
    return tuple(check(_nvrtc().nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))


def compile_program(source: bytes, name: str, options: list[str], kind: str, headers: dict[str, bytes]) -> bytes:
    """NVRTC's PTX or cubin (`kind`) of `source`; `headers` maps include names to their text."""
    if kind not in ("ptx", "cubin"):
        raise ValueError(f"kind must be 'ptx' or 'cubin', not {kind!r}")
    nvrtc = _nvrtc()
    nvrtc_version()
    prog = check(nvrtc.nvrtcCreateProgram(source, name.encode(), len(headers), list(headers.values()),
                                          [h.encode() for h in headers]), "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in options]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if int(err) != 0:
            size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            log = log.rstrip(b"\x00 ").decode(errors="replace").strip()
            raise CompileError(f"NVRTC compile of {name} failed ({err.name}){': ' + log if log else ''}")
        get_size, get = ((nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX) if kind == "ptx"
                         else (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN))
        image = b" " * check(get_size(prog), f"{kind} size of {name}")
        check(get(prog, image), f"{kind} of {name}")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return image.rstrip(b"\x00") if kind == "ptx" else image


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: `$ANCHORTRT_KERNEL_CACHE`, else `$XDG_CACHE_HOME/anchortrt/kernels`, else
    `~/.cache/anchortrt/kernels`."""
    if os.environ.get("ANCHORTRT_KERNEL_CACHE"):
        return Path(os.environ["ANCHORTRT_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base, "anchortrt", "kernels")


def compile_cached(source: bytes, name: str, options: list[str], kind: str,
                   headers: dict[str, bytes] | None = None) -> bytes:
    """`compile_program`, its result kept in `kernel_cache_dir()`: one file per (source, headers, NVRTC version,
    options, kind) hash, read instead of compiling when it is there. A cache that cannot be written only costs a
    compile next time."""
    headers = headers or {}
    key = hashlib.sha256(json.dumps(
        [source.hex(), [h.hex() for h in headers.values()], nvrtc_version(), options, kind], sort_keys=True
    ).encode()).hexdigest()
    path = kernel_cache_dir() / f"{Path(name).stem}-{key[:32]}.{kind}"
    try:
        return path.read_bytes()
    except OSError:
        pass
    image = compile_program(source, name, options, kind, headers)
    try:
        write_atomic(path, image)  # whole or not at all: another process may be reading it
    except (OSError, BadInput):  # BadInput: core.sidecar refuses the path (a folder there, a broken link)
        pass
    return image


def target_arch(compute_capability: int) -> int:
    """The newest architecture NVRTC supports that a device of this compute capability (e.g. 90) can run."""
    usable = [a for a in nvrtc_archs() if a <= compute_capability]
    if not usable:
        raise CompileError(
            f"NVRTC {'.'.join(map(str, nvrtc_version()))} cannot compile for compute capability "
            f"{compute_capability}: it supports {nvrtc_archs()}"
        )
    return max(usable)


def load_kernel(image: bytes, kind: str, name: str) -> Any:
    """Kernel `name` of a cubin or PTX image (`kind`), loaded for the current context."""
    if kind not in ("ptx", "cubin"):
        raise ValueError(f"kind must be 'ptx' or 'cubin', not {kind!r}")
    with _named(f"loading the {kind} of {name}"):
        code = _core.ObjectCode.from_cubin(image) if kind == "cubin" else _core.ObjectCode.from_ptx(image)
        return code.get_kernel(name)


def launch(kernel: Any, grid: tuple, block: tuple, stream: int, *args: Any, shared_mem: int = 0,
           name: str = "a kernel") -> None:
    """Queue `kernel` on the stream with this handle (ours, TensorRT's or torch's). Arguments are passed by
    their C type: numpy scalars (np.uint64 for pointers, np.int32) or cuda.core Buffers."""
    with _named(f"launching {name}"):
        _core.launch(_stream_of(int(stream)), _config(tuple(grid), tuple(block), int(shared_mem)), kernel, *args)


# Launches from Python are host-bound for small kernels: build each configuration and stream wrapper once.
@functools.lru_cache(maxsize=256)
def _config(grid: tuple, block: tuple, shared_mem: int) -> Any:
    return _core.LaunchConfig(grid=grid, block=block, shmem_size=shared_mem)


@functools.lru_cache(maxsize=64)
def _stream_of(handle: int) -> Any:
    return _core.Stream.from_handle(handle)  # a wrapper that owns nothing: the handle's owner destroys it


# ---------------------------------------------------------------- graphs


class Graph(_Resource):
    """An instantiated CUDA graph of the work `enqueue` puts on `stream` while captured.

    cuda.core's GraphBuilder of a stream captures that very stream, so work queued on its handle by another
    library (TensorRT's execute_async_v3) is captured too. Capture is thread-local (as trtexec does it): other
    threads may keep using CUDA meanwhile. Everything captured is frozen: kernel arguments, pointers and copy
    sizes. Replay with new data by writing into the same buffers.
    """

    def __init__(self, stream: Stream, enqueue: Callable[[], Any]) -> None:
        self._graph = None
        builder = stream._stream.create_graph_builder()
        try:
            with _named("cuStreamBeginCapture"):
                builder.begin_building("thread_local")
            enqueue()
            with _named("cuStreamEndCapture"):
                builder.end_building()
            with _named("cuGraphInstantiate"):
                self._graph = builder.complete()
        finally:
            # Ends a capture still open (enqueue raised, or the capture was invalidated) so the stream stays
            # usable, and frees the captured template; the instantiated graph does not need it.
            with contextlib.suppress(Exception):
                builder.close()

    def launch(self, stream: Stream) -> None:
        with _named("cuGraphLaunch"):
            self._graph.launch(stream._stream)

    def close(self) -> None:
        if self._graph is not None:
            with _named("cuGraphExecDestroy"):
                self._graph.close()
            self._graph = None

"""Run an AnchorDETR TensorRT engine with cuda-python: `Engine` (one per file) and `EngineRunner` (one per stream).

An EngineRunner is a `runtime.detector.Detector` (limits from the engine's optimisation profile) and, with its
device input buffers (`input_pointers`, `sibling`, `start_on_device`), a `runtime.pipeline.DeviceRunner` that the
GPU preprocessing path writes into.

Before TensorRT sees the plan, the sidecar written by ``netdef.build`` is checked: the TensorRT version, the GPU's
compute capability and (when the caller names them) the weights must match, each refused with one line.

A runner allocates everything once, for the profile's largest shape: device buffers for every input and output,
pinned host buffers of the same sizes, one block of TensorRT scratch memory, an execution context, one stream,
two timing events. `infer` copies a batch into the pinned buffers, then queues the upload, ``execute_async_v3``
and the downloads on the runner's stream and waits once. With ``cuda_graphs=True`` the first call for each
(batch, height, width) runs on a new context of its own, which is then captured; later calls of that shape replay
the graph on that context (at most `EngineRunner.MAX_GRAPHS` shapes, least recently used evicted). A context
never changes shape under a graph: TensorRT does not promise that a graph captured at one shape survives the
context running another. A shape that cannot be captured stays on plain enqueue (the reason is kept in
`graph_failures`).

Several runners can share one `Engine` (deserialised once): each has its own context, buffers and stream, so
they can run concurrently from different threads.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.backend import BackendError, get_runtime_backend, lean_library
from core.sidecar import (
    REBUILD_HINT, Profile, SidecarError, check_sidecar, default_engine_path, load_sidecar, weights_problem,
)
from core import cuda
from core.errors import AnchorError, BadInput, Unavailable
from runtime.detector import ProfileDetector
from runtime.preprocess import ShapeError

DEFAULT_ENGINE = default_engine_path("r50_dc5", "fp16")  # what `python -m netdef.build --fp16` writes
INPUTS = ("images", "masks")
# Architectures TensorRT-RTX 1.7 compiles for (its ComputeCapability enum); Hopper (9.x) is not among them.
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")


def require_file(engine_path: str | Path) -> Path:
    path = Path(engine_path)
    if not path.is_file():
        raise BadInput(f"engine {path} not found: build one with `python -m netdef.build --fp16` or pass --engine")
    return path


def _input_shapes(batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    return {"images": (batch, 3, height, width), "masks": (batch, height, width)}


def _capture_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps errors for our one-line messages instead of printing them."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg.strip())

        @property
        def last_error(self) -> str:
            return self.errors[-1] if self.errors else "no details from TensorRT"

    return Logger()


def read_sidecar(engine_path: str | Path) -> tuple[Path, dict[str, Any], Profile]:
    """The engine file, its sidecar and the sidecar's profile, or BadInput: what can be checked without a GPU."""
    path = require_file(engine_path)
    try:
        sidecar = load_sidecar(path)
        return path, sidecar, Profile.from_dict(sidecar["profile"])
    except (SidecarError, KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"engine {path}: {exc}") from None


class Engine:
    """A checked, deserialised engine and its sidecar; share it between runners with `EngineRunner(engine)`."""

    def __init__(self, path: str | Path = DEFAULT_ENGINE, weights_sha256: str | None = None, device: int = 0):
        self.path, self.sidecar, self.profile = read_sidecar(path)
        mismatch = weights_sha256 and weights_problem(self.sidecar, weights_sha256)
        if mismatch:
            raise BadInput(f"{self.path}: {mismatch}; name the weights it was built from, or rebuild it from these "
                           "with `python -m netdef.build --weights ...`")
        try:
            backend = get_runtime_backend(self.sidecar["backend"], bool(self.sidecar.get("version_compatible")))
        except BackendError as exc:
            raise Unavailable(f"engine {self.path} was built with {self.sidecar['backend']}: {exc}") from None
        # A plan built with --exclude-lean-runtime runs on the lean runtime of exactly its builder's version: loaded
        # from the installed tensorrt-lean libs of that version when the installed TensorRT is another one.
        built = self.sidecar["trt_version"]
        excluded = self.sidecar["version_compatible"] and self.sidecar["lean_runtime_excluded"]
        lean = lean_library(built) if excluded and backend.version != built else None
        version = built if lean else backend.version
        self._check(backend, compute_capability=None, trt_version=version)  # before touching the GPU
        self.device = cuda.init(device)
        self._check(backend, compute_capability=self.device.compute_capability, trt_version=version)
        self.trt = backend.trt
        self._logger = _capture_logger(self.trt)
        self._runtime = self.trt.Runtime(self._logger)
        if lean:
            self._runtime = self._runtime.load_runtime(str(lean))
            if self._runtime is None:
                raise Unavailable(f"engine {self.path}: TensorRT could not load the lean runtime {lean}: "
                                  f"{self._logger.last_error}")
        elif self.sidecar["version_compatible"]:
            self._runtime.engine_host_code_allowed = True  # the plan's embedded lean runtime runs
        self.trt_engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.trt_engine is None:
            problem = (f"TensorRT could not load {self.path} on {self.device.name} (compute capability "
                       f"{self.device.compute_capability}): {self._logger.last_error}")
            if backend.name == "tensorrt-rtx" and self.device.compute_capability not in RTX_COMPUTE_CAPABILITIES:
                raise Unavailable(f"{problem}; TensorRT-RTX targets compute capability "
                                  f"{', '.join(RTX_COMPUTE_CAPABILITIES)} only: build with full TensorRT (--backend tensorrt)")
            raise BadInput(f"{problem}; {REBUILD_HINT}")
        names = [self.trt_engine.get_tensor_name(i) for i in range(self.trt_engine.num_io_tensors)]
        is_input = {n: self.trt_engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT for n in names}
        self.inputs = tuple(n for n in names if is_input[n])
        self.outputs = tuple(n for n in names if not is_input[n])
        if sorted(self.inputs) != sorted(INPUTS):
            raise BadInput(f"engine {self.path} has inputs {list(self.inputs)}, not AnchorDETR's {list(INPUTS)}")
        self.dtypes = {n: np.dtype(self.trt.nptype(self.trt_engine.get_tensor_dtype(n))) for n in names}
        # The plan's own profile is authoritative; (B,3,H,W) -> (B,H,W).
        self.profile = Profile(*(
            (int(s[0]), int(s[2]), int(s[3])) for s in self.trt_engine.get_tensor_profile_shape("images", 0)
        ))

    def _check(self, backend: Any, compute_capability: str | None, trt_version: str) -> None:
        try:
            check_sidecar(
                self.sidecar, trt_version=trt_version, compute_capability=compute_capability, backend=backend.name
            )
        except SidecarError as exc:
            raise Unavailable(f"{self.path}: {exc}") from None

    def close(self) -> None:
        self.trt_engine = None
        self._runtime = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class EngineRunner(ProfileDetector):
    """Execution contexts, one stream and one buffer set on an `Engine`; use as a context manager.

    Plain enqueue uses one context whose input shape follows the batch. With ``cuda_graphs=True`` every captured
    (batch, height, width) gets a context of its own that keeps that shape, so a graph is only ever replayed on
    the context and shape it was captured with; the `MAX_GRAPHS` most recently used are kept (least recently
    used evicted: graph and context freed). All contexts share one block of TensorRT scratch memory: they run
    one after another on the runner's stream, which is what makes sharing safe.
    """

    MAX_GRAPHS = 8  # shapes with a captured graph and context; each adds a context's host state and a graph
    name = "engine"

    def __init__(
        self,
        engine: str | Path | Engine = DEFAULT_ENGINE,
        weights_sha256: str | None = None,
        *,
        cuda_graphs: bool = False,
        device: int = 0,
    ):
        self._own_engine = not isinstance(engine, Engine)
        self.engine = Engine(engine, weights_sha256, device) if self._own_engine else engine
        self.profile = self.engine.profile
        self.cuda_graphs = cuda_graphs
        self.graph_failures: dict[tuple[int, int, int], str] = {}
        self.last_timing: dict[str, Any] = {}
        # shape -> (its own context, its graph), least recently used first
        self._graphs: OrderedDict[tuple[int, int, int], tuple[Any, cuda.Graph]] = OrderedDict()
        self._resources: list[Any] = []
        self._shape: tuple[int, int, int] | None = None  # the plain context's current input shape
        self._output_shapes: dict[tuple[int, int, int], dict[str, tuple[int, ...]]] = {}
        self.stream: cuda.Stream | None = None
        self.context: Any = None
        self._top_k: Any = None  # the device top-100 for raw outputs: None = not yet decided, False = none
        try:
            self._allocate()
        except BaseException:
            self.close()
            raise

    @property
    def description(self) -> str:
        """The engine in one line: file, precision, plugins, backend and GPU."""
        side = self.engine.sidecar
        plugins = ",".join(side["plugins"]) or "no plugins"
        return (f"TensorRT engine {self.engine.path.name}: {side['precision'].upper()}, {plugins}, "
                f"{side['backend']} {side['trt_version']} on {self.engine.device.name}")

    def _allocate(self) -> None:
        self.engine.device.activate()
        self.stream = self._keep(cuda.Stream())
        self._start, self._end = self._keep(cuda.Event()), self._keep(cuda.Event())
        trt_engine = self.engine.trt_engine
        self._scratch = self._keep(cuda.DeviceBuffer(trt_engine.get_device_memory_size_for_profile_v2(0)))
        self.context = self._new_context()
        largest = self._set_shape(self.context, self.profile.max)
        self._shape = self.profile.max
        self._device: dict[str, cuda.DeviceBuffer] = {}
        self._host: dict[str, cuda.PinnedBuffer] = {}
        for name, shape in largest.items():
            dtype = self.engine.dtypes[name]
            count = int(np.prod(shape))
            self._device[name] = self._keep(cuda.DeviceBuffer(count * dtype.itemsize))
            self._host[name] = self._keep(cuda.PinnedBuffer(count, dtype))
        self._bind(self.context)

    def _keep(self, resource: Any) -> Any:
        self._resources.append(resource)
        return resource

    def _new_context(self) -> Any:
        """A context that uses the runner's scratch block instead of allocating its own."""
        trt = self.engine.trt
        context = self.engine.trt_engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise Unavailable(f"TensorRT could not create an execution context: {self.engine._logger.last_error}")
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1; the `device_memory` setter before
            context.set_device_memory(self._scratch.ptr, self._scratch.nbytes)
        else:
            context.device_memory = self._scratch.ptr
        return context

    def _bind(self, context: Any) -> None:
        for name, buffer in self._device.items():
            if not context.set_tensor_address(name, buffer.ptr):
                raise Unavailable(f"TensorRT refused the address of {name}: {self.engine._logger.last_error}")

    def _set_shape(self, context: Any, shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
        """Set `context`'s input shapes for (batch, height, width); returns every I/O tensor's shape."""
        for name, dims in _input_shapes(*shape).items():
            if not context.set_input_shape(name, dims):
                raise ShapeError(f"TensorRT refused {name} of shape {dims}: {self.engine._logger.last_error}")
        if shape not in self._output_shapes:
            try:
                missing = context.infer_shapes()
            except RuntimeError as exc:  # how the bindings report a failed inference
                raise ShapeError(f"TensorRT cannot infer output shapes for batch {shape[0]} of {shape[1]}x{shape[2]} "
                                 f"({exc}): choose another size or rebuild the engine") from None
            if missing:
                raise BadInput(f"TensorRT cannot infer output shapes, missing {missing}")
            shapes = dict(_input_shapes(*shape))
            shapes.update({n: tuple(context.get_tensor_shape(n)) for n in self.engine.outputs})
            self._output_shapes[shape] = shapes
        return self._output_shapes[shape]

    def _context_for(self, shape: tuple[int, int, int]) -> Any:
        """The context to run a shape without a graph: a fresh one to capture next (this run is its warm-up, so
        TensorRT's lazy initialisation is not captured), else the plain context set to the shape."""
        if self.cuda_graphs and shape not in self.graph_failures:
            context = self._new_context()
            self._bind(context)
            self._set_shape(context, shape)
            return context
        if self._shape != shape:
            self._set_shape(self.context, shape)
            self._shape = shape
        return self.context

    def _enqueue(self, context: Any) -> None:
        if not context.execute_async_v3(self.stream.handle):
            raise AnchorError(f"TensorRT execute_async_v3 failed: {self.engine._logger.last_error}")

    def _capture(self, shape: tuple[int, int, int], context: Any) -> None:
        try:
            graph = cuda.Graph(self.stream, lambda: self._enqueue(context))
        except AnchorError as exc:
            self.graph_failures[shape] = str(exc)  # the context is dropped; the shape runs on the plain one
            return
        if len(self._graphs) >= self.MAX_GRAPHS:
            _, (_, oldest) = self._graphs.popitem(last=False)  # its context goes with the tuple
            oldest.close()
        self._graphs[shape] = (context, graph)

    def infer(self, images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        """Raw engine outputs for a batch: images (B,3,H,W) float32, masks (B,H,W) bool (True = padding).

        Sizes below the profile minimum are padded (masked); outputs keep the caller's batch size.
        """
        if self.context is None:
            raise AnchorError("this EngineRunner is closed: create a new one")
        started = time.perf_counter()
        batch = images.shape[0]
        images, masks = self.fit_profile(np.asarray(images), np.asarray(masks))
        self.engine.device.activate()
        for name, array in (("images", images), ("masks", masks)):
            self._host[name].view(array.shape)[...] = array
            self._device[name].upload(self._host[name].view(array.shape), self.stream)
        return self._start_run((images.shape[0], images.shape[2], images.shape[3]), batch, started)()

    def sibling(self) -> "EngineRunner":
        """Another runner (context, buffers, stream) on this runner's Engine, e.g. a second buffer set."""
        return EngineRunner(self.engine, cuda_graphs=self.cuda_graphs)

    @property
    def input_pointers(self) -> tuple[int, int]:
        """Device addresses of the images and masks buffers, for a producer that writes them on the GPU."""
        return self._device["images"].ptr, self._device["masks"].ptr

    def device_inputs(self, batch: int, height: int, width: int) -> tuple[int, int]:
        """`input_pointers`: the buffers hold the profile's largest batch, so any shape inside it fits."""
        (max_b, max_h, max_w) = self.profile.max
        if batch > max_b or height > max_h or width > max_w:
            raise ShapeError(f"shape {(batch, height, width)} is outside the engine profile ({self.profile})")
        return self.input_pointers

    def start_on_device(self, shape: tuple[int, int, int], batch: int | None = None
                        ) -> Callable[[], dict[str, np.ndarray]]:
        """Queue the run of inputs already in `input_pointers` (written on this runner's stream, or synchronised
        by the caller), laid out C-contiguous as (B,3,H,W) float32 and (B,H,W) bool for `shape` = (B, H, W) inside
        the profile, and return at once; the returned call waits for it and gives the raw outputs of the first
        `batch` images (default all B). Call it before this runner runs anything else: the outputs come back
        through the runner's own pinned buffers."""
        if self.context is None:
            raise AnchorError("this EngineRunner is closed: create a new one")
        (min_b, min_h, min_w), (max_b, max_h, max_w) = self.profile.min, self.profile.max
        if not (min_b <= shape[0] <= max_b and min_h <= shape[1] <= max_h and min_w <= shape[2] <= max_w):
            raise ShapeError(f"shape {shape} is outside the engine profile ({self.profile})")
        self.engine.device.activate()
        return self._start_run(tuple(shape), shape[0] if batch is None else batch, time.perf_counter())

    def infer_on_device(self, shape: tuple[int, int, int], batch: int | None = None) -> dict[str, np.ndarray]:
        """`start_on_device`, waited for."""
        return self.start_on_device(shape, batch)()

    def _start_run(self, shape: tuple[int, int, int], batch: int, started: float
                   ) -> Callable[[], dict[str, np.ndarray]]:
        """Queue the uploaded inputs of `shape` on the stream (a captured graph where there is one) and the
        downloads; the returned call synchronises, copies the outputs out and, after a shape's first run without
        a graph, captures one for it."""
        captured = self._graphs.get(shape)
        if captured is not None:
            self._graphs.move_to_end(shape)
            context, graph = captured
        else:
            context, graph = self._context_for(shape), None
        shapes = self._output_shapes[shape]
        self._start.record(self.stream)
        if graph is not None:
            graph.launch(self.stream)
        else:
            self._enqueue(context)
        self._end.record(self.stream)
        outputs = {}
        top_k = self._device_top_k()
        if top_k is not None:  # raw outputs: the top-100 on the device, only it comes back
            (_, queries, classes) = shapes["pred_logits"]
            top_k.run(self._device["pred_logits"].ptr, self._device["pred_boxes"].ptr, shape[0], queries, classes)
        else:
            for name in self.engine.outputs:
                host = self._host[name].view(shapes[name])
                self._device[name].download(host, self.stream)
                outputs[name] = host

        def finish() -> dict[str, np.ndarray]:
            self.engine.device.activate()  # the pipeline calls it on another thread, and it may capture a graph
            self.stream.synchronize()
            ran = top_k.outputs() if top_k is not None else outputs
            result = {name: array[:batch].copy() for name, array in ran.items()}
            self.last_timing = {
                "gpu_ms": cuda.Event.elapsed_ms(self._start, self._end),
                "host_ms": 1000 * (time.perf_counter() - started),
                "graph": graph is not None,
            }
            if context is not self.context and graph is None:
                self._capture(shape, context)
            return result

        return finish

    def _device_top_k(self) -> Any:
        """For an engine with raw float32 outputs (built without the in-engine top-100), the device top-100
        (runtime.gpu_postprocess.DeviceTopK on this runner's stream), made on first use; else None. Where its
        kernel cannot be compiled or loaded the raw outputs are downloaded and the host takes the top-100, as before."""
        if self._top_k is None:
            self._top_k = False
            dtypes = self.engine.dtypes
            if set(self.engine.outputs) == {"pred_logits", "pred_boxes"} and all(
                    dtypes[n] == np.float32 for n in self.engine.outputs):
                from runtime.gpu_postprocess import DeviceTopK

                try:
                    self._top_k = self._keep(DeviceTopK(self.profile.max[0], stream=self.stream))
                except cuda.CudaError:  # no NVRTC, or no kernel for this GPU: the host does it
                    pass
        return self._top_k or None

    def close(self) -> None:
        """Free graphs, contexts, buffers, events and the stream (and the engine if this runner loaded it)."""
        if self.stream is not None:
            self.stream.synchronize()  # nothing may still use the graphs and buffers freed below
        for _, graph in self._graphs.values():
            graph.close()
        self._graphs.clear()
        self.context = None  # contexts go before the scratch memory they use
        while self._resources:
            self._resources.pop().close()
        self.stream = self.context = None
        if self._own_engine:
            self.engine.close()

    def __enter__(self) -> "EngineRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

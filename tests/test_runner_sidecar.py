"""EngineRunner without a GPU: the checks before TensorRT sees the plan (engine file, sidecar, backend, version,
GPU, weights) and the bookkeeping of execution contexts and CUDA graphs."""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import pytest
from PIL import Image

from core.backend import Backend
from core.sidecar import SidecarError, check_sidecar, load_sidecar, write_sidecar
from core import cuda
from core.errors import AnchorError, BadInput, Unavailable
from runtime.preprocess import ShapeError
from runtime.runner import INPUTS, Engine, EngineRunner

from helpers import raises_unless

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_FULL_TRT = importlib.util.find_spec("tensorrt") is not None


def rtx_version():
    import tensorrt_rtx

    return tensorrt_rtx.__version__


def make_engine(tmp_path, **overrides):
    """A plan file (not a real engine) with a complete sidecar beside it."""
    path = tmp_path / "model.plan"
    path.write_bytes(b"not a real plan")
    sidecar = {
        "config": {}, "profile": {"min": [1, 320, 512], "opt": [1, 800, 800], "max": [4, 1344, 1344]},
        "precision": "fp16", "plugins": [], "postprocess": False, "backend": "tensorrt-rtx",
        "trt_version": rtx_version() if HAS_RTX else "1.7.1.116", "gpu": None, "weights_sha256": "ab" * 32,
        "inputs": {}, "outputs": {}, "version_compatible": False, "lean_runtime_excluded": False,
        "anchortrt_version": "0.1.0",
    }
    sidecar.update(overrides)
    write_sidecar(path, sidecar)
    return path


def test_missing_engine_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(BadInput, match=r"engine .*nothere.plan not found: build one with `python -m netdef.build"):
        Engine(tmp_path / "nothere.plan")


def test_missing_sidecar_is_bad_input(tmp_path):
    path = tmp_path / "model.plan"
    path.write_bytes(b"x")
    with pytest.raises(BadInput, match=r"no sidecar .*model.json") as info:
        Engine(path)
    assert info.value.exit_code == 2


@pytest.mark.skipif(HAS_FULL_TRT, reason="full TensorRT is installed here")
def test_engine_of_an_uninstalled_backend_is_an_environment_error(tmp_path):
    with pytest.raises(Unavailable, match=r"built with tensorrt: .*pip install 'anchortrt\[trt\]'") as info:
        Engine(make_engine(tmp_path, backend="tensorrt", trt_version="11.4.0"))
    assert info.value.exit_code == 3


@pytest.mark.skipif(not HAS_RTX, reason="needs tensorrt_rtx")
def test_other_tensorrt_version_refused(tmp_path):
    with pytest.raises(Unavailable, match=r"built by TensorRT 1\.0\.0, this is TensorRT " + rtx_version()):
        Engine(make_engine(tmp_path, trt_version="1.0.0"))


def test_weights_mismatch_is_bad_input_before_the_backend_and_gpu(tmp_path):
    # backend "tensorrt" is not installed here: the weights are checked first, and they are the user's input
    path = make_engine(tmp_path, backend="tensorrt", trt_version="11.4.0")
    with pytest.raises(BadInput, match=r"embeds weights sha256 ababababab.*named weights are cdcdcdcdcd") as info:
        Engine(path, weights_sha256="cd" * 32)
    assert info.value.exit_code == 2


def test_no_gpu_is_one_clear_environment_error(tmp_path, monkeypatch):
    def no_driver(index=0):
        raise cuda.NoGpuError(f"no NVIDIA driver: DynamicLibNotFoundError; {cuda.NO_GPU_HINT}")

    monkeypatch.setattr(cuda, "init", no_driver)
    monkeypatch.setattr("runtime.runner.get_runtime_backend", lambda name, vc=False: fake_backend(name, "1.7.1.116"))
    with pytest.raises(cuda.NoGpuError, match="nvidia-smi") as info:
        Engine(make_engine(tmp_path, trt_version="1.7.1.116"), weights_sha256="ab" * 32)
    assert info.value.exit_code == 3


def test_real_driver_absence_is_reported_as_no_gpu():
    from conftest import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(cuda.NoGpuError, match="NVIDIA"):
        cuda.init()


class FakeLogger:
    class Severity:
        INTERNAL_ERROR, ERROR, WARNING = "internal", "error", "warning"

    def __init__(self):
        pass


class FakeRuntime:
    """deserialize_cuda_engine fails the way TensorRT does with a foreign plan: logs an error, returns None."""

    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data):
        self.logger.log(FakeLogger.Severity.WARNING, "ignored")
        self.logger.log(FakeLogger.Severity.ERROR, "Serialization assertion magicTagRead == kMAGIC_TAG failed")
        return None


def fake_backend(name, version):
    return Backend(name, types.SimpleNamespace(__version__=version, ILogger=FakeLogger, Runtime=FakeRuntime))


def fake_gpu(compute_capability):
    return lambda index=0: cuda.Device(index, "Fake GPU", compute_capability, 1 << 34, None)


H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@pytest.mark.parametrize(
    "backend, version, built_on, running_cc, error, pattern",
    [
        ("tensorrt", "11.4.0", H100, "8.6", Unavailable,
         r"built for NVIDIA H100 80GB HBM3 \(compute capability 9\.0\), this GPU is 8\.6"),
        ("tensorrt", "11.4.0", H100, "9.0", BadInput, r"TensorRT could not load .*model.plan on Fake GPU .*magicTagRead"),
        ("tensorrt-rtx", "1.7.1.116", None, "9.0", Unavailable,
         r"TensorRT-RTX targets compute capability 7\.5, .* build with full TensorRT"),
    ],
    ids=["other-gpu", "unloadable-plan", "rtx-on-hopper"],
)
def test_gpu_checks_and_deserialisation_failure(tmp_path, monkeypatch, backend, version, built_on, running_cc,
                                                error, pattern):
    monkeypatch.setattr("runtime.runner.get_runtime_backend", lambda name, vc=False: fake_backend(name, version))
    monkeypatch.setattr(cuda, "init", fake_gpu(running_cc))
    path = make_engine(tmp_path, backend=backend, trt_version=version, gpu=built_on)
    with pytest.raises(error, match=pattern):
        Engine(path)


# The lean runtime: version-compatible engines of full TensorRT run on tensorrt_lean (a runtime-only module, no
# Builder) of the same major version, no older than the builder; standard engines keep the exact match.

def fake_module(name, version):
    """A runtime-only TensorRT module (Runtime and ILogger, no Builder), importable as `name`."""
    mod = types.ModuleType(name)
    mod.__version__, mod.ILogger, mod.Runtime = version, FakeLogger, FakeRuntime
    return mod


@pytest.fixture
def installed(monkeypatch):
    """installed(tensorrt=None | version, tensorrt_lean=None | version): what `import` finds; None = absent."""

    def install(**versions):
        for name, version in versions.items():
            monkeypatch.setitem(sys.modules, name, None if version is None else fake_module(name, version))
        # the runner must never import it: it needs full TensorRT (`import tensorrt`) and AOT plans do not use it
        monkeypatch.setitem(sys.modules, "tensorrt_lean.plugin", None)

    return install


VC_SIDECAR = {"backend": "tensorrt", "trt_version": "11.2.1.2", "version_compatible": True,
              "lean_runtime_excluded": False, "gpu": H100, "weights_sha256": "ab" * 32}
EXCLUDED_SIDECAR = dict(VC_SIDECAR, lean_runtime_excluded=True)


@pytest.mark.parametrize("backend, version, ok", [
    ("tensorrt-lean", "11.4.0.106", True), ("tensorrt-lean", "11.2.1.2", True), ("tensorrt", "11.4.0.106", True),
    ("tensorrt-lean", "11.1.0.106", False), ("tensorrt-lean", "10.16.1.11", False), ("tensorrt", "12.0.0", False),
    ("tensorrt-lean", "11.2", False), ("tensorrt-rtx", "11.4.0", False),
])
def test_version_compatible_rule(backend, version, ok):
    check = lambda: check_sidecar(VC_SIDECAR, trt_version=version, compute_capability="9.0", backend=backend)
    if ok:
        check()
    else:
        with pytest.raises(SidecarError, match="this is TensorRT|this runtime uses tensorrt-rtx"):
            check()


def test_version_compatible_message_states_the_rule():
    with pytest.raises(SidecarError, match=r"built by TensorRT 11\.2\.1\.2 with --version-compatible, which runs on "
                                           r"TensorRT 11\.x from 11\.2\.1\.2 on; this is TensorRT 10\.16\.1\.11"):
        check_sidecar(VC_SIDECAR, trt_version="10.16.1.11", compute_capability="9.0", backend="tensorrt-lean")


def test_standard_engines_keep_the_exact_version_and_backend():
    standard = dict(VC_SIDECAR, version_compatible=False)
    check_sidecar(standard, trt_version="11.2.1.2", compute_capability="9.0", backend="tensorrt")
    with pytest.raises(SidecarError, match=r"built by TensorRT 11\.2\.1\.2, this is TensorRT 11\.4\.0\.106"):
        check_sidecar(standard, trt_version="11.4.0.106", compute_capability="9.0", backend="tensorrt")
    with pytest.raises(SidecarError, match=r"standard plan, and the TensorRT lean runtime loads only "
                                           r"version-compatible ones \(built with --version-compatible\)"):
        check_sidecar(standard, trt_version="11.2.1.2", compute_capability="9.0", backend="tensorrt-lean")
    # an RTX engine never runs on lean, whatever its flag says (RTX has no version-compatible plans)
    rtx = dict(VC_SIDECAR, backend="tensorrt-rtx", trt_version="1.7.1.116", gpu=None)
    with pytest.raises(SidecarError, match="built with tensorrt-rtx, but this runtime uses tensorrt-lean"):
        check_sidecar(rtx, trt_version="1.7.1.116", compute_capability="9.0", backend="tensorrt-lean")
    with pytest.raises(SidecarError, match=r"compute capability 9\.0\), this GPU is 8\.6"):  # VC keeps the GPU tie
        check_sidecar(VC_SIDECAR, trt_version="11.4.0.106", compute_capability="8.6", backend="tensorrt-lean")


def test_a_packaging_suffix_is_the_same_release():
    """10.13.3.9.post1 ships 10.13.3.9's tensorrt.so: either loads the other's standard plans; 10.13.3.10 does not."""
    built = dict(VC_SIDECAR, version_compatible=False, trt_version="10.13.3.9")
    check_sidecar(built, trt_version="10.13.3.9.post1", compute_capability="9.0", backend="tensorrt")
    check_sidecar(dict(built, trt_version="10.13.3.9.post1"), trt_version="10.13.3.9", compute_capability="9.0",
                  backend="tensorrt")
    with pytest.raises(SidecarError, match=r"built by TensorRT 10\.13\.3\.9, this is TensorRT 10\.13\.3\.10"):
        check_sidecar(built, trt_version="10.13.3.10", compute_capability="9.0", backend="tensorrt")


@pytest.mark.parametrize("backend, version, ok", [
    ("tensorrt-lean", "11.2.1.2", True), ("tensorrt", "11.2.1.2", True), ("tensorrt-lean", "11.4.0.106", False),
    ("tensorrt", "11.2.1.3", False), ("tensorrt-lean", "11.1.0.106", False),
])
def test_excluded_lean_runtime_needs_exactly_the_builders_version(backend, version, ok):
    """A plan built with --exclude-lean-runtime loads only with the lean runtime of the builder's version
    (IRuntime::loadRuntime's rule), where an embedded one loads on any later 11.x."""
    with raises_unless(ok, SidecarError, r"--exclude-lean-runtime, which runs only on the lean runtime of "
                                         r"exactly 11\.2\.1\.2.*pip install 'tensorrt-lean-cu13==11\.2\.1\.2'"):
        check_sidecar(EXCLUDED_SIDECAR, trt_version=version, compute_capability="9.0", backend=backend)


def test_sidecars_before_the_lean_runtime_field_read_as_that_builder_wrote_them(tmp_path):
    """Version-compatible plans of earlier builds always excluded the lean runtime; standard ones have none."""
    for vc in (True, False):
        path = make_engine(tmp_path, **dict(VC_SIDECAR, version_compatible=vc))
        side = path.with_suffix(".json")
        side.write_text(side.read_text().replace('"lean_runtime_excluded": false,', ""))
        assert "lean_runtime_excluded" not in side.read_text()
        assert load_sidecar(path)["lean_runtime_excluded"] is vc


class LeanLoadingRuntime(FakeRuntime):
    """A runtime whose load_runtime returns the runtime of the library it loads (recorded in ``loaded``)."""

    loaded: list = []

    def load_runtime(self, path):
        LeanLoadingRuntime.loaded.append(path)
        return FakeRuntime(self.logger)


@pytest.mark.parametrize("library", [None, "/site/tensorrt_lean_libs/libnvinfer_lean.so.11"])
def test_excluded_plan_on_another_tensorrt_loads_the_builders_lean_runtime_or_names_it(
        tmp_path, monkeypatch, installed, library):
    installed(tensorrt=None, tensorrt_lean="11.4.0.106")
    sys.modules["tensorrt_lean"].Runtime = LeanLoadingRuntime
    LeanLoadingRuntime.loaded = []
    monkeypatch.setattr("runtime.runner.lean_library", lambda version: library and version == "11.2.1.2" and library)
    monkeypatch.setattr(cuda, "init", fake_gpu("9.0"))
    path = make_engine(tmp_path, **EXCLUDED_SIDECAR)
    if library:  # loaded through Runtime.load_runtime, then TensorRT (the fake's deserialize) was reached
        with pytest.raises(BadInput, match=r"TensorRT could not load .*magicTagRead"):
            Engine(path)
        assert LeanLoadingRuntime.loaded == [library]
    else:
        with pytest.raises(Unavailable, match=r"exactly 11\.2\.1\.2; this is TensorRT 11\.4\.0\.106: "
                                              r"pip install 'tensorrt-lean-cu13==11\.2\.1\.2'") as info:
            Engine(path)
        assert info.value.exit_code == 3 and LeanLoadingRuntime.loaded == []


def test_embedded_lean_runtime_plans_load_with_host_code_allowed(tmp_path, monkeypatch, installed):
    installed(tensorrt="11.4.0.106", tensorrt_lean=None)
    runtimes = []

    class Recording(FakeRuntime):
        def __init__(self, logger):
            super().__init__(logger)
            runtimes.append(self)

    sys.modules["tensorrt"].Runtime = Recording
    monkeypatch.setattr(cuda, "init", fake_gpu("9.0"))
    for sidecar, host_code in ((VC_SIDECAR, True), (dict(VC_SIDECAR, version_compatible=False,
                                                          trt_version="11.4.0.106"), None)):
        with pytest.raises(BadInput, match="magicTagRead"):
            Engine(make_engine(tmp_path, **sidecar))
        # the plan's embedded lean runtime is host code; a standard plan runs none
        assert getattr(runtimes[-1], "engine_host_code_allowed", None) is host_code


def test_version_compatible_must_be_a_boolean(tmp_path):
    path = make_engine(tmp_path)
    side = path.with_suffix(".json")
    side.write_text(side.read_text().replace('"version_compatible": false', '"version_compatible": "false"'))
    with pytest.raises(SidecarError, match=r"version_compatible is 'false', not true or false"):
        load_sidecar(path)


@pytest.mark.parametrize("lean_version, accepted", [("11.4.0.106", True), ("11.1.0.106", False), ("10.16.1.11", False)])
def test_vc_engine_on_a_lean_only_machine(tmp_path, monkeypatch, installed, lean_version, accepted):
    installed(tensorrt=None, tensorrt_lean=lean_version)
    monkeypatch.setattr(cuda, "init", fake_gpu("9.0"))
    path = make_engine(tmp_path, **VC_SIDECAR)
    if accepted:  # every check passed: TensorRT (the fake's deserialize) was reached
        with pytest.raises(BadInput, match=r"TensorRT could not load .*magicTagRead"):
            Engine(path)
    else:
        with pytest.raises(Unavailable, match=rf"11\.x from 11\.2\.1\.2 on; this is TensorRT {lean_version}") as info:
            Engine(path)
        assert info.value.exit_code == 3
    assert sys.modules["tensorrt_lean.plugin"] is None  # never imported


def test_standard_engine_on_a_lean_only_machine_names_the_rebuild(tmp_path, monkeypatch, installed, capsys):
    from runtime import infer

    installed(tensorrt=None, tensorrt_lean="11.4.0.106")
    probed = []
    monkeypatch.setattr(cuda, "init", lambda index=0: probed.append(index))
    path = make_engine(tmp_path, **dict(VC_SIDECAR, version_compatible=False, trt_version="11.4.0.106"))
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert infer.main([str(image), "--engine", str(path)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only the TensorRT lean runtime is installed" in err[0]
    assert "rebuild the engine with `python -m netdef.build --version-compatible`" in err[0]
    assert not probed  # refused before the GPU is opened


# EngineRunner's contexts and graphs without a GPU: core.cuda and a runtime-only TensorRT module (no Builder)
# are replaced by recording fakes. The GPU stand-in (test_cuda_helpers_gpu.py) runs the same code on real CUDA.

class CpuStream:
    handle = 7

    def synchronize(self):
        pass

    def close(self):
        pass


class CpuEvent(CpuStream):
    def record(self, stream):
        pass

    @staticmethod
    def elapsed_ms(start, end):
        return 1.0


class CpuDeviceBuffer(CpuStream):
    count = 0

    def __init__(self, nbytes):
        CpuDeviceBuffer.count += 1
        self.nbytes, self.ptr = nbytes, 0x1000 * CpuDeviceBuffer.count

    def upload(self, host, stream):
        pass

    download = upload


class CpuPinned(CpuStream):
    def __init__(self, size, dtype):
        self.array = np.zeros(size, dtype)

    def view(self, shape):
        return self.array[: int(np.prod(shape))].reshape(shape)


class CpuGraph:
    """Runs the captured enqueue once (as capture does) and counts replays."""

    def __init__(self, stream, enqueue):
        enqueue()
        self.launches, self.closed = 0, False

    def launch(self, stream):
        self.launches += 1

    def close(self):
        self.closed = True


class RecordingContext:
    def __init__(self, engine):
        self.engine, self.shape, self.runs, self.memory, self.addresses = engine, None, [], None, {}

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_input_shape(self, name, dims):
        if name == "images":
            self.shape = (dims[0], dims[2], dims[3])
        return True

    def infer_shapes(self):
        return []

    def get_tensor_shape(self, name):
        return (self.shape[0], 4, 91 if name == "pred_logits" else 4)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        self.runs.append(self.shape)
        return True


class RecordingEngine:
    names = ("images", "masks", "pred_logits", "pred_boxes")
    num_io_tensors = 4

    def __init__(self):
        self.contexts = []  # weak references: the runner alone owns its contexts

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "input" if name in INPUTS else "output"

    def get_tensor_dtype(self, name):
        return np.bool_ if name == "masks" else np.float32

    def get_tensor_profile_shape(self, name, index):
        return [(1, 3, 8, 8), (1, 3, 16, 16), (2, 3, 32, 48)]

    def get_device_memory_size_for_profile_v2(self, index):
        return 4096

    def create_execution_context(self, strategy):
        assert strategy == "user-managed"
        context = RecordingContext(self)
        self.contexts.append(weakref.ref(context))
        return context


@pytest.fixture
def cpu_runner(tmp_path, monkeypatch):
    """make(**kwargs) -> an EngineRunner on fakes; the runtime-only module has no Builder."""
    trt = types.SimpleNamespace(
        __version__="11.4.0.106", ILogger=FakeLogger, TensorIOMode=types.SimpleNamespace(INPUT="input"),
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="user-managed"),
        nptype=lambda dtype: dtype,
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: RecordingEngine()),
    )
    monkeypatch.setattr("runtime.runner.get_runtime_backend", lambda name, vc=False: Backend("tensorrt-lean", trt))
    for name, fake in (("Stream", CpuStream), ("Event", CpuEvent), ("DeviceBuffer", CpuDeviceBuffer),
                       ("PinnedBuffer", CpuPinned), ("Graph", CpuGraph)):
        monkeypatch.setattr(cuda, name, fake)
    monkeypatch.setattr(cuda, "init", lambda index=0: types.SimpleNamespace(
        name="Fake GPU", compute_capability="9.0", activate=lambda: None))
    path = make_engine(tmp_path, **dict(VC_SIDECAR, trt_version="11.4.0.106"))
    return lambda **kwargs: EngineRunner(path, **kwargs)


def run_shape(runner, batch, height, width):
    runner.infer(np.zeros((batch, 3, height, width), np.float32), np.zeros((batch, height, width), bool))
    return runner.last_timing["graph"]


A, B, C = (2, 16, 24), (1, 32, 48), (2, 8, 8)


def test_each_captured_shape_has_its_own_context(cpu_runner):
    with cpu_runner(cuda_graphs=True) as runner:
        plain = runner.context
        assert [run_shape(runner, *A), run_shape(runner, *B)] == [False, False]
        (ctx_a, graph_a), (ctx_b, graph_b) = runner._graphs[A], runner._graphs[B]
        assert ctx_a is not ctx_b and plain not in (ctx_a, ctx_b)
        assert ctx_a.runs == [A, A] and ctx_b.runs == [B, B]  # warm-up run, then the captured one
        assert run_shape(runner, *A) is True
        assert runner._graphs[A] == (ctx_a, graph_a) and graph_a.launches == 1 and graph_b.launches == 0
        assert ctx_a.shape == A and ctx_a.runs == [A, A]  # replayed on its own context, at its own shape
        assert len(runner.engine.trt_engine.contexts) == 3 and plain.runs == []
        # one scratch block for all: they run one after another on the runner's stream
        assert plain.memory == ctx_a.memory == ctx_b.memory == (runner._scratch.ptr, 4096)
        assert ctx_a.addresses == ctx_b.addresses == plain.addresses
    assert graph_a.closed and graph_b.closed and not runner._graphs


def test_start_on_device_queues_the_run_and_its_call_waits_reads_and_captures(cpu_runner, monkeypatch):
    """start_on_device returns with the run queued and nothing waited for; the call it returns synchronises the
    stream once, gives the outputs and only then captures the shape's graph (its first run was the warm-up)."""
    waits = []
    monkeypatch.setattr(CpuStream, "synchronize", lambda self: waits.append(self))
    with cpu_runner(cuda_graphs=True) as runner:
        activated = []  # the threads that made the runner's device current
        runner.engine.device = types.SimpleNamespace(activate=lambda: activated.append(threading.current_thread()))
        with pytest.raises(ShapeError, match="outside the engine profile"):
            runner.start_on_device((3, 16, 24))  # the profile's largest batch is 2: refused before anything runs
        finish = runner.start_on_device(A, batch=1)
        context = runner.engine.trt_engine.contexts[-1]()
        assert context.runs == [A] and waits == [] and A not in runner._graphs
        runner._host["pred_logits"].array[:] = 7  # what the queued download would have written
        with ThreadPoolExecutor(1) as other:  # as the pipeline's post-processing stage calls it
            outputs, thread = other.submit(lambda: (finish(), threading.current_thread())).result()
        assert activated[-1] is thread  # before the wait and the capture, on the thread that made them
        assert waits == [runner.stream] and A in runner._graphs and runner.last_timing["graph"] is False
        assert outputs["pred_logits"].shape == (1, 4, 91) and (outputs["pred_logits"] == 7).all()
        runner._host["pred_logits"].array[:] = 0
        assert (outputs["pred_logits"] == 7).all()  # a copy: the pinned buffers are the next run's
        assert runner.infer_on_device(A)["pred_boxes"].shape == (2, 4, 4) and runner.last_timing["graph"] is True


def test_least_recently_used_graph_is_evicted_and_released(cpu_runner, monkeypatch):
    monkeypatch.setattr(EngineRunner, "MAX_GRAPHS", 2)
    with cpu_runner(cuda_graphs=True) as runner:
        for shape in (A, B, A, C):  # A used again after B: B is the least recently used when C arrives
            run_shape(runner, *shape)
        assert list(runner._graphs) == [A, C]
        contexts = runner.engine.trt_engine.contexts
        evicted = [ref for ref in contexts if ref() is None]
        assert len(contexts) == 4 and len(evicted) == 1  # plain, A, B, C: B's context freed
        assert run_shape(runner, *B) is False and list(runner._graphs) == [C, B]  # recaptured, A evicted


def test_plain_enqueue_uses_one_context_and_failed_captures_stay_plain(cpu_runner, monkeypatch):
    with cpu_runner() as runner:
        for shape in (A, B, A):
            assert run_shape(runner, *shape) is False
        assert runner.context.runs == [A, B, A] and not runner._graphs
        assert len(runner.engine.trt_engine.contexts) == 1

    def failing(stream, enqueue):
        raise AnchorError("TensorRT execute_async_v3 failed: capture refused")

    monkeypatch.setattr(cuda, "Graph", failing)
    with cpu_runner(cuda_graphs=True) as runner:
        assert [run_shape(runner, *A), run_shape(runner, *A)] == [False, False]
        assert "capture refused" in runner.graph_failures[A] and not runner._graphs
        assert runner.context.runs == [A]  # the first run was on the context that failed to capture


def test_failed_shape_inference_is_one_line_not_a_runtime_error(cpu_runner, monkeypatch):
    from core.errors import BadInput

    def refuse(self):
        raise RuntimeError("IExecutionContext::inferShapes: error")  # what the bindings raise

    monkeypatch.setattr(RecordingContext, "infer_shapes", refuse)
    with pytest.raises(BadInput, match=r"cannot infer output shapes for batch \d+ of \d+x\d+ "
                                       r"\(IExecutionContext::inferShapes: error\)"):
        cpu_runner()  # the runner sizes its buffers for the profile's largest shape when it opens

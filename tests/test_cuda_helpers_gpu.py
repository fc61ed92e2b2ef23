"""core.cuda on a real GPU, with an NVRTC-compiled saxpy kernel: no TensorRT involved."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

SAXPY = rb"""
extern "C" __global__ void saxpy(float a, const float* x, const float* y, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a * x[i] + y[i];
}
"""
N = 1 << 20
BLOCK = 256


@pytest.fixture(scope="module")
def cuda():
    from core import cuda

    cuda.init()
    return cuda


def compile_kernel(cuda, source: bytes, name: str):
    """`name` from `source`, compiled by NVRTC to a cubin for this GPU and loaded (core.cuda's own path)."""
    device = cuda.init()
    cubin = cuda.compile_program(source, f"{name}.cu", [f"--gpu-architecture=sm_{device.arch}"], "cubin", {})
    return cuda.load_kernel(cubin, "cubin", name)


@pytest.fixture(scope="module")
def saxpy(cuda):
    return compile_kernel(cuda, SAXPY, "saxpy")


def launch(cuda, kernel, stream, a, x, y, out, n=N):
    args = (np.float32(a), np.uint64(x.ptr), np.uint64(y.ptr), np.uint64(out.ptr), np.int32(n))
    cuda.launch(kernel, ((n + BLOCK - 1) // BLOCK, 1, 1), (BLOCK, 1, 1), stream.handle, *args, name="saxpy")


def test_device_and_memory_info(cuda):
    device = cuda.init()
    assert device.name and re.fullmatch(r"\d+\.\d+", device.compute_capability)
    free, total = cuda.memory_info()
    assert 0 < free <= total == device.total_memory
    with cuda.DeviceBuffer(256 << 20):
        assert cuda.memory_info()[0] <= free - (256 << 20)
    assert cuda.memory_info()[0] > free - (256 << 20)  # freed on exit


def test_upload_kernel_download_and_event_timing(cuda, saxpy):
    rng = np.random.default_rng(0)
    with cuda.Stream() as stream, cuda.Event() as start, cuda.Event() as end, \
            cuda.PinnedBuffer(N, np.float32) as hx, cuda.PinnedBuffer(N, np.float32) as hy, \
            cuda.PinnedBuffer(N, np.float32) as hout, cuda.DeviceBuffer(4 * N) as x, \
            cuda.DeviceBuffer(4 * N) as y, cuda.DeviceBuffer(4 * N) as out:
        hx.array[:] = rng.standard_normal(N, dtype=np.float32)
        hy.array[:] = rng.standard_normal(N, dtype=np.float32)
        x.upload(hx.array, stream)
        y.upload(hy.array, stream)
        start.record(stream)
        for _ in range(20):
            launch(cuda, saxpy, stream, 2.5, x, y, out)
        end.record(stream)
        out.download(hout.array, stream)
        stream.synchronize()
        np.testing.assert_allclose(hout.array, 2.5 * hx.array + hy.array, rtol=1e-6, atol=1e-6)
        assert 0 < cuda.Event.elapsed_ms(start, end) < 1000


def test_graph_replays_with_new_data(cuda, saxpy):
    """Capture copy-in, kernel, copy-out once; replay after rewriting the pinned inputs."""
    rng = np.random.default_rng(1)
    with cuda.Stream() as stream, cuda.PinnedBuffer(N, np.float32) as hx, cuda.PinnedBuffer(N, np.float32) as hy, \
            cuda.PinnedBuffer(N, np.float32) as hout, cuda.DeviceBuffer(4 * N) as x, \
            cuda.DeviceBuffer(4 * N) as y, cuda.DeviceBuffer(4 * N) as out:

        def work():
            x.upload(hx.array, stream)
            y.upload(hy.array, stream)
            launch(cuda, saxpy, stream, -1.5, x, y, out)
            out.download(hout.array, stream)

        hout.array[:] = 0
        with cuda.Graph(stream, work) as graph:
            stream.synchronize()
            assert not hout.array.any()  # capturing ran nothing
            for _ in range(3):
                hx.array[:] = rng.standard_normal(N, dtype=np.float32)
                hy.array[:] = rng.standard_normal(N, dtype=np.float32)
                graph.launch(stream)
                stream.synchronize()
                np.testing.assert_allclose(hout.array, -1.5 * hx.array + hy.array, rtol=1e-6, atol=1e-6)


def test_failed_capture_leaves_stream_usable(cuda, saxpy):
    with cuda.Stream() as stream, cuda.DeviceBuffer(4 * N) as x, cuda.PinnedBuffer(N, np.float32) as host:

        def broken():
            launch(cuda, saxpy, stream, 1.0, x, x, x)
            raise RuntimeError("enqueue failed")

        with pytest.raises(RuntimeError, match="enqueue failed"):
            cuda.Graph(stream, broken)
        host.array[:] = 3.0
        x.upload(host.array, stream)
        launch(cuda, saxpy, stream, 2.0, x, x, x)  # x = 2x + x
        x.download(host.array, stream)
        stream.synchronize()
        assert np.all(host.array == 9.0)


def test_errors_name_the_call_and_cuda_error(cuda):
    with pytest.raises(cuda.CudaError, match=r"cuMemAlloc\(\d+ bytes\) failed: CUDA_ERROR_OUT_OF_MEMORY"):
        cuda.DeviceBuffer(1 << 50)
    with cuda.PinnedBuffer(16, np.float32) as pinned:
        assert pinned.view((2, 8)).shape == (2, 8)
        with pytest.raises(ValueError, match="holds 16"):
            pinned.view((5, 4))
    with cuda.DeviceBuffer(16) as small, cuda.Stream() as stream:
        with pytest.raises(ValueError, match="do not fit"):
            small.upload(np.zeros(8, np.float32), stream)


def test_close_is_idempotent(cuda):
    stream, event, buffer, pinned = cuda.Stream(), cuda.Event(), cuda.DeviceBuffer(64), cuda.PinnedBuffer(4, np.int32)
    for resource in (stream, event, buffer, pinned):
        resource.close()
        resource.close()
    assert pinned.array is None


# EngineRunner on a real GPU with a stand-in for TensorRT: the "engine" is one NVRTC kernel that the fake
# context launches on the runner's stream from the addresses and shapes the runner gave it. This proves the
# runner's buffers, copies, shape switching, graph capture/replay and fallback, and engine sharing; what it
# cannot prove is TensorRT's own behaviour (that needs the `trt` tests and full TensorRT).

FAKE_DETR = rb"""
extern "C" __global__ void fake_detr(const float* images, const bool* masks, float* logits, float* boxes,
                                     int B, int H, int W, int Q, int C) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * Q) return;
    int b = i / Q, q = i % Q;
    float v = images[((size_t)b * 3 + q % 3) * H * W + q];  // channel q%3, row 0, column q
    for (int c = 0; c < C; ++c) logits[(size_t)i * C + c] = v + c;
    int valid = 0;
    for (int x = 0; x < W; ++x) valid += !masks[(size_t)b * H * W + x];  // unpadded columns of row 0
    for (int j = 0; j < 4; ++j) boxes[(size_t)i * 4 + j] = (float)valid / W * (j + 1);
}
"""
Q, C = 4, 91
PROFILE = {"min": [1, 8, 8], "opt": [1, 16, 16], "max": [2, 32, 48]}


def expected_outputs(images, masks):
    batch = images.shape[0]
    v = np.stack([images[:, q % 3, 0, q] for q in range(Q)], 1)  # (B, Q)
    logits = v[:, :, None] + np.arange(C, dtype=np.float32)
    valid = (~masks[:, 0, :]).sum(1) / masks.shape[2]
    boxes = np.broadcast_to(valid[:, None, None] * np.arange(1, 5, dtype=np.float32), (batch, Q, 4))
    return logits.astype(np.float32), boxes.astype(np.float32)


class FakeTensorRT:
    """The parts of the tensorrt module EngineRunner uses."""

    __version__ = "0.0.fake"

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class ExecutionContextAllocationStrategy:
        USER_MANAGED = "user-managed"

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING = "internal", "error", "warning"

        def __init__(self):
            pass

    @staticmethod
    def nptype(dtype):
        return dtype

    def __init__(self, kernel, fail_capture=False):
        self.kernel, self.fail_capture = kernel, fail_capture

    def Runtime(self, logger):
        fake = self

        class Runtime:
            def deserialize_cuda_engine(self, data):
                return FakeEngine(fake)

        return Runtime()


class FakeEngine:
    io = {"images": np.float32, "masks": np.bool_, "pred_logits": np.float32, "pred_boxes": np.float32}

    def __init__(self, fake):
        self.fake, self.num_io_tensors, self.contexts = fake, 4, 0

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return "input" if name in ("images", "masks") else "output"

    def get_tensor_dtype(self, name):
        return self.io[name]

    def get_tensor_profile_shape(self, name, index):
        return [(b, 3, h, w) for b, h, w in PROFILE.values()]

    def get_device_memory_size_for_profile_v2(self, index):
        return 1 << 20

    def create_execution_context(self, strategy):
        assert strategy == "user-managed"
        self.contexts += 1
        return FakeContext(self.fake)


class FakeContext:
    def __init__(self, fake):
        self.fake, self.shapes, self.addresses, self.memory = fake, {}, {}, None

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_input_shape(self, name, dims):
        self.shapes[name] = tuple(dims)
        return True

    def infer_shapes(self):
        return []

    def get_tensor_shape(self, name):
        batch = self.shapes["images"][0]
        return self.shapes.get(name) or {"pred_logits": (batch, Q, C), "pred_boxes": (batch, Q, 4)}[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        from cuda.bindings import driver as cu

        if self.fake.fail_capture:
            status = cu.cuStreamIsCapturing(stream)[1]
            if status != cu.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE:
                return False
        assert self.memory is not None and self.memory[1] >= 1 << 20  # TensorRT needs it before enqueue
        batch, _, height, width = self.shapes["images"]
        from core import cuda

        a = self.addresses
        args = (*(np.uint64(a[n]) for n in ("images", "masks", "pred_logits", "pred_boxes")),
                *(np.int32(v) for v in (batch, height, width, Q, C)))
        cuda.launch(self.fake.kernel, (1, 1, 1), (64, 1, 1), stream, *args, name="fake_detr")  # TensorRT's stream
        return True


@pytest.fixture
def fake_engine(cuda, tmp_path, monkeypatch):
    from core.backend import Backend
    from core.sidecar import write_sidecar

    def make(fail_capture=False):
        fake = FakeTensorRT(compile_kernel(cuda, FAKE_DETR, "fake_detr"), fail_capture)
        monkeypatch.setattr("runtime.runner.get_runtime_backend", lambda name, vc=False: Backend("tensorrt", fake))
        path = tmp_path / "fake.plan"
        path.write_bytes(b"fake")
        write_sidecar(path, {
            "config": {}, "profile": PROFILE, "precision": "fp32", "plugins": [], "postprocess": False,
            "backend": "tensorrt", "trt_version": FakeTensorRT.__version__,
            "gpu": {"name": "x", "compute_capability": cuda.init().compute_capability}, "weights_sha256": "0" * 64,
            "inputs": {}, "outputs": {}, "version_compatible": False, "anchortrt_version": "0",
        })
        return path

    return make


def random_inputs(rng, batch, height, width, valid_width):
    images = rng.standard_normal((batch, 3, height, width), dtype=np.float32)
    masks = np.zeros((batch, height, width), dtype=bool)
    masks[:, :, valid_width:] = True
    return images, masks


def infer_and_compare(runner, images, masks):
    out = runner.infer(images, masks)
    logits, boxes = expected_outputs(images, masks)
    np.testing.assert_array_equal(out["pred_logits"], logits)
    np.testing.assert_allclose(out["pred_boxes"], boxes, rtol=1e-6)
    return runner.last_timing["graph"]


def test_runner_graphs_per_shape_replay_new_data(cuda, fake_engine, monkeypatch):
    from runtime.runner import EngineRunner

    def no_allocation(*args):
        raise AssertionError("memory allocated after the runner was created")

    rng = np.random.default_rng(2)
    with EngineRunner(fake_engine(), cuda_graphs=True) as runner:
        assert runner.engine.profile.max == (2, 32, 48)
        monkeypatch.setattr(cuda, "DeviceBuffer", no_allocation)
        monkeypatch.setattr(cuda, "PinnedBuffer", no_allocation)
        sequence = [(2, 16, 24, 20), (2, 16, 24, 7), (1, 32, 48, 48), (1, 32, 48, 5), (2, 16, 24, 24), (2, 8, 8, 3)]
        graphs = [infer_and_compare(runner, *random_inputs(rng, *shape)) for shape in sequence]
        # first call of a shape runs plainly and captures; repeats replay with the new data
        assert graphs == [False, True, False, True, True, False]
        assert set(runner._graphs) == {(2, 16, 24), (1, 32, 48), (2, 8, 8)} and not runner.graph_failures
        # one context per captured shape, besides the plain one; all on one scratch block
        contexts = [context for context, _ in runner._graphs.values()] + [runner.context]
        assert len({id(c) for c in contexts}) == 4 == runner.engine.trt_engine.contexts
        assert len({c.memory for c in contexts}) == 1
        assert runner.last_timing["gpu_ms"] > 0 and runner.last_timing["host_ms"] > 0
    with pytest.raises(Exception, match="closed"):
        runner.infer(*random_inputs(rng, 1, 8, 8, 8))


def test_runner_falls_back_when_capture_fails(fake_engine):
    from runtime.runner import EngineRunner

    rng = np.random.default_rng(3)
    with EngineRunner(fake_engine(fail_capture=True), cuda_graphs=True) as runner:
        graphs = [infer_and_compare(runner, *random_inputs(rng, 2, 16, 24, w)) for w in (24, 10, 3)]
        assert graphs == [False, False, False]
        assert "execute_async_v3 failed" in runner.graph_failures[(2, 16, 24)]


def test_runners_share_one_engine_across_threads(fake_engine):
    import threading

    from runtime.runner import Engine, EngineRunner

    with Engine(fake_engine()) as engine:
        runners = [EngineRunner(engine, cuda_graphs=graphs) for graphs in (False, True)]
        assert engine.trt_engine.contexts == 2
        failures = []

        def work(runner, seed):
            rng = np.random.default_rng(seed)
            try:
                for i in range(30):
                    infer_and_compare(runner, *random_inputs(rng, 1 + i % 2, 8 + i % 3 * 8, 16 + i % 5 * 8, 1 + i % 16))
            except Exception as exc:  # surfaced below
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(r, seed)) for seed, r in enumerate(runners)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for runner in runners:
            runner.close()
        assert not failures, failures


def test_bench_engine_rows_on_the_stand_in(fake_engine, tmp_path, capsys):
    from runtime import bench

    out = tmp_path / "bench.json"
    argv = ["--engine", str(fake_engine()), "--shapes", "16x24,32x48", "--batch", "1,2", "--iters", "5",
            "--warmup", "2", "--graphs", "--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["mode"], r["batch"], r["height"]) for r in rows] == [
        (mode, b, h) for mode in ("enqueue", "cuda-graph") for b in (1, 2) for h in (16, 32)]
    for r in rows:
        assert 0 < r["gpu_ms"]["p50"] <= r["gpu_ms"]["p99"] and r["e2e_ms"]["mean"] > 0 and r["iters"] == 5
        assert r["device_mem_mib"] >= 0 and "graph_failure" not in r
    assert "cuda-graph" in capsys.readouterr().out
    assert bench.main(argv[:2] + ["--shapes", "64x64"]) == 2  # outside the profile


def test_infer_cli_on_the_stand_in(fake_engine, tmp_path, capsys):
    from PIL import Image

    from runtime import infer

    for name, size in (("7.png", (20, 10)), ("tall.png", (9, 40))):
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name)
    results = tmp_path / "r.json"
    argv = [str(tmp_path / "7.png"), str(tmp_path / "tall.png"), "--engine", str(fake_engine()),
            "--threshold", "0", "--json", str(results), "--out", str(tmp_path / "out")]
    assert infer.main(argv) == 0
    records = json.loads(results.read_text())
    assert [r["image_id"] for r in records] == [7] * 100 + [1] * 100  # top-100 of 4 queries x 91 labels each
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["7.jpg", "tall.jpg"]
    assert "2 images processed, 200 detections" in capsys.readouterr().out

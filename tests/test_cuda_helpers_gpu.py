"""runtime.cuda on a real GPU, with an NVRTC-compiled saxpy kernel: no TensorRT involved."""

from __future__ import annotations

import ctypes
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
    from runtime import cuda

    cuda.init()
    return cuda


@pytest.fixture(scope="module")
def saxpy(cuda):
    """The kernel compiled to a cubin for this GPU's architecture and loaded into the primary context."""
    from cuda.bindings import driver as cu, nvrtc

    device = cuda.init()
    prog = cuda.check(nvrtc.nvrtcCreateProgram(SAXPY, b"saxpy.cu", 0, [], []), "nvrtcCreateProgram")
    arch = device.compute_capability.replace(".", "")
    opts = [f"--gpu-architecture=sm_{arch}".encode()]
    cuda.check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), "nvrtcCompileProgram")
    size = cuda.check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    cubin = b" " * size
    cuda.check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    module = cuda.check(cu.cuModuleLoadData(cubin), "cuModuleLoadData")
    yield cuda.check(cu.cuModuleGetFunction(module, b"saxpy"), "cuModuleGetFunction")
    cuda.check(cu.cuModuleUnload(module), "cuModuleUnload")


def launch(cuda, kernel, stream, a, x, y, out, n=N):
    from cuda.bindings import driver as cu

    args = ((a, x.ptr, y.ptr, out.ptr, n), (ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int))
    grid = (n + BLOCK - 1) // BLOCK
    cuda.check(cu.cuLaunchKernel(kernel, grid, 1, 1, BLOCK, 1, 1, 0, stream.handle, args, 0), "cuLaunchKernel")


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

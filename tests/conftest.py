"""Shared fixtures (the GPU kernel built for the CPU, core.cuda on host memory) and the skip rules for GPU and
full-TensorRT tests."""

from __future__ import annotations

import functools

import pytest

from core import cuda
from helpers import CXX, NO_CXX, HostMemory, Ordered, build_kernel_for_cpu


@functools.cache
def gpu_available() -> bool:
    """An NVIDIA driver answers and has a device 0."""
    return cuda.probe() is not None


@functools.cache
def full_tensorrt_available() -> bool:
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Runtime")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    no_trt = pytest.mark.skip(reason="needs full TensorRT and an NVIDIA GPU")
    for item in items:
        # The markers, not item.keywords: those also hold parameter ids, and a case named "gpu" is not a GPU test.
        if item.get_closest_marker("gpu") and not gpu_available():
            item.add_marker(no_gpu)
        if item.get_closest_marker("trt") and not (gpu_available() and full_tensorrt_available()):
            item.add_marker(no_trt)


@pytest.fixture(scope="module")
def kernel(request, tmp_path_factory):
    """runtime/preprocess.cu compiled for the CPU (helpers.build_kernel_for_cpu), once per test module; a test
    parametrized indirectly gets it with those kernel_defines() overrides."""
    if CXX is None:
        pytest.skip(NO_CXX)
    return build_kernel_for_cpu(tmp_path_factory.mktemp("kernel"), **getattr(request, "param", {}))


@pytest.fixture
def host_gpu(kernel, monkeypatch):
    """core.cuda with host memory for device memory and the CPU build of the kernel for the launch, so that
    GpuPreprocessor itself (staging, slot records, buffer growth, launch arguments) runs on this machine."""
    from types import SimpleNamespace

    from runtime.gpu_preprocess import BLOCK, PIXELS_X

    def launch(fn, grid, block, stream, slots, *args, name=""):
        assert tuple(block) == BLOCK
        if args:  # second_pass: its grid covers the padded batch
            normalised, images, masks, height, width = args
            assert grid[0] * block[0] * PIXELS_X >= width and grid[1] * block[1] >= height
            args = (int(normalised), int(images), int(masks), int(height), int(width))
        launches.append(name)
        fn(*grid, int(slots), *args)

    launches: list = []

    monkeypatch.setattr(cuda, "current_device", lambda: SimpleNamespace(arch=90, activate=lambda: None))
    monkeypatch.setattr(cuda, "Stream", Ordered)
    monkeypatch.setattr(cuda, "Event", Ordered)
    monkeypatch.setattr(cuda, "PinnedBuffer", HostMemory)
    monkeypatch.setattr(cuda, "DeviceBuffer", HostMemory)
    monkeypatch.setattr(cuda, "load_kernel", lambda image, kind, name: kernel[name])
    monkeypatch.setattr(cuda, "launch", launch)
    monkeypatch.setattr("runtime.gpu_preprocess._cubin", lambda arch: b"")
    monkeypatch.setattr(cuda, "target_arch", lambda arch: arch)
    return launches

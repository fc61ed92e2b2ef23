"""Shared fixtures and the skip rules for GPU and full-TensorRT tests."""

from __future__ import annotations

import functools

import pytest

from core import cuda


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

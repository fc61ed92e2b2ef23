"""core.cuda without a GPU: the one probe, its users, NVRTC through core.cuda, the plugins' launcher seam."""

from __future__ import annotations

import subprocess
import sys

import pytest

from core import cuda
from netdef import build


def fake_device(total=80 << 30):
    return cuda.Device(0, "Fake H100", "9.0", total, None)


def test_import_and_probe_without_a_driver_in_a_fresh_process():
    """No libcuda here: importing the layer works, the probe answers None, init names the problem."""
    code = ("from core import cuda\n"
            "assert cuda.probe() is None and cuda.probe(3) is None\n"
            "try:\n    cuda.init()\nexcept cuda.NoGpuError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "no NVIDIA driver: DynamicLibNotFoundError" in out and "nvidia-smi" in out


def test_build_sidecar_and_workspace_read_the_probe(monkeypatch):
    monkeypatch.setattr(cuda, "probe", lambda index=0: fake_device())
    assert build.gpu_entry() == {"name": "Fake H100", "compute_capability": "9.0"}
    assert build.gpu_total_memory() == 80 << 30
    assert build.workspace_limit_mib(1 << 20) == 80 << 10
    monkeypatch.setattr(cuda, "probe", lambda index=0: None)
    assert build.gpu_entry() is None and build.gpu_total_memory() is None
    assert build.workspace_limit_mib(1 << 20) == 1 << 20


def test_gpu_skip_rule_reads_the_probe(monkeypatch):
    import conftest

    conftest.gpu_available.cache_clear()
    monkeypatch.setattr(cuda, "probe", lambda index=0: fake_device())
    try:
        assert conftest.gpu_available()
    finally:
        conftest.gpu_available.cache_clear()


def test_device_arch_is_nvrtc_numbering():
    assert fake_device().arch == 90
    assert cuda.Device(0, "x", "12.0", 1, None).arch == 120


def test_activate_makes_a_device_current_once_per_thread_and_again_after_another(monkeypatch):
    """The GPU path activates its device for every image it places: the context is made current once per thread,
    and again whenever that thread made another device current in between."""
    import threading

    made = []

    class CoreDevice:
        def __init__(self, index):
            self.index = index

        def set_current(self):
            made.append((threading.current_thread().name, self.index))

    monkeypatch.setattr(cuda._core, "Device", CoreDevice)
    monkeypatch.setattr(cuda, "_activated", threading.local())
    zero, one = fake_device(), cuda.Device(1, "Fake H100", "9.0", 80 << 30, None)
    for device in (zero, zero, zero, one, one, zero):
        device.activate()
    thread = threading.Thread(target=lambda: [zero.activate(), zero.activate()], name="other")
    thread.start()
    thread.join()
    me = threading.current_thread().name
    assert made == [(me, 0), (me, 1), (me, 0), ("other", 0)]


def test_one_checker_for_driver_and_nvrtc_results():
    from cuda.bindings import driver, nvrtc

    assert cuda.check((driver.CUresult.CUDA_SUCCESS, 7), "x") == 7
    with pytest.raises(cuda.CudaError, match="cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY"):
        cuda.check((driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY, None), "cuMemAlloc")
    with pytest.raises(cuda.CudaError, match="nvrtcCompileProgram failed: NVRTC_ERROR_COMPILATION"):
        cuda.check((nvrtc.nvrtcResult.NVRTC_ERROR_COMPILATION,), "nvrtcCompileProgram")


def test_compile_program_ptx_and_cubin_with_an_in_memory_header():
    source = b'#include "half.cuh"\nextern "C" __global__ void k(float* x) { x[0] = HALF; }\n'
    headers = {"half.cuh": b"#define HALF 0.5f\n"}  # 0.5f is 1056964608 as bits
    ptx = cuda.compile_program(source, "k.cu", ["--gpu-architecture=compute_90"], "ptx", headers)
    assert b".entry k" in ptx and b"1056964608" in ptx and not ptx.endswith(b"\0")
    cubin = cuda.compile_program(source, "k.cu", ["--gpu-architecture=sm_90"], "cubin", headers)
    assert cubin.startswith(b"\x7fELF")
    with pytest.raises(cuda.CompileError, match="NVRTC compile of k.cu failed .*HALF"):
        cuda.compile_program(source, "k.cu", ["--gpu-architecture=sm_90"], "cubin", {"half.cuh": b""})


def test_launch_kernel_checks_inputs_before_touching_the_gpu():
    from plugins import launch, masked_softmax

    with pytest.raises(ValueError, match="expected 2 input and 1 output pointers"):
        launch.launch_kernel(masked_softmax.SPEC, ["float32", "bool"], {}, [1, 2], [(1, 8, 4, 4), (1, 4)], 0)

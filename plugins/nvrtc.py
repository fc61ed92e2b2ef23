"""Compile our `.cu` kernels with NVRTC (through core.cuda) and cache the results on disk.

No C++ toolchain is needed: NVRTC comes from the `nvidia-cuda-nvrtc` wheel and `cuda_fp16.h` from the
`nvidia-cuda-runtime` wheel. PTX (`compute_XX`) is what TensorRT embeds in an engine; a cubin (`sm_XX`) is what our
own launcher loads, so that it does not depend on the driver's PTX JIT. The PTX ISA version follows the NVRTC
version (13.0 -> 9.0, 13.5 -> 9.5) and a driver only JIT-compiles PTX up to its own version, hence the pin
`nvidia-cuda-nvrtc==13.0.*` for the R580 (CUDA 13.0) drivers.

Cache: `core.cuda.compile_cached` (`$ANCHORTRT_KERNEL_CACHE`, else `$XDG_CACHE_HOME/anchortrt/kernels`, else
`~/.cache/anchortrt/kernels`), one file per (sources, NVRTC version, options) hash; within a process each
(source, defines, arch, kind) compiles once.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from core import cuda
from core.cuda import CompileError, target_arch  # raised and used here too: NVRTC missing, an unsupported GPU
from .spec import float_literal

SOURCE_DIR = Path(__file__).resolve().parent
HEADERS = ("common.cuh",)


@functools.cache
def include_dirs() -> tuple[str, ...]:
    """Directories holding cuda_fp16.h: the nvidia-cuda-runtime wheel first, then a CUDA toolkit."""
    candidates = []
    try:
        import nvidia

        for root in nvidia.__path__:
            candidates += [Path(root, "cu13", "include"), Path(root, "cuda_runtime", "include")]
    except ImportError:
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var], "include"))
    candidates.append(Path("/usr/local/cuda/include"))
    for path in candidates:
        if (path / "cuda_fp16.h").is_file():
            return (str(path),)
    raise CompileError(
        "cuda_fp16.h not found: pip install nvidia-cuda-runtime (or set CUDA_HOME to a CUDA toolkit)"
    )


def format_define(name: str, value) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float):
        value = float_literal(value)
    return f"-D{name}={value}"


def compile_kernel(source: str, defines: dict, arch: int, kind: str = "ptx") -> bytes:
    """Compile plugins/<source> with the given #defines for `arch` (e.g. 90); kind "ptx" or "cubin"."""
    if kind not in ("ptx", "cubin"):
        raise ValueError(f"kind must be 'ptx' or 'cubin', not {kind!r}")
    return _compile_cached(source, tuple(sorted(defines.items())), arch, kind)


@functools.lru_cache(maxsize=256)
def _compile_cached(source: str, defines: tuple, arch: int, kind: str) -> bytes:
    text = (SOURCE_DIR / source).read_bytes()
    headers = [(SOURCE_DIR / h).read_bytes() for h in HEADERS]
    target = f"--gpu-architecture={'compute' if kind == 'ptx' else 'sm'}_{arch}"
    options = [target, "--std=c++17", *(format_define(k, v) for k, v in defines), *(f"-I{d}" for d in include_dirs())]
    return cuda.compile_cached(text, source, options, kind, dict(zip(HEADERS, headers)))

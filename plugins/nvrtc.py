"""Compile our `.cu` kernels with NVRTC (through cuda-python) and cache the results on disk.

No C++ toolchain is needed: NVRTC comes from the `nvidia-cuda-nvrtc` wheel and `cuda_fp16.h` from the
`nvidia-cuda-runtime` wheel. PTX (`compute_XX`) is what TensorRT embeds in an engine; a cubin (`sm_XX`) is what our
own launcher loads, so that it does not depend on the driver's PTX JIT. The PTX ISA version follows the NVRTC
version (13.0 -> 9.0, 13.5 -> 9.5) and a driver only JIT-compiles PTX up to its own version, hence the pin
`nvidia-cuda-nvrtc==13.0.*` for the R580 (CUDA 13.0) drivers.

Cache: `$ANCHORTRT_KERNEL_CACHE`, else `$XDG_CACHE_HOME/anchortrt/kernels`, else `~/.cache/anchortrt/kernels`;
one file per (sources, NVRTC version, options) hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

from .spec import float_literal

SOURCE_DIR = Path(__file__).resolve().parent
HEADERS = ("common.cuh",)
# PTX ISA that a CUDA 13.0 driver (R580) can load: the newest our AOT plugins may embed.
MAX_PTX_VERSION = (9, 0)


class CompileError(RuntimeError):
    """NVRTC is missing or rejected a kernel."""


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise CompileError(
            "cuda-python is not installed: pip install 'anchortrt[plugins]' (cuda-python, nvidia-cuda-nvrtc)"
        ) from exc
    return nvrtc


def _check(result, what: str, prog=None):
    nvrtc = _nvrtc()
    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = _program_log(prog) if prog is not None else ""
        raise CompileError(f"NVRTC {what} failed ({err.name}){': ' + log if log else ''}")
    return result[1] if len(result) == 2 else result[1:]


def _program_log(prog) -> str:
    nvrtc = _nvrtc()
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.rstrip(b"\x00 ").decode(errors="replace").strip()


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    try:
        return tuple(_check(_nvrtc().nvrtcVersion(), "version"))
    except RuntimeError as exc:  # cuda-python raises when libnvrtc itself cannot be found
        raise CompileError(
            f"NVRTC cannot be loaded ({exc}): pip install 'nvidia-cuda-nvrtc==13.0.*'"
        ) from exc


@functools.cache
def supported_archs() -> tuple[int, ...]:
    return tuple(_check(_nvrtc().nvrtcGetSupportedArchs(), "supported archs"))


def target_arch(compute_capability: int) -> int:
    """The newest architecture NVRTC supports that a device of this compute capability (e.g. 90) can run."""
    usable = [a for a in supported_archs() if a <= compute_capability]
    if not usable:
        raise CompileError(
            f"NVRTC {'.'.join(map(str, nvrtc_version()))} cannot compile for compute capability "
            f"{compute_capability}: it supports {supported_archs()}"
        )
    return max(usable)


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


def cache_dir() -> Path:
    if os.environ.get("ANCHORTRT_KERNEL_CACHE"):
        return Path(os.environ["ANCHORTRT_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base, "anchortrt", "kernels")


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
    options = [target, "--std=c++17", *(format_define(k, v) for k, v in defines)]
    key = hashlib.sha256(
        json.dumps(
            [text.hex(), [h.hex() for h in headers], nvrtc_version(), options, kind], sort_keys=True
        ).encode()
    ).hexdigest()
    path = cache_dir() / f"{Path(source).stem}-{key[:32]}.{kind}"
    try:
        return path.read_bytes()
    except OSError:
        pass
    image = _run_nvrtc(source, text, headers, options + [f"-I{d}" for d in include_dirs()], kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(image)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a recompile next time
    return image


def _run_nvrtc(source: str, text: bytes, headers: list[bytes], options: list[str], kind: str) -> bytes:
    nvrtc = _nvrtc()
    nvrtc_version()  # a clear error when libnvrtc is missing
    prog = _check(
        nvrtc.nvrtcCreateProgram(text, source.encode(), len(headers), headers, [h.encode() for h in HEADERS]),
        "create program",
    )
    try:
        opts = [o.encode() for o in options]
        _check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), f"compile of {source}", prog)
        if kind == "ptx":
            size = _check(nvrtc.nvrtcGetPTXSize(prog), "PTX size")
            buf = b" " * size
            _check(nvrtc.nvrtcGetPTX(prog, buf), "PTX")
        else:
            size = _check(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
            buf = b" " * size
            _check(nvrtc.nvrtcGetCUBIN(prog, buf), "cubin")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return buf.rstrip(b"\x00") if kind == "ptx" else buf


def ptx_version(ptx: bytes) -> tuple[int, int]:
    """The `.version` directive of a PTX module, e.g. (9, 0)."""
    found = re.search(rb"^\s*\.version\s+(\d+)\.(\d+)", ptx, re.MULTILINE)
    if not found:
        raise CompileError("no .version directive in the PTX")
    return int(found.group(1)), int(found.group(2))


def ptx_entries(ptx: bytes) -> list[str]:
    """Names of the kernels (`.entry`) a PTX module defines."""
    return [m.decode() for m in re.findall(rb"\.entry\s+([A-Za-z_][A-Za-z0-9_]*)", ptx)]

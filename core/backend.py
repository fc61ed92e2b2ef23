"""Which TensorRT builds our network (full TensorRT or TensorRT for RTX) and which runs an engine (those two, or
the lean runtime).

All three expose the same pybind layer, so the network and runner code take the module as a parameter and never
import one at module import time. One owner for the questions "is it installed", "can it build here" and "can it
run our plugins".
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from types import ModuleType

from core.errors import Unavailable

BACKENDS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx", "tensorrt-lean": "tensorrt_lean"}
BUILDERS = ("tensorrt", "tensorrt-rtx")  # the lean runtime has no Builder
NVIDIA_INDEX = "https://pypi.nvidia.com"
INSTALL_HINT = {
    "tensorrt": f"pip install 'anchortrt[trt]' --extra-index-url {NVIDIA_INDEX}  (full TensorRT; its libraries "
                "come from NVIDIA's package index, and it needs an NVIDIA GPU and driver to build)",
    "tensorrt-rtx": "pip install 'anchortrt[rtx]'  (TensorRT for RTX, builds without a GPU)",
    "tensorrt-lean": "pip install 'anchortrt[lean]'  (the 44 MB lean runtime: runs engines built with "
                     "--version-compatible)",
}
# Ahead-of-time plugin layers arrived in TensorRT 10.9, but the cu13 packages 10.13.2.6 and 10.13.3.9 ship the plugin
# package only as `tensorrt_bindings.plugin` (no `tensorrt.plugin`, from 10.14.1.48.post1 on), and before 10.16 it
# keeps a stale IExprBuilder between describe calls. Until 11.2.1 it converts attributes with a call that NumPy 2.4
# refuses ("only 0-dimensional arrays ...").
PLUGINS_MIN_TRT = (11, 2, 1)
PLUGINS_MIN_TRT_OLD_NUMPY = (10, 16)
NUMPY_BREAKS_OLD_PLUGINS = (2, 4)


class BackendError(Unavailable, RuntimeError):
    """No usable TensorRT, or a feature the chosen backend does not have (command lines exit 3)."""


def version_tuple(version: str) -> tuple[int, ...]:
    """``"11.2.1.2"`` -> (11, 2, 1, 2); a non-numeric tail (``post1``, ``rc``) ends the tuple."""
    out = []
    for part in version.split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
        if not part.isdigit():
            break
    return tuple(out)


@dataclass(frozen=True)
class Backend:
    name: str  # a key of BACKENDS
    trt: ModuleType

    @property
    def version(self) -> str:
        return self.trt.__version__

    def plugin_problem(self, numpy_version: str | None = None) -> str | None:
        """Why this backend cannot build our ahead-of-time plugin layers, or None when it can."""
        if self.name != "tensorrt" or not hasattr(self.trt, "QuickPluginCreationRequest"):
            return (f"{self.name} {self.version} has no plugin layers: use --plugins none, or install full "
                    f"TensorRT >= {'.'.join(map(str, PLUGINS_MIN_TRT))} ({INSTALL_HINT['tensorrt']}) and pass "
                    "--backend tensorrt")
        trt_v = version_tuple(self.version)
        if trt_v >= PLUGINS_MIN_TRT:
            return None
        if numpy_version is None:
            import numpy

            numpy_version = numpy.__version__
        if trt_v >= PLUGINS_MIN_TRT_OLD_NUMPY and version_tuple(numpy_version) < NUMPY_BREAKS_OLD_PLUGINS:
            return None
        return (f"plugins need TensorRT >= {'.'.join(map(str, PLUGINS_MIN_TRT))} (this is {self.version}, whose "
                f"tensorrt.plugin fails on NumPy {numpy_version} >= 2.4, or is missing or unreliable below 10.16): "
                f"pip install -U 'tensorrt-cu13>=11.2.1' --extra-index-url {NVIDIA_INDEX}, or pip install "
                "'numpy<2.4' with TensorRT >= 10.16, or build with --plugins none")


def check_plugins(backend: Backend, plugins) -> None:
    """BackendError naming the requested ``plugins`` and why ``backend`` cannot build them; nothing when it can or
    when none are requested."""
    problem = backend.plugin_problem() if plugins else None
    if problem:
        raise BackendError(f"plugins {', '.join(sorted(plugins))}: {problem}")


def backend_of(trt: ModuleType) -> Backend:
    """The Backend of a TensorRT module (network and plugin code are handed the module, not the Backend)."""
    return Backend("tensorrt-rtx" if trt.__name__.startswith("tensorrt_rtx") else "tensorrt", trt)


def installed_module(name: str) -> ModuleType | None:
    """The module of backend `name` (a BACKENDS key) where it is installed with its libraries, else None."""
    try:
        mod = importlib.import_module(BACKENDS[name])
    except ImportError:
        return None
    # The tensorrt stub packages import but carry no API until the libraries are present.
    return mod if hasattr(mod, "Runtime") else None


@lru_cache(maxsize=None)
def _builder_problem(name: str) -> str | None:
    """Why ``name`` cannot create a Builder here (None when it can). Full TensorRT returns a null builder without a
    usable CUDA device, which pybind turns into a TypeError."""
    mod = installed_module(name)
    if mod is None:
        return f"{name} is not installed: {INSTALL_HINT[name]}"
    if not hasattr(mod, "Builder"):
        return f"{name} {mod.__version__} cannot build engines"

    class Quiet(mod.ILogger):
        def __init__(self) -> None:
            mod.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            pass

    try:
        builder = mod.Builder(Quiet())
    except (TypeError, RuntimeError) as exc:
        return f"{name} {mod.__version__} cannot create a builder on this machine (no usable GPU?): {exc}"
    del builder
    return None


def get_backend(name: str | None = None) -> Backend:
    """The named backend for building, or the first that can build here (full TensorRT, then TensorRT-RTX)."""
    if name is not None and name not in BUILDERS:
        extra = " (the lean runtime only runs engines)" if name == "tensorrt-lean" else ""
        raise BackendError(f"unknown build backend {name!r}{extra}: choose one of {', '.join(BUILDERS)}")
    problems = []
    for candidate in [name] if name else list(BUILDERS):
        problem = _builder_problem(candidate)
        if problem is None:
            return Backend(candidate, installed_module(candidate))
        problems.append(problem)
    raise BackendError("no TensorRT backend can build here: " + "; ".join(problems))


def lean_library(version: str) -> Path | None:
    """The lean runtime library (libnvinfer_lean.so) of exactly TensorRT ``version`` where an installed
    tensorrt-lean-cu*-libs package provides it, else None: what ``Runtime.load_runtime`` needs for a plan built
    with --exclude-lean-runtime by another version than the installed TensorRT."""
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("-", "_")
        if not re.fullmatch(r"tensorrt_lean_cu\d+_libs", name) or dist.version != version:
            continue
        for file in dist.files or ():
            if re.fullmatch(r"libnvinfer_lean\.so(\.\d+)*", Path(str(file)).name):
                return Path(dist.locate_file(file))
    return None


def get_runtime_backend(built_with: str, version_compatible: bool = False) -> Backend:
    """The backend that runs an engine built by ``built_with``: the same one, or for a version-compatible full
    TensorRT engine the lean runtime when full TensorRT is absent."""
    candidates = [built_with]
    if built_with == "tensorrt":
        candidates.append("tensorrt-lean")
    elif built_with not in BACKENDS:
        raise BackendError(f"unknown backend {built_with!r}: choose one of {', '.join(BACKENDS)}")
    for candidate in candidates:
        mod = installed_module(candidate)
        if mod is not None:
            if candidate == "tensorrt-lean" and not version_compatible:
                raise BackendError(
                    "only the TensorRT lean runtime is installed, and it loads only version-compatible engines: "
                    "rebuild the engine with `python -m netdef.build --version-compatible`, or install full "
                    f"TensorRT ({INSTALL_HINT['tensorrt']})"
                )
            return Backend(candidate, mod)
    raise BackendError("no TensorRT runtime for this engine is installed: "
                       + "; or ".join(INSTALL_HINT[c] for c in candidates))

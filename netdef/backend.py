"""Which TensorRT builds our network: full TensorRT or TensorRT for RTX.

Both expose the same network-definition API (one pybind layer), so the network code takes the module
as a parameter and never imports either at module import time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

BACKENDS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINT = {
    "tensorrt": "pip install 'anchortrt[trt]'  (full TensorRT, needs an NVIDIA driver to build)",
    "tensorrt-rtx": "pip install 'anchortrt[rtx]'  (TensorRT for RTX, builds without a GPU)",
}


class BackendError(RuntimeError):
    """No usable TensorRT, or a feature the chosen backend does not have."""


@dataclass(frozen=True)
class Backend:
    name: str  # "tensorrt" | "tensorrt-rtx"
    trt: ModuleType

    @property
    def version(self) -> str:
        return self.trt.__version__

    @property
    def has_plugins(self) -> bool:
        # TensorRT-RTX has no custom layers at all; our plugins are ahead-of-time `tensorrt.plugin`
        # kernels, which need QuickPluginCreationRequest (TensorRT 10.8+).
        return hasattr(self.trt.INetworkDefinition, "add_plugin") and hasattr(self.trt, "QuickPluginCreationRequest")

    @property
    def builds_without_gpu(self) -> bool:
        return self.name == "tensorrt-rtx"


def _import(name: str) -> ModuleType | None:
    try:
        mod = importlib.import_module(BACKENDS[name])
    except ImportError:
        return None
    # The tensorrt stub packages import but carry no network API until the libraries are present.
    return mod if hasattr(mod, "Builder") else None


def get_backend(name: str | None = None) -> Backend:
    """The named backend, or the first installed one (full TensorRT first)."""
    if name is not None and name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    for candidate in [name] if name else list(BACKENDS):
        mod = _import(candidate)
        if mod is not None:
            return Backend(candidate, mod)
    wanted = [name] if name else list(BACKENDS)
    raise BackendError(
        "no TensorRT backend is installed: " + "; or ".join(INSTALL_HINT[w] for w in wanted)
    )

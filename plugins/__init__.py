"""AnchorDETR's four custom kernels (MaskedSoftmax, LayerNorm, AddBiasTranspose, Mask2Pos) as TensorRT plugins.

Each `plugins.<name>` module has its `SPEC` (kernel, inputs, launch rule), `launch(...)` (device pointers,
cuda-python) and `add_layer(trt, network, ...)` (an AOT `tensorrt.plugin` layer whose PTX is embedded in the
engine). This package does not import torch: the PyTorch formulations and the torch-tensor wrappers are in
`reference.plugins`. See docs/plugins.md.
"""

import importlib
from types import ModuleType

NAMES = ("masked_softmax", "layer_norm", "add_bias_transpose", "mask2pos")  # the one list of plugin names


def get(name: str) -> ModuleType:
    """The module of plugin ``name``, imported on first use (a network without plugins never loads them)."""
    if name not in NAMES:
        raise KeyError(f"unknown plugin {name!r}: choose from {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")

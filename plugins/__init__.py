"""AnchorDETR's four custom kernels (MaskedSoftmax, LayerNorm, AddBiasTranspose, Mask2Pos) as TensorRT plugins.

Each `plugins.<name>` module has `reference(...)` (PyTorch), `launch(...)` (device pointers, cuda-python),
`apply(...)` (CUDA torch tensors) and `add_layer(trt, network, ...)` (an AOT `tensorrt.plugin` layer whose PTX is
embedded in the engine). See docs/plugins.md.
"""

from __future__ import annotations

import importlib
import json

NAMES = ("masked_softmax", "layer_norm", "add_bias_transpose", "mask2pos")


def get(name: str):
    """The plugin module `plugins.<name>`."""
    if name not in NAMES:
        raise ValueError(f"unknown plugin {name!r}: choose from {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def interpret(metadata: str, inputs) -> list:
    """Outputs of a plugin layer through the plugin's PyTorch reference, from the layer's metadata string."""
    from .spec import METADATA_KEY

    try:
        record = json.loads(metadata)
        spec = get(record[METADATA_KEY]).SPEC
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not an anchortrt plugin layer (metadata {metadata!r}): {exc}") from None
    return spec.reference(list(inputs), spec.normalize_attrs(record["attrs"]))


def interpret_plugin_layer(layer, inputs) -> list:
    """Evaluate a plugin layer added by `plugins.<name>.add_layer` on torch `inputs` (the layer's inputs, in
    order, constants included); returns its outputs as a list of torch tensors."""
    return interpret(layer.metadata, inputs)

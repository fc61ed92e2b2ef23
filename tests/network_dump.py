"""Layer-by-layer dumps of the AnchorDETR network definitions, to show that a refactor changes no layer.

``dump_network`` lists every layer of a network definition: name, type, inputs and outputs (name, shape, dtype),
the attributes of its I...Layer class and a sha256 of every weight it holds. ``dump_all`` does that for every
released variant and the MHA and grid ablations (shallow, 2 + 2 layers, random weights), FP32 and FP16, with
and without postprocess, and plugins on and off. TensorRT-RTX has no plugin layers, so "plugins on" is the
plugin path's wiring with each plugin's add_layer replaced by native layers of the plugin's contract
(helpers.native_plugins, as test_parity.py checks it).

    python tests/network_dump.py DIR        # writes DIR/<case>.txt and DIR/digests.txt (one line per case)
    diff -r /tmp/before /tmp/after          # identical dumps: the refactor changed no layer
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: helpers beside it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = ("r50_c5", "r50_dc5", "r101_c5", "r101_dc5", "r50_dc5_mha", "r50_c5_grid")
# Attributes whose getters need arguments or say nothing about the definition.
_SKIP = {"get_input", "get_output", "get_output_type", "set_input", "num_inputs", "num_outputs", "name", "type",
         "metadata", "num_ranks", "set_output_type", "reset_output_type", "output_type_is_set",
         "reset_precision", "precision_is_set", "set_shape", "get_shape",
         "scales"}  # IResizeLayer.scales logs an error for a resize to a shape tensor


def _value(v) -> str:
    if hasattr(v, "numpy") and hasattr(v, "nbytes"):  # trt.Weights
        v = v.numpy() if v.size else np.zeros(0, np.float32)
    if isinstance(v, np.ndarray):
        a = v
        return f"weights({a.dtype},{a.size},sha256:{hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]})"
    if hasattr(v, "name") and type(v).__name__ not in ("str",) and hasattr(type(v), "__members__"):
        return str(v.name)
    if type(v).__name__ in ("Dims", "Permutation", "Dims2", "DimsHW"):
        return str(tuple(v))
    return repr(v)


def _tensor(t) -> str:
    return "None" if t is None else f"{t.name}{tuple(t.shape)}:{t.dtype.name}"


def dump_network(trt, network) -> list[str]:
    """One line per input, layer and output of ``network``; stable across processes."""
    from reference.interpret import _layer_class

    lines = [f"input {_tensor(network.get_input(i))}" for i in range(network.num_inputs)]
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = layer.type.name
        ins = [_tensor(layer.get_input(j)) for j in range(layer.num_inputs)]
        outs = [_tensor(layer.get_output(j)) for j in range(layer.num_outputs)]
        cls = _layer_class(trt, kind)
        attrs = []
        if cls is not None:
            layer.__class__ = cls
            base = set(dir(trt.ILayer))
            for a in sorted(a for a in dir(cls) if not a.startswith("_") and a not in base and a not in _SKIP):
                try:
                    v = getattr(layer, a)
                except Exception as e:  # a getter that does not apply to this layer's configuration
                    v = f"<{type(e).__name__}>"
                if callable(v):
                    continue
                attrs.append(f"{a}={_value(v) if not isinstance(v, str) else v}")
        meta = getattr(layer, "metadata", "")
        lines.append(f"layer {i} {layer.name} {kind} in=[{', '.join(ins)}] out=[{', '.join(outs)}] "
                     f"{' '.join(attrs)}" + (f" metadata={meta}" if meta else ""))
    lines += [f"output {_tensor(network.get_output(i))}" for i in range(network.num_outputs)]
    return lines


def cases():
    """(case name, variant, options) for every dumped network."""
    for variant in VARIANTS:
        for fp16 in (False, True):
            for plugins in ((False, True) if not variant.endswith(("_mha",)) else (False,)):
                for postprocess in (False, True):
                    name = f"{variant}-{'fp16' if fp16 else 'fp32'}-{'plugins' if plugins else 'native'}" + (
                        "-postprocess" if postprocess else "")
                    yield name, variant, {"fp16": fp16, "plugins": plugins, "postprocess": postprocess}
    yield "r50_dc5-fp32-native-unfolded", "r50_dc5", {"fp16": False, "plugins": False, "postprocess": False,
                                                       "fold_constants": False}


def dump_case(trt, variant: str, options: dict) -> list[str]:
    import pytest

    from helpers import builder_tensors, define, native_plugins, small_config
    from plugins import NAMES

    cfg = small_config(variant)
    # torch's random init gives other float32 values on another CPU's vector unit (AVX2 and AVX-512 differ), so
    # the digests would pin the machine; NumPy's generator is the same everywhere. Only the shapes are kept.
    tensors = {name: np.random.default_rng(i).standard_normal(a.shape).astype(a.dtype)
               for i, (name, a) in enumerate(sorted(builder_tensors(cfg).items()))}
    options = dict(options)
    with pytest.MonkeyPatch.context() as mp:
        if options.pop("plugins"):
            native_plugins(trt, cfg, mp)
            options["plugins"] = set(NAMES)
        _, network, _keep = define(trt, cfg, tensors, **options)
        return dump_network(trt, network)


def digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def dump_all(out: Path, only: str | None = None) -> dict[str, str]:
    from core.backend import get_backend

    trt = get_backend("tensorrt-rtx").trt
    out.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, variant, options in cases():
        if only and only not in name:
            continue
        lines = dump_case(trt, variant, options)
        (out / f"{name}.txt").write_text("\n".join(lines) + "\n")
        digests[name] = digest(lines)
        print(name, len(lines), digests[name][:16], flush=True)
    (out / "digests.txt").write_text("".join(f"{k} {v}\n" for k, v in digests.items()))
    return digests


if __name__ == "__main__":
    dump_all(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)

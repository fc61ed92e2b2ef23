"""Soak test: an R50-DC5 engine with every plugin, 10,000 inferences cycling through shapes, no device memory growth.

NVIDIA/TensorRT#4849: ahead-of-time plugins leak CUDA modules on every input-shape change in TensorRT 11.1 and
11.2.1 (whether 11.4 is affected is not known). Our plugins are all AOT, and `EngineRunner` changes the plain
context's shape whenever consecutive batches differ, so a long run over mixed image sizes is exactly the case.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import SMALL_PROFILE, run_main, save_random_weights

pytestmark = [pytest.mark.trt, pytest.mark.slow]

CALLS = 10_000
# (batch, height, width) inside SMALL_PROFILE (min 1x64x64, max 2x128x160); consecutive calls always differ.
SHAPES = [(1, 64, 64), (2, 96, 128), (1, 128, 160), (2, 64, 160), (1, 96, 96)]
# After one warm-up pass every shape's lazily created state exists, so a healthy runner allocates nothing more;
# what remains is cuMemGetInfo's granularity (2 MiB pages) and the driver's own bookkeeping. The bound is two
# orders of magnitude below the leak it guards against: 10,000 shape changes leaking one CUDA module each
# (a module maps at least one 2 MiB page in practice; even 4 KiB per change would be 39 MiB).
MAX_GROWTH = 32 << 20


def test_device_memory_stays_flat_over_10000_shape_changes(tmp_path, capsys):
    from core.config import AnchorDETRConfig
    from core import cuda
    from runtime.runner import EngineRunner

    weights = save_random_weights(tmp_path / "r50_dc5.safetensors", AnchorDETRConfig.from_variant("r50_dc5"))
    engine = tmp_path / "r50_dc5_plugins_fp16.plan"
    code, out, err = run_main(["--weights", weights, "--backend", "tensorrt", "--plugins", "all", "--fp16",
                               "-o", engine, "--json", *SMALL_PROFILE], capsys)
    assert code == 0, err
    assert json.loads(engine.with_suffix(".json").read_text())["plugins"], "the engine must contain the plugins"

    rng = np.random.default_rng(0)
    inputs = [(rng.standard_normal((b, 3, h, w), dtype=np.float32), np.zeros((b, h, w), bool)) for b, h, w in SHAPES]
    with EngineRunner(engine) as runner:
        for images, masks in inputs:  # warm-up: each shape once
            runner.infer(images, masks)
        free_before, _ = cuda.memory_info()
        for i in range(CALLS):
            out = runner.infer(*inputs[i % len(inputs)])
        free_after, _ = cuda.memory_info()
        assert all(np.isfinite(v).all() for v in out.values() if v.dtype.kind == "f")
    growth = free_before - free_after
    assert growth <= MAX_GROWTH, (
        f"device memory grew {growth / 2**20:.1f} MiB over {CALLS} shape changes (bound {MAX_GROWTH >> 20} MiB): "
        "NVIDIA/TensorRT#4849? see docs/runtime.md, 'Long runs with plugins'"
    )

"""The runner against the real TensorRT lean runtime's API (``tensorrt-lean-cu13``, which imports without a GPU).

No engine can be deserialised here, so this proves the static half of a lean deployment: every TensorRT call the
runner makes exists in the lean module with the receiver the runner calls it on, and selecting a backend for a
version-compatible engine picks the lean runtime when full TensorRT is absent. Running a version-compatible engine on
it stays a `trt` check for a machine with a GPU.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from core import backend as backend_mod

RUNNER = Path(__file__).resolve().parents[1] / "runtime" / "runner.py"
HAS_LEAN = importlib.util.find_spec("tensorrt_lean") is not None
pytestmark = pytest.mark.skipif(not HAS_LEAN, reason="needs tensorrt-lean-cu13 (pip install 'anchortrt[lean]')")

# How the runner names the objects it calls TensorRT through -> the lean class that object is.
RECEIVERS = {
    r"trt": None,  # the module itself
    r"_runtime": "Runtime",
    r"trt_engine": "ICudaEngine",
    r"context|ctx": "IExecutionContext",
}


def runner_calls() -> set[tuple[str | None, str]]:
    source = RUNNER.read_text()
    calls = set()
    for receiver, cls in RECEIVERS.items():
        for match in re.finditer(rf"(?<![\w.])(?:\w+\.)*(?:{receiver})\.([A-Za-z_][A-Za-z0-9_]*)", source):
            calls.add((cls, match.group(1)))
    return calls


def test_every_tensorrt_call_of_the_runner_exists_in_the_lean_runtime():
    import tensorrt_lean as lean

    calls = runner_calls()
    assert len(calls) >= 12, f"the runner's TensorRT calls were not found in {RUNNER}: {sorted(calls, key=str)}"
    missing = []
    for cls, name in sorted(calls, key=str):
        owner = lean if cls is None else getattr(lean, cls)
        if not hasattr(owner, name):
            missing.append(f"{cls or 'tensorrt_lean'}.{name}")
    assert not missing, f"the lean runtime lacks {missing}: the runner would fail on a lean-only install"


def test_lean_runtime_cannot_build_and_is_not_offered_as_a_builder():
    import tensorrt_lean as lean

    assert not hasattr(lean, "Builder")
    with pytest.raises(backend_mod.BackendError, match="lean runtime only runs engines"):
        backend_mod.get_backend("tensorrt-lean")


def test_version_compatible_engine_runs_on_lean_when_full_tensorrt_is_absent(monkeypatch):
    real_import = backend_mod.installed_module
    monkeypatch.setattr(backend_mod, "installed_module", lambda name: None if name == "tensorrt" else real_import(name))
    chosen = backend_mod.get_runtime_backend("tensorrt", version_compatible=True)
    assert chosen.name == "tensorrt-lean" and chosen.trt.__name__ == "tensorrt_lean"
    with pytest.raises(backend_mod.BackendError, match="--version-compatible"):
        backend_mod.get_runtime_backend("tensorrt", version_compatible=False)

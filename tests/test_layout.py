"""The package layering: imports only go down ``core -> weights, plugins -> netdef -> reference -> runtime -> serve, eval``.

Every import statement counts, function-level ones included (a lazy import is still a dependency). `weights` and
`plugins` are peers and import neither each other nor anything above `core`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"core": 0, "weights": 1, "plugins": 1, "netdef": 2, "reference": 3, "runtime": 4, "serve": 5, "eval": 5}
# What core may import beyond the standard library: numpy, and the CUDA and console libraries of the base install.
CORE_THIRD_PARTY = {"numpy", "cuda", "rich"}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in ``path``; relative imports resolve to the file's own package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = path.relative_to(ROOT).parts[0] if node.level else (node.module or "").split(".")[0]
            found.append((node.lineno, module))
    return found


def package_files():
    for package in LAYER:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_every_package_is_checked():
    on_disk = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert on_disk == set(LAYER), f"packages without a layer: {sorted(on_disk - set(LAYER))}"


def test_imports_only_go_down_the_layers():
    wrong = []
    for path in package_files():
        own = path.relative_to(ROOT).parts[0]
        for line, module in imports_of(path):
            if module in LAYER and module != own and LAYER[module] >= LAYER[own]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(wrong)


def test_core_needs_only_the_standard_library_numpy_and_the_base_install():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    wrong = []
    for path in sorted((ROOT / "core").rglob("*.py")):
        for line, module in imports_of(path):
            if module not in stdlib and module not in CORE_THIRD_PARTY and module != "core":
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_plugins_do_not_import_torch():
    wrong = [f"{p.relative_to(ROOT)}:{line}" for p in sorted((ROOT / "plugins").rglob("*.py"))
             for line, module in imports_of(p) if module == "torch"]
    assert not wrong, "plugins/ must not import torch (PyTorch formulations live in reference/): " + ", ".join(wrong)


@pytest.mark.parametrize("module", ["runtime.runner", "runtime.detector", "runtime.infer", "runtime.bench", "runtime.pipeline",
                                    "runtime.preprocess", "runtime.postprocess", "runtime.gpu_preprocess", "runtime.synthetic",
                                    "runtime.torch_detector", "serve.server", "serve.client", "serve.triton",
                                    "eval.coco", "weights"])
def test_runtime_imports_without_torch(module):
    # A meta-path entry refusing torch makes `import torch` fail as it would where torch is not installed.
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'torch'\")\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        f"import {module}\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1:]

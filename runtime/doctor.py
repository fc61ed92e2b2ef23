"""``python -m runtime.doctor``: prove an installation end to end on this machine, and say how fast it is.

One command, run first after installing (its report is what to attach to a bug report):

* environment: the GPU (compute capability, driver, CUDA), TensorRT (full, RTX, lean) and its version, NVRTC for
  the plugins, nvImageCodec, torch; the install line of each missing piece;
* build: FP32 and FP16 engines (``netdef.build``, in-engine top-100) from ``--weights`` or random-init weights, over
  a narrow profile; with ``--plugins all`` where the plugin path is supported, and a version-compatible plan when
  the lean runtime is installed; build time and engine size;
* the network evaluated in PyTorch (``reference.check``: the interpreter's per-block parity), which needs no GPU;
* on the GPU: enqueue and CUDA-graph replay at two shapes and two batch sizes; the outputs against the PyTorch
  reference per output; plugins on against off; the engine's top-100 against the host's; the version-compatible
  plan on the lean runtime against full TensorRT; GPU preprocessing against the CPU path on awkward images;
  ``runtime.bench``'s p50 latency at 1x and 4x the first shape, next to the reference's strongest torch mode.

Every check that cannot run here (no GPU, no torch, no full TensorRT) is listed as skipped with the reason.
The tolerances are those the test suite holds (named below, with the test that holds them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from core import cuda
from core.backend import BACKENDS, BUILDERS, INSTALL_HINT, get_backend, installed_module
from core.cli import guarded, hw_list, int_list, parser, positive_int
from core.errors import EXIT_ENVIRONMENT, EXIT_FAILED, AnchorError, BadInput
from core.progress import Spinner, format_bytes, format_seconds, print_table
from core.sidecar import Profile, check_output_path, write_atomic

# Engine outputs against the FP32 PyTorch reference, max |engine - ref| / max(1, max |ref|), FP32, FP16 and FP16 with
# plugins alike: tests/test_parity.py::test_engine_matches_reference (FP16_WHOLE; TensorRT may run FP32 matmuls in
# TF32, whose 10-bit mantissa is fp16's).
ENGINE_TOLERANCE = 5e-2
# The same engine and inputs through enqueue and through a CUDA-graph replay: the same kernels, so only
# nondeterministic reductions may differ.
GRAPH_TOLERANCE = 1e-5
# In-engine top-100 against runtime.postprocess on the same logits: tests/test_parity.py (scores, boxes atol 1e-6).
TOP100_ATOL = 1e-6
# GPU preprocessing against the CPU path: masks and sizes equal, values at most one uint8 level apart
# (tests/test_gpu_preprocess.py).
PREPROCESS_STEPS = 1
# Awkward decoded sizes (H, W) for the preprocessing check: upscale, antialiased downscale, 1xN, extreme aspect.
AWKWARD = ((480, 640), (1800, 1200), (1, 37), (3000, 10))
PARITY_SIZE, PARITY_BATCH = (128, 160), 2  # the interpreter's padded batch: small, so it takes seconds on a CPU
DEFAULT_VARIANT = "r50_dc5"
NVIMGCODEC_HINT = "pip install nvidia-nvimgcodec-cu13"
TORCH_HINT = "pip install torch  (CUDA wheels: https://pytorch.org/get-started/locally/)"
STRONGEST_TORCH_MODE = "compile-fp16-graphs"

PASS, FAIL, SKIP = "pass", "FAIL", "skipped"
NO_GPU = "no GPU (see the gpu row)"


@dataclass
class Row:
    """One line of the report: what was checked, how it went, how long it took, what was measured."""

    check: str
    result: str  # PASS, FAIL or SKIP
    seconds: float = 0.0
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


class Skip(Exception):
    """A check that cannot run here; the message says why and what to install."""


class Outcome(Exception):
    """A check that ran and failed; the message names what differed."""


def run_check(name: str, fn: Callable[[], tuple[str, dict[str, Any]] | None], rows: list[Row]) -> Row:
    """``fn()`` -> (detail, figures) for a pass; Skip or Outcome (a failure) otherwise; any other exception is a
    failure too, reported by its class and message (the report must come out whatever breaks)."""
    start = time.monotonic()
    # A live spinner on a terminal; logs and pipes get only the table.
    progress = Spinner(name, stream=sys.stderr) if sys.stderr.isatty() else contextlib.nullcontext()
    try:
        with progress:
            detail, figures = fn() or ("", {})
        row = Row(name, PASS, detail=detail, figures=figures)
    except Skip as exc:
        row = Row(name, SKIP, detail=str(exc))
    except Outcome as exc:
        row = Row(name, FAIL, detail=str(exc), figures=getattr(exc, "figures", {}))
    except Exception as exc:  # noqa: BLE001  a broken check is a failed check, not a crash
        row = Row(name, FAIL, detail=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}")
    row.seconds = round(time.monotonic() - start, 3)
    rows.append(row)
    return row


def failed(message: str, figures: dict[str, Any] | None = None) -> Outcome:
    exc = Outcome(message)
    exc.figures = figures or {}
    return exc


# ---------------------------------------------------------------------------------------------- comparisons
# Pure functions of arrays: each GPU row is one of these applied to what the GPU gave (tests drive them with fakes).


def relative_errors(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per output of ``want``: max |got - want| / max(1, max |want|) (tests/test_parity.py's scale); inf for a
    missing output, a shape mismatch or non-finite values."""
    errors = {}
    for name, ref in want.items():
        value = got.get(name)
        ref = np.asarray(ref, dtype=np.float64)
        if value is None or np.shape(value) != ref.shape:
            errors[name] = float("inf")
            continue
        value = np.asarray(value, dtype=np.float64)
        if not np.isfinite(value).all():
            errors[name] = float("inf")
            continue
        errors[name] = float(np.abs(value - ref).max(initial=0.0) / max(1.0, float(np.abs(ref).max(initial=0.0))))
    return errors


def judge(errors: Mapping[str, float], tol: float, what: str) -> tuple[str, dict[str, Any]]:
    """(detail, figures) when every relative error is within ``tol``; Outcome naming the outputs that are not."""
    detail = ", ".join(f"{k} {e:.1e}" for k, e in errors.items()) + f" (rel err <= {tol:g})"
    figures = {"rel_err": dict(errors), "tolerance": tol}
    bad = [k for k, e in errors.items() if not e <= tol]
    if bad:
        raise failed(f"{what}: {', '.join(bad)} beyond tolerance: {detail}", figures)
    return f"{what}: {detail}", figures


def compare_outputs(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], tol: float, what: str
                    ) -> tuple[str, dict[str, Any]]:
    """judge() of every output of ``want``."""
    return judge(relative_errors(got, want), tol, what)


def compare_many(got: Sequence[Mapping], want: Sequence[Mapping], tol: float, what: str) -> tuple[str, dict[str, Any]]:
    """judge() of the worst error per output over several batches."""
    worst: dict[str, float] = {}
    for g, w in zip(got, want, strict=True):
        for k, e in relative_errors(g, w).items():
            worst[k] = max(worst.get(k, 0.0), e)
    return judge(worst, tol, what)


def _sorted_rows(labels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    rows = np.column_stack([np.asarray(labels, np.float64), np.asarray(boxes, np.float64)])
    return rows[np.lexsort(rows.T[::-1])]


def compare_top100(engine: Mapping[str, np.ndarray], host: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """The engine's scores/labels/boxes (B,100...) against runtime.postprocess's per image: scores and boxes within
    TOP100_ATOL; labels equal except where two scores tie (their order is then either). Returns the largest
    differences; Outcome when they are beyond."""
    worst = {"scores": 0.0, "boxes": 0.0, "labels_differing": 0}
    for b, want in enumerate(host):
        scores, labels, boxes = (np.asarray(engine[k][b]) for k in ("scores", "labels", "boxes"))
        if scores.shape != want["scores"].shape:
            raise failed(f"image {b}: the engine keeps {scores.shape[0]} detections, the host {want['scores'].shape[0]}")
        worst["scores"] = max(worst["scores"], float(np.abs(scores - want["scores"]).max(initial=0)))
        # Detections whose scores tie may come in either order: within each run of tied scores, rows are compared
        # after sorting by (label, box).
        starts = np.r_[0, np.flatnonzero(np.abs(np.diff(want["scores"])) > TOP100_ATOL) + 1, len(scores)]
        for lo, hi in zip(starts[:-1], starts[1:]):
            got_rows = _sorted_rows(labels[lo:hi], boxes[lo:hi])
            want_rows = _sorted_rows(want["labels"][lo:hi], want["boxes"][lo:hi])
            worst["labels_differing"] += int((got_rows[:, 0] != want_rows[:, 0]).sum())
            worst["boxes"] = max(worst["boxes"], float(np.abs(got_rows[:, 1:] - want_rows[:, 1:]).max(initial=0)))
    if worst["scores"] > TOP100_ATOL or worst["boxes"] > TOP100_ATOL or worst["labels_differing"]:
        raise failed(f"engine top-100 differs from the host's: scores {worst['scores']:.1e}, boxes "
                     f"{worst['boxes']:.1e} (atol {TOP100_ATOL:g}), {worst['labels_differing']} labels", worst)
    return worst


def preprocess_steps(gpu: tuple[np.ndarray, np.ndarray, list], cpu: tuple[np.ndarray, np.ndarray, list]) -> int:
    """uint8 levels between the GPU's and the CPU's (images, masks, sizes); Outcome when the masks or sizes differ
    or the values are more than PREPROCESS_STEPS apart."""
    from runtime.preprocess import NORMALISED

    (images, masks, sizes), (want, want_masks, want_sizes) = gpu, cpu
    if [tuple(s) for s in sizes] != [tuple(s) for s in want_sizes]:
        raise failed(f"resized sizes differ: GPU {list(map(tuple, sizes))}, CPU {list(map(tuple, want_sizes))}")
    if images.shape != want.shape or not np.array_equal(masks, want_masks):
        raise failed(f"padding masks differ ({int((masks != want_masks).sum())} entries)")
    steps = max(int(np.abs(np.searchsorted(NORMALISED[c], images[:, c]).clip(0, 255).astype(int)
                           - np.searchsorted(NORMALISED[c], want[:, c]).clip(0, 255)).max(initial=0))
                for c in range(3))
    if steps > PREPROCESS_STEPS:
        raise failed(f"GPU preprocessing is {steps} uint8 levels from the CPU path (at most {PREPROCESS_STEPS})",
                     {"uint8_steps": steps})
    return steps


def graph_replays(runner, configs: Sequence[tuple[int, tuple[int, int]]]) -> tuple[str, dict[str, Any]]:
    """Each (batch, (H, W)) twice on a runner made with cuda_graphs=True: a plain enqueue (that captures), then the
    graph's replay, whose outputs must be the enqueue's. Random inputs: runtime.bench's."""
    from runtime.bench import random_batch

    figures: dict[str, Any] = {}
    for batch, hw in configs:
        images, masks = random_batch(batch, hw)
        plain = runner.infer(images, masks)
        if runner.last_timing.get("graph"):
            raise failed(f"{batch}x{hw[0]}x{hw[1]}: the first call replayed a graph; nothing was enqueued")
        replay = runner.infer(images, masks)
        key = f"{batch}x{hw[0]}x{hw[1]}"
        problem = runner.graph_failures.get((batch, *hw))
        if problem or not runner.last_timing.get("graph"):
            raise failed(f"{key}: no CUDA graph was replayed ({problem or 'the second call enqueued again'})")
        errors = relative_errors(replay, plain)
        figures[key] = {"rel_err": errors, "graph_gpu_ms": runner.last_timing.get("gpu_ms")}
        if max(errors.values(), default=0.0) > GRAPH_TOLERANCE:
            raise failed(f"{key}: graph replay differs from enqueue ({', '.join(f'{k} {e:.1e}' for k, e in errors.items())}"
                         f", tolerance {GRAPH_TOLERANCE:g})", figures)
    return f"{len(configs)} shapes: enqueue then graph replay, outputs equal (<= {GRAPH_TOLERANCE:g})", figures


# ---------------------------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def gpu_info() -> dict[str, Any] | None:
    """The GPU and its driver, from the one probe (core.cuda.probe) and the driver's own version calls."""
    gpu = cuda.probe()
    if gpu is None:
        return None
    from cuda.bindings import driver as cu

    cuda_version = cuda.check(cu.cuDriverGetVersion(), "cuDriverGetVersion")
    info = {"name": gpu.name, "compute_capability": gpu.compute_capability, "memory_bytes": gpu.total_memory,
            "cuda_driver_api": f"{cuda_version // 1000}.{cuda_version % 1000 // 10}",
            "cuda_python": _version("cuda-python") or _version("cuda-bindings")}
    with contextlib.suppress(OSError):  # Linux names the kernel driver's release here
        info["driver"] = Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0]
    return info


def check_gpu() -> tuple[str, dict[str, Any]]:
    info = gpu_info()
    if info is None:
        raise Skip(f"no GPU: {cuda.NO_GPU_HINT}")
    return (f"{info['name']}, compute capability {info['compute_capability']}, {format_bytes(info['memory_bytes'])}, "
            f"driver {info.get('driver', '?')}, CUDA {info['cuda_driver_api']}"), info


def check_tensorrt() -> tuple[str, dict[str, Any]]:
    found = {name: (mod.__version__ if (mod := installed_module(name)) is not None else None) for name in BACKENDS}
    parts = [f"{n} {v}" if v else f"{n} missing ({INSTALL_HINT[n]})" for n, v in found.items()]
    if not any(found[n] for n in BUILDERS):
        raise Skip("no TensorRT that builds: " + "; ".join(parts))
    return "; ".join(parts), found


def check_nvrtc() -> tuple[str, dict[str, Any]]:
    try:
        version, archs = cuda.nvrtc_version(), cuda.nvrtc_archs()
    except Exception as exc:  # noqa: BLE001  missing library: cuda-python raises its loader's error
        raise Skip(f"NVRTC unavailable ({type(exc).__name__}); the plugins and GPU preprocessing need it: "
                   f"{cuda.NVRTC_HINT}") from None
    return f"NVRTC {version[0]}.{version[1]}, sm {archs[0]}..{archs[-1]}", {"version": list(version), "archs": list(archs)}


def check_nvimagecodec() -> tuple[str, dict[str, Any]]:
    try:
        from nvidia import nvimgcodec
    except ImportError:
        raise Skip(f"nvImageCodec not installed (GPU JPEG decoding): {NVIMGCODEC_HINT}") from None
    version = getattr(nvimgcodec, "__version__", None) or _version("nvidia-nvimgcodec-cu13") or "?"
    return f"nvImageCodec {version}", {"version": version}


def torch_module():
    try:
        import torch
    except ImportError:
        return None
    return torch


def check_torch() -> tuple[str, dict[str, Any]]:
    torch = torch_module()
    if torch is None:
        raise Skip(f"torch not installed (the reference's parity and latency rows need it): {TORCH_HINT}")
    on_gpu = torch.cuda.is_available()
    return (f"torch {torch.__version__}, CUDA {'available' if on_gpu else 'not available'}",
            {"version": torch.__version__, "cuda": on_gpu, "cuda_version": torch.version.cuda})


# ---------------------------------------------------------------------------------------------- the doctor


def profile_for(shapes: Sequence[tuple[int, int]], batches: Sequence[int]) -> Profile:
    """The narrowest profile holding every shape and batch: tuned for the largest batch at the first shape."""
    hs, ws = [h for h, _ in shapes], [w for _, w in shapes]
    return Profile((min(batches), min(hs), min(ws)), (max(batches), *shapes[0]), (max(batches), max(hs), max(ws))
                   ).validate()


@contextlib.contextmanager
def quiet() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """A CLI's stdout (its table or JSON) and stderr (its error line) captured: the doctor prints one table."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


def last_line(stream: io.StringIO) -> str:
    return (stream.getvalue().strip().splitlines() or ["no message"])[-1]


class Doctor:
    def __init__(self, args: argparse.Namespace, folder: Path):
        self.args, self.folder = args, folder
        self.rows: list[Row] = []
        self.profile = profile_for(args.shapes, args.batches)
        self.configs = [(b, hw) for hw in args.shapes for b in args.batches]
        self.weights: Path | None = args.weights
        self.engines: dict[str, Path] = {}  # label -> plan
        self.backend = None
        self.gpu = cuda.probe()
        self.torch = torch_module()

    def check(self, name: str, fn: Callable[[], tuple[str, dict[str, Any]] | None]) -> Row:
        return run_check(name, fn, self.rows)

    # ------------------------------------------------------------------ build

    def make_weights(self) -> tuple[str, dict[str, Any]]:
        if self.weights is not None:
            import weights

            cfg, _ = weights.load(self.weights)
            return f"{self.weights} ({cfg.variant}, {cfg.num_classes} classes)", {"path": str(self.weights)}
        if self.torch is None:
            raise Skip(f"no --weights, and random-init weights need torch: pass --weights W.safetensors or {TORCH_HINT}")
        from weights.extract import main as extract

        path = self.folder / f"random_{self.args.variant}.safetensors"
        with quiet() as (_, err):
            code = extract(["--random-init", self.args.variant, "-o", str(path)])
        if code:
            raise failed(f"weights.extract exited {code}: " + last_line(err))
        self.weights = path
        return f"random-init {self.args.variant} (no --weights given)", {"path": str(path)}

    def build(self, label: str, options: Sequence[str]) -> tuple[str, dict[str, Any]]:
        """One engine through netdef.build's command line (its checks, sidecar and summary)."""
        if self.weights is None:
            raise Skip("no weights (see the weights row)")
        if self.backend is None:
            raise Skip("no TensorRT that builds here (see the tensorrt row)")
        from netdef.build import main as build

        p = self.profile
        plan = self.folder / f"{label}.plan"
        argv = ["--weights", str(self.weights), "--backend", self.backend.name, "--postprocess", "--json",
                "--min", f"{p.min[1]}x{p.min[2]}", "--opt", f"{p.opt[1]}x{p.opt[2]}", "--max", f"{p.max[1]}x{p.max[2]}",
                "--batch", f"{p.min[0]},{p.opt[0]},{p.max[0]}", "-o", str(plan), *options]
        with quiet() as (out, err):
            code = build(argv)
        if code:
            raise failed(f"{' '.join(['netdef.build', *options])} exited {code}: " + last_line(err))
        summary = json.loads(out.getvalue())
        self.engines[label] = plan
        return (f"{format_seconds(summary['build_seconds'])}, {format_bytes(summary['engine_bytes'])}, "
                f"{summary['backend']} {summary['trt_version']}, plugins {','.join(summary['plugins']) or 'none'}"), {
            "build_seconds": summary["build_seconds"], "engine_bytes": summary["engine_bytes"],
            "options": list(options), "backend": summary["backend"], "trt_version": summary["trt_version"]}

    def plugin_options(self) -> list[str]:
        problem = self.backend.plugin_problem() if self.backend is not None else "no TensorRT that builds"
        if problem:
            raise Skip(f"plugins not supported here: {problem}")
        return ["--fp16", "--plugins", "all"]

    def version_compatible_options(self) -> list[str]:
        if self.backend is None or self.backend.name != "tensorrt":
            raise Skip(f"version-compatible plans need full TensorRT: {INSTALL_HINT['tensorrt']}")
        if installed_module("tensorrt-lean") is None:
            raise Skip(f"the lean runtime is not installed: {INSTALL_HINT['tensorrt-lean']}")
        return ["--version-compatible"]

    # ------------------------------------------------------------------ the interpreter (no GPU needed)

    def interpreter(self, precision: str) -> tuple[str, dict[str, Any]]:
        if self.torch is None:
            raise Skip(f"the interpreter runs the network in PyTorch: {TORCH_HINT}")
        if self.weights is None or self.backend is None:
            raise Skip("no weights or no TensorRT that builds (rows above)")
        from reference.check import run_check as parity

        device = "cuda" if self.torch.cuda.is_available() else "cpu"
        with quiet():
            report = parity(self.weights, fp16=precision == "fp16", size=PARITY_SIZE, batch=PARITY_BATCH,
                            device=device, backend_name=self.backend.name)
        worst = max(report["blocks"], key=lambda r: -1 if r["max_rel_err"] is None else r["max_rel_err"])
        figures = {"tolerance": report["tolerance"], "device": device, "blocks": {
            r["block"]: r["max_rel_err"] for r in report["blocks"]}}
        bad = [r["block"] for r in report["blocks"] if not r["passed"]]
        if bad:
            raise failed(f"{len(bad)} of {len(report['blocks'])} blocks differ, first {bad[0]} "
                         f"(rel err <= {report['tolerance']:g})", figures)
        return (f"{len(report['blocks'])} blocks match on {device}, worst {worst['block']} "
                f"{worst['max_rel_err']:.1e} (<= {report['tolerance']:g})"), figures

    # ------------------------------------------------------------------ on the GPU

    def need_gpu(self, *labels: str) -> list[Path]:
        if self.gpu is None:
            raise Skip(NO_GPU)
        missing = [label for label in labels if label not in self.engines]
        if missing:
            raise Skip(f"engine {', '.join(missing)} was not built (see its build row)")
        return [self.engines[label] for label in labels]

    def need_torch(self) -> None:
        if self.torch is None:
            raise Skip(f"torch is not installed: {TORCH_HINT}")

    def graphs(self, label: str) -> tuple[str, dict[str, Any]]:
        (plan,) = self.need_gpu(label)
        from runtime.runner import EngineRunner

        with EngineRunner(plan, cuda_graphs=True) as runner:
            return graph_replays(runner, self.configs)

    def engine_outputs(self, plan: Path, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
        from runtime.runner import EngineRunner

        with EngineRunner(plan) as runner:
            return [runner.infer(images, masks) for images, masks in batches]

    def parity_inputs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Padded batches of images of different sizes (masks exercised): the largest batch at the first shape and
        the smallest at the last."""
        (b0, hw0), (b1, hw1) = (max(self.args.batches), self.args.shapes[0]), (min(self.args.batches), self.args.shapes[-1])
        return [padded_batch(b0, hw0), padded_batch(b1, hw1)]

    def reference_outputs(self, batches) -> list[dict[str, np.ndarray]]:
        torch = self.torch
        from reference.torch_model import AnchorDETR

        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # an FP32 reference
        model = AnchorDETR.from_safetensors(self.weights, device=device)
        out = []
        with torch.inference_mode():
            for images, masks in batches:
                got = model(torch.from_numpy(images).to(device), torch.from_numpy(masks).to(device))
                out.append({k: got[k].float().cpu().numpy() for k in ("pred_logits", "pred_boxes")})
        return out

    def parity(self, label: str) -> tuple[str, dict[str, Any]]:
        (plan,) = self.need_gpu(label)
        self.need_torch()
        batches = self.parity_inputs()
        got, want = self.engine_outputs(plan, batches), self.reference_outputs(batches)
        return compare_many(got, want, ENGINE_TOLERANCE, f"{label} vs torch")

    def plugins_on_off(self) -> tuple[str, dict[str, Any]]:
        on, off = self.need_gpu("fp16-plugins", "fp16")
        batches = self.parity_inputs()
        return compare_many(self.engine_outputs(on, batches), self.engine_outputs(off, batches), ENGINE_TOLERANCE,
                            "plugins vs none")

    def top100(self, label: str) -> tuple[str, dict[str, Any]]:
        (plan,) = self.need_gpu(label)
        from runtime.postprocess import postprocess
        from runtime.bench import random_batch

        figures = {}
        outputs = self.engine_outputs(plan, [random_batch(batch, hw) for batch, hw in self.configs])
        for (batch, hw), out in zip(self.configs, outputs, strict=True):
            sizes = np.ones((batch, 2))  # normalised boxes: the tolerance is in image units
            host = postprocess(out["pred_logits"], out["pred_boxes"], sizes)
            figures[f"{batch}x{hw[0]}x{hw[1]}"] = compare_top100(out, host)
        return f"{len(self.configs)} shapes: scores and boxes within {TOP100_ATOL:g}, labels equal", figures

    def lean(self) -> tuple[str, dict[str, Any]]:
        (plan,) = self.need_gpu("fp32-version-compatible")
        inputs = self.parity_inputs()[:1]
        full = self.engine_outputs(plan, inputs)[0]
        lean = lean_outputs(plan, *inputs[0], self.folder)
        detail, figures = compare_outputs(lean, full, GRAPH_TOLERANCE, "lean vs full TensorRT")
        return detail, {**figures, "lean_version": installed_module("tensorrt-lean").__version__}

    def preprocess(self) -> tuple[str, dict[str, Any]]:
        if self.gpu is None:
            raise Skip(NO_GPU)
        try:
            cuda.nvrtc_version()
        except Exception:  # noqa: BLE001
            raise Skip(f"GPU preprocessing compiles its kernel with NVRTC: {cuda.NVRTC_HINT}") from None
        from PIL import Image

        from runtime.preprocess import preprocess_batch, to_rgb

        arrays = awkward_images()
        max_hw = self.profile.max[1:]
        steps = 0
        for start in range(0, len(arrays), 2):
            pair = arrays[start : start + 2]
            want = preprocess_batch([to_rgb(Image.fromarray(a)) for a in pair], max_hw=max_hw)
            steps = max(steps, preprocess_steps(gpu_preprocessed(pair, want[0].shape, max_hw), want))
        return f"{len(arrays)} awkward images: masks and sizes equal, values within {steps} uint8 level(s)", {
            "uint8_steps": steps, "sizes": [list(a.shape[:2]) for a in arrays]}

    def latency(self) -> tuple[str, dict[str, Any]]:
        (plan,) = self.need_gpu("fp16")
        from core.progress import ProgressBar
        from runtime import bench

        hw = self.args.shapes[0]
        configs = [(b, hw) for b in sorted(set(self.args.batches))]
        argv = ["--engine", str(plan), "--graphs", "--iters", str(self.args.iters), "--warmup", "5",
                "--torch-modes", self.args.torch_mode]
        if self.torch is not None and self.torch.cuda.is_available():
            argv += ["--torch-weights", str(self.weights)]
        args = bench.build_parser().parse_args(argv)
        args.torch_modes = [self.args.torch_mode]
        rows = []
        total = (args.warmup + args.iters) * len(configs) * (2 + (args.torch_weights is not None))
        with ProgressBar(total, "latency", stream=sys.stderr if sys.stderr.isatty() else io.StringIO()) as bar:
            rows += bench.bench_engine(args, configs, bar)
            if args.torch_weights is not None:
                rows += bench.bench_torch(args, configs, bar)
        figures = {f"{r['backend']} {r['mode']} {r['batch']}x{r['height']}x{r['width']}": r["e2e_ms"]["p50"]
                   for r in rows}
        detail = "; ".join(f"{k} p50 {v:.2f} ms" for k, v in figures.items() if "enqueue" not in k)
        if args.torch_weights is None:
            detail += "; torch reference not measured (needs torch with CUDA)"
        return detail, {"p50_ms": figures, "rows": rows}

    # ------------------------------------------------------------------ all of it

    def run(self) -> list[Row]:
        for name, fn in (("gpu", check_gpu), ("tensorrt", check_tensorrt), ("nvrtc", check_nvrtc),
                         ("nvimagecodec", check_nvimagecodec), ("torch", check_torch)):
            self.check(name, fn)
        try:
            self.backend = get_backend()
        except AnchorError:
            self.backend = None
        self.check("weights", self.make_weights)
        for precision in self.args.precisions:
            self.check(f"build {precision}", lambda p=precision: self.build(p, ["--fp16"] * (p == "fp16")))
        self.check("build fp16 plugins", lambda: self.build("fp16-plugins", self.plugin_options()))
        self.check("build version-compatible",
                   lambda: self.build("fp32-version-compatible", self.version_compatible_options()))
        for precision in self.args.precisions:
            self.check(f"interpreter {precision}", lambda p=precision: self.interpreter(p))
        labels = [*self.args.precisions, "fp16-plugins"]
        for label in labels:
            self.check(f"enqueue + graphs {label}", lambda x=label: self.graphs(x))
        for label in labels:
            self.check(f"vs torch {label}", lambda x=label: self.parity(x))
        self.check("plugins on vs off", self.plugins_on_off)
        self.check("top-100 engine vs host", lambda: self.top100(self.args.precisions[0]))
        self.check("lean runtime", self.lean)
        self.check("gpu preprocessing", self.preprocess)
        self.check("latency", self.latency)
        return self.rows


def padded_batch(batch: int, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """runtime.bench's random batch with image i > 0 smaller by up to a quarter of the height and a third of the width
    (sizes off the backbone strides), zero-padded and masked as the runtime pads a batch. numpy only: the rows that
    compare engines with each other run without torch."""
    from runtime.bench import random_batch

    images, masks = random_batch(batch, hw)
    for i in range(1, batch):
        shrink = i / max(batch - 1, 1)
        h, w = hw[0] - round(shrink * hw[0] / 4) - 3, hw[1] - round(shrink * hw[1] / 3) - 5
        images[i, :, h:], images[i, :, :, w:] = 0, 0
        masks[i, h:], masks[i, :, w:] = True, True
    return images, masks


def awkward_images() -> list[np.ndarray]:
    """Decoded RGB arrays of AWKWARD sizes, smooth gradients plus noise (deterministic)."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in AWKWARD:
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
        out.append(np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8))
    return out


def gpu_preprocessed(arrays: Sequence[np.ndarray], shape: tuple[int, ...], max_hw) -> tuple:
    """(images, masks, sizes) of runtime.gpu_preprocess for `arrays`, padded to `shape` (B,3,H,W), read back."""
    from runtime.gpu_preprocess import GpuPreprocessor

    cuda.init()
    b, _, h, w = shape
    nbytes = b * 3 * h * w * 4
    with GpuPreprocessor(max_batch=b, max_hw=max_hw) as pre:
        sizes = [pre.upload(slot, a) for slot, a in enumerate(arrays)]
        with cuda.DeviceBuffer(nbytes + b * h * w) as out, cuda.PinnedBuffer(nbytes + b * h * w, np.uint8) as host:
            pre.run(out.ptr, out.ptr + nbytes, (b, h, w))
            out.download(host.array, pre.stream)
            pre.stream.synchronize()
            raw = host.array.copy()
    return raw[:nbytes].view(np.float32).reshape(b, 3, h, w), raw[nbytes:].view(bool).reshape(b, h, w), sizes


LEAN_SCRIPT = """\
import sys
import numpy as np
class NoFullTensorRT:  # the runner then loads the plan with the lean runtime, as where only it is installed
    def find_spec(self, name, path=None, target=None):
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ModuleNotFoundError("No module named 'tensorrt'")
sys.meta_path.insert(0, NoFullTensorRT())
from runtime.runner import EngineRunner
data = np.load(sys.argv[2])
with EngineRunner(sys.argv[1]) as runner:
    assert runner.engine.trt.__name__.startswith("tensorrt_lean"), runner.engine.trt.__name__
    np.savez(sys.argv[3], **runner.infer(data["images"], data["masks"]))
"""


def lean_outputs(plan: Path, images: np.ndarray, masks: np.ndarray, folder: Path) -> dict[str, np.ndarray]:
    """The plan's outputs from a child process in which only the lean runtime can be imported."""
    inputs, outputs = folder / "lean_inputs.npz", folder / "lean_outputs.npz"
    np.savez(inputs, images=images, masks=masks)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", LEAN_SCRIPT, str(plan), str(inputs), str(outputs)], cwd=root,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise failed("the lean runtime could not run the plan: "
                     + ((done.stderr.strip().splitlines() or ["no message"])[-1]))
    with np.load(outputs) as data:
        return {k: data[k] for k in data.files}


# ---------------------------------------------------------------------------------------------- command line

EPILOG = f"""\
examples:
  python -m runtime.doctor                                   random-init {DEFAULT_VARIANT}, the full report
  python -m runtime.doctor --weights weights/anchor_detr_r50_dc5.safetensors --json doctor.json
  python -m runtime.doctor --shapes 320x320,256x384 --batches 1,2 --torch-mode fp16     quicker

tolerances (those the test suite holds): engine vs the FP32 PyTorch reference and plugins on vs off
{ENGINE_TOLERANCE:g} x max(1, max |ref|) per output; enqueue vs graph replay and lean vs full TensorRT
{GRAPH_TOLERANCE:g}; engine top-100 vs host {TOP100_ATOL:g}; GPU vs CPU preprocessing {PREPROCESS_STEPS} uint8
level; the interpreter's per-block parity as `python -m reference.check` (1e-3 FP32, 3e-2 FP16).

exit codes: 0 every check that could run passed (the rest are listed as skipped, with why), 1 a check failed,
2 bad arguments, 3 nothing could run (no GPU and no TensorRT)
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "python -m runtime.doctor",
        "Check this installation end to end and measure it: environment, engine builds, the network against\n"
        "the PyTorch reference, enqueue and CUDA graphs, plugins, top-100, the lean runtime, GPU preprocessing\n"
        "and latency. Prints a table (check, result, time, detail); --json writes every figure. Attach the\n"
        "report to a bug report.",
        EPILOG,
    )
    p.add_argument("--weights", type=Path, metavar="W.safetensors",
                   help=f"weights to build from (default: random-init {DEFAULT_VARIANT}, which needs torch)")
    p.add_argument("--variant", default=DEFAULT_VARIANT, help=f"random-init variant (default {DEFAULT_VARIANT})")
    p.add_argument("--precisions", default="fp32,fp16",
                   help="engines to build and run, from fp32,fp16 (default fp32,fp16)")
    p.add_argument("--shapes", type=hw_list, default="800x800,640x960", metavar="HxW,HxW",
                   help="the two input shapes; the profile spans them, latency is at the first (default %(default)s)")
    p.add_argument("--batches", type=int_list, default="1,4", metavar="B,B", help="the two batch sizes (default 1,4)")
    p.add_argument("--iters", type=positive_int, default=50, help="timed iterations per latency row (default 50)")
    p.add_argument("--torch-mode", default=STRONGEST_TORCH_MODE,
                   help=f"the reference's mode next to the engine's latency (default {STRONGEST_TORCH_MODE}, the "
                   "strongest; see python -m runtime.bench --help)")
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep the weights and engines in DIR (default: a temporary "
                   "folder, removed)")
    p.add_argument("--json", type=Path, metavar="REPORT", help="write the report as JSON")
    return p


def report(rows: Sequence[Row], args: argparse.Namespace, exit_code: int) -> dict[str, Any]:
    from netdef.build import anchortrt_version

    return {
        "anchortrt_version": anchortrt_version(),
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_cores": os.cpu_count(),
        "gpu": next((r.figures for r in rows if r.check == "gpu" and r.result == PASS), None),
        "versions": {"tensorrt": next((r.figures for r in rows if r.check == "tensorrt"), {}) or {},
                     "numpy": np.__version__, "torch": _version("torch"), "pillow": _version("pillow"),
                     "cuda-python": _version("cuda-python")},
        "options": {"weights": str(args.weights) if args.weights else None, "variant": args.variant,
                    "precisions": args.precisions, "shapes": [list(s) for s in args.shapes],
                    "batches": args.batches, "iters": args.iters, "torch_mode": args.torch_mode},
        "checks": [asdict(r) for r in rows],
        "skipped": {r.check: r.detail for r in rows if r.result == SKIP},
        "exit_code": exit_code,
    }


def exit_code(rows: Sequence[Row], nothing_could_run: bool) -> int:
    if nothing_could_run:
        return EXIT_ENVIRONMENT
    return EXIT_FAILED if any(r.result == FAIL for r in rows) else 0


def run(args: argparse.Namespace) -> int:
    from runtime.bench import TORCH_MODES

    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not args.precisions or set(args.precisions) - {"fp32", "fp16"}:
        raise BadInput(f"--precisions {','.join(args.precisions)}: choose from fp32,fp16")
    if len(args.shapes) != 2 or len(args.batches) != 2:
        raise BadInput("--shapes and --batches take two values each, e.g. --shapes 800x800,640x960 --batches 1,4")
    if args.torch_mode not in TORCH_MODES:
        raise BadInput(f"--torch-mode {args.torch_mode}: choose from {', '.join(TORCH_MODES)}")
    if args.weights is not None and not args.weights.is_file():
        raise BadInput(f"--weights {args.weights} not found: extract one with `python -m weights.extract`, or leave "
                       "--weights out for random-init weights")
    if args.json is not None:
        check_output_path(args.json, "--json")
    profile_for(args.shapes, args.batches)  # a ProfileError (exit 2) before any work
    if args.weights is None:
        from core.config import AnchorDETRConfig

        AnchorDETRConfig.from_variant(args.variant)  # a ConfigError (exit 2) names the variants
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            folder = args.keep
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="anchortrt-doctor-")))
        doctor = Doctor(args, folder)
        rows = doctor.run()
    code = exit_code(rows, doctor.gpu is None and doctor.backend is None)
    print_table([(r.check, r.result, format_seconds(r.seconds), r.detail) for r in rows],
                ["check", "result", "time", "detail"])
    ran = [r for r in rows if r.result != SKIP]
    print(f"\n{sum(r.result == PASS for r in ran)} of {len(ran)} checks that could run passed; "
          f"{len(rows) - len(ran)} skipped" + ("; nothing could run: no GPU and no TensorRT" if code == 3 else ""))
    if args.json is not None:
        write_atomic(args.json, (json.dumps(report(rows, args, code), indent=2, default=str) + "\n").encode())
        print(f"report: {args.json}")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    return guarded(p.prog, run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

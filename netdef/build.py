"""``python -m netdef.build``: AnchorDETR weights -> TensorRT engine plan + JSON sidecar.

``create_network`` is the library entry point (``main``, the parity check ``python -m reference.check`` and
``reference.interpret.evaluate`` use it): a strongly typed network defined by ``netdef.network.define_network``,
one optimization profile over ``images``/``masks``, workspace limit, progress monitor and (full TensorRT only)
timing cache. ``main`` is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from core import cuda
from core.backend import BACKENDS, Backend, BackendError, check_plugins, get_backend
from core import cli
from core.errors import BadInput, Failed
from core.progress import ProgressBar, Spinner, format_bytes, format_seconds, print_table
from core.sidecar import (
    Profile, ProfileError, check_output_path, default_engine_path,
    sidecar_path, write_atomic, write_sidecar,
)

from plugins import NAMES as PLUGIN_NAMES
DEFAULT_WEIGHTS = Path("weights/anchor_detr_r50_dc5.safetensors")
# FP32 R50-DC5 at the default maximum (8x1344x1344) asks TensorRT-RTX for 8.2 GiB at build time; leave room.
DEFAULT_WORKSPACE_MIB = 16384
MISSING_WEIGHTS = (
    "weights file {path} not found: extract a checkpoint with `python -m weights.extract CKPT.pth -o {path}` "
    "or make random-init weights with `python -m weights.extract --random-init r50_dc5 -o {path}`"
)


# TensorRT indexes a tensor's elements with int32 (NVIDIA documents 2^31-1 elements as the limit for most layers);
# a profile whose largest activation exceeds it fails deep inside the build, or overflows silently.
MAX_ACTIVATION_ELEMENTS = 2**31 - 1


class BuildError(Failed, RuntimeError):
    """TensorRT refused to build the network; the message carries TensorRT's own errors."""


def largest_activation(cfg, profile: Profile) -> tuple[int, str]:
    """(elements, what) of the largest tensor our network materialises at ``profile.max``: the backbone's stride-4
    maps (B x 256 x H/4 x W/4) or the encoder's row-attended values T (B x heads x h*w queries x h x head_dim,
    netdef.network.rcda), which grows with h^2 w at the feature size h x w = H/stride x W/stride."""
    b, height, width = profile.max
    h, w = -(-height // cfg.stride), -(-width // cfg.stride)
    sizes = [(b * 256 * -(-height // 4) * -(-width // 4), "backbone stride-4 feature map")]
    if cfg.attention_type == "RCDA":
        sizes.append((b * h * w * h * cfg.d_model, "encoder attention rows (B x heads x h*w x h x head_dim)"))
    return max(sizes)


def check_activation_size(cfg, profile: Profile) -> None:
    elements, what = largest_activation(cfg, profile)
    if elements > MAX_ACTIVATION_ELEMENTS:
        b, height, width = profile.max
        raise ProfileError(
            f"profile max {b}x{height}x{width} makes the {what} {elements:,} elements, above the {MAX_ACTIVATION_ELEMENTS:,} "
            "that TensorRT's int32 element indexing allows: lower --max or the max of --batch"
        )


PROFILE_WARNING = ("TensorRT does not take the optimization profile as given ({}): fix --min/--opt/--max HxW and "
                   "--batch MIN,OPT,MAX; no engine written")


def check_profile_warnings(logger) -> None:
    """BadInput when TensorRT warned about the optimization profile: it corrects or ignores such a profile instead
    of failing, so the engine would not accept the shapes the sidecar promises."""
    said = [w for w in getattr(logger, "warnings", ()) if "profile" in w.lower() or "not self-consistent" in w]
    if said:
        raise BadInput(PROFILE_WARNING.format(" | ".join(said)))


def parse_plugins(text: str) -> frozenset[str]:
    """``all`` | ``none`` | comma-separated names from PLUGIN_NAMES."""
    if text == "all":
        return frozenset(PLUGIN_NAMES)
    if text in ("none", ""):
        return frozenset()
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(names - set(PLUGIN_NAMES))
    if unknown:
        raise ValueError(f"unknown plugin(s) {', '.join(unknown)}: choose all, none or from {', '.join(PLUGIN_NAMES)}")
    return names


def check_version_compatible(backend: Backend) -> None:
    """BackendError unless ``backend`` can build version-compatible plans for the lean runtime."""
    if backend.name != "tensorrt" or not all(
            hasattr(backend.trt.BuilderFlag, f) for f in ("VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME")):
        raise BackendError(f"--version-compatible needs full TensorRT with VERSION_COMPATIBLE and EXCLUDE_LEAN_RUNTIME "
                           f"(this is {backend.name} {backend.version}): pass --backend tensorrt, or drop the option")


def _creation_flags(backend: Backend) -> int:
    # TensorRT 10 needs the flag for a strongly typed network; TensorRT 11 and TensorRT-RTX are always strongly
    # typed and deprecate the flag.
    if backend.name == "tensorrt" and int(backend.version.split(".")[0]) < 11:
        return 1 << int(backend.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def make_logger(trt, verbose: bool = False, stream=None):
    """A TensorRT logger that keeps errors and warnings for the end of the build instead of interleaving them
    with the progress bar; ``verbose`` also prints everything down to INFO as it comes."""

    class BuildLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg: str) -> None:
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            elif level == int(trt.ILogger.Severity.WARNING):
                self.warnings.append(msg)
            if verbose and level <= int(trt.ILogger.Severity.INFO):
                print(f"[TensorRT {severity.name}] {msg}", file=stream or sys.stderr)

    return BuildLogger()


def make_progress_monitor(trt, bar: ProgressBar):
    """A TensorRT progress monitor that folds the nested build phases into one fraction on ``bar``.

    Each open phase subdivides the current step of its parent, so the bar advances smoothly through the nested
    phases (their names and nesting vary between TensorRT versions); the status names the innermost open phase,
    and the bar is full when the outermost phase finishes. ``events`` keeps ("start", name, parent) and
    ("finish", name, None) in order. Ctrl-C during the build cancels it.
    """

    class BuildMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.stack: list[list] = []  # open phases: [name, steps, steps done]
            self.events: list[tuple[str, str, str | None]] = []
            self.max_depth = 0
            self.cancelled = False
            self._lock = threading.Lock()

        def _draw(self) -> None:
            frac, scale = 0.0, 1.0
            for _, steps, done in self.stack:
                frac += scale * min(done, steps) / steps
                scale /= steps
            bar.set(frac, status=self.stack[-1][0] if self.stack else None)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self._lock:
                    self.events.append(("start", phase_name, parent_phase))
                    self.stack.append([phase_name, max(num_steps, 1), 0])
                    self.max_depth = max(self.max_depth, len(self.stack))
                    self._draw()
            except KeyboardInterrupt:
                self.cancelled = True

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                with self._lock:
                    for entry in reversed(self.stack):
                        if entry[0] == phase_name:
                            entry[2] = step + 1
                            break
                    self._draw()
            except KeyboardInterrupt:
                self.cancelled = True
            return not self.cancelled  # False asks TensorRT to stop the build

        def phase_finish(self, phase_name: str) -> None:
            try:
                with self._lock:
                    self.events.append(("finish", phase_name, None))
                    for i in range(len(self.stack) - 1, -1, -1):
                        if self.stack[i][0] == phase_name:
                            del self.stack[i:]
                            break
                    # A finished child is counted when its parent reports the step; the outermost phase's last
                    # step is never reported, so its end fills the bar.
                    if not self.stack:
                        bar.set(1.0, status="done")
            except KeyboardInterrupt:
                self.cancelled = True

    return BuildMonitor()


def load_timing_cache(config, path: Path) -> None:
    """Full TensorRT only (a deprecated no-op on TensorRT-RTX): tactic timings reused across builds."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache written by another GPU or TensorRT version: start afresh rather than fail the build.
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def save_timing_cache(config, path: Path) -> None:
    write_atomic(path, bytes(config.get_timing_cache().serialize()))


def create_network(
    backend: Backend,
    cfg,
    tensors,
    *,
    fp16: bool = False,
    tf32: bool = False,
    version_compatible: bool = False,
    plugins: frozenset[str] = frozenset(),
    postprocess: bool = False,
    profile: Profile = Profile(),
    fold_constants: bool = True,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    logger=None,
    monitor=None,
    timing_cache: Path | None = None,
):
    """-> (builder, network, builder_config, keepalive); keep ``keepalive`` referenced until the build returns
    (``trt.Weights`` do not copy their numpy arrays). ``fold_constants=False`` computes what depends only on
    weights in the network instead of at build time (to measure what folding saves). ``tf32`` lets FP32
    convolutions and matmuls use TF32 tensor cores; otherwise TF32 is cleared (full TensorRT enables it by default)."""
    from netdef.network import define_network

    profile.validate()
    check_plugins(backend, plugins)
    trt = backend.trt
    logger = logger if logger is not None else make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_creation_flags(backend))
    keepalive: list[Any] = [logger]
    keepalive += define_network(trt, network, cfg, tensors, fp16=fp16, plugins=plugins, postprocess=postprocess,
                                fold_constants=fold_constants)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if hasattr(trt.BuilderFlag, "TF32"):
        (config.set_flag if tf32 else config.clear_flag)(trt.BuilderFlag.TF32)
    if version_compatible:
        check_version_compatible(backend)
        # Lean-runtime operators only, and no lean runtime inside the plan: tensorrt_lean (or a later TensorRT of
        # the same major version) runs it.
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    opt = builder.create_optimization_profile()
    for name, channels in (("images", (3,)), ("masks", ())):
        opt.set_shape(name, *((b, *channels, h, w) for b, h, w in (profile.min, profile.opt, profile.max)))
    if config.add_optimization_profile(opt) < 0:
        said = [e for e in logger.errors if "profile" in e.lower()][:1] or logger.errors[-1:] or ["no error message"]
        raise ProfileError(f"TensorRT refused the optimization profile {profile}: {said[0]}")
    if monitor is not None:
        config.progress_monitor = monitor
        keepalive.append(monitor)
    if timing_cache is not None and backend.name == "tensorrt":
        load_timing_cache(config, timing_cache)
    return builder, network, config, keepalive


def build_serialized(builder, network, config, logger=None):
    """The serialized plan (IHostMemory, a buffer); BuildError with TensorRT's errors if the build fails."""
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        monitor = config.progress_monitor
        if monitor is not None and getattr(monitor, "cancelled", False):
            raise BuildError("build cancelled")
        errors = getattr(logger, "errors", None) or ["no error message"]
        hint = ""
        if any("OutOfMemory" in e or "workspace" in e for e in errors):
            hint = " (raise --workspace, or lower --max/--batch: memory grows with the largest batch x image)"
        raise BuildError("TensorRT could not build the engine: " + " | ".join(errors[-3:]) + hint)
    return plan


def describe_io(trt, network) -> tuple[dict, dict]:
    """Network inputs and outputs as the sidecar lists them: name -> {dtype, shape with -1 for dynamic}."""
    import numpy as np

    def desc(t) -> dict:
        return {"dtype": np.dtype(trt.nptype(t.dtype)).name, "shape": list(t.shape)}

    inputs = {t.name: desc(t) for t in map(network.get_input, range(network.num_inputs))}
    outputs = {t.name: desc(t) for t in map(network.get_output, range(network.num_outputs))}
    return inputs, outputs


def gpu_entry() -> dict[str, str] | None:
    """The sidecar's `gpu`: name and compute capability of CUDA device 0 (the one TensorRT builds on), or None
    without a driver or device."""
    gpu = cuda.probe()
    return None if gpu is None else {"name": gpu.name, "compute_capability": gpu.compute_capability}


def gpu_total_memory() -> int | None:
    """Bytes of memory on CUDA device 0, or None without a driver or device."""
    gpu = cuda.probe()
    return None if gpu is None else gpu.total_memory


def workspace_limit_mib(requested_mib: int) -> int:
    """The workspace to ask for: TensorRT ignores a pool limit above the device's memory (with an error line)
    instead of capping it, so the request is capped at the GPU's total memory; unchanged without a GPU."""
    total = gpu_total_memory()
    return requested_mib if total is None else min(requested_mib, total >> 20)


def anchortrt_version() -> str:
    try:
        return metadata.version("anchortrt")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- command line


def _plugins(text: str) -> frozenset[str]:
    try:
        return parse_plugins(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


DESCRIPTION = """\
Build a TensorRT engine for AnchorDETR from a weights file.

The network is written layer by layer with the TensorRT network API (netdef/network.py), strongly typed:
strict FP32 by default, TF32 convolutions and matmuls (--tf32), or FP16 tensors with FP32 kept where precision needs it (--fp16). Inputs are `images`
(B,3,H,W) float32, normalised, and `masks` (B,H,W) bool, True = padding; outputs `pred_logits` (B,900,91) and
`pred_boxes` (B,900,4), plus `scores`/`labels`/`boxes` top-100 with --postprocess. Batch, height and width are
dynamic within one optimization profile (--min/--opt/--max/--batch).

Writes ENGINE.plan and ENGINE.json (the sidecar the runtime checks: config, profile, precision, TensorRT
version, GPU, weights sha256, I/O) next to it; both appear atomically.
"""

EPILOG = """\
workflow:
  python -m weights.extract CKPT.pth -o weights/anchor_detr_r50_dc5.safetensors   (or --random-init r50_dc5)
  python -m netdef.build --fp16                  -> engines/anchor_detr_r50_dc5_fp16.plan + .json
  python -m reference.check --fp16                  per-block parity against PyTorch, without running an engine
  python -m runtime.infer IMG --engine engines/anchor_detr_r50_dc5_fp16.plan

backends: full TensorRT (pip install 'anchortrt[trt]') builds on and for the local GPU and supports plugins;
TensorRT for RTX (pip install 'anchortrt[rtx]') builds ahead of time without a GPU, for RTX GPUs only.

profile bound: the largest activation at --max and the largest --batch must stay within 2^31-1 elements, the
limit of TensorRT's int32 element indexing. For R50-DC5 that is the encoder's row-attended values, B x 256 x
(H/16)^2 x W/16 elements: 8x1344x1344 uses 1.2e9, 8x1600x1600 2.05e9; 16x1344x1344 (2.4e9) is refused
before building.

exit codes: 0 built, 1 TensorRT failed to build, 2 bad input, 3 no usable TensorRT backend.
"""


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m netdef.build", DESCRIPTION, EPILOG)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                   help=f"weights file from `python -m weights.extract` (default: {DEFAULT_WEIGHTS})")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true",
                           help="FP16 network (FP32 where precision needs it); default strict FP32")
    precision.add_argument("--tf32", action="store_true",
                           help="FP32 network whose convolutions and matmuls may use TF32 tensor cores (10-bit "
                                "mantissa; full TensorRT's default, which plain FP32 builds turn off)")
    p.add_argument("--plugins", type=_plugins, default=frozenset(), metavar="all|none|NAME,...",
                   help=f"custom layers to use, full TensorRT only: {', '.join(PLUGIN_NAMES)} (default: none)")
    default = Profile()
    for which, meaning in (("min", "smallest image the engine accepts"), ("opt", "image size TensorRT tunes for"),
                           ("max", "largest image the engine accepts")):
        _, h, w = getattr(default, which)
        p.add_argument(f"--{which}", type=cli.hw, default=f"{h}x{w}", metavar="HxW",
                       help=f"{meaning}, height x width (default: %(default)s)")
    p.add_argument("--batch", type=cli.min_opt_max, default=",".join(str(s[0]) for s in (default.min, default.opt, default.max)),
                   metavar="MIN,OPT,MAX", help="batch range (default: %(default)s)")
    p.add_argument("--backend", choices=list(BACKENDS),
                   help="TensorRT flavour (default: whichever is installed, full TensorRT first)")
    p.add_argument("--postprocess", action="store_true",
                   help="add in-engine top-100 scores/labels/boxes outputs, so the host copies 100 rows, not 900x91")
    p.add_argument("--version-compatible", action="store_true",
                   help="full TensorRT only: a plan the 44 MB lean runtime (pip install 'anchortrt[lean]') and later "
                        "TensorRT of the same major version can run (lean-runtime operators only; maybe slower); "
                        "not with --plugins")
    p.add_argument("--timing-cache", type=Path, metavar="PATH",
                   help="tactic timing cache reused across builds (default: ENGINE.timing.cache; "
                        "full TensorRT only, TensorRT-RTX has none)")
    p.add_argument("--workspace", type=cli.positive_int, default=DEFAULT_WORKSPACE_MIB, metavar="MiB",
                   help="memory pool TensorRT may use beyond the weights (default: %(default)s MiB, capped at the GPU's "
                        "memory; FP32 at 8x1344x1344 needs more than 8 GiB)")
    p.add_argument("--no-fold-constants", dest="fold_constants", action="store_false",
                   help="compute what depends only on weights inside the network instead of at build time "
                        "(for measuring what folding saves; the engine gets slower, not faster)")
    p.add_argument("-o", "--output", type=Path, metavar="ENGINE.plan",
                   help="engine path (default: engines/anchor_detr_<variant>_<fp32|tf32|fp16>.plan)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout instead of a table")
    p.add_argument("-v", "--verbose", action="store_true", help="print TensorRT's log as the build runs")
    return p


def print_summary(summary: dict[str, Any], verbose: bool = False) -> None:
    """The summary a person reads: the JSON summary as a two-column table on stdout."""
    gpu = summary["gpu"]
    warnings = summary["warnings"]
    print_table([
        ("engine", f"{summary['engine']}  (+ {Path(summary['sidecar']).name})"),
        ("backend", f"{summary['backend']} {summary['trt_version']}"),
        ("precision", summary["precision"]),
        ("version compatible", "yes (lean runtime)" if summary["version_compatible"] else "no"),
        ("profile (BxHxW)", str(Profile.from_dict(summary["profile"]))),
        ("plugins", ", ".join(summary["plugins"]) or "none"),
        ("postprocess", "in engine (top-100)" if summary["postprocess"] else "no"),
        ("network layers", summary["layers"]),
        ("engine size", format_bytes(summary["engine_bytes"])),
        ("build time", format_seconds(summary["build_seconds"])),
        ("gpu", f"{gpu['name']} (sm {gpu['compute_capability']})" if gpu else "none (ahead-of-time build)"),
        ("weights", f"{summary['weights']}  sha256 {summary['weights_sha256'][:12]}"),
        ("TensorRT warnings", f"{warnings}" + ("  (-v shows them)" if warnings and not verbose else "")),
    ], headers=("build", "value"))



def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    return cli.guarded(p.prog, run, p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The build; an expected failure raises (core.errors) with its exit code, before anything is written."""
    try:
        profile = Profile(
            min=(args.batch[0], *args.min), opt=(args.batch[1], *args.opt), max=(args.batch[2], *args.max)
        ).validate()
    except ProfileError as e:
        raise BadInput(f"{e} (fix --min/--opt/--max HxW and --batch MIN,OPT,MAX)") from None
    if args.version_compatible and args.plugins:
        raise BadInput("--version-compatible with --plugins is untested (ahead-of-time plugin layers in a "
                       "version-compatible plan): build with --plugins none, or without --version-compatible")
    if not args.weights.is_file():
        raise BadInput(MISSING_WEIGHTS.format(path=args.weights))
    backend = get_backend(args.backend)
    check_plugins(backend, args.plugins)
    if args.version_compatible:
        check_version_compatible(backend)

    import weights

    cfg, tensors = weights.load(args.weights)
    check_activation_size(cfg, profile)
    precision = "fp16" if args.fp16 else "tf32" if args.tf32 else "fp32"
    output = args.output or default_engine_path(cfg.variant, precision)
    timing_cache = args.timing_cache or output.with_suffix(".timing.cache")
    # Every path we will write, checked before the build; folders are made only when the files are written.
    side = sidecar_path(output)
    check_output_path(output, "engine")
    check_output_path(side, "sidecar")
    if backend.name == "tensorrt":
        check_output_path(timing_cache, "timing cache")

    trt = backend.trt
    logger = make_logger(trt, verbose=args.verbose)
    has_monitor = hasattr(trt, "IProgressMonitor")
    bar = ProgressBar(1.0, "building engine", tick=0.5) if has_monitor else None
    monitor = make_progress_monitor(trt, bar) if has_monitor else None
    from netdef.network import NetworkConfigError

    try:
        with Spinner(f"defining network ({cfg.variant}, {precision})"):
            builder, network, config, keepalive = create_network(
                backend, cfg, tensors, fp16=args.fp16, tf32=args.tf32, version_compatible=args.version_compatible,
                plugins=args.plugins, postprocess=args.postprocess,
                profile=profile, fold_constants=args.fold_constants, workspace_mib=workspace_limit_mib(args.workspace),
                logger=logger, monitor=monitor, timing_cache=timing_cache,
            )
    except NetworkConfigError as e:
        raise BadInput(str(e)) from None
    check_profile_warnings(logger)
    start = time.monotonic()
    with bar if bar is not None else Spinner("building engine"):
        plan = build_serialized(builder, network, config, logger)
    build_seconds = time.monotonic() - start
    del keepalive  # the plan holds its own copy of the weights now
    check_profile_warnings(logger)

    inputs, outputs = describe_io(trt, network)
    sidecar = {
        "config": json.loads(cfg.to_json()),
        "profile": profile.to_dict(),
        "precision": precision,
        "plugins": sorted(args.plugins),
        "postprocess": args.postprocess,
        "backend": backend.name,
        "trt_version": backend.version,
        "gpu": gpu_entry(),
        "weights_sha256": weights.file_sha256(args.weights),
        "inputs": inputs,
        "outputs": outputs,
        "version_compatible": args.version_compatible,
        "anchortrt_version": anchortrt_version(),
        "labels": weights.class_names(args.weights),  # core.labels: the class names
    }
    try:
        write_atomic(output, plan)
        write_sidecar(output, sidecar)
        if backend.name == "tensorrt":
            save_timing_cache(config, timing_cache)
    except OSError as e:
        raise BadInput(f"cannot write the engine: {e}") from None

    summary = {
        "engine": str(output),
        "sidecar": str(side),
        "backend": backend.name,
        "trt_version": backend.version,
        "precision": precision,
        "version_compatible": args.version_compatible,
        "profile": profile.to_dict(),
        "plugins": sidecar["plugins"],
        "postprocess": args.postprocess,
        "layers": network.num_layers,
        "fold_constants": args.fold_constants,
        "engine_bytes": plan.nbytes,
        "build_seconds": round(build_seconds, 2),
        "gpu": sidecar["gpu"],
        "weights": str(args.weights),
        "weights_sha256": sidecar["weights_sha256"],
        "warnings": len(logger.warnings),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, verbose=args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())

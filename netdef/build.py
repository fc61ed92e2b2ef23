"""``python -m netdef.build``: AnchorDETR weights -> TensorRT engine plan + JSON sidecar.

``create_network`` is the library entry point (``main``, the parity check ``python -m reference.check`` and
``reference.interpret.evaluate`` use it): a strongly typed network defined by ``netdef.network.define_network``,
one optimization profile over ``images``/``masks``, workspace limit, progress monitor and (full TensorRT only)
timing cache. ``main`` is the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from core import cuda
from core.backend import BACKENDS, Backend, BackendError, check_plugins, get_backend
from core import cli, labels
from core.errors import BadInput, Failed, Interrupted
from core.progress import ProgressBar, Spinner, format_bytes, format_seconds, print_table
from core.sidecar import (
    Profile, ProfileError, Sidecar, check_output_path, default_engine_path,
    sidecar_path, write_atomic, write_sidecar,
)

from plugins import NAMES as PLUGIN_NAMES
DEFAULT_WEIGHTS = Path("weights/anchor_detr_r50_dc5.safetensors")
# FP32 R50-DC5 at the default maximum (8x1344x1344) asks TensorRT-RTX for 8.2 GiB at build time; leave room.
DEFAULT_WORKSPACE_MIB = 16384


# TensorRT indexes a tensor's elements with int32 (NVIDIA documents 2^31-1 elements as the limit for most layers);
# a profile whose largest activation exceeds it fails deep inside the build, or overflows silently.
MAX_ACTIVATION_ELEMENTS = 2**31 - 1


class BuildError(Failed, RuntimeError):
    """TensorRT refused to build the network; the message carries TensorRT's own errors."""


class BuildInterrupted(Interrupted):
    """Ctrl-C cancelled the build through the progress monitor; nothing was written."""


def largest_activation(cfg, profile: Profile) -> tuple[int, str]:
    """(elements, what) of the largest tensor our network materialises at ``profile.max``: the backbone's stride-4
    maps (B x 256 x H/4 x W/4) or the encoder's row-attended values T (B x heads x h*w queries x h x head_dim,
    netdef.network.row_column_attention), which grows with h^2 w at the feature size h x w = H/stride x W/stride."""
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


def check_version_compatible(backend: Backend, option: str = "--version-compatible") -> None:
    """BackendError unless ``backend`` can build version-compatible plans (with or without their lean runtime)."""
    if backend.name != "tensorrt" or not all(
            hasattr(backend.trt.BuilderFlag, f) for f in ("VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME")):
        raise BackendError(f"{option} needs full TensorRT with VERSION_COMPATIBLE and EXCLUDE_LEAN_RUNTIME "
                           f"(this is {backend.name} {backend.version}): pass --backend tensorrt, or drop the option")


def check_finite(path: Path, tensors) -> None:
    """BadInput naming the first weights that hold NaN or infinity: TensorRT builds them into an engine that
    answers NaN."""
    for name, array in tensors.items():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise BadInput(f"weights {path}: tensor {name!r} has {bad} NaN or infinite values (of {np.size(array)}): "
                           "extract the checkpoint again, or check the training run that wrote it "
                           "(`python -m reference.check` reports every such tensor)")


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
    ("finish", name, None) in order; ``seconds`` the time each phase was the innermost open one (where the time
    goes: a phase may report no step for most of the build). ``cancel()`` (Ctrl-C, see ``cancel_on_interrupt``)
    makes the next ``step_complete`` answer False, which stops the build.
    """

    class BuildMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.stack: list[list] = []  # open phases: [name, steps, steps done]
            self.events: list[tuple[str, str, str | None]] = []
            self.seconds: dict[str, float] = {}
            self.max_depth = 0
            self.cancelled = False
            self._lock = threading.Lock()
            self._since = time.monotonic()

        def cancel(self) -> None:
            self.cancelled = True

        def _clock(self) -> None:
            """Charge the time since the last event to the innermost open phase."""
            now = time.monotonic()
            if self.stack:
                name = self.stack[-1][0]
                self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
            self._since = now

        def _draw(self) -> None:
            frac, scale = 0.0, 1.0
            for _, steps, done in self.stack:
                frac += scale * min(done, steps) / steps
                scale /= steps
            bar.set(frac, status=self.stack[-1][0] if self.stack else None)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                with self._lock:
                    self._clock()
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
                    self._clock()
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


def slowest_phase(monitor) -> tuple[str, float] | None:
    """(name, seconds) of the phase that was innermost the longest, or None without a monitor or phases."""
    seconds = getattr(monitor, "seconds", None)
    return max(seconds.items(), key=lambda item: item[1]) if seconds else None


@contextlib.contextmanager
def cancel_on_interrupt(monitor) -> Iterator[None]:
    """Ctrl-C during the block cancels the build through ``monitor`` instead of raising KeyboardInterrupt: raised
    inside a TensorRT callback (the logger's, the monitor's), TensorRT logs and swallows it and builds on. Without a
    monitor, or off the main thread (where no signal handler can be set), Ctrl-C stays a KeyboardInterrupt."""
    if monitor is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: monitor.cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
    exclude_lean_runtime: bool = False,
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
    convolutions and matmuls use TF32 tensor cores; otherwise TF32 is cleared (full TensorRT enables it by default).
    ``version_compatible``: lean-runtime operators only, the lean runtime embedded in the plan;
    ``exclude_lean_runtime`` (implies version_compatible) leaves it out."""
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
    if version_compatible or exclude_lean_runtime:
        check_version_compatible(backend, "--exclude-lean-runtime" if exclude_lean_runtime else "--version-compatible")
        # Lean-runtime operators only. With its lean runtime embedded, the plan runs on any later TensorRT of the same
        # major version (host code allowed); without it, only on the lean runtime of exactly this version.
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if exclude_lean_runtime:
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
    monitor = config.progress_monitor
    if monitor is not None and getattr(monitor, "cancelled", False):
        raise BuildInterrupted("interrupted: build cancelled, nothing written")
    if plan is None:
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
(B,3,H,W) float32, normalised, and `masks` (B,H,W) bool, True = padding; outputs the official PostProcess's top-100
`scores` (B,100), `labels` (B,100) int32 and `boxes` (B,100,4) x0,y0,x1,y1 normalised, computed in the engine so
the host copies 100 rows per image, beside the raw `pred_logits` (B,900,91) and `pred_boxes` (B,900,4); --raw-outputs
leaves the top-100 out. Batch, height and width are dynamic within one optimization profile (--min/--opt/--max/--batch).

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

version-compatible plans (full TensorRT; lean-runtime operators only, maybe slower):
  --version-compatible     embeds the lean runtime: runs on this and any later TensorRT of the same major version
                           (the runner allows the plan's host code; Triton needs
                           --backend-config=tensorrt,version-compatible=true)
  --exclude-lean-runtime   a smaller plan without it: runs only on the lean runtime of exactly this TensorRT version
                           (pip install 'tensorrt-lean-cu13==<version>'; the runner loads it with Runtime.load_runtime
                           when the installed TensorRT is another version); Triton cannot load such a plan

exit codes: 0 built, 1 TensorRT failed to build, 2 bad input, 3 no usable TensorRT backend, 130 interrupted (Ctrl-C:
the build is cancelled and nothing is written).
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
    outputs = p.add_mutually_exclusive_group()
    outputs.add_argument("--postprocess", action="store_true", default=True,
                         help="in-engine top-100 scores/labels/boxes beside the raw outputs, so the host copies 100 "
                              "rows, not 900x91 (the default)")
    outputs.add_argument("--raw-outputs", dest="postprocess", action="store_false",
                         help="only the raw pred_logits/pred_boxes: the host ranks the 900x91 scores")
    vc = p.add_mutually_exclusive_group()
    vc.add_argument("--version-compatible", action="store_true",
                    help="full TensorRT only: a plan with its lean runtime embedded, which any later TensorRT of the "
                         "same major version runs (lean-runtime operators only; maybe slower); not with --plugins")
    vc.add_argument("--exclude-lean-runtime", action="store_true",
                    help="full TensorRT only: a version-compatible plan without its lean runtime (smaller), which "
                         "runs only on the lean runtime of exactly this TensorRT version (pip install "
                         "'anchortrt[lean]' pinned to it); not with --plugins")
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
        ("version compatible", ("yes, lean runtime excluded" if summary["lean_runtime_excluded"]
                                else "yes, lean runtime embedded") if summary["version_compatible"] else "no"),
        ("profile (BxHxW)", str(Profile.from_dict(summary["profile"]))),
        ("plugins", ", ".join(summary["plugins"]) or "none"),
        ("postprocess", "in engine (top-100)" if summary["postprocess"] else "no"),
        ("network layers", summary["layers"]),
        ("engine size", format_bytes(summary["engine_bytes"])),
        ("build time", format_seconds(summary["build_seconds"])
         + (f"  (longest phase: {summary['slowest_phase']['name']}, {format_seconds(summary['slowest_phase']['seconds'])})"
            if summary["slowest_phase"] else "")),
        ("gpu", f"{gpu['name']} (sm {gpu['compute_capability']})" if gpu else "none (ahead-of-time build)"),
        ("weights", f"{summary['weights']}  sha256 {summary['weights_sha256'][:12]}"),
        ("TensorRT warnings", f"{warnings}" + ("  (-v shows them)" if warnings and not verbose else "")),
    ], headers=("build", "value"))



def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    return cli.guarded(p.prog, run, p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The build; an expected failure raises (core.errors) with its exit code, before anything is written."""
    profile = validate_options(args)
    backend = get_backend(args.backend)
    check_plugins(backend, args.plugins)
    if args.version_compatible or args.exclude_lean_runtime:
        check_version_compatible(backend, "--exclude-lean-runtime" if args.exclude_lean_runtime else
                                 "--version-compatible")
    cfg, tensors = load_weights(args.weights, profile)
    precision = "fp16" if args.fp16 else "tf32" if args.tf32 else "fp32"
    paths = output_paths(args, cfg.variant, precision, backend)
    built = build(args, backend, cfg, tensors, profile, precision, paths)
    sidecar = make_sidecar(args, backend, cfg, profile, precision, built)
    write_engine(paths, built, sidecar)
    summary = make_summary(args, backend, paths, sidecar, built)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, verbose=args.verbose)
    return 0


def validate_options(args: argparse.Namespace) -> Profile:
    """The profile and the option combinations, checked before anything is loaded."""
    try:
        profile = Profile(
            min=(args.batch[0], *args.min), opt=(args.batch[1], *args.opt), max=(args.batch[2], *args.max)
        ).validate()
    except ProfileError as e:
        raise BadInput(f"{e} (fix --min/--opt/--max HxW and --batch MIN,OPT,MAX)") from None
    if (args.version_compatible or args.exclude_lean_runtime) and args.plugins:
        option = "--exclude-lean-runtime" if args.exclude_lean_runtime else "--version-compatible"
        raise BadInput(f"{option} with --plugins is untested (ahead-of-time plugin layers in a version-compatible "
                       f"plan): build with --plugins none, or without {option}")
    import weights

    weights.require_weights_file(args.weights)
    return profile


def load_weights(path: Path, profile: Profile):
    """(config, tensors) of the weights file, refused when they hold NaN/inf or the profile is too large for them."""
    import weights

    cfg, tensors = weights.load(path)
    check_finite(path, tensors)
    check_activation_size(cfg, profile)
    return cfg, tensors


@dataclass(frozen=True)
class OutputPaths:
    engine: Path
    sidecar: Path
    timing_cache: Path | None  # full TensorRT only


def output_paths(args: argparse.Namespace, variant: str, precision: str, backend: Backend) -> OutputPaths:
    """Every path the build will write, checked before the build; folders are made only when the files are written."""
    engine = args.output or default_engine_path(variant, precision)
    timing_cache = (args.timing_cache or engine.with_suffix(".timing.cache")) if backend.name == "tensorrt" else None
    paths = OutputPaths(engine, sidecar_path(engine), timing_cache)
    inputs = [("--weights", args.weights)]
    check_output_path(paths.engine, "engine", inputs)
    check_output_path(paths.sidecar, "sidecar", inputs)
    if paths.timing_cache is not None:
        check_output_path(paths.timing_cache, "timing cache", inputs)
    return paths


@dataclass
class Built:
    plan: Any
    network: Any
    config: Any
    logger: Any
    monitor: Any
    seconds: float


def build(args: argparse.Namespace, backend: Backend, cfg, tensors, profile: Profile, precision: str,
          paths: OutputPaths) -> Built:
    """Define the network and build the plan, with a progress bar; Ctrl-C cancels the build (BuildInterrupted)."""
    trt = backend.trt
    logger = make_logger(trt, verbose=args.verbose)
    has_monitor = hasattr(trt, "IProgressMonitor")
    bar = ProgressBar(1.0, "building engine", tick=0.5) if has_monitor else None
    monitor = make_progress_monitor(trt, bar) if has_monitor else None
    with Spinner(f"defining network ({cfg.variant}, {precision})"):
        builder, network, config, keepalive = create_network(
            backend, cfg, tensors, fp16=args.fp16, tf32=args.tf32, version_compatible=args.version_compatible,
            exclude_lean_runtime=args.exclude_lean_runtime, plugins=args.plugins, postprocess=args.postprocess,
            profile=profile, fold_constants=args.fold_constants, workspace_mib=workspace_limit_mib(args.workspace),
            logger=logger, monitor=monitor, timing_cache=paths.timing_cache,
        )
    check_profile_warnings(logger)
    start = time.monotonic()
    with cancel_on_interrupt(monitor), bar if bar is not None else Spinner("building engine"):
        plan = build_serialized(builder, network, config, logger)
    if monitor is not None and monitor.cancelled:  # Ctrl-C after the last step: the plan is not written either
        raise BuildInterrupted("interrupted: build cancelled, nothing written")
    seconds = time.monotonic() - start
    del keepalive  # the plan holds its own copy of the weights now
    check_profile_warnings(logger)
    return Built(plan, network, config, logger, monitor, seconds)


def make_sidecar(args: argparse.Namespace, backend: Backend, cfg, profile: Profile, precision: str,
                 built: Built) -> Sidecar:
    import weights

    inputs, outputs = describe_io(backend.trt, built.network)
    return Sidecar(
        config=json.loads(cfg.to_json()), profile=profile.to_dict(), precision=precision, plugins=sorted(args.plugins),
        postprocess=args.postprocess, backend=backend.name, trt_version=backend.version,
        version_compatible=args.version_compatible or args.exclude_lean_runtime,
        lean_runtime_excluded=args.exclude_lean_runtime, gpu=gpu_entry(),
        weights_sha256=weights.file_sha256(args.weights), inputs=inputs, outputs=outputs,
        anchortrt_version=anchortrt_version(), labels=labels.stored(weights.class_names(args.weights)),
        random_init=weights.is_random_init(args.weights),
    )


def write_engine(paths: OutputPaths, built: Built, sidecar: Sidecar) -> None:
    try:
        write_atomic(paths.engine, built.plan)
        write_sidecar(paths.engine, sidecar)
        if paths.timing_cache is not None:
            save_timing_cache(built.config, paths.timing_cache)
    except OSError as e:
        raise BadInput(f"cannot write the engine: {e}") from None


def make_summary(args: argparse.Namespace, backend: Backend, paths: OutputPaths, sidecar: Sidecar,
                 built: Built) -> dict[str, Any]:
    """What the build made, as --json prints it and print_summary shows it."""
    slowest = slowest_phase(built.monitor)
    return {
        "engine": str(paths.engine),
        "sidecar": str(paths.sidecar),
        "backend": backend.name,
        "trt_version": backend.version,
        "precision": sidecar.precision,
        "version_compatible": sidecar.version_compatible,
        "lean_runtime_excluded": sidecar.lean_runtime_excluded,
        "profile": sidecar.profile,
        "plugins": sidecar.plugins,
        "postprocess": sidecar.postprocess,
        "layers": built.network.num_layers,
        "fold_constants": args.fold_constants,
        "engine_bytes": built.plan.nbytes,
        "build_seconds": round(built.seconds, 2),
        "slowest_phase": {"name": slowest[0], "seconds": round(slowest[1], 2)} if slowest else None,
        "gpu": sidecar.gpu,
        "weights": str(args.weights),
        "weights_sha256": sidecar.weights_sha256,
        "warnings": len(built.logger.warnings),
    }


if __name__ == "__main__":
    sys.exit(main())

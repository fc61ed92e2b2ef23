"""The JSON sidecar written next to every engine, and the checks the runtime makes before loading one.

An engine is only valid for the TensorRT version that built it, for the GPU architecture it was tuned on (full
TensorRT) and for the weights it embeds; the sidecar records all three, plus what the runtime needs to feed it
(profile, I/O names, dtypes and shapes). Standard library only: the runtime imports this without torch or
TensorRT.

Layout (``<engine stem>.json`` beside ``<engine stem>.plan``)::

    config            AnchorDETRConfig fields (dict)
    profile           {"min": [B, H, W], "opt": [...], "max": [...]}
    precision         "fp32" | "tf32" | "fp16"
    version_compatible bool: built with VERSION_COMPATIBLE (lean-runtime operators only)
    lean_runtime_excluded bool: built with EXCLUDE_LEAN_RUNTIME too. A version-compatible plan without it embeds its
                      lean runtime and runs on any TensorRT of the builder's major version from the builder's on
                      (host code allowed); with it, the plan is smaller and runs only on the lean runtime of exactly
                      the builder's version. Sidecars written before the field existed read as excluded when
                      version-compatible (the builder always excluded it then).
    plugins           sorted list of plugin names
    postprocess       bool (in-engine top-100)
    backend           "tensorrt" | "tensorrt-rtx"
    trt_version       version string of the backend that built the engine
    gpu               {"name", "compute_capability": "9.0"} of the build GPU, or null (no GPU, e.g. TensorRT-RTX on a CPU)
    weights_sha256    sha256 of the weights file
    inputs, outputs   {name: {"dtype": "float32", "shape": [-1, 3, -1, -1]}}
    anchortrt_version version of this package
    random_init       true when the engine embeds random weights (weights.extract --random-init); absent otherwise
    labels            optional: class names {"<label>": name} (core.labels); absent in sidecars from before names
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from core.backend import version_tuple
from core.errors import BadInput

SIDECAR_KEYS = (
    "config", "profile", "precision", "plugins", "postprocess", "backend", "trt_version", "version_compatible",
    "lean_runtime_excluded", "gpu", "weights_sha256", "inputs", "outputs", "anchortrt_version",
)
# Keys a sidecar of an earlier anchortrt may lack, with the value that reads it as that version wrote it.
SIDECAR_DEFAULTS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "lean_runtime_excluded": lambda data: data.get("version_compatible") is True,
}
OPTIONAL_KEYS = ("labels",)  # written when given; readers fall back to the default (core.labels.of_sidecar)
MIN_SIDE = 32  # one feature-map pixel at the C5 stride; smaller images have no feature map
REBUILD_HINT = "rebuild it with `python -m netdef.build` (see --help)"


class SidecarError(BadInput, ValueError):
    """A sidecar that is missing or does not match this machine, TensorRT or weights."""


class OutputPathError(BadInput, OSError):
    """A path we were asked to write that is not a regular file or a new file in a writable folder."""


class ProfileError(BadInput, ValueError):
    """An optimization profile that TensorRT would reject or that our network cannot take."""


@dataclass(frozen=True)
class Profile:
    """Dynamic (batch, height, width) range of the ``images``/``masks`` inputs: one TensorRT optimization profile."""

    min: tuple[int, int, int] = (1, 320, 512)
    opt: tuple[int, int, int] = (1, 800, 800)
    max: tuple[int, int, int] = (8, 1344, 1344)

    def validate(self) -> "Profile":
        problems = []
        for name, shape in (("min", self.min), ("opt", self.opt), ("max", self.max)):
            b, h, w = shape
            if b < 1:
                problems.append(f"{name} batch {b} < 1")
            if h < MIN_SIDE or w < MIN_SIDE:
                problems.append(f"{name} size {h}x{w} is below {MIN_SIDE}x{MIN_SIDE}")
        for axis, label in enumerate(("batch", "height", "width")):
            lo, mid, hi = self.min[axis], self.opt[axis], self.max[axis]
            if not lo <= mid <= hi:
                problems.append(f"{label} needs min <= opt <= max, got {lo}, {mid}, {hi}")
        if problems:
            raise ProfileError("bad optimization profile: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Profile":
        return cls(*(tuple(int(v) for v in data[k]) for k in ("min", "opt", "max")))

    def __str__(self) -> str:
        return "  ".join(f"{k} {b}x{h}x{w}" for k, (b, h, w) in zip(("min", "opt", "max"), (self.min, self.opt, self.max)))


@dataclass(frozen=True)
class Sidecar:
    """The sidecar's fields (the module docstring says what each means); ``to_dict`` is what is written."""

    config: dict[str, Any]
    profile: dict[str, list[int]]
    precision: str
    plugins: list[str]
    postprocess: bool
    backend: str
    trt_version: str
    version_compatible: bool
    lean_runtime_excluded: bool
    gpu: dict[str, str] | None
    weights_sha256: str
    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    anchortrt_version: str
    labels: dict[str, str] | None = None  # optional (OPTIONAL_KEYS): class names, core.labels' stored form
    random_init: bool = False  # optional: written only when true, so engines of real weights keep their fields

    def to_dict(self) -> dict[str, Any]:
        return written_fields({k: v for k, v in vars(self).items() if v is not None or k not in OPTIONAL_KEYS})


def written_fields(sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a sidecar file holds, in its order: every SIDECAR_KEYS, the OPTIONAL_KEYS given, and random_init
    only when true (engines of real weights keep the fields they always had)."""
    fields = {k: sidecar[k] for k in SIDECAR_KEYS} | {k: sidecar[k] for k in OPTIONAL_KEYS if k in sidecar}
    if sidecar.get("random_init"):
        fields["random_init"] = True
    return fields


def default_engine_path(variant: str, precision: str) -> Path:
    """Where ``python -m netdef.build`` writes an engine unless told otherwise (and where the runtime looks)."""
    return Path("engines") / f"anchor_detr_{variant}_{precision}.plan"


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``engines/x.plan`` -> ``engines/x.json``."""
    engine_path = Path(engine_path)
    if engine_path.suffix == ".json":
        raise SidecarError(f"engine path {engine_path} ends in .json, which is the sidecar's name: use .plan")
    return engine_path.with_suffix(".json")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same resolved path, or through a hard link the same inode."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:  # one does not exist (yet): not a file we would destroy
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_output_path(
    path: str | os.PathLike, what: str = "output",
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
) -> Path:
    """``path`` if we may write a file there: an existing regular file (replaced) or a new name whose nearest
    existing folder is writable (folders are made only when the file is written). Anything else, such as a
    folder, a device or a pipe, is refused before any work starts; the rename would silently replace it.

    ``inputs``: (label, path) of every file the command reads, e.g. ("image", "photo.jpg"). An output that is
    one of them, by name, symbolic link or hard link, is refused: writing it would destroy the input."""
    path = Path(path)
    for label, source in inputs:
        if source is not None and same_file(path, source):
            how = "" if os.path.abspath(path) == os.path.abspath(source) else " (the same file)"
            raise OutputPathError(f"{what} {path} is the {label} {source}{how}: writing it would destroy that "
                                  "input; choose another path")
    if path.exists() or path.is_symlink():
        target = path.resolve()
        if not target.is_file():
            kind = "a folder" if target.is_dir() else "not a regular file"
            raise OutputPathError(f"{what} {path} is {kind}: name a regular file or a new path")
        folder = target.parent
    else:
        folder = path.parent
        while not folder.exists():
            if folder.is_symlink():
                raise OutputPathError(f"{what} {path}: folder {folder} is a broken link: name another path")
            folder = folder.parent
        if not folder.is_dir():
            raise OutputPathError(f"{what} {path}: {folder} is not a folder: name another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path}: folder {folder} is not writable: name another path")
    return path


def engine_inputs(engine: str | os.PathLike | None, what: str = "--engine") -> list[tuple[str, Path | None]]:
    """The files an engine is read from, as ``check_output_path``'s ``inputs``: the plan and its sidecar."""
    if engine is None:
        return []
    return [(what, Path(engine)), (f"sidecar of {what}", Path(engine).with_suffix(".json"))]


def replace_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """``write(tmp)`` fills a temporary file in ``path``'s folder, which is then renamed to ``path``: readers never
    see half a file, and a failure leaves neither a temporary file nor a changed ``path``. Refuses (OutputPathError)
    a ``path`` that :func:`check_output_path` refuses; makes missing folders."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; our files are not secrets
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``data`` written to ``path`` through :func:`replace_atomically`."""
    replace_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def write_sidecar(engine_path: str | os.PathLike, sidecar: Sidecar | Mapping[str, Any]) -> Path:
    if isinstance(sidecar, Sidecar):
        sidecar = sidecar.to_dict()
    sidecar = {**{k: default(sidecar) for k, default in SIDECAR_DEFAULTS.items() if k not in sidecar}, **sidecar}
    missing = [k for k in SIDECAR_KEYS if k not in sidecar]
    if missing:
        raise SidecarError(f"sidecar is missing {missing}")
    path = sidecar_path(engine_path)
    write_atomic(path, (json.dumps(written_fields(sidecar), indent=2, ensure_ascii=False) + "\n").encode())
    return path


def load_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of an engine; ``path`` is the engine or the sidecar itself."""
    path = Path(path)
    side = path if path.suffix == ".json" else sidecar_path(path)
    try:
        data = json.loads(side.read_text())
    except FileNotFoundError:
        raise SidecarError(f"no sidecar {side} next to the engine: {REBUILD_HINT}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SidecarError(f"sidecar {side} is unreadable ({e}): {REBUILD_HINT}") from None
    if isinstance(data, dict):
        for key, default in SIDECAR_DEFAULTS.items():
            data.setdefault(key, default(data))
    missing = [k for k in SIDECAR_KEYS if k not in data] if isinstance(data, dict) else list(SIDECAR_KEYS)
    if missing:
        raise SidecarError(f"sidecar {side} lacks {', '.join(missing)}: not written by netdef.build; {REBUILD_HINT}")
    for key in ("version_compatible", "lean_runtime_excluded"):
        if not isinstance(data[key], bool):  # "false" would read as true in the version rule
            raise SidecarError(f"sidecar {side}: {key} is {data[key]!r}, not true or false; {REBUILD_HINT}")
    return data


def _cc_string(cc: str | tuple[int, int] | None) -> str | None:
    if cc is None or isinstance(cc, str):
        return cc
    return f"{cc[0]}.{cc[1]}"


def lean_install_hint(version: str) -> str:
    """How to get the lean runtime of exactly ``version`` (what an --exclude-lean-runtime plan needs)."""
    return (f"pip install 'tensorrt-lean-cu13=={version}' "
            "(or rebuild with --version-compatible, which embeds the lean runtime in the plan)")


def weights_problem(sidecar: Mapping[str, Any], weights_sha256: str) -> str | None:
    """Why the engine does not embed the weights with this sha256 (None when it does)."""
    if weights_sha256 == sidecar["weights_sha256"]:
        return None
    return (f"engine embeds weights sha256 {sidecar['weights_sha256'][:12]}..., "
            f"the named weights are {weights_sha256[:12]}...")


def same_release(a: str, b: str) -> bool:
    """Whether two TensorRT versions are one release: their numbers, not packaging suffixes (10.13.3.9.post1 is a
    re-upload of 10.13.3.9 with an identical tensorrt.so, and an engine built by one loads in the other)."""
    ra, rb = version_tuple(a), version_tuple(b)
    return ra == rb if ra and rb else a == b


def check_sidecar(
    sidecar: Mapping[str, Any],
    *,
    trt_version: str,
    compute_capability: str | tuple[int, int] | None,
    weights_sha256: str | None = None,
    backend: str | None = None,
) -> None:
    """Raise SidecarError naming every reason the engine cannot be used here.

    - ``trt_version``: the loading TensorRT. A standard plan needs the exact version that built it; a
      version-compatible one loads on the same major version, no older than the builder (TensorRT's engine
      compatibility rule: built by 11.2, runs on 11.2 and later 11.x); one built with --exclude-lean-runtime only on
      the lean runtime of exactly the builder's version (``IRuntime::loadRuntime``), which the runner loads when the
      installed TensorRT is another version (``trt_version`` is then the loaded library's).
    - ``compute_capability`` ("9.0" or (9, 0)): the GPU about to run the engine. Full TensorRT tunes kernels for
      the build GPU's architecture; TensorRT-RTX engines compile for the running GPU, so only full TensorRT
      engines are checked.
    - ``weights_sha256``: the weights the user named, if any.
    - ``backend``: the loading backend's name, if known.
    """
    problems = []
    built_with, built_version = sidecar["backend"], sidecar["trt_version"]
    compatible = bool(sidecar.get("version_compatible")) and built_with == "tensorrt"
    if backend == "tensorrt-lean" and built_with == "tensorrt" and not compatible:
        problems.append("engine is a standard plan, and the TensorRT lean runtime loads only version-compatible "
                        "ones (built with --version-compatible)")
    elif backend is not None and backend != built_with and not (compatible and backend == "tensorrt-lean"):
        problems.append(f"engine was built with {built_with}, but this runtime uses {backend}")
    if compatible and sidecar.get("lean_runtime_excluded"):
        if trt_version != built_version:
            problems.append(f"engine was built by TensorRT {built_version} with --exclude-lean-runtime, which runs "
                            f"only on the lean runtime of exactly {built_version}; this is TensorRT {trt_version}: "
                            f"{lean_install_hint(built_version)}")
    elif compatible:
        built, running = version_tuple(built_version), version_tuple(trt_version)
        if running[:1] != built[:1] or running < built:
            problems.append(f"engine was built by TensorRT {built_version} with --version-compatible, which runs on "
                            f"TensorRT {built[0]}.x from {built_version} on; this is TensorRT {trt_version}")
    elif not same_release(trt_version, built_version):
        problems.append(f"engine was built by TensorRT {built_version}, this is TensorRT {trt_version}")
    built_cc = (sidecar.get("gpu") or {}).get("compute_capability")
    running_cc = _cc_string(compute_capability)
    if sidecar["backend"] == "tensorrt" and built_cc and running_cc and built_cc != running_cc:
        gpu = sidecar["gpu"].get("name", "another GPU")
        problems.append(f"engine was built for {gpu} (compute capability {built_cc}), this GPU is {running_cc}")
    mismatch = weights_problem(sidecar, weights_sha256) if weights_sha256 is not None else None
    if mismatch:
        problems.append(mismatch)
    if problems:
        raise SidecarError("engine does not match: " + "; ".join(problems) + f"; {REBUILD_HINT}")

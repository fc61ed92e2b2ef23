"""A Triton model repository that takes JPEG bytes: ``python -m serve.triton --engine E.plan -o REPO/``.

Writes the ensemble ``anchor_detr``, which answers serve.server's protocol (input ``image`` BYTES and an optional
``threshold``; outputs ``count``, ``scores``, ``labels``, ``boxes``, ``names``, ``size``, ``error``), so serve.client
talks to either server unchanged. Its steps:

- ``anchor_detr_pre`` (Python backend, serve/models/pre.py): checks each request's image and decodes the batch's
  (on a GPU instance its JPEGs in one nvImageCodec call into device memory, ``--decode``), then runs the evaluation
  transform of the batch into the engine's ``images``/``masks`` (our GPU kernel on a GPU instance,
  the tensors handed on in device memory through DLPack) and emits each image's original size;
- ``anchor_detr_trt`` (TensorRT backend): the engine, built with ``--postprocess`` so the top-100 is inside it;
- ``anchor_detr_post`` (Python backend, serve/models/post.py): boxes to each image's pixels, the threshold.

``--raw`` writes only ``anchor_detr_trt`` with every engine output, for clients that preprocess themselves.
``--torch-weights`` puts the PyTorch reference in place of the engine (a Python-backend model of the same name
and I/O, serve/models/torch_stand_in.py), for trying the ensemble where Triton has no TensorRT backend; with
``--serve`` the repository is then served by the tritonserver binary that PyTriton's wheel ships.

The AOT plugin layers (``--plugins``) are serialised inside the plan, so Triton needs no plugin library. The plan
loads only in a Triton whose TensorRT built it (the sidecar's ``trt_version``), or a later one of the same major
version for a version-compatible engine (which embeds its lean runtime; Triton runs it with
``--backend-config=tensorrt,version-compatible=true``). A plan built with --exclude-lean-runtime is refused: Triton
never loads a separate lean runtime (it does not call loadRuntime). The class names (core.labels) are in
``anchor_detr_trt/labels.txt`` (line k names label k) and in the ``labels`` parameter of the engine step and of
``anchor_detr_post``, which answers them as ``names``. The Python-backend models import this package:
docs/serving.md says how Triton's Python gets it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from core import labels
from core.cli import gpu_list, guarded, hw, parser, positive_int
from core.config import NUM_TOPK, AnchorDETRConfig
from core.errors import BadInput, Unavailable
from core.sidecar import MIN_SIDE, OutputPathError, Profile, SidecarError, check_output_path, load_sidecar
from core.sidecar import write_atomic
from runtime.decode import DECODE, add_decode_option
from runtime.detector import POSTPROCESS_OUTPUTS
from runtime.runner import require_file
from serve.server import DEFAULT_TORCH_BATCH, add_batching_options, add_port_options, check_port_options
from serve.server import MODEL_NAME as SERVER_MODEL

ENSEMBLE = SERVER_MODEL  # serve.server's model name: clients do not tell the two servers apart
MODEL_NAME = "anchor_detr_trt"  # the engine step (and the only model with --raw)
PRE, POST = "anchor_detr_pre", "anchor_detr_post"
MODELS_DIR = Path(__file__).resolve().with_name("models")
READY_TIMEOUT_S = 300
EXIT_TIMEOUT_S = 10
# numpy dtype names as the sidecar writes them -> Triton's DataType names.
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "float16": "TYPE_FP16", "float32": "TYPE_FP32",
}  # fmt: skip

EPILOG = f"""\
models written: {ENSEMBLE} (ensemble: {PRE} -> {MODEL_NAME} -> {POST}); with --raw only {MODEL_NAME}
examples:
  python -m serve.triton --engine engines/anchor_detr_r50_dc5_fp16.plan -o models/ --instances 2 --gpus 0,1
  tritonserver --model-repository models/     (Triton release whose TensorRT built the engine; our package
                                               installed in its Python: docs/serving.md)
  python -m serve.client photo.jpg --url localhost:8000
  python -m serve.triton --torch-weights w.safetensors --device cpu --max-size 480x640 -o /tmp/repo --serve
exit codes: 0 written (with --serve: stopped by Ctrl-C or SIGTERM), 2 bad input (engine, sidecar, weights,
            arguments, output folder), 3 environment (--serve without PyTriton, tritonserver failed)
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "python -m serve.triton",
        "Write a Triton Inference Server model repository for an engine built by `python -m netdef.build`:\n"
        f"the ensemble {ENSEMBLE} takes encoded images and answers detections in pixels, as `python -m\n"
        "serve.server` does (same protocol, same client); its Python-backend steps decode and preprocess (on\n"
        "the GPU) and scale the boxes, the engine step runs on Triton's TensorRT backend.",
        EPILOG,
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--engine", type=Path, metavar="E.plan",
                       help="engine, its sidecar <engine>.json beside it (the ensemble needs --postprocess)")
    model.add_argument("--torch-weights", type=Path, metavar="W.safetensors",
                       help="the PyTorch reference in place of the engine (Python backend; no TensorRT needed)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="REPO", help="model repository folder")
    p.add_argument("--raw", action="store_true",
                   help=f"only {MODEL_NAME} with the engine's raw inputs and outputs (clients preprocess themselves)")
    p.add_argument("--instances", type=positive_int, default=1, metavar="N",
                   help="execution instances of each model per GPU (default 1)")
    p.add_argument("--gpus", type=gpu_list, metavar="I,...",
                   help="GPUs to place instances on, e.g. 0,1 (default: every GPU Triton sees)")
    add_batching_options(p, "how long Triton may hold a request to fill a batch")
    p.add_argument("--no-exif", action="store_true", help="ignore EXIF orientation (boxes refer to stored pixels)")
    add_decode_option(p, "auto", f"{PRE}'s `decode` parameter: ", "CPU instances always decode with Pillow")
    p.add_argument("--execution-env", metavar="PATH",
                   help="EXECUTION_ENV_PATH of the Python-backend models: a conda-pack archive with this package, "
                   "as the server sees it (e.g. $$TRITON_MODEL_DIRECTORY/../anchortrt-env.tar.gz)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="--torch-weights only: where the Python-backend models run (default cpu)")
    p.add_argument("--max-size", type=hw, metavar="HxW",
                   help="--torch-weights only: scale images to fit HxW, as an engine whose profile maximum is HxW does")
    serve = p.add_argument_group("serving the repository here (--torch-weights only)")
    serve.add_argument("--serve", action="store_true",
                       help="then serve it with the tritonserver in PyTriton's wheel until Ctrl-C or SIGTERM")
    add_port_options(serve)
    return p


# ---------------------------------------------------------------------------------------------- config.pbtxt


def _io(name: str, data_type: str, dims: Sequence[int], optional: bool = False) -> str:
    extra = "\n    optional: true" if optional else ""
    return f'  {{\n    name: "{name}"\n    data_type: {data_type}\n    dims: {list(dims)}{extra}\n  }}'


def _io_list(kind: str, items: Sequence[str]) -> str:
    return f"{kind} [\n" + ",\n".join(items) + "\n]"


def _triton_type(name: str, desc: Mapping[str, Any]) -> str:
    dtype = desc["dtype"]
    if dtype not in TRITON_TYPES:
        raise BadInput(f"tensor {name} has dtype {dtype}, which has no Triton type here: rebuild the engine")
    return TRITON_TYPES[dtype]


def _instances(count: int, gpu: bool, gpus: Sequence[int] | None) -> str:
    placed = f"\n    gpus: {list(gpus)}" if gpu and gpus else ""
    return f"instance_group [\n  {{\n    count: {count}\n    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}{placed}\n  }}\n]"


def _batching(max_queue_delay_us: int) -> str:
    return f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}"


def _parameters(values: Mapping[str, str]) -> str:
    # JSON string quoting is valid protobuf text format: a path with quotes or backslashes stays one string.
    return "\n".join(f'parameters {{\n  key: {json.dumps(k)}\n  value: {{ string_value: {json.dumps(v)} }}\n}}'
                     for k, v in values.items())


@dataclass(frozen=True)
class Options:
    """What a deployment sets, shared by every model of the repository."""

    instances: int = 1
    gpus: tuple[int, ...] | None = None
    max_queue_delay_us: int = 1000
    max_pixels: int = Image.MAX_IMAGE_PIXELS
    exif: bool = True
    execution_env: str | None = None
    decode: str = "auto"  # runtime.decode.DECODE: where anchor_detr_pre decodes JPEGs on a GPU instance


def _engine_hw(profile: Profile) -> tuple[int, int]:
    """The engine inputs' height and width in Triton's dims: dynamic (-1) unless the profile fixes them."""
    h, w = ((lo if lo == hi else -1) for lo, hi in zip(profile.min[1:], profile.max[1:]))
    return h, w


def _engine_inputs(h: int = -1, w: int = -1) -> list[str]:
    return [_io("images", "TYPE_FP32", [3, h, w]), _io("masks", "TYPE_BOOL", [h, w])]


def model_config(sidecar: Mapping[str, Any], instances: int = 1, max_queue_delay_us: int = 1000,
                 gpus: Sequence[int] | None = None, max_batch: int | None = None) -> str:
    """config.pbtxt text of the engine step for the engine a sidecar describes (every output of the sidecar)."""
    profile = Profile.from_dict(sidecar["profile"])
    if profile.min[0] != 1:
        # Triton's batcher sends any batch from 1 up; the plan would refuse those below its minimum.
        raise BadInput(f"the engine's profile starts at batch {profile.min[0]}: Triton needs engines that take "
                       "batch 1; rebuild with `python -m netdef.build --batch 1,OPT,MAX`")
    h, w = _engine_hw(profile)
    input_dims = {"images": [3, h, w], "masks": [h, w]}
    inputs = sidecar["inputs"]
    if sorted(inputs) != sorted(input_dims):
        raise BadInput(f"the engine's inputs {sorted(inputs)} are not AnchorDETR's {sorted(input_dims)}: rebuild it")
    outputs = sidecar["outputs"]
    if not outputs:
        raise BadInput("the sidecar lists no outputs: rebuild the engine with `python -m netdef.build`")
    lines = [
        f'name: "{MODEL_NAME}"',
        'platform: "tensorrt_plan"',
        f"max_batch_size: {max_batch or profile.max[0]}",
        _io_list("input", [_io(n, _triton_type(n, inputs[n]), input_dims[n]) for n in sorted(inputs)]),
        _io_list("output", [_io(n, _triton_type(n, d), [int(v) for v in d["shape"][1:]])
                            for n, d in sorted(outputs.items())]),
        # Triton batches only requests whose H and W agree: anchor_detr_pre pads each batch to one size.
        _batching(max_queue_delay_us),
        _instances(instances, True, gpus),
    ]
    return "\n".join(lines) + "\n"


def _python_model(name: str, max_batch: int, inputs: Sequence[str], outputs: Sequence[str], options: Options,
                  gpu: bool, batching: bool, parameters: Mapping[str, str] | None = None) -> str:
    params = dict(parameters or {})
    if options.execution_env:
        params["EXECUTION_ENV_PATH"] = options.execution_env
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch}",
             _io_list("input", inputs), _io_list("output", outputs),
             _batching(options.max_queue_delay_us) if batching else "dynamic_batching {\n}",
             _instances(options.instances, gpu, options.gpus)]
    if params:
        lines.append(_parameters(params))
    return "\n".join(lines) + "\n"


TOP_K = [_io("scores", "TYPE_FP32", [NUM_TOPK]), _io("labels", "TYPE_INT32", [NUM_TOPK]),
         _io("boxes", "TYPE_FP32", [NUM_TOPK, 4])]
THRESHOLD = _io("threshold", "TYPE_FP32", [1], optional=True)
ANSWER = [_io("count", "TYPE_INT32", [1]), _io("scores", "TYPE_FP32", [-1]), _io("labels", "TYPE_INT32", [-1]),
          _io("boxes", "TYPE_FP32", [-1, 4]), _io("names", "TYPE_STRING", [-1]), _io("size", "TYPE_INT32", [2]),
          _io("error", "TYPE_STRING", [1])]
LABELS_FILE = "labels.txt"


def labels_metadata(names: Mapping[int, str], num_classes: int) -> tuple[dict[str, str], bytes]:
    """The class names (core.labels) for Triton users: a ``labels`` parameter holding the names JSON (clients read
    it with get_model_config; anchor_detr_post answers them), and labels.txt, line k naming label k (its number
    where it has no name), the layout of Triton's label files."""
    text = "".join(labels.label_name(names, k) + "\n" for k in range(num_classes))
    return {labels.KEY: labels.to_json(names)}, text.encode()


def _step(model: str, inputs: Mapping[str, str], outputs: Mapping[str, str]) -> str:
    """One ensemble step: the model's tensor names (keys) bound to the ensemble's tensors (values)."""
    maps = [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
    maps += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
    return f'    {{\n      model_name: "{model}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }"


def ensemble_configs(max_batch: int, min_hw: tuple[int, int], max_hw: tuple[int, int] | None, options: Options,
                     gpu: bool, engine_hw: tuple[int, int] = (-1, -1),
                     names: Mapping[str, str] | None = None) -> dict[str, str]:
    """config.pbtxt text of the ensemble and its two Python-backend steps, by model name. `engine_hw`: the engine
    inputs' dims (a profile that fixes the size makes the pre step's outputs that size: it pads to the minimum);
    `names`: labels_metadata's parameters, which anchor_detr_post answers as ``names``."""
    pre = _python_model(
        PRE, max_batch, [_io("image", "TYPE_STRING", [1]), THRESHOLD],
        [*_engine_inputs(*engine_hw), _io("original_size", "TYPE_INT32", [2])], options, gpu, batching=True,
        parameters={"min_hw": f"{min_hw[0]}x{min_hw[1]}", "max_hw": f"{max_hw[0]}x{max_hw[1]}" if max_hw else "",
                    "max_pixels": str(options.max_pixels), "exif": "true" if options.exif else "false",
                    "decode": options.decode},
    )
    # Post-processing is 100 rows per image: on the CPU, next to the batcher, whatever the other steps use.
    post = _python_model(
        POST, max_batch, [_io("top_scores", "TYPE_FP32", [NUM_TOPK]), _io("top_labels", "TYPE_INT32", [NUM_TOPK]),
                          _io("top_boxes", "TYPE_FP32", [NUM_TOPK, 4]), _io("original_size", "TYPE_INT32", [2]),
                          THRESHOLD],
        ANSWER, options, gpu=False, batching=False, parameters=names,
    )
    steps = [
        _step(PRE, {"image": "image", "threshold": "threshold"},
              {"images": "engine_images", "masks": "engine_masks", "original_size": "original_size"}),
        _step(MODEL_NAME, {"images": "engine_images", "masks": "engine_masks"},
              {"scores": "top_scores", "labels": "top_labels", "boxes": "top_boxes"}),
        _step(POST, {"top_scores": "top_scores", "top_labels": "top_labels", "top_boxes": "top_boxes",
                     "original_size": "original_size", "threshold": "threshold"},
              {name: name for name in ("count", "scores", "labels", "boxes", "names", "size", "error")}),
    ]
    ensemble = "\n".join([
        f'name: "{ENSEMBLE}"', 'platform: "ensemble"', f"max_batch_size: {max_batch}",
        _io_list("input", [_io("image", "TYPE_STRING", [1]), THRESHOLD]), _io_list("output", ANSWER),
        "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}",
    ]) + "\n"
    return {ENSEMBLE: ensemble, PRE: pre, POST: post}


# ---------------------------------------------------------------------------------------------- repositories


def _model_file(name: str) -> bytes:
    return (MODELS_DIR / name).read_bytes()


def _ensemble_files(configs: Mapping[str, str]) -> dict[str, bytes | None]:
    return {
        f"{ENSEMBLE}/config.pbtxt": configs[ENSEMBLE].encode(), f"{ENSEMBLE}/1": None,  # ensembles need a version
        f"{PRE}/config.pbtxt": configs[PRE].encode(), f"{PRE}/1/model.py": _model_file("pre.py"),
        f"{POST}/config.pbtxt": configs[POST].encode(), f"{POST}/1/model.py": _model_file("post.py"),
    }


def _check_options(options: Options) -> None:
    if options.instances < 1:
        raise BadInput(f"--instances {options.instances}: must be at least 1")
    if options.max_queue_delay_us < 0:
        raise BadInput(f"--max-queue-delay-us {options.max_queue_delay_us}: must be 0 or more")
    if options.decode not in DECODE:
        raise BadInput(f"--decode {options.decode}: expected one of {', '.join(DECODE)}")


def engine_repository(engine: Path, options: Options = Options(), raw: bool = False,
                      max_batch: int | None = None) -> dict[str, bytes | None]:
    """The files (relative path -> bytes; None for a folder) of the repository for an engine."""
    require_file(engine)
    _check_options(options)
    try:
        sidecar = load_sidecar(engine)
    except SidecarError as exc:
        raise BadInput(f"engine {engine}: {exc}") from None
    if sidecar["backend"] != "tensorrt":
        raise BadInput(f"engine {engine} was built with {sidecar['backend']}; Triton's TensorRT backend runs full "
                       "TensorRT plans only: build it with `python -m netdef.build --backend tensorrt`")
    if sidecar["version_compatible"] and sidecar["lean_runtime_excluded"]:
        raise BadInput(f"engine {engine} was built with --exclude-lean-runtime, and Triton's TensorRT backend loads "
                       "only version-compatible plans that embed their lean runtime: rebuild it with "
                       "`python -m netdef.build --version-compatible`")
    profile = Profile.from_dict(sidecar["profile"])
    if max_batch is not None and max_batch > profile.max[0]:
        raise BadInput(f"--max-batch {max_batch} exceeds the engine profile's maximum batch {profile.max[0]}")
    batch = max_batch or profile.max[0]
    num_classes = int(sidecar["config"].get("num_classes", labels.COCO_NUM_CLASSES))
    names, labels_text = labels_metadata(labels.of_sidecar(sidecar), num_classes)
    config = model_config(sidecar, options.instances, options.max_queue_delay_us, options.gpus, batch)
    files: dict[str, bytes | None] = {
        f"{MODEL_NAME}/config.pbtxt": (config + _parameters(names) + "\n").encode(),
        f"{MODEL_NAME}/{LABELS_FILE}": labels_text,
    }
    if not raw:
        missing = [n for n in POSTPROCESS_OUTPUTS if n not in sidecar["outputs"]]
        if missing:
            raise BadInput(f"engine {engine} has no in-engine top-100 (outputs {missing} missing): rebuild it with "
                           "`python -m netdef.build --postprocess`, or write the raw model with --raw")
        files |= _ensemble_files(ensemble_configs(batch, profile.min[1:], profile.max[1:], options, gpu=True,
                                                  engine_hw=_engine_hw(profile), names=names))
    files[f"{MODEL_NAME}/1/model.plan"] = engine.read_bytes()
    return files


def torch_repository(weights: Path, options: Options = Options(), device: str = "cpu",
                     max_hw: tuple[int, int] | None = None, max_batch: int | None = None) -> dict[str, bytes | None]:
    """The ensemble with the PyTorch reference (weights copied into the repository) in place of the engine."""
    if not weights.is_file():
        raise BadInput(f"--torch-weights {weights} not found: write one with `python -m weights.extract`")
    _check_options(options)
    if max_hw is not None and min(max_hw) < MIN_SIDE:
        raise BadInput(f"--max-size {max_hw[0]}x{max_hw[1]}: both sides must be at least {MIN_SIDE}")
    import weights as weights_file

    batch = max_batch or DEFAULT_TORCH_BATCH
    gpu = device == "cuda"
    if options.decode == "gpu" and not gpu:
        raise BadInput(f"--decode gpu needs GPU instances of {PRE}: use --device cuda, or --decode auto|cpu")
    class_names = weights_file.class_names(weights)
    num_classes = AnchorDETRConfig.from_json(weights_file.read_metadata(weights)["config"]).num_classes
    names, labels_text = labels_metadata(class_names, num_classes)
    stand_in = _python_model(MODEL_NAME, batch, _engine_inputs(), TOP_K, options, gpu, batching=True, parameters=names)
    files = _ensemble_files(ensemble_configs(batch, (MIN_SIDE, MIN_SIDE), max_hw, options, gpu, names=names))
    files |= {f"{MODEL_NAME}/config.pbtxt": stand_in.encode(), f"{MODEL_NAME}/{LABELS_FILE}": labels_text,
              f"{MODEL_NAME}/1/model.py": _model_file("torch_stand_in.py"),
              f"{MODEL_NAME}/1/model.safetensors": weights.read_bytes()}
    return files


def write_repository(repo: Path, files: Mapping[str, bytes | None]) -> None:
    """Write every file (each checked before the first is written); a failed write removes the folders it made."""
    created = repo  # the topmost folder this call makes, removed again if writing fails
    while not created.parent.exists():
        created = created.parent
    fresh = not created.exists()
    try:
        for name, data in files.items():
            if data is not None:
                check_output_path(repo / name, "model repository file")
        for name, data in files.items():
            if data is None:
                (repo / name).mkdir(parents=True, exist_ok=True)
            else:
                write_atomic(repo / name, data)
    except OutputPathError as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        if fresh:
            shutil.rmtree(created, ignore_errors=True)
        raise BadInput(f"cannot write {repo} ({exc.strerror or exc}): choose a writable folder") from None


# ---------------------------------------------------------------------------------------------- --serve


def shm_prefix(pid: int | None = None) -> str:
    """The name prefix of the Python backend's shared-memory segments of the server `serve` runs in process `pid`."""
    return f"anchortrt_{os.getpid() if pid is None else pid}_"


def bundled_tritonserver(repo: Path, backends: Path, host: str = "127.0.0.1", http_port: int = 8000,
                         grpc_port: int = 8001, metrics_port: int = 8002) -> dict[str, Any]:
    """`subprocess.Popen` arguments (args, env, cwd) that start the tritonserver of PyTriton's wheel on `repo`, its
    Python backend copied into `backends` (a folder the caller removes afterwards) with the stub of this Python.

    The stub runs the model files in this interpreter's environment: this Python's libpython first on
    LD_LIBRARY_PATH (the stub loads it by name and may otherwise pick another build of the same version) and this
    environment's `bin` first on PATH (the stub's Python finds its site-packages from it). The stub ignores
    PYTHONPATH, but its sys.path starts with its working folder: the server runs in this package's root folder,
    so the models import this copy of the package, whatever else is installed."""
    try:
        import pytriton
    except ImportError as exc:
        raise Unavailable(f"--serve needs PyTriton ({exc}): pip install -e '.[serve]'") from None
    dist = Path(pytriton.__file__).resolve().parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise Unavailable(f"PyTriton has no Python-backend stub for Python {version} ({stub}): use Python 3.11-3.13")
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (dist / "backends" / "python" / "libtriton_python.so",
                   dist / "backends" / "python" / "triton_python_backend_utils.py", stub):
        shutil.copy2(source, python / source.name)
    env = dict(os.environ)

    def first(name: str, paths: Sequence[str]) -> None:
        env[name] = os.pathsep.join([p for p in paths if p] + [p for p in env.get(name, "").split(os.pathsep) if p])

    libs = dist.parent.parent / "nvidia_pytriton.libs"  # the server's own libraries, beside the package
    first("LD_LIBRARY_PATH", [sysconfig.get_config_var("LIBDIR") or "", str(libs)])
    first("PATH", [str(Path(sys.executable).parent)])
    args = [str(dist / "bin" / "tritonserver"), "--model-repository", str(repo), "--backend-directory", str(backends),
            "--http-address", host, "--http-port", str(http_port), "--grpc-address", host,
            "--grpc-port", str(grpc_port), "--metrics-address", host, "--metrics-port", str(metrics_port),
            "--exit-timeout-secs", str(EXIT_TIMEOUT_S),
            # Shared-memory segments named after this process: several servers on one machine stay apart, and
            # anything a crash leaves in /dev/shm says whose it was.
            f"--backend-config=python,shm-region-prefix-name={shm_prefix()}"]
    return {"args": args, "env": env, "cwd": str(Path(__file__).resolve().parents[1])}


def _ready(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v2/health/ready", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def serve(repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int) -> int:
    """Serve `repo` with PyTriton's tritonserver until Ctrl-C or SIGTERM, which are passed on to it once; Triton
    then finishes the requests it has, unloads the models and exits. Its log goes to this process's stderr."""
    backends = Path(tempfile.mkdtemp(prefix="anchortrt-triton-"))
    try:
        launch = bundled_tritonserver(repo, backends, host, http_port, grpc_port, metrics_port)
        process = subprocess.Popen(**launch, stdout=sys.stderr, stderr=sys.stderr)
        stopping: list[int] = []

        def stop(signum: int, _frame: Any) -> None:
            if not stopping:
                process.send_signal(signal.SIGTERM)
            stopping.append(signum)

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while process.poll() is None and not stopping and not _ready(host, http_port):
                if time.monotonic() > deadline:
                    stop(signal.SIGTERM, None)
                    break
                time.sleep(0.5)
            if process.poll() is None and not stopping:
                print(f"serving {ENSEMBLE} from {repo} on http://{host}:{http_port}, grpc {host}:{grpc_port}, "
                      f"metrics http://{host}:{metrics_port}/metrics; Ctrl-C or SIGTERM stops", flush=True)
            code = process.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if process.poll() is None:  # an error above: never leave the server running
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(backends, ignore_errors=True)
    if stopping and code == 0:
        return 0
    if stopping:
        raise Unavailable(f"tritonserver did not stop cleanly (exit code {code}): see its log above; \"Exit timeout "
                          f"expired\" there means clients kept connections open for all of its {EXIT_TIMEOUT_S} s")
    raise Unavailable(f"tritonserver exited with code {code} before it was stopped: see its log above (a model "
                      "that failed to load names itself there)")


def _check_serve_args(args: argparse.Namespace) -> None:
    check_port_options(args)
    if args.engine is not None:
        raise BadInput("--serve needs --torch-weights: PyTriton's tritonserver has no TensorRT backend; serve an "
                       "engine's repository with the Triton container (docs/serving.md)")


def run(args: argparse.Namespace) -> int:
    if args.torch_weights is None and (args.max_size is not None or args.device != "cpu"):
        raise BadInput("--device and --max-size apply to --torch-weights only (an engine's sizes are its profile's)")
    if args.gpus and args.torch_weights is not None and args.device == "cpu":
        raise BadInput("--gpus places GPU instances: it needs --engine or --device cuda")
    if args.raw and args.engine is None:
        raise BadInput("--raw writes the engine's own model: it needs --engine")
    if args.serve:
        _check_serve_args(args)
    options = Options(args.instances, tuple(args.gpus) if args.gpus else None, args.max_queue_delay_us,
                      args.max_pixels, not args.no_exif, args.execution_env, args.decode)
    if args.engine is not None:
        files = engine_repository(args.engine, options, args.raw, args.max_batch)
    else:
        files = torch_repository(args.torch_weights, options, args.device, args.max_size, args.max_batch)
    write_repository(args.output, files)
    models = sorted({name.split("/")[0] for name in files})
    print(f"wrote {', '.join(models)} in {args.output}", flush=True)
    if args.serve:
        return serve(args.output.resolve(), args.host, args.http_port, args.grpc_port, args.metrics_port)
    # A version-compatible plan runs its embedded lean runtime, which Triton allows only when told to.
    vc = args.engine is not None and load_sidecar(args.engine)["version_compatible"]
    print(f"serve with `tritonserver --model-repository {args.output}"
          f"{' --backend-config=tensorrt,version-compatible=true' if vc else ''}`", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    return guarded(p.prog, run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

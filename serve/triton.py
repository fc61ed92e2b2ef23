"""Export an engine as a Triton model repository: ``python -m serve.triton --engine E.plan -o REPO/``.

Writes ``REPO/anchor_detr_trt/1/model.plan`` (a copy of the engine) and ``REPO/anchor_detr_trt/config.pbtxt``
for Triton's TensorRT backend: the engine's raw inputs and outputs, ``max_batch_size`` and the dims from the
sidecar's profile, dynamic batching and GPU instances. Pre- and post-processing stay with the client
(``runtime.preprocess`` / ``runtime.postprocess``); ``serve.server`` is the server that does them itself.

The AOT plugin layers (``--plugins``) are serialised inside the plan, so Triton needs no plugin library and
no LD_PRELOAD. The plan only loads in a Triton whose TensorRT is the one that built it (the sidecar's
``trt_version``), or a later one of the same major version for a version-compatible engine (which embeds its lean
runtime; Triton runs it with ``--backend-config=tensorrt,version-compatible=true``). A plan built with
--exclude-lean-runtime is refused: Triton never loads a separate lean runtime (it does not call loadRuntime).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from core.sidecar import OutputPathError, Profile, SidecarError, check_output_path, load_sidecar, write_atomic
from core import labels
from core.cli import guarded, parser, positive_int
from core.errors import BadInput
from runtime.runner import require_file

MODEL_NAME = "anchor_detr_trt"
# numpy dtype names as the sidecar writes them -> Triton's DataType names.
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "float16": "TYPE_FP16", "float32": "TYPE_FP32",
}  # fmt: skip

EPILOG = """\
examples:
  python -m serve.triton --engine engines/anchor_detr_r50_dc5_fp16.plan -o models/
  tritonserver --model-repository models/     (Triton release whose TensorRT built the engine)
exit codes: 0 written, 2 bad input (engine or sidecar missing, an engine Triton cannot run, bad output folder)
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        "python -m serve.triton",
        "Write a Triton Inference Server model repository for an engine built by `python -m netdef.build`:\n"
        f"REPO/{MODEL_NAME}/1/model.plan and REPO/{MODEL_NAME}/config.pbtxt for Triton's TensorRT backend.\n"
        "Clients send the engine's raw inputs (`images` (B,3,H,W) float32 normalised, `masks` (B,H,W) bool)\n"
        "and post-process `pred_logits`/`pred_boxes` (or the in-engine top-100) themselves.",
        EPILOG,
    )
    p.add_argument("--engine", type=Path, required=True, help="engine file with its sidecar <engine>.json beside it")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="REPO", help="model repository folder")
    p.add_argument("--instances", type=positive_int, default=1, metavar="N", help="execution instances per GPU (default 1)")
    p.add_argument("--max-queue-delay-us", type=int, default=1000, metavar="U",
                   help="how long Triton may hold a request to fill a batch, microseconds (default 1000)")
    return p


def _dims(shape: Sequence[int]) -> list[int]:
    """A sidecar shape without its batch axis (Triton adds it back from max_batch_size)."""
    return [int(d) for d in shape[1:]]


def _tensor(name: str, desc: Mapping[str, Any], dims: Sequence[int]) -> str:
    dtype = desc["dtype"]
    if dtype not in TRITON_TYPES:
        raise BadInput(f"tensor {name} has dtype {dtype}, which has no Triton type here: rebuild the engine")
    return f'  {{\n    name: "{name}"\n    data_type: {TRITON_TYPES[dtype]}\n    dims: {list(dims)}\n  }}'


def model_config(sidecar: Mapping[str, Any], instances: int = 1, max_queue_delay_us: int = 1000) -> str:
    """config.pbtxt text for the engine a sidecar describes."""
    profile = Profile.from_dict(sidecar["profile"])
    if profile.min[0] != 1:
        # Triton's batcher sends any batch from 1 up; the plan would refuse those below its minimum.
        raise BadInput(f"the engine's profile starts at batch {profile.min[0]}: Triton needs engines that take "
                       "batch 1; rebuild with `python -m netdef.build --batch 1,OPT,MAX`")
    # Height and width are dynamic unless the profile fixes them.
    h, w = ((lo if lo == hi else -1) for lo, hi in zip(profile.min[1:], profile.max[1:]))
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
        f"max_batch_size: {profile.max[0]}",
        "input [\n" + ",\n".join(_tensor(n, inputs[n], input_dims[n]) for n in sorted(inputs)) + "\n]",
        "output [\n" + ",\n".join(_tensor(n, d, _dims(d["shape"])) for n, d in sorted(outputs.items())) + "\n]",
        # Triton batches only requests whose H and W agree: clients pad to one size to benefit.
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_GPU\n  }}\n]",
    ]
    return "\n".join(lines) + "\n"


LABELS_FILE = "labels.txt"


def labels_metadata(sidecar: Mapping[str, Any]) -> tuple[str, bytes]:
    """The engine's class names (core.labels) for Triton users: a config.pbtxt ``parameters`` entry ``labels``
    holding the names JSON (clients read it with get_model_config), and labels.txt beside config.pbtxt, line k
    naming label k (its number where it has no name), the layout of Triton's label files."""
    names = labels.of_sidecar(sidecar)
    count = int(sidecar["config"].get("num_classes", labels.COCO_NUM_CLASSES))
    text = "".join(labels.label_name(names, k) + "\n" for k in range(count))
    value = json.dumps(labels.to_json(names), ensure_ascii=False)  # its escapes are valid in text protobuf
    return f'parameters {{\n  key: "{labels.KEY}"\n  value: {{ string_value: {value} }}\n}}\n', text.encode()


def export(engine: Path, repo: Path, instances: int = 1, max_queue_delay_us: int = 1000) -> Path:
    """Write the model repository; returns the model's folder. Everything is checked before anything is written."""
    require_file(engine)
    if instances < 1:
        raise BadInput(f"--instances {instances}: must be at least 1")
    if max_queue_delay_us < 0:
        raise BadInput(f"--max-queue-delay-us {max_queue_delay_us}: must be 0 or more")
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
    parameters, labels_text = labels_metadata(sidecar)
    config = model_config(sidecar, instances, max_queue_delay_us) + parameters
    model = repo / MODEL_NAME
    created = model / "1"  # the topmost folder this call makes, removed again if writing fails
    while not created.parent.exists():
        created = created.parent
    fresh = not created.exists()
    try:
        for path in (model / "config.pbtxt", model / "1" / "model.plan", model / LABELS_FILE):
            check_output_path(path, "model repository file")
        write_atomic(model / "1" / "model.plan", engine.read_bytes())
        write_atomic(model / LABELS_FILE, labels_text)
        write_atomic(model / "config.pbtxt", config.encode())
    except OutputPathError as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        if fresh:
            shutil.rmtree(created, ignore_errors=True)
        raise BadInput(f"cannot write {model} ({exc.strerror or exc}): choose a writable folder") from None
    return model


def run(args: argparse.Namespace) -> int:
    model = export(args.engine, args.output, args.instances, args.max_queue_delay_us)
    # A version-compatible plan runs its embedded lean runtime, which Triton allows only when told to.
    vc = " --backend-config=tensorrt,version-compatible=true" if load_sidecar(args.engine)["version_compatible"] else ""
    print(f"wrote {model}/config.pbtxt, {model}/{LABELS_FILE} and {model}/1/model.plan; serve with "
          f"`tritonserver --model-repository {args.output}{vc}`")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    return guarded(p.prog, run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

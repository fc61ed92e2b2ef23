"""Official AnchorDETR checkpoint -> one anchortrt weights file (safetensors).

    python -m weights.extract CHECKPOINT.pth [-o OUT.safetensors] [--variant r50_dc5]
    python -m weights.extract --random-init r50_dc5 [--num-classes N] [--seed 0] [-o OUT.safetensors]
    python -m weights.extract FINETUNED.pth --names classes.txt     (or --names instances_train.json)

Without -o the file is weights/anchor_detr_<variant>.safetensors. Arguments, the checkpoint's first bytes and the
output path are checked before torch is imported (a typo is reported at once, not after seconds).

Exit codes: 0 written; 2 bad input or usage (nothing written); 3 environment (torch missing); 130 interrupted
(Ctrl-C; 143 for SIGTERM; nothing written).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from core import cli, labels
from core.config import VARIANTS, AnchorDETRConfig
from core.errors import BadInput, Unavailable
from core.progress import Spinner, format_bytes, format_seconds, print_table
from core.sidecar import check_output_path
from weights import default_weights_path, file_sha256, naming, save
from weights.checkpoint import CheckpointError, check_checkpoint_file, configure, read_checkpoint

EPILOG = f"""\
variants: {", ".join(VARIANTS)} (the released models); ablations append _mha (standard attention),
_3lvl (three feature levels), _grid (grid anchors), e.g. r50_dc5_mha.

The checkpoint is read with torch.load(weights_only=True) and an allow-list (argparse.Namespace, numpy
scalars): nothing else is unpickled. Its configuration comes from its tensors and its training args;
--variant is needed only for a bare state dict without args (C5 and DC5 have the same tensors).
Written: FP32 tensors named as the TensorRT builder uses them (frozen BN folded into the convolutions,
attention input projections pre-sliced, shared heads once) and metadata (format, config, source sha256).
The file is reproducible: the same checkpoint (contents and file name) and options give the same sha256.

class names: stored in the file and carried into the engine's sidecar, so every output names a fine-tuned
model's own classes. --names FILE is one name per line (line k names label k), or a COCO annotations JSON
(its categories: id -> name); ids must lie in 0..num_classes-1, once each (exit 2 otherwise). Without it a
91-class checkpoint keeps COCO's names and any other class count gets numeric labels.
"""


def _parser() -> argparse.ArgumentParser:
    p = cli.parser(
        "python -m weights.extract",
        "Convert an official AnchorDETR checkpoint (.pth) to an anchortrt weights file (.safetensors).",
        EPILOG,
    )
    p.add_argument("checkpoint", nargs="?", help="official checkpoint, e.g. AnchorDETR_r50_dc5.pth")
    p.add_argument("-o", "--output", help="weights file to write; missing folders are made (default: "
                   f"{default_weights_path('<variant>')}, the variant as detected or given)")
    p.add_argument("--variant", help="configuration of a checkpoint without training args, e.g. r50_dc5")
    p.add_argument("--random-init", metavar="VARIANT", help="write random weights of this variant instead of a checkpoint "
                   "(marked as random in the metadata: the commands that detect warn that they mean nothing)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init (default 0)")
    p.add_argument("--num-classes", type=cli.positive_int, metavar="N",
                   help="class count of --random-init (default 91, COCO's label space)")
    p.add_argument("--names", metavar="FILE", help=f"class names: {labels.NAMES_HELP}")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    return p


@contextlib.contextmanager
def _step(desc: str) -> Iterator[None]:
    """A live spinner on a terminal; silent in logs and pipes, where only the summary or error is wanted."""
    if sys.stderr.isatty():
        with Spinner(desc):
            yield
    else:
        yield


def _check_output(output: str | os.PathLike, checkpoint: str | None) -> Path:
    """The output path if we may write it; refused before any work: a folder, device or pipe (the final rename
    would replace it), an unwritable folder, the checkpoint itself."""
    return check_output_path(output, "output", [("checkpoint", checkpoint)])


def _check_inputs(
    output: str | None, checkpoint: str | None, variant: str | None, random_init: str | None
) -> Path | None:
    """Everything that needs no torch: variant names, the checkpoint's format, the output path. Returns the output
    path, or None for the default path of a checkpoint whose variant is known only once it is read."""
    named = AnchorDETRConfig.from_variant(random_init or variant).variant if random_init or variant else None
    if checkpoint:
        check_checkpoint_file(checkpoint)
    if output is None and named is None:
        return None
    return _check_output(output or default_weights_path(named), checkpoint)


def _verify_shared_heads(sd: Mapping[str, Any]) -> None:
    """The per-layer head copies are one module in the official model: any difference means another model."""
    import torch

    for name, copies in naming.shared_head_copies(sd).items():
        for key in copies[1:]:
            if not torch.equal(sd[key], sd[copies[0]]):
                raise CheckpointError(
                    f"{key} differs from {copies[0]}: the official model shares one head over all decoder "
                    "layers, so this checkpoint comes from a modified model"
                )


def class_names(pairs: list[tuple[int, str]] | None, num_classes: int) -> dict[int, str]:
    """The names to store: those of --names, checked against the class count, or the default for it."""
    return labels.default_names(num_classes) if pairs is None else labels.check_names(pairs, num_classes)


def random_config(variant: str, num_classes: int | None) -> AnchorDETRConfig:
    cfg = AnchorDETRConfig.from_variant(variant)
    return cfg if num_classes is None else dataclasses.replace(cfg, num_classes=num_classes)


def extract(
    output: Path | None, checkpoint: str | None = None, variant: str | None = None,
    random_init: str | None = None, seed: int = 0, num_classes: int | None = None,
    names: list[tuple[int, str]] | None = None,
) -> dict[str, Any]:
    """Write the weights file to `output` as returned by _check_inputs; returns the summary. ``names``: (id, name)
    pairs of --names (core.labels.read_names_file). Raises BadInput (CheckpointError, ConfigError, WeightsError,
    LabelsError and OutputPathError are kinds of it)."""
    start = time.monotonic()
    if random_init:
        cfg = random_config(random_init, num_classes)
        stored = class_names(names, cfg.num_classes)
        from weights.random_init import random_state_dict

        with _step(f"random {cfg.variant} weights (seed {seed})"):
            sd = random_state_dict(cfg, seed)
        source, source_sha256 = f"random-init {cfg.variant} seed {seed}", ""
    else:
        with _step(f"reading {os.path.basename(checkpoint)}"):
            sd, args = read_checkpoint(checkpoint)
        cfg = configure(sd, args, variant)
        stored = class_names(names, cfg.num_classes)  # before the output is touched: a misfit writes nothing
        if output is None:
            output = _check_output(default_weights_path(cfg.variant), checkpoint)
        with _step("hashing the checkpoint"):
            # The name only: the folder the checkpoint sits in must not change the file.
            source, source_sha256 = os.path.basename(checkpoint), file_sha256(checkpoint)
    with _step("checking and converting"):
        _verify_shared_heads(sd)
        tensors = naming.to_builder(sd, cfg)
    with _step(f"writing {output}"):
        try:
            save(output, cfg, tensors, source=source, source_sha256=source_sha256, random_init=bool(random_init),
                 names=stored)
        except OSError as exc:
            raise BadInput(f"cannot write {output} ({exc.strerror or exc}): check the path and free space") from exc
    return {
        "output": str(output),
        "variant": cfg.variant,
        "config": json.loads(cfg.to_json()),
        "tensors": len(tensors),
        "parameters": sum(math.prod(t.shape) for t in tensors.values()),
        "bytes": os.path.getsize(output),
        "seconds": round(time.monotonic() - start, 3),
        "sha256": file_sha256(output),
        "source": source,
        "source_sha256": source_sha256,
        "num_classes": cfg.num_classes,
        "labels": labels.stored(stored),
    }


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    return cli.guarded(parser.prog, run, parser, parser.parse_args(argv))


def run(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> int:
    if bool(opts.checkpoint) == bool(opts.random_init):
        parser.error("give either a CHECKPOINT or --random-init VARIANT")
    if opts.random_init and opts.variant:
        parser.error("--variant is for checkpoints; with --random-init the variant is its argument")
    if opts.num_classes is not None and not opts.random_init:
        parser.error("--num-classes is for --random-init; a checkpoint's class count comes from its tensors")
    names = labels.read_names_file(opts.names) if opts.names else None
    if names is not None and opts.random_init:  # the class count is known: refuse a misfit before any work
        class_names(names, random_config(opts.random_init, opts.num_classes).num_classes)
    output = _check_inputs(opts.output, opts.checkpoint, opts.variant, opts.random_init)
    try:
        import torch  # noqa: F401  (reading checkpoints and random weights need it)
    except ImportError:
        raise Unavailable("torch is not installed: pip install torch") from None
    summary = extract(output, opts.checkpoint, opts.variant, opts.random_init, opts.seed, opts.num_classes, names)
    classes = summary["num_classes"]
    if names is None and classes != labels.COCO_NUM_CLASSES:
        print(f"hint: {classes} classes and no --names, so labels are numbers 0..{classes - 1}: name them with "
              f"--names FILE ({labels.NAMES_HELP})", file=sys.stderr)
    if opts.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table([
            ("written", summary["output"]),
            ("variant", summary["variant"]),
            ("source", summary["source"]),
            ("tensors", summary["tensors"]),
            ("classes", f"{classes}, {labels.describe(labels.from_stored(summary['labels'], classes), classes)}"),
            ("parameters", f"{summary['parameters']:,}"),
            ("size", format_bytes(summary["bytes"])),
            ("time", format_seconds(summary["seconds"])),
            ("sha256", summary["sha256"]),
        ])
    return 0


if __name__ == "__main__":
    sys.exit(main())

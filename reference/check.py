"""``python -m reference.check``: per-block parity of our TensorRT network against the PyTorch reference.

No engine is built or run: the network definition is evaluated by ``reference.interpret`` (TensorRT's layer
semantics in PyTorch), so this works on any machine where a TensorRT backend can define a network: TensorRT-RTX
needs no GPU, full TensorRT needs one to create its builder. Both
sides see the same padded batch of random images of different sizes; every block that the reference's
``intermediates()`` names is compared with the network tensor of the same name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from core import cli
from core.backend import BUILDERS, get_backend
from core.errors import BadInput, Unavailable
from netdef.build import DEFAULT_WEIGHTS, MAX_ACTIVATION_ELEMENTS, create_network, largest_activation
from core.progress import Spinner, format_bytes, print_table
from core.sidecar import MIN_SIDE, Profile
from weights import require_weights_file

# Tolerances on the block's relative error (max |net - ref| / max |ref|). FP32: both sides compute in float32
# with different summation orders; 1e-3 leaves room for the deep backbone's accumulated rounding. FP16: fp16
# tensors carry ~3 significant digits (eps 9.8e-4) through ~60 layers, compared with an FP32 reference.
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}


def padded_batch(batch: int, height: int, width: int, seed: int = 0):
    """Random normalised images, image i smaller than image 0 by up to a quarter (height) and a third (width),
    zero-padded to (height, width), and the padding mask (True = padding). Image sizes are not multiples of
    the backbone stride, so the mask downsampling is exercised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(batch, 3, height, width)
    masks = torch.ones(batch, height, width, dtype=torch.bool)
    sizes = []
    for i in range(batch):
        shrink = i / max(batch - 1, 1)
        h = max(32, height - round(shrink * height / 4) - (i > 0) * 3)
        w = max(32, width - round(shrink * width / 3) - (i > 0) * 5)
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        masks[i, :h, :w] = False
        sizes.append((h, w))
    return images, masks, sizes


def compare(name: str, got, ref, tol: float) -> dict[str, Any]:
    """One row of the parity table. Booleans (the mask) compare as 0/1."""
    row: dict[str, Any] = {"block": name, "shape": list(ref.shape), "max_abs_err": None, "max_rel_err": None,
                           "tolerance": tol, "passed": False, "problem": None}
    if got is None:
        row["problem"] = "not in the network"
        return row
    if tuple(got.shape) != tuple(ref.shape):
        row["problem"] = f"network shape {list(got.shape)} != reference {list(ref.shape)}"
        return row
    import torch

    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    if ref.numel() == 0:
        row.update(max_abs_err=0.0, max_rel_err=0.0, passed=True)
        return row
    finite = bool(torch.isfinite(got).all())
    err = (got - ref).abs().max().item() if finite else math.nan
    row.update(max_abs_err=err, max_rel_err=err / max(ref.abs().max().item(), 1e-12))
    row["passed"] = bool(row["max_rel_err"] <= tol)  # NaN fails
    if not finite:
        row["problem"] = "non-finite values"
    return row


# Both sides hold the input and output of the largest block at once, and the interpreter keeps what later
# layers still read: four copies of the largest activation is the least either needs.
ACTIVATION_COPIES = 4


def check_size(cfg, batch: int, size: tuple[int, int], device: str) -> None:
    """Refuse, before anything is allocated, a batch whose largest activation TensorRT cannot index (int32) or that
    cannot fit in the memory of ``device``."""
    import torch

    shape = (batch, *size)
    elements, what = largest_activation(cfg, Profile(shape, shape, shape))
    fix = "lower --size or --batch"
    if elements > MAX_ACTIVATION_ELEMENTS:
        raise BadInput(f"--size {size[0]}x{size[1]} with --batch {batch} makes the {what} {elements:,} elements, above "
                       f"the {MAX_ACTIVATION_ELEMENTS:,} that TensorRT's int32 element indexing allows: {fix}")
    if device == "cuda":
        memory, where = torch.cuda.get_device_properties(0).total_memory, "the GPU's"
    else:
        memory, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's"
    need = ACTIVATION_COPIES * 4 * elements  # float32
    if need > memory:
        raise BadInput(f"--size {size[0]}x{size[1]} with --batch {batch} needs at least {format_bytes(need)} "
                       f"({ACTIVATION_COPIES} float32 copies of the {what}), more than {where} "
                       f"{format_bytes(memory)}: {fix}")


def run_check(weights_path: Path, *, fp16: bool, size: tuple[int, int], batch: int, device: str,
              backend_name: str | None = None, seed: int = 0, tol: float | None = None) -> dict[str, Any]:
    """Build the network, evaluate it and the reference on one padded batch; the report as a dict."""
    import torch

    import weights
    from reference.interpret import interpret_network
    from reference.torch_model import AnchorDETR

    backend = get_backend(backend_name)
    cfg, tensors = weights.load(weights_path)
    check_size(cfg, batch, size, device)
    # CUDA convolutions default to TF32 (10-bit mantissa): both sides would round alike-but-not-equal, and
    # the FP32 tolerance is meant for FP32 arithmetic.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    precision = "fp16" if fp16 else "fp32"
    tol = TOLERANCE[precision] if tol is None else tol
    images, masks, sizes = padded_batch(batch, *size, seed=seed)
    with Spinner(f"defining network ({cfg.variant}, {precision})"):
        shape = (batch, *size)
        _, network, _, keepalive = create_network(
            backend, cfg, tensors, fp16=fp16, profile=Profile(shape, shape, shape)
        )
    with Spinner(f"running the PyTorch reference on {device}"):
        model = AnchorDETR.from_builder_tensors(cfg, tensors, device)
        ref = model.intermediates(images.to(device), masks.to(device))
    with Spinner(f"interpreting the network on {device}"):
        got = interpret_network(
            network, {"images": images.to(device), "masks": masks.to(device)}, device=device,
            outputs=list(ref), missing_ok=True, trt=backend.trt,
        )
    del keepalive
    rows = [compare(name, got.get(name), value, tol) for name, value in ref.items()]
    return {
        "weights": str(weights_path),
        "variant": cfg.variant,
        "precision": precision,
        "backend": f"{backend.name} {backend.version}",
        "device": device,
        "batch": [list(s) for s in sizes],
        "padded_size": list(size),
        "tolerance": tol,
        "blocks": rows,
        "passed": all(r["passed"] for r in rows),
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def print_report(report: dict[str, Any]) -> None:
    print(f"parity of {report['variant']} {report['precision']} network vs PyTorch reference "
          f"({report['backend']}, interpreter on {report['device']}); images "
          + ", ".join(f"{h}x{w}" for h, w in report["batch"]) + f" padded to {'x'.join(map(str, report['padded_size']))}")
    print_table(
        [(r["block"], "x".join(map(str, r["shape"])), _fmt(r["max_abs_err"]), _fmt(r["max_rel_err"]),
          ("pass" if r["passed"] else "FAIL") + (f": {r['problem']}" if r["problem"] else ""))
         for r in report["blocks"]],
        headers=("block", "shape", "max abs err", "max rel err", f"rel err <= {report['tolerance']:g}"),
    )
    failed = [r["block"] for r in report["blocks"] if not r["passed"]]
    if failed:
        print(f"{len(failed)} of {len(report['blocks'])} blocks differ; the first is {failed[0]}")
    else:
        print(f"all {len(report['blocks'])} blocks match")


DESCRIPTION = """\
Per-block parity of our TensorRT network against the PyTorch reference, without building an engine.

The network definition is evaluated by reference.interpret (TensorRT's layer semantics in PyTorch), so this runs
without a GPU with TensorRT-RTX (full TensorRT needs a GPU even to define a network). Both sides get the same padded batch of random
images of different sizes; each block of the reference (backbone, mask, input_proj, posemb_*, encoder.N,
decoder.N, pred_logits, pred_boxes) is compared with the network tensor of the same name, in network order,
so the first failing row shows where the network diverges.
"""

EPILOG = """\
rel err is the block's max |network - reference| divided by its max |reference|, so one tolerance serves
blocks of any scale; the default is 1e-3 for FP32 and 3e-2 for FP16 (against the FP32 reference).

exit codes: 0 all blocks match, 1 a block differs, 2 bad input, 3 no TensorRT backend that can build here (or no
CUDA for --device cuda), 130 interrupted (Ctrl-C; 143 for SIGTERM).
"""


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m reference.check", DESCRIPTION, EPILOG)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help=f"weights file (default: {DEFAULT_WEIGHTS})")
    p.add_argument("--fp16", action="store_true", help="check the FP16 network (against the FP32 reference)")
    p.add_argument("--size", type=cli.hw, default="320x480", metavar="HxW",
                   help="padded batch size; the other images are smaller (default: %(default)s)")
    p.add_argument("--batch", type=cli.positive_int, default=2, help="images in the batch (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides run (default: cpu)")
    p.add_argument("--backend", choices=BUILDERS,
                   help="TensorRT flavour that defines the network (default: the first that can build here)")
    p.add_argument("--seed", type=int, default=0, help="random images seed (default: %(default)s)")
    p.add_argument("--tol", type=cli.positive_float, help="relative error tolerance (default: 1e-3 FP32, 3e-2 FP16)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    return cli.guarded(p.prog, run, p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if min(args.size) < MIN_SIDE:
        raise BadInput(f"--size {args.size[0]}x{args.size[1]} is below {MIN_SIDE}x{MIN_SIDE}, the smallest image with a feature map")
    require_weights_file(args.weights)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise Unavailable("--device cuda, but PyTorch sees no CUDA device: use --device cpu")
    # A network this config cannot build is BadInput (exit 2); a layer the interpreter cannot evaluate is Failed
    # (exit 1: no verdict on parity). Both reach core.cli.guarded as they are.
    report = run_check(args.weights, fp16=args.fp16, size=args.size, batch=args.batch, device=args.device,
                       backend_name=args.backend, seed=args.seed, tol=args.tol)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

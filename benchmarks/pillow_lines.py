"""Check that the NumPy twin of the GPU resize (`runtime.gpu_preprocess.pillow_bilinear`) equals Pillow's
`Image.resize(BILINEAR)` bit for bit under each Pillow release line that pyproject admits.

    python -m benchmarks.pillow_lines [--versions 10.0.0,10.4.0,...] [--random 150] [--out pillow_lines.json]
    python -m benchmarks.pillow_lines --installed    # only the Pillow this Python imports, nothing installed

Each version is installed with `pip install --no-deps --only-binary :all: --target TMP/pillow-X pillow==X` into a
temporary folder (removed at the end) and checked in its own subprocess with PYTHONPATH=TMP/pillow-X, so it
shadows the installed Pillow. The cases: the sizes the GPU and kernel tests use (through the evaluation resize,
fit within 1344x1344), the NumPy twin's awkward sizes (1xN, Nx1, 3000x10, upscales, antialiased downscales),
sizes on both sides of each pass-order rule's boundary, and --random random sizes (small, up to 1500, and taller
than 100 widths). Per case, random pixels are resized by Pillow, by `pillow_bilinear` (the order
`vertical_first` picks for that Pillow, as the kernel's `Slot.vertical_first`) and by the other order; a case
is *decisive* when the two orders give different pixels, so only Pillow's own order can match it.
Exit codes: 0 all equal, 1 some case differs, 2 bad arguments, 3 pip could not install a version.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from core.cli import guarded, parser, positive_int
from core.errors import Failed, Unavailable
from core.progress import ProgressBar, print_table
from core.sidecar import check_output_path, write_atomic

# The newest release of each line pyproject admits (pillow>=10), and the releases either side of 12.2.0, where the
# pass order changed within the 12 line.
VERSIONS = ("10.0.0", "10.4.0", "11.3.0", "12.1.1", "12.2.0", "12.3.0", "13.0.0")
ROOT = Path(__file__).resolve().parents[1]
MAX_HW = (1344, 1344)  # the profile maximum the GPU and kernel tests use

# Decoded image sizes (H, W) of tests/test_gpu_preprocess.py and tests/test_preprocess_kernel_on_cpu.py.
TEST_IMAGES = [(480, 640), (1800, 1200), (1, 37), (41, 1), (3000, 10), (10, 3000), (1, 1), (427, 640),
               (2000, 1990), (600, 800), (1200, 900), (3000, 2000), (29, 1), (2, 900), (1700, 1500), (333, 501),
               (48, 64), (70, 31), (300, 200), (12, 30), (30, 12), (900, 1300)]
# (in_h, in_w, out_h, out_w): tests/test_preprocess.py's cases, then each rule's boundary from both sides:
# 12.2's "taller than 100 widths" (1000 vs 1001 rows of 10) and 13.0's "height loses more than twice the width's
# pixels" (20 = 2 * 10 vs 21 > 2 * 10).
RESIZES = [(480, 640, 800, 1066), (1, 1, 5, 7), (1, 9, 1, 3), (9, 1, 800, 1), (1, 200, 1, 1333),
           (3000, 10, 1333, 4), (10, 3000, 4, 1333), (10, 3000, 1, 1), (7, 5, 7, 11), (5, 7, 2, 7), (29, 13, 10, 10),
           (30, 20, 10, 10), (31, 20, 10, 10), (1200, 900, 800, 600), (333, 501, 800, 1203),
           (1000, 10, 500, 7), (1001, 10, 500, 7), (1000, 10, 999, 7), (1001, 10, 1000, 13), (2500, 9, 1333, 4),
           (60, 40, 40, 30), (61, 40, 40, 30), (120, 90, 50, 55), (121, 90, 50, 55)]


def cases(count: int, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """The fixed cases, then `count` random ones (a third each: small, up to 1500, taller than 100 widths)."""
    from runtime.preprocess import output_hw

    rng = np.random.default_rng(seed)
    out = [(h, w, *output_hw(h, w, MAX_HW)) for h, w in TEST_IMAGES] + list(RESIZES)
    for i in range(count):
        if i % 3 == 0:
            out.append(tuple(int(v) for v in rng.integers(1, 64, 4)))
        elif i % 3 == 1:
            h, w = (int(v) for v in rng.integers(1, 1500, 2))
            out.append((h, w, *output_hw(h, w, MAX_HW)))
        else:
            w = int(rng.integers(1, 12))
            h = int(rng.integers(100 * w + 1, 3000))
            out.append((h, w, int(rng.integers(1, h)), int(rng.integers(1, 16))))
    return out


def check(version: str, count: int) -> dict:
    """Every case under the Pillow this process imports, which must be `version`."""
    import PIL
    from PIL import Image

    from runtime.gpu_preprocess import _resample, pass_order, pillow_bilinear, vertical_first

    if PIL.__version__ != version:
        raise Failed(f"expected Pillow {version}, imported {PIL.__version__} from {PIL.__file__}")
    rng = np.random.default_rng(1)
    result = {"pillow": version, "rule": pass_order(version).__name__.lstrip("_"), "cases": 0, "equal": 0,
              "decisive": 0, "decisive_vertical_first": 0, "values_differ": 0, "failures": []}
    for in_h, in_w, out_h, out_w in cases(count):
        rgb = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
        pillow = np.asarray(Image.fromarray(rgb, "RGB").resize((out_w, out_h), Image.Resampling.BILINEAR))
        twin = pillow_bilinear(rgb, out_h, out_w)
        vertical = vertical_first(in_h, in_w, out_h, out_w)
        other = _resample(rgb, out_h, out_w, vertical=not vertical)
        differ = int(np.count_nonzero(twin != pillow))
        result["cases"] += 1
        result["equal"] += differ == 0
        result["values_differ"] += differ
        if not np.array_equal(twin, other):
            result["decisive"] += 1
            result["decisive_vertical_first"] += vertical
        if differ:
            result["failures"].append(f"{in_h}x{in_w} -> {out_h}x{out_w}: {differ} values")
    return result


def install(version: str, folder: Path) -> Path:
    target = folder / f"pillow-{version}"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary", ":all:", "--target", str(target), f"pillow=={version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"pip could not install pillow=={version} ({last}); check the network or the version")
    return target


def check_in_subprocess(version: str, target: Path, count: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    command = [sys.executable, "-m", "benchmarks.pillow_lines", "--child", version, "--random", str(count)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise Failed(f"the check under Pillow {version} failed: {done.stderr.strip() or done.stdout.strip()}")
    return json.loads(done.stdout)


def run(args: argparse.Namespace) -> int:
    if args.child:  # inside the subprocess of one version
        print(json.dumps(check(args.child, args.random)))
        return 0
    if args.out:
        check_output_path(args.out, "--out")
    if args.installed:
        import PIL

        results = [check(PIL.__version__, args.random)]
    else:
        results = []
        with tempfile.TemporaryDirectory(prefix="pillow-lines-") as folder, \
                ProgressBar(len(args.versions), "Pillow lines") as bar:
            for done, version in enumerate(args.versions):
                bar.set(done, f"installing {version}")
                target = install(version, Path(folder))
                bar.set(done, f"checking {version}")
                results.append(check_in_subprocess(version, target, args.random))
            bar.set(len(args.versions), "done")
    print_table([(r["pillow"], r["rule"].replace("_", " "), r["cases"], r["equal"], r["decisive"],
                  r["decisive_vertical_first"], r["values_differ"]) for r in results],
                ["Pillow", "pass-order rule", "cases", "equal", "decisive", "of them vertical first",
                 "values differ"])
    for r in results:
        for failure in r["failures"]:
            print(f"Pillow {r['pillow']}: {failure}", file=sys.stderr)
    if args.out:
        write_atomic(args.out, (json.dumps(results, indent=2) + "\n").encode())
    return 1 if any(r["values_differ"] for r in results) else 0


def _versions(text: str) -> list[str]:
    versions = [v.strip() for v in text.split(",") if v.strip()]
    if not versions or not all(v.replace(".", "").isdigit() and v.count(".") == 2 for v in versions):
        raise argparse.ArgumentTypeError(f"expected comma-separated releases like 10.4.0,13.0.0, got {text!r}")
    return versions


def main(argv=None) -> int:
    p = parser("python -m benchmarks.pillow_lines", __doc__.split("\n\n")[0],
               "examples:\n  python -m benchmarks.pillow_lines\n  python -m benchmarks.pillow_lines --installed\n"
               "exit codes: 0 all equal, 1 some case differs, 2 bad arguments, 3 pip could not install a version")
    p.add_argument("--versions", type=_versions, default=list(VERSIONS),
                   help=f"Pillow releases to install and check (default {','.join(VERSIONS)})")
    p.add_argument("--installed", action="store_true", help="check only the Pillow this Python imports")
    p.add_argument("--random", type=positive_int, default=150, help="random sizes besides the fixed cases")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return guarded(p.prog, run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""The pipeline's own capacity: files to detections with the engine stage replaced by a stand-in.

    python -m benchmarks.pipeline_capacity [--images 64] [--batch 4] [--workers 4] [--in-flight 2] [--gpu]
                                           [--out capacity.json]

Images: deterministic 640x480 JPEGs (runtime.synthetic.synthetic_images) in a temporary folder. The stand-in engine
returns fixed raw outputs of AnchorDETR's shapes (B,900,91) logits and (B,900,4) boxes at once, so the host
post-processing (top-100 of 900x91 per image) still runs; what remains is decode, preprocess, post-process and
the pipeline's own overhead: the rate the pipeline can feed an engine at. With --gpu the stand-in also copies the
batch to the GPU and the outputs back (core.cuda, pinned buffers) without running a network, so the copies
count as they would with a real engine. Reported: images/s over the timed run (after one untimed batch), busy ms
per image of each stage, the process's CPU ms per image, and the CPU core count.
Exit codes: 0 ok, 2 bad arguments, 3 no GPU (with --gpu).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from core.cli import guarded, positive_int
from core.errors import BadInput
from core.sidecar import Profile, check_output_path, write_atomic
from runtime.preprocess import usable_cpus
from runtime.synthetic import synthetic_images
from runtime.pipeline import PipelineStats, detect_stream
from runtime.detector import Detector, ProfileDetector

QUERIES, CLASSES = 900, 91
PROFILE = Profile((1, 320, 512), (4, 800, 1066), (8, 1344, 1344))


class NullEngine(ProfileDetector):
    """An engine stand-in that does no work: fixed outputs of the right shapes (scores spread so the top-100
    sort has work to do)."""

    def __init__(self, profile: Profile = PROFILE) -> None:
        self.profile = profile
        rng = np.random.default_rng(0)
        self._logits = rng.standard_normal((profile.max[0], QUERIES, CLASSES), dtype=np.float32)
        self._boxes = rng.uniform(0.1, 0.9, (profile.max[0], QUERIES, 4)).astype(np.float32)

    def infer(self, images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        batch = images.shape[0]
        return {"pred_logits": self._logits[:batch], "pred_boxes": self._boxes[:batch]}


class CopyEngine(NullEngine):
    """NullEngine plus the copies a real engine pays: the batch to the device, the raw outputs back. `gpu`."""

    def __init__(self, profile: Profile = PROFILE) -> None:
        from core import cuda

        super().__init__(profile)
        self.cuda = cuda
        cuda.init()
        b, h, w = profile.max
        self.stream = cuda.Stream()
        self._sizes = {"images": b * 3 * h * w * 4, "masks": b * h * w, "logits": self._logits.nbytes,
                       "boxes": self._boxes.nbytes}
        self._device = {k: cuda.DeviceBuffer(n) for k, n in self._sizes.items()}
        self._pinned = {k: cuda.PinnedBuffer(n, np.uint8) for k, n in self._sizes.items()}

    def infer(self, images: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
        outputs = super().infer(images, masks)
        for name, array in (("images", images), ("masks", masks)):
            host = self._pinned[name].view((array.nbytes,))
            host[...] = array.reshape(-1).view(np.uint8)
            self._device[name].upload(host, self.stream)
        for name, array in (("logits", outputs["pred_logits"]), ("boxes", outputs["pred_boxes"])):
            self._device[name].download(self._pinned[name].view((array.nbytes,)), self.stream)
        self.stream.synchronize()
        return outputs


def measure(detector: Detector, paths, batch: int, workers: int, in_flight: int) -> dict:
    # CPU preprocessing: the GPU kernel writes into an EngineRunner's buffers, which a stand-in does not have.
    options = dict(batch=batch, workers=workers, in_flight=in_flight, gpu_preprocess=False)
    for _ in detect_stream(detector, paths[:batch], **options):  # warm-up: thread pools, first allocations
        pass
    stats = PipelineStats()
    for _ in detect_stream(detector, paths, stats=stats, **options):
        pass
    return stats.summary()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_capacity", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=positive_int, default=64, help="synthetic 640x480 JPEGs (default 64)")
    p.add_argument("--batch", type=positive_int, default=4, help="images per batch (default 4)")
    p.add_argument("--workers", type=positive_int, default=usable_cpus(),
                   help="decode threads (default: one per usable core)")
    p.add_argument("--in-flight", type=positive_int, default=2, help="batches in flight (default 2)")
    p.add_argument("--gpu", action="store_true", help="the stand-in also copies to and from the GPU (needs one)")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    return guarded(p.prog, run, p.parse_args(argv), sys.argv[1:] if argv is None else argv)


def run(args: argparse.Namespace, argv) -> int:
    if args.batch > PROFILE.max[0]:
        raise BadInput(f"the stand-in engine takes --batch 1..{PROFILE.max[0]}, not {args.batch}")
    if args.out:
        check_output_path(args.out, "--out")
    detector = CopyEngine() if args.gpu else NullEngine()
    with tempfile.TemporaryDirectory(prefix="anchortrt-capacity-") as folder:
        paths = synthetic_images(Path(folder), args.images)
        summary = measure(detector, paths, args.batch, args.workers, args.in_flight)
    report = {"command": "python -m benchmarks.pipeline_capacity " + " ".join(argv),
              "machine": f"{platform.processor() or platform.machine()}, {usable_cpus()} usable CPU cores",
              "stand_in": "copies to/from the GPU" if args.gpu else "no work", **summary}
    print(json.dumps(report, indent=1))
    if args.out:
        write_atomic(args.out, (json.dumps(report, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

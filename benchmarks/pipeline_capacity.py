"""The pipeline's own capacity: files to detections with the engine replaced by a stand-in that runs no network.

    python -m benchmarks.pipeline_capacity [--images 64] [--batch 4] [--workers N] [--in-flight 2]
                                           [--gpu [--decode auto|gpu|cpu] [--outputs top100|raw]] [--repeat 1]
                                           [--out capacity.json]

Images: deterministic 640x480 JPEGs (runtime.synthetic.synthetic_images) in a temporary folder. Without --gpu the
CPU path runs: Pillow decoding, `prepare_batch` on the host, a stand-in whose `infer` returns fixed raw outputs of
AnchorDETR's shapes ((B,900,91) logits, (B,900,4) boxes), and the host top-100. With --gpu the GPU path runs, as it
would with an engine: files decoded by nvImageCodec into device memory (--decode; Pillow with cpu), the kernel
writing into the stand-in's device input buffers, and a stand-in `DeviceEngine` (a runtime.pipeline.DeviceRunner)
whose outputs are those of an engine with the top-100 inside it (--outputs top100: scores, labels and boxes
downloaded from the device), or raw outputs left on the device and reduced there by the device top-100
(--outputs raw, runtime.gpu_postprocess.DeviceTopK). What is measured is what a user with an engine gets, minus
the engine's own time. Reported: images/s over the timed run (after one untimed batch), ms per image, busy ms per
image of each stage, the process's CPU ms per image, the usable CPU cores.
Exit codes: 0 ok, 2 bad arguments, 3 no GPU or no nvImageCodec (with --gpu).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.report import emit
from core.cli import guarded, positive_float, positive_int
from core.errors import BadInput
from core.sidecar import Profile, check_output_path
from runtime import pipeline
from runtime.preprocess import usable_cpus
from runtime.synthetic import synthetic_images
from runtime.bench import timed_stream
from runtime.detector import Detector, ProfileDetector

QUERIES, CLASSES = 900, 91
PROFILE = Profile((1, 320, 512), (8, 800, 1066), (32, 1344, 1344))


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


class DeviceEngine(NullEngine):
    """A DeviceRunner stand-in: device input buffers for the profile's largest batch, its own stream, and fixed
    outputs on the device: the in-engine top-100's (`outputs="top100"`, downloaded as an engine's would be) or raw
    outputs reduced by the device top-100 (`outputs="raw"`). `gpu`."""

    def __init__(self, profile: Profile = PROFILE, outputs: str = "top100") -> None:
        from core import cuda
        from runtime.gpu_postprocess import DeviceTopK

        super().__init__(profile)
        cuda.init()
        self.cuda, self.outputs, self.stream = cuda, outputs, cuda.Stream()
        b, h, w = profile.max
        self._inputs = cuda.DeviceBuffer(b * 3 * h * w * 4 + b * h * w)
        self._images_bytes = b * 3 * h * w * 4
        self._raw = {"logits": cuda.DeviceBuffer(self._logits.nbytes), "boxes": cuda.DeviceBuffer(self._boxes.nbytes)}
        self._raw["logits"].upload(self._logits, self.stream)
        self._raw["boxes"].upload(self._boxes, self.stream)
        self._top = DeviceTopK(b, stream=self.stream)
        # The top-100 an engine would output, on the device, and the pinned buffers it is downloaded into.
        self._top.run(self._raw["logits"].ptr, self._raw["boxes"].ptr, b, QUERIES, CLASSES)
        self.stream.synchronize()
        self._fixed = self._top.outputs()
        self._fixed["labels"] = self._fixed["labels"].astype(np.int32)
        self._device = {k: cuda.DeviceBuffer(v.nbytes) for k, v in self._fixed.items()}
        self._host = {k: cuda.PinnedBuffer(v.size, v.dtype) for k, v in self._fixed.items()}
        for k, v in self._fixed.items():
            self._device[k].upload(v, self.stream)
        self.stream.synchronize()

    def sibling(self) -> "DeviceEngine":
        return DeviceEngine(self.profile, self.outputs)

    @property
    def input_pointers(self) -> tuple[int, int]:
        return self._inputs.ptr, self._inputs.ptr + self._images_bytes

    def device_inputs(self, batch: int, height: int, width: int) -> tuple[int, int]:
        return self.input_pointers

    def start_on_device(self, shape: tuple[int, int, int], batch: int | None = None
                        ) -> Callable[[], dict[str, np.ndarray]]:
        count = shape[0] if batch is None else batch
        if self.outputs == "raw":
            self._top.run(self._raw["logits"].ptr, self._raw["boxes"].ptr, shape[0], QUERIES, CLASSES)

            def top_k() -> dict[str, np.ndarray]:
                self.stream.synchronize()
                return {k: v[:count] for k, v in self._top.outputs().items()}

            return top_k
        out = {}
        for name, fixed in self._fixed.items():
            host = self._host[name].view((shape[0], *fixed.shape[1:]))
            self._device[name].download(host, self.stream)
            out[name] = host

        def downloaded() -> dict[str, np.ndarray]:
            self.stream.synchronize()
            return {k: v[:count].copy() for k, v in out.items()}

        return downloaded

    def close(self) -> None:
        self.stream.synchronize()
        self._top.close()
        for buffer in [self._inputs, *self._raw.values(), *self._device.values(), *self._host.values()]:
            buffer.close()


def measure(detector: Detector, paths, batch: int, workers: int, in_flight: int, gpu: bool,
            decode: str = "cpu") -> dict:
    from runtime.decode import DECODE

    summary = timed_stream(detector, paths, batch=batch, workers=workers, in_flight=in_flight, gpu_preprocess=gpu,
                           gpu_decode=DECODE[decode] if gpu else False).summary()
    summary["ms_per_image"] = 1000 / summary["images_per_s"] if summary["images_per_s"] else None
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_capacity", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=positive_int, default=64, help="synthetic 640x480 JPEGs (default 64)")
    p.add_argument("--batch", type=positive_int, default=4, help="images per batch (default 4)")
    p.add_argument("--workers", type=positive_int, default=usable_cpus(),
                   help="decode threads (default: one per usable core)")
    p.add_argument("--in-flight", type=positive_int, default=2, help="batches in flight (default 2)")
    p.add_argument("--gpu", action="store_true", help="the GPU path, with the DeviceEngine stand-in (needs a GPU)")
    p.add_argument("--decode", choices=("auto", "gpu", "cpu"), default="gpu",
                   help="--gpu: decode with nvImageCodec (gpu, default), where installed (auto), or Pillow (cpu)")
    p.add_argument("--outputs", choices=("top100", "raw"), default="top100",
                   help="--gpu: the stand-in's outputs: an in-engine top-100's (default) or raw ones reduced by the "
                   "device top-100")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="runs over the same files; the report is the median run's, with every run's images/s")
    p.add_argument("--switch-interval", type=positive_float, metavar="SECONDS",
                   help="the switch interval the pipeline runs with (runtime.pipeline.SWITCH_INTERVAL_S, default "
                   f"{pipeline.SWITCH_INTERVAL_S}; Python's own: 0.005): a diagnostic of how long its threads wait to "
                   "get the GIL back from one that computes")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    return guarded(p.prog, run, p.parse_args(argv), sys.argv[1:] if argv is None else argv)


def run(args: argparse.Namespace, argv) -> int:
    if args.batch > PROFILE.max[0]:
        raise BadInput(f"the stand-in engine takes --batch 1..{PROFILE.max[0]}, not {args.batch}")
    if args.out:
        check_output_path(args.out, "--out")
    detector = DeviceEngine(outputs=args.outputs) if args.gpu else NullEngine()
    interval = pipeline.SWITCH_INTERVAL_S
    pipeline.SWITCH_INTERVAL_S = args.switch_interval or interval
    try:
        with tempfile.TemporaryDirectory(prefix="anchortrt-capacity-") as folder:
            paths = synthetic_images(Path(folder), args.images)
            runs = [measure(detector, paths, args.batch, args.workers, args.in_flight, args.gpu, args.decode)
                    for _ in range(args.repeat)]
    finally:
        pipeline.SWITCH_INTERVAL_S = interval
        detector.close()
    median = sorted(runs, key=lambda r: r["images_per_s"])[len(runs) // 2]
    stand_in = (f"GPU path, {args.decode} decoding, {args.outputs} outputs on the device" if args.gpu
                else "CPU path, fixed raw outputs")
    report = {"command": "python -m benchmarks.pipeline_capacity " + " ".join(argv),
              "machine": f"{platform.processor() or platform.machine()}, {usable_cpus()} usable CPU cores",
              "stand_in": stand_in, "switch_interval_s": args.switch_interval or interval, **median}
    if args.repeat > 1:
        report["runs_images_per_s"] = [round(r["images_per_s"], 1) for r in runs]
    emit(report, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

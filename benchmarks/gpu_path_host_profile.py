"""The GPU path's host-side (Python) cost per image, measured on a machine without a GPU.

    python -m benchmarks.gpu_path_host_profile [--decode gpu|cpu] [--images 512] [--batch 8] [--in-flight 3]
                                               [--repeats 3] [--profile]

`runtime.pipeline.detect_stream` runs the whole GPU path as the CPU tests run it (tests/
test_preprocess_kernel_on_cpu.py): host memory stands in for device and pinned memory, streams and events do
nothing, and `--decode gpu` decodes with tests/helpers' fake nvImageCodec. What is left is the pipeline's own
Python, so the device work is taken out too: the fake codec hands back pixels decoded once before the timing (no
decoding in the call), the kernel launches are no-ops, and the engine stand-in returns fixed top-100 outputs.
Images: the synthetic 640x480 JPEGs of benchmarks.pipeline_capacity. Printed per repeat: images/s, the process's
CPU ms per image and each stage's busy ms per image; with --profile, cProfile of the feeder thread (reads and the
decode call) and of the preprocess stage thread (upload and the kernels' launch) over one more run.
Machine-dependent and for comparing versions of the code on one machine: no GPU time is in it.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def stand_ins():
    """core.cuda with host memory and no-op launches; runtime.decode with a fake codec of pre-decoded pixels.
    Returns `remember(paths)`, which decodes the files once for the codec, and the engine stand-in's class."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import FakeCodec, FakeImage, HostMemory, NumpyDetector, Ordered

    from core import cuda
    from runtime import decode, gpu_preprocess

    cuda.current_device = lambda: SimpleNamespace(arch=90, activate=lambda: None, index=0)
    cuda.Stream = cuda.Event = Ordered
    cuda.PinnedBuffer = cuda.DeviceBuffer = HostMemory
    cuda.load_kernel = lambda image, kind, name: name
    cuda.launch = lambda *args, **kwargs: None
    cuda.target_arch = lambda arch: arch
    gpu_preprocess._cubin = lambda arch: b""

    decoded: dict = {}
    codec = FakeCodec()
    codec.Decoder = lambda device_id, backends: SimpleNamespace(
        decode=lambda data, params, cuda_stream=0: [decoded[(len(d), d[-64:])] for d in data])
    made = decode.BatchDecoder
    decode.load_codec = lambda: codec
    decode.BatchDecoder = lambda exif=True: made(exif=exif, device=False, codec=codec)

    def remember(paths) -> None:
        for path in paths:
            data = path.read_bytes()
            assert (len(data), data[-64:]) not in decoded, "two synthetic files share a key"
            decoded[len(data), data[-64:]] = FakeImage(data, True)

    class Engine(NumpyDetector):
        """A DeviceRunner whose engine returns fixed outputs of an in-engine top-100's shapes."""

        def __init__(self, profile):
            super().__init__(profile, engine_postprocess=True)
            self.stream, self._buffer = Ordered(), HostMemory(8)
            rng = np.random.default_rng(0)
            batch = profile.max[0]
            self.fixed = {"scores": np.sort(rng.random((batch, 100), np.float32))[:, ::-1].copy(),
                          "labels": rng.integers(0, 91, (batch, 100)).astype(np.int32),
                          "boxes": rng.uniform(0, 1, (batch, 100, 4)).astype(np.float32)}

        input_pointers = property(lambda self: (self._buffer.ptr, self._buffer.ptr))

        def device_inputs(self, batch, height, width):
            return self.input_pointers

        def sibling(self):
            return Engine(self.profile)

        def start_on_device(self, shape, batch=None):
            return lambda: {k: v[:batch].copy() for k, v in self.fixed.items()}

    return remember, Engine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_path_host_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--decode", choices=("gpu", "cpu"), default="gpu", help="the fake nvImageCodec (gpu) or Pillow")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--in-flight", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="then cProfile the feeder and preprocess stage threads")
    args = p.parse_args(argv)
    remember, Engine = stand_ins()
    from benchmarks.pipeline_capacity import PROFILE
    from runtime import pipeline
    from runtime.synthetic import synthetic_images

    with tempfile.TemporaryDirectory(prefix="anchortrt-host-profile-") as folder:
        paths = synthetic_images(Path(folder), args.images)
        remember(paths)
        engine = Engine(PROFILE)
        options = dict(batch=args.batch, in_flight=args.in_flight, gpu_preprocess=True,
                       gpu_decode=args.decode == "gpu")
        for _ in pipeline.detect_stream(engine, paths[:args.batch], **options):  # warm-up
            pass
        for repeat in range(args.repeats):
            stats = pipeline.PipelineStats()
            for _ in pipeline.detect_stream(engine, paths, stats=stats, **options):
                pass
            s = stats.summary()
            stages = ", ".join(f"{k} {v:.3f}" for k, v in s["stage_ms_per_image"].items() if v)
            print(f"{s['images_per_s']:.0f} images/s, CPU {s['cpu_ms_per_image']:.3f} ms/image; busy ms/image: {stages}")
        if args.profile:
            feeder, stage = cProfile.Profile(), cProfile.Profile()
            batches, prepare = pipeline.batches_for, pipeline.GpuPath.prepare

            def profiled_batches(*a, **k):
                feeder.enable()
                try:
                    yield from batches(*a, **k)
                finally:
                    feeder.disable()

            def profiled_prepare(self, rgb):
                stage.enable()
                try:
                    return prepare(self, rgb)
                finally:
                    stage.disable()

            pipeline.batches_for, pipeline.GpuPath.prepare = profiled_batches, profiled_prepare
            for _ in pipeline.detect_stream(engine, paths, **options):
                pass
            for name, profile in (("feeder thread (reads, decode call)", feeder),
                                  ("preprocess stage thread (upload, launch)", stage)):
                print(f"--- {name}, {args.images} images")
                pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    return 0


if __name__ == "__main__":
    sys.exit(main())

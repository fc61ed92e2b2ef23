"""runtime.pipeline and the Detector methods built on it: order, error isolation, bounded memory, stage failures,
and equality with the serial `Detector.detect` (a NumPy stand-in for the engine, and the PyTorch reference)."""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from runtime import pipeline
from runtime.pipeline import PipelineStats, bounded, detect_stream
from runtime.preprocess import ImageError
from helpers import NumpyDetector, solid


def same(found, expected):
    assert len(found) == len(expected)
    for got, want in zip(found, expected):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


@pytest.fixture
def files(tmp_path):
    """Nine small images of three colours and sizes, so each batch's padding and labels differ."""
    paths = []
    for i in range(9):
        path = tmp_path / f"{i}.{'png' if i % 2 else 'jpg'}"
        solid(40 + 8 * i, 30 + 5 * (i % 4), i % 3).save(path)
        paths.append(path)
    return paths


def test_detect_files_in_input_order_equal_to_serial_detect(files):
    detector = NumpyDetector()
    expected = detector.detect([Image.open(p) for p in files], threshold=0.3, batch_size=2)
    serial_calls = [shape for shape, _ in detector.calls]
    detector.calls.clear()
    found = detector.detect_files(files, threshold=0.3, batch=2, workers=3)
    same(found, expected)
    assert [d["labels"][0] for d in found] == [(1, 3, 17)[i % 3] for i in range(9)]
    assert [shape for shape, _ in detector.calls] == serial_calls  # the same batches, in the same order
    keys = [key for key, _ in detector.iter_detect(files, batch=2)]
    assert keys == files


def test_images_in_give_positions(files):
    detector = NumpyDetector()
    images = [Image.open(p) for p in files[:3]]
    out = list(detector.iter_detect(iter(images), threshold=0.3))
    assert [key for key, _ in out] == [0, 1, 2]
    same([r for _, r in out], detector.detect(images, threshold=0.3))


def test_unreadable_files_are_error_entries_and_the_rest_go_on(files, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    paths = [files[0], tmp_path / "missing.png", files[1], broken, files[2]]
    detector = NumpyDetector()
    found = detector.detect_files(paths, threshold=0.3, batch=2)
    assert isinstance(found[1], ImageError) and "missing.png: no such file" in str(found[1])
    assert isinstance(found[3], ImageError) and "broken.jpg: cannot read image" in str(found[3])
    same([found[i] for i in (0, 2, 4)], NumpyDetector().detect([Image.open(p) for p in files[:3]], threshold=0.3))
    # batches [0, missing] [1, broken] [2]: the engine saw only the readable images of each
    assert [shape[0] for shape, _ in detector.calls] == [1, 1, 1]
    # a batch of unreadable files only never reaches the engine
    detector.calls.clear()
    assert all(isinstance(r, ImageError) for r in detector.detect_files([broken, broken], batch=2))
    assert not detector.calls


class SlowDetector(NumpyDetector):
    def infer(self, images, masks):
        time.sleep(0.01)
        return super().infer(images, masks)


@pytest.mark.parametrize("in_flight", [1, 2, 4])
def test_batches_in_flight_are_bounded(in_flight):
    """A slow consumer: the source is never more than in_flight batches ahead of what was handed out."""
    pulled, handed = [0], [0]
    ahead = []

    def images():
        for i in range(40):
            pulled[0] += 1
            ahead.append(pulled[0] - handed[0])
            yield solid(32, 24, i % 3)

    stats = PipelineStats()
    for key, _ in NumpyDetector().iter_detect(images(), batch=2, in_flight=in_flight, stats=stats):
        time.sleep(0.005)
        handed[0] += 1
    assert handed[0] == 40 and stats.images == 40 and stats.batches == 20
    # one more batch than in flight may be in the feeder's hands while it waits for a slot
    assert max(ahead) <= 2 * (in_flight + 1)
    assert stats.max_live == in_flight  # the slow consumer lets the pipeline fill up to the bound, not beyond


def test_stages_overlap():
    """Three stages of 20 ms each over 8 items: about 10 stage-times when overlapped, 24 one after another."""
    def stage(item):
        time.sleep(0.02)
        return item

    start = time.perf_counter()
    assert list(bounded(range(8), [stage, stage, stage], in_flight=3)) == list(range(8))
    assert time.perf_counter() - start < 0.02 * 18


def test_post_processing_overlaps_the_next_batch_s_engine_step(files):
    """Post-processing has a stage thread of its own: a batch's post-processing waits until the next batch's
    engine step has started, which deadlocked (here: timed out) while both ran on the engine stage's thread."""
    started = [threading.Event() for _ in range(5)]

    class Overlapped(NumpyDetector):
        def infer(self, images, masks):
            started[len(self.calls)].set()
            return super().infer(images, masks)

        def found(self, outputs, orig_sizes, threshold):
            done = sum(e.is_set() for e in started)
            if done < len(started):  # the last batch has no next one
                assert started[done].wait(timeout=5), "the next engine step did not start during post-processing"
            return super().found(outputs, orig_sizes, threshold)

    got = [r for _, r in Overlapped().iter_detect(files, batch=2, in_flight=3)]
    assert len(got) == 9 and pipeline_threads() == []


def test_a_failing_stage_raises_at_its_item_and_stops_the_threads():
    before = threading.active_count()

    def stage(item):
        if item == 3:
            raise ValueError("bad item 3")
        return item * 10

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for value in bounded(range(100), [stage], in_flight=2):
            got.append(value)
    assert got == [0, 10, 20]
    assert threading.active_count() == before


def test_leaving_early_stops_the_threads_and_the_source():
    before = threading.active_count()
    closed = []

    def source():
        try:
            yield from range(1000)
        finally:
            closed.append(True)

    for value in bounded(source(), [lambda x: x], in_flight=2):
        if value == 5:
            break
    assert threading.active_count() == before and closed == [True]
    with pytest.raises(ValueError, match="in_flight must be at least 1"):
        list(bounded(range(3), [], in_flight=0))


def test_stats_record_every_stage(files):
    stats = PipelineStats()
    list(detect_stream(SlowDetector(), files, batch=2, stats=stats))
    summary = stats.summary()
    assert summary["images"] == 9 and summary["batches"] == 5 and summary["errors"] == 0
    assert summary["decoded"] == {"nvimagecodec": 0, "pillow": 9}
    per_image = summary["stage_ms_per_image"]
    assert per_image["engine"] >= 5 * 10 / 9  # five calls of at least 10 ms
    assert per_image["decode"] > 0 and per_image["preprocess"] > 0 and per_image["postprocess"] > 0
    assert per_image["upload"] == 0 and per_image["gpu"] == 0  # CPU path, and the stand-in has no GPU timing
    assert summary["cpu_ms_per_image"] > 0 and summary["images_per_s"] > 0


class IntervalDetector(NumpyDetector):
    """Records the switch interval its engine step runs under."""

    def __init__(self):
        super().__init__()
        self.intervals = []

    def infer(self, images, masks):
        self.intervals.append(sys.getswitchinterval())
        return super().infer(images, masks)


def test_pipelines_run_with_a_short_switch_interval_and_give_the_process_s_back_after_the_last(files):
    about = lambda seconds: pytest.approx(seconds, abs=2e-6)  # Python keeps it in whole microseconds
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.004)
        outer, inner = IntervalDetector(), IntervalDetector()
        first = detect_stream(outer, files[:4], batch=2)
        next(first)
        assert sys.getswitchinterval() == about(pipeline.SWITCH_INTERVAL_S)
        assert len(list(detect_stream(inner, files[:2], batch=2))) == 2
        assert sys.getswitchinterval() == about(pipeline.SWITCH_INTERVAL_S)  # the first one still runs
        assert len(list(first)) == 3
        assert sys.getswitchinterval() == about(0.004)
        assert outer.intervals == inner.intervals[:1] * 2 == [about(pipeline.SWITCH_INTERVAL_S)] * 2
        sys.setswitchinterval(0.0002)  # a process that chose a shorter one keeps it
        list(detect_stream(outer, files[:2], batch=2))
        assert outer.intervals[-1] == about(0.0002) and sys.getswitchinterval() == about(0.0002)
    finally:
        sys.setswitchinterval(before)


def test_gpu_preprocess_true_needs_an_engine_runner(files):
    from core.errors import Unavailable

    with pytest.raises(Unavailable, match="GPU preprocessing needs a detector with device input buffers"):
        NumpyDetector().iter_detect(files, gpu_preprocess=True)  # at the call, before any work


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    pytest.importorskip("torch")
    from runtime.torch_detector import TorchReference
    from core.config import AnchorDETRConfig
    from helpers import save_random_weights

    cfg = AnchorDETRConfig(dilation=False, enc_layers=1, dec_layers=1)  # r50_c5, one layer each: quick on CPU
    path = save_random_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors", cfg)
    reference = TorchReference(path, "cpu")
    reference.max_hw = (64, 96)  # scale the evaluation resize down, as a small engine profile would
    return reference


@pytest.mark.slow
def test_torch_reference_through_the_pipeline_equals_serial_detect(torch_reference, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(64, 96), (96, 64), (80, 80)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    expected = torch_reference.detect([Image.open(p) for p in paths], threshold=0.0, batch_size=2)
    found = torch_reference.detect_files(paths, threshold=0.0, batch=2, workers=2)
    same(found, expected)
    assert all(len(d["scores"]) == 100 for d in found)


@pytest.mark.gpu
def test_gpu_preprocess_path_with_a_stand_in_engine(files):
    """The GPU path (kernel into the runner's input buffers, two buffer sets) against the CPU path, with a
    stand-in engine that downloads its input buffers and answers as NumpyDetector does."""
    from core.sidecar import Profile
    from helpers import CudaRunner

    profile = Profile((1, 320, 512), (1, 800, 800), (2, 1344, 1344))

    runner = CudaRunner(profile)  # not an EngineRunner: the GPU path takes anything with device input buffers
    expected = NumpyDetector(profile).detect([Image.open(p) for p in files], threshold=0.3, batch_size=2)
    same(runner.detect_files(files, threshold=0.3, batch=2, gpu_preprocess=True), expected)
    assert len(runner.siblings) == 1  # in_flight=2: two buffer sets


class DeviceStandIn(NumpyDetector):
    """Has the members of runtime.pipeline.DeviceRunner, without a GPU behind them."""

    stream = "a stream"
    input_pointers = (0, 0)

    def device_inputs(self, batch, height, width):
        return self.input_pointers

    def sibling(self):
        return DeviceStandIn(self.profile)

    def start_on_device(self, shape, batch=None):
        raise AssertionError("never reached without a GPU")


def test_the_gpu_path_takes_any_device_runner_and_falls_back_without_a_gpu(files, monkeypatch):
    from core.errors import Unavailable
    from runtime import gpu_preprocess, pipeline

    def no_gpu(*args, **kwargs):
        raise Unavailable("no GPU here")

    monkeypatch.setattr(gpu_preprocess, "GpuPreprocessor", no_gpu)
    detector = DeviceStandIn()
    assert isinstance(detector, pipeline.DeviceRunner) and not isinstance(NumpyDetector(), pipeline.DeviceRunner)
    # Required: accepted as a runner (not "needs a TensorRT engine runner"), then refused for the missing GPU.
    with pytest.raises(Unavailable, match=r"GPU preprocessing is unavailable \(no GPU here\)"):
        detector.detect_files(files, gpu_preprocess=True)
    # By default (None): the CPU path, with the same detections as the serial detect.
    expected = NumpyDetector().detect([Image.open(p) for p in files], threshold=0.3, batch_size=2)
    same(detector.detect_files(files, threshold=0.3, batch=2, gpu_preprocess=None), expected)
    assert isinstance(pipeline.open_path(detector, None, 2, PipelineStats()), pipeline.CpuPath)


def test_a_bad_decoder_setting_is_an_error_where_a_missing_decoder_falls_back(monkeypatch):
    """Where GPU decoding was only wanted (None) and nvImageCodec is missing, the GPU path decodes with Pillow;
    where it was required, that is the error. A wrong ANCHORTRT_GPU_DECODE_LANES is an error either way, never a
    quiet fallback to the CPU path."""
    from core.errors import BadInput
    from runtime import decode, gpu_preprocess, pipeline

    class Preprocessor:  # no GPU here: the path is only opened and closed
        def __init__(self, *args, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(gpu_preprocess, "GpuPreprocessor", Preprocessor)

    def missing():
        raise decode.DecoderUnavailable("GPU decoding needs nvImageCodec")

    monkeypatch.setattr(decode, "load_codec", missing)
    detector = DeviceStandIn()
    path = pipeline.open_path(detector, None, 2, PipelineStats(), gpu_decode=None)
    assert isinstance(path, pipeline.GpuPath) and path.decoder is None
    path.close()
    with pytest.raises(decode.DecoderUnavailable, match="needs nvImageCodec"):
        pipeline.open_path(detector, None, 2, PipelineStats(), gpu_decode=True)
    monkeypatch.setattr(decode, "load_codec", lambda: None)
    monkeypatch.setenv("ANCHORTRT_GPU_DECODE_LANES", "many")
    for gpu_decode in (None, True):
        with pytest.raises(BadInput, match="ANCHORTRT_GPU_DECODE_LANES='many'"):
            pipeline.open_path(detector, None, 2, PipelineStats(), gpu_decode=gpu_decode)


def test_synthetic_images_are_deterministic_jpegs_shared_by_every_benchmark(tmp_path):
    from runtime import bench, synthetic

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = synthetic.synthetic_images(tmp_path / "a", 3), synthetic.synthetic_images(tmp_path / "b", 3)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert len({p.read_bytes() for p in first}) == 3
    with Image.open(first[0]) as image:
        assert image.format == "JPEG" and image.size == (640, 480)
    assert bench.pipeline_files(str(tmp_path / "a"), None) == first
    assert [p.read_bytes() for p in first] == list(synthetic.synthetic_jpegs(3))  # the files are the bytes
    (small,) = synthetic.decoded_images(1, (96, 64))
    assert small.mode == "RGB" and small.size == (96, 64) and np.asarray(small).std() > 10  # not a flat colour


def test_bench_pipeline_rows_from_files_to_detections(tmp_path, files):
    import argparse

    from runtime import bench

    args = argparse.Namespace(workers=2, in_flight=2, preprocess="cpu", decode="cpu")
    row = bench.pipeline_row("numpy", NumpyDetector(), files, 2, args)
    assert row["images"] == 9 and row["batches"] == 5 and row["errors"] == 0 and row["images_per_s"] > 0
    assert set(row["stage_ms_per_image"]) == {"decode", "upload", "preprocess", "engine", "gpu", "postprocess"}


@pytest.mark.parametrize("spec, message", [
    ("synthetic:0", "expected synthetic:N with N a positive integer"),
    ("synthetic:many", "expected synthetic:N with N a positive integer"),
    ("nowhere", "not a folder; name a folder of images or synthetic:N"),
    ("EMPTY", "no image files"),
])
def test_bench_pipeline_bad_spec_is_one_line_before_any_work(tmp_path, capsys, spec, message):
    from runtime import bench

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")  # never opened: the spec is refused first
    (tmp_path / "empty").mkdir()
    spec = str(tmp_path / "empty") if spec == "EMPTY" else spec
    assert bench.main(["--pipeline", spec, "--torch-weights", str(weights), "--torch-device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_bench_compile_graphs_mode_uses_reduce_overhead_and_each_mode_sets_its_layout():
    """compile-fp16-graphs is Inductor with CUDA graphs; eager FP16 runs the model channels-last (faster convs on the
    H200), every other mode NCHW, set again at each call so that a benchmark of several modes of one model times
    each in its own layout, unless the caller chooses the layout."""
    from runtime import bench

    class Model:
        layouts = []

        def to(self, memory_format):
            self.layouts.append(memory_format)
            return self

    class FakeTorch:
        channels_last, contiguous_format = "channels_last", "contiguous"

        class backends:
            class cuda:
                class matmul:
                    allow_tf32 = None

            class cudnn:
                allow_tf32 = None

        compiled = []

        def compile(self, model, mode, dynamic):
            self.compiled.append((mode, dynamic))
            return model

    from runtime.torch_detector import torch_forward

    torch, model = FakeTorch(), Model()
    for mode in ("compile-fp16", "compile-fp16-graphs", "fp16", "fp32"):
        torch_forward(torch, model, mode)
    assert torch.compiled == [("default", False), ("reduce-overhead", False)]
    assert model.layouts == ["contiguous", "contiguous", "channels_last", "contiguous"]
    # A caller's choice (benchmarks.torch_gpu_layouts) overrides the mode's own.
    torch_forward(torch, model, "compile-fp16-graphs", channels_last=True)
    torch_forward(torch, model, "fp16", channels_last=False)
    assert model.layouts[4:] == ["channels_last", "contiguous"]
    assert "compile-fp16-graphs" in bench.TORCH_MODES and "compile-fp16-graphs" in bench.EPILOG


def test_pipeline_capacity_benchmark_reports_the_run(tmp_path, capsys):
    from benchmarks import pipeline_capacity

    out = tmp_path / "capacity.json"
    assert pipeline_capacity.main(["--images", "4", "--batch", "2", "--workers", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 4 and report["batches"] == 2 and report["stand_in"] == "CPU path, fixed raw outputs"
    assert report["stage_ms_per_image"]["preprocess"] > 0 and report["images_per_s"] > 0
    assert pipeline_capacity.main(["--batch", "33"]) == 2 and "--batch 1..32" in capsys.readouterr().err


def pipeline_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("pipeline-")]


class ClosingDetector(NumpyDetector):
    def close(self):
        self.threads_at_close = pipeline_threads()
        super().close()


def test_infer_cli_goes_through_the_pipeline_and_closes_it_before_the_runner(files, monkeypatch, capsys):
    from runtime import infer
    from core.errors import BadInput

    detector = ClosingDetector()
    monkeypatch.setattr(infer, "open_runner", lambda engine, sha: detector)
    assert infer.main([*map(str, files), "--batch", "2", "--workers", "2", "--preprocess", "cpu"]) == 0
    assert [shape[0] for shape, _ in detector.calls] == [2, 2, 2, 2, 1]
    assert detector.closed and detector.threads_at_close == []

    def fail(*args):
        raise BadInput("cannot print")

    detector = ClosingDetector()
    monkeypatch.setattr(infer, "open_runner", lambda engine, sha: detector)
    monkeypatch.setattr(infer, "print_detections", fail)
    assert infer.main([*map(str, files), "--batch", "2"]) == 2
    assert detector.closed and detector.threads_at_close == []  # no pipeline thread still using the runner
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        infer.main([str(files[0]), "--workers", "0"])
    assert exit_.value.code == 2
    assert "argument --workers: expected a positive integer, got '0'" in capsys.readouterr().err


def test_infer_cli_gpu_preprocessing_needs_an_engine_runner(files, monkeypatch, capsys):
    from runtime import infer

    monkeypatch.setattr(infer, "open_runner", lambda engine, sha: NumpyDetector())
    assert infer.main([str(files[0]), "--preprocess", "gpu"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m runtime.infer: error: GPU preprocessing needs a detector with device input buffers (an "
                   "EngineRunner, the PyTorch reference on CUDA): use CPU preprocessing (gpu_preprocess=False, "
                   "--preprocess cpu)"]


def test_eval_run_models_through_the_pipeline(files, tmp_path):
    from eval import coco

    class Model:
        name, min_hw, max_hw, max_batch = "fake", None, (96, 128), None
        description = "fake"

        def __init__(self):
            self.shapes = []

        def __call__(self, images, masks, sizes):
            from core.sidecar import Profile

            self.shapes.append(images.shape)
            numpy = NumpyDetector(Profile((1, 32, 32), (1, 64, 64), (8, 128, 128)))
            return numpy.results(numpy.infer(images, masks), sizes)

    model = Model()
    results, seconds, evaluated, skipped, decoded = coco.run_models([model], list(range(100, 109)), files, batch=4,
                                                                    workers=2)
    assert evaluated == list(range(100, 109)) and skipped == [] and decoded == {"nvimagecodec": 0, "pillow": 9}
    assert [s[0] for s in model.shapes] == [4, 4, 1] and seconds["fake"] > 0
    assert sorted({r["image_id"] for r in results["fake"]}) == list(range(100, 109))
    assert [r["image_id"] for r in results["fake"]] == sorted(r["image_id"] for r in results["fake"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    # an unreadable image is skipped (eval.coco reports it and marks the run partial), the others evaluated
    results, _, evaluated, skipped, decoded = coco.run_models([Model()], [1, 2], [files[0], broken], batch=1,
                                                              workers=1)
    assert evaluated == [1] and skipped == [str(broken)] and {r["image_id"] for r in results["fake"]} == {1}
    assert decoded == {"nvimagecodec": 0, "pillow": 1}  # the unreadable one is not counted
    assert pipeline_threads() == []


def test_bad_pipeline_arguments_are_refused_at_the_call(files):
    from core.errors import BadInput

    for options in ({"workers": 0}, {"in_flight": 0}, {"batch": 0}):
        with pytest.raises(BadInput, match="must be at least 1"):
            NumpyDetector().iter_detect(files, **options)


def _read_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("anchortrt-read")]


def test_gpu_decoding_calls_on_the_taking_thread_with_the_files_read_ahead_and_fails_in_place(files):
    """Each decode call is made on the thread that takes the batches, when it needs the call's first batch (the
    pipeline's feeder, which then preprocesses and starts them), with the files of the calls after it already being
    read. A failing call is raised at its batch's place, and no read thread is left."""
    from runtime.pipeline import device_decoded_batches

    calls, ahead, parsed = [], [], threading.Semaphore(0)

    class Decoder:
        def parse(self, items):
            parsed.release()
            return items

        def decode(self, items, names):
            calls.append(threading.current_thread().name)
            if len(calls) == 1:  # this call's files have been read, and so are the next two calls'
                ahead.append(all(parsed.acquire(timeout=5) for _ in range(3)))
            if len(calls) == 3:
                raise RuntimeError("the decoder failed on its third call")
            return [np.zeros((2, 2, 3), np.uint8) for _ in items]

    batches = device_decoded_batches(iter(files), 2, 2, False, Decoder(), PipelineStats(), group=1)
    first = next(batches)
    assert calls == ["MainThread"] and ahead == [True]
    assert [len(first.keys), len(next(batches).keys)] == [2, 2] and calls == ["MainThread"] * 2
    with pytest.raises(RuntimeError, match="third call"):
        next(batches)
    assert _read_threads() == []


def test_leaving_gpu_decoding_early_stops_its_threads(files):
    from runtime.pipeline import device_decoded_batches

    class Decoder:
        def decode(self, items, names):
            return [np.zeros((2, 2, 3), np.uint8) for _ in items]

    batches = device_decoded_batches(iter(files), 1, 2, False, Decoder(), PipelineStats(), group=1)
    assert next(batches).keys == files[:1]
    batches.close()
    assert _read_threads() == []


def test_gpu_decoding_decodes_group_batches_per_call_and_yields_them_in_order(files):
    # One decoder call per `group` batches (the hardware decoder's throughput grows with the call's size), the
    # batches still of the engine's size, in input order, the short last group included.
    from runtime.pipeline import device_decoded_batches

    calls, parsed_on = [], set()

    class Decoder:
        def parse(self, items):  # on the read threads, so that the decode call does not make the CodeStreams
            parsed_on.add(threading.current_thread().name.rpartition("_")[0])
            return [(item,) for item in items]

        def decode(self, items, names):
            calls.append(len(items))
            return [np.full((2, 2, 3), len(item) % 251, np.uint8) for (item,) in items]

    batches = list(device_decoded_batches(iter(files), 2, 2, False, Decoder(), PipelineStats(), group=3))
    assert calls == [6, 3] and parsed_on == {"anchortrt-read"}
    assert [len(b.keys) for b in batches] == [2, 2, 2, 2, 1]
    assert [k for b in batches for k in b.keys] == files
    sizes = [p.stat().st_size % 251 for p in files]
    assert [int(image[0, 0, 0]) for b in batches for image in b.images] == sizes

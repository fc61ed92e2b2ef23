"""The ensemble in a real tritonserver: `python -m serve.triton --torch-weights ... --serve` (PyTriton's binary and
Python backend), answering serve.client as serve.server does.

There is no TensorRT backend here, so the engine step is the PyTorch stand-in (serve/models/torch_stand_in.py, the
top-100 as an engine built with --postprocess emits it), on random r50_c5 weights with images scaled to fit 64x96
so a CPU forward is quick. Answers are compared with the detections runtime.infer's pipeline gives for the same
files with the same reference (`TorchReference.detect_files`).
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from helpers import assert_good_and_bad_answered_together, assert_same_detections, free_ports, ready_clients
from helpers import session_processes
from helpers import noise_image_file as encoded

MAX_SIZE = (64, 96)
MAX_PIXELS = 200 * 200
START_TIMEOUT_S = 150


# ---- the models' work without Triton (serve.models.steps) ------------------------------------------------------


def test_preprocess_checks_each_request_and_pads_the_batch_to_its_largest():
    from runtime.preprocess import preprocess_batch
    from serve.models.steps import Preprocess, RequestError

    pre = Preprocess((32, 32), MAX_SIZE, MAX_PIXELS)
    assert pre.decoder is None and pre.decoding == "Pillow"  # a CPU instance
    rows = np.array([[encoded(1, (96, 64))], [encoded(2, (60, 90), "PNG")]], dtype=object)
    (images,) = pre.requests([(rows, np.array([[0.5], [0.0]], np.float32))])
    assert [im.size for im in images] == [(96, 64), (60, 90)]
    batch, masks = pre.batch(images)
    expected, expected_masks, _ = preprocess_batch(images, exif=False, min_hw=(32, 32), max_hw=MAX_SIZE)
    assert batch.shape == (2, 3, 64, 96) and np.array_equal(batch, expected) and np.array_equal(masks, expected_masks)
    assert masks[1, :, 42:].all() and not masks[1, :, :42].any()  # the portrait image is 64x42 inside 64x96
    for image, threshold, message in ((b"", None, "empty"), (b"junk", None, "cannot decode"),
                                      (encoded(3, (201, 200)), None, "--max-pixels"),
                                      (encoded(4), np.array([[1.5]], np.float32), "outside [0, 1]")):
        (refused,) = pre.requests([(np.array([[image]], dtype=object), threshold)])
        assert isinstance(refused, RequestError) and message in str(refused)


def corrupt_jpeg(seed: int) -> bytes:
    """A JPEG whose headers parse and which ends in EOI, so it goes to the GPU decoder, with no scan data at all."""
    data = encoded(seed)
    frame = data.index(b"\xff\xc0")
    return data[: frame + 2 + int.from_bytes(data[frame + 2:frame + 4], "big")] + b"\xff\xd9"


def one_image(data: bytes, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A Triton request's inputs as anchor_detr_pre gets them: image rows of BYTES, the optional threshold."""
    return np.array([[data]], dtype=object), None if threshold is None else np.array([[threshold]], np.float32)


@pytest.mark.parametrize("whole_call_fails", [False, True])
def test_gpu_decoding_decodes_the_batch_in_one_call_and_a_bad_image_fails_alone(whole_call_fails):
    """The GPU instance's decoding with nvImageCodec's stand-in (host memory behind __cuda_array_interface__): the
    batch's JPEGs in one call, in place as device images; a JPEG the codec refuses and the other formats through
    Pillow; each bad request refused with serve.server's own message, the others decoded. If the codec call itself
    fails (`whole_call_fails`), that batch is decoded by Pillow, still each request on its own."""
    from helpers import FakeCodec, pixels_at
    from runtime.decode import BatchDecoder, DeviceImage
    from runtime.preprocess import to_rgb
    from serve.models.steps import Preprocess, RequestError
    from serve.server import HostPreprocess

    jpeg, refused, png, corrupt = encoded(1), encoded(2, (60, 90)), encoded(3, fmt="PNG"), corrupt_jpeg(4)
    big = encoded(5, (201, 200))
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("L").save(buffer, "JPEG")
    gray = buffer.getvalue()  # a grayscale JPEG: the GPU decoder makes it RGB
    codec = FakeCodec(refuse={refused} if whole_call_fails else {refused, corrupt})  # nvImageCodec fails these
    decoder = BatchDecoder(device=False, codec=codec, pillow_workers=1)
    pre = Preprocess((32, 32), MAX_SIZE, MAX_PIXELS, decoder=decoder)
    assert pre.decoding.startswith("nvImageCodec")
    requests = [one_image(jpeg, 0.5), one_image(corrupt), one_image(png), one_image(b""), one_image(refused),
                one_image(big), one_image(jpeg, 1.5), one_image(gray),
                (np.array([[jpeg], [b"junk"]], dtype=object), None)]  # two images, one bad: the request fails
    answers = pre.requests(requests)
    host = HostPreprocess(SimpleNamespace(min_hw=None, max_hw=None), MAX_PIXELS)
    for index, data in ((1, corrupt), (3, b""), (5, big), (8, b"junk")):
        with pytest.raises(RequestError) as expected:
            host.decode(data)
        same = [re.sub(r" at 0x[0-9a-f]+", "", str(e)) for e in (answers[index], expected.value)]  # Pillow's stream
        assert isinstance(answers[index], RequestError) and same[0] == same[1], index
    assert "cannot decode the image" in str(answers[1]) and "--max-pixels" in str(answers[5])
    assert isinstance(answers[6], RequestError) and "outside [0, 1]" in str(answers[6])
    # One codec call for the batch: the complete JPEGs of the requests that passed their checks, in order (the
    # two-image request failed at its second image's header, before any decoding).
    assert codec.calls == [[jpeg, corrupt, refused, gray]]
    good = {0: jpeg, 2: png, 4: refused, 7: gray}
    for index, data in good.items():
        (image,) = answers[index]
        expected = np.asarray(to_rgb(Image.open(io.BytesIO(data))))
        on_gpu = index in (0, 7) and not whole_call_fails
        assert isinstance(image, DeviceImage) == on_gpu, index
        np.testing.assert_array_equal(pixels_at(image) if on_gpu else np.asarray(image), expected)
        assert (image.height, image.width) == expected.shape[:2]  # anchor_detr_pre's original_size
    pre.close()


def test_the_decoder_is_picked_by_the_decode_parameter_and_the_instance_kind():
    from helpers import FakeCodec
    from runtime.decode import BatchDecoder
    from core.errors import BadInput, Unavailable
    from serve.models.steps import Preprocess, decoder_for

    assert decoder_for("cpu", 0) is None  # Pillow, also on a GPU instance
    assert decoder_for("auto", None) is None  # a CPU instance decodes with Pillow
    with pytest.raises(Unavailable, match="needs a GPU instance"):
        decoder_for("gpu", None)
    with pytest.raises(BadInput, match="expected one of auto, gpu, cpu"):
        decoder_for("fast", 0)
    made = decoder_for("auto", 0, codec=FakeCodec(), device=False)
    assert isinstance(made, BatchDecoder)
    made.close()

    class NoDecoder(FakeCodec):  # nvImageCodec installed, but it can make no decoder here
        def __init__(self):
            super().__init__()

            def refuse(*_args, **_kwargs):
                raise RuntimeError("no decoder")
            self.Decoder = refuse

    assert decoder_for("auto", 0, codec=NoDecoder(), device=False) is None  # Pillow then
    with pytest.raises(Unavailable, match="cannot make a decoder"):
        decoder_for("gpu", 0, codec=NoDecoder(), device=False)
    params = {"min_hw": "32x32", "max_hw": "", "max_pixels": "1000", "exif": "true"}
    assert Preprocess.from_parameters(params, None, 4).decoder is None  # a repository without the parameter: auto
    with pytest.raises(Unavailable, match="needs a GPU instance"):
        Preprocess.from_parameters({**params, "decode": "gpu"}, None, 4)


def test_answer_scales_to_each_image_thresholds_and_encodes_as_serve_server():
    from serve.models.steps import RequestError, answer

    scores = np.array([[0.9, 0.6, 0.2], [0.8, 0.1, 0.05]], np.float32)
    labels = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    boxes = np.tile(np.array([0.1, 0.2, 0.5, 1.0], np.float32), (2, 3, 1))
    sizes = np.array([[100, 200], [50, 40]], np.int32)
    names = {1: "cat", 4: "dog"}  # label 2 has no name: its number
    out = answer(scores, labels, boxes, sizes, np.array([[0.5], [0.5]], np.float32), names)
    assert out["count"].tolist() == [[2], [1]] and out["error"].tolist() == [[b""], [b""]]
    assert out["names"][0].tolist() == [b"cat", b"2"] and out["names"][1, 0] == b"dog"
    assert out["size"].tolist() == sizes.tolist() and out["labels"].dtype == np.int32
    np.testing.assert_allclose(out["boxes"][0, 0], [20, 20, 100, 100])  # x by width 200, y by height 100
    np.testing.assert_allclose(out["boxes"][1, 0], [4, 10, 20, 50])
    assert out["labels"][0].tolist() == [1, 2] and out["labels"][1, 0] == 4
    assert answer(scores, labels, boxes, sizes, None, names)["count"].tolist() == [[2], [1]]  # default threshold 0.5
    with pytest.raises(RequestError, match="outside"):
        answer(scores, labels, boxes, sizes, np.array([[0.5], [np.nan]], np.float32), names)


def test_stand_in_runs_requests_of_one_size_as_one_batch():
    from core.config import NUM_TOPK
    from serve.models.steps import EngineStandIn

    class Reference:
        batches = []

        def infer(self, images, masks):
            self.batches.append(images.shape)
            logits = np.zeros((len(images), 300, 91), np.float32)
            logits[:, 0, 7] = images.mean(axis=(1, 2, 3))  # each image's own best detection
            return {"pred_logits": logits, "pred_boxes": np.full((len(images), 300, 4), 0.5, np.float32)}

    stand_in = EngineStandIn.__new__(EngineStandIn)
    stand_in.reference = Reference()
    requests = [(np.full((1, 3, 64, 96), v, np.float32), np.zeros((1, 64, 96), bool)) for v in (1.0, 2.0)]
    requests.insert(1, (np.full((2, 3, 32, 48), 3.0, np.float32), np.zeros((2, 32, 48), bool)))
    answers = stand_in.run_many(requests)
    assert sorted(Reference.batches) == [(2, 3, 32, 48), (2, 3, 64, 96)]
    assert [len(a["scores"]) for a in answers] == [1, 2, 1]
    assert all(a["scores"].shape[1] == NUM_TOPK and a["labels"].dtype == np.int32 for a in answers)
    top = [float(a["scores"][0, 0]) for a in answers]
    assert top[0] < top[2] < top[1]  # sigmoid of 1, 2, 3: each answer is its own request's
    np.testing.assert_allclose(answers[0]["boxes"][0, 0], [0.25, 0.25, 0.75, 0.75])  # relative x0,y0,x1,y1


def dlpack_dtype(capsule) -> tuple[int, int]:
    """(type code, bits) of a legacy DLPack capsule ("dltensor", what Triton's Python backend reads)."""
    import ctypes

    class DLTensor(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
                    ("ndim", ctypes.c_int32), ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8),
                    ("lanes", ctypes.c_uint16)]

    api = ctypes.pythonapi
    api.PyCapsule_IsValid.argtypes = api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    assert api.PyCapsule_IsValid(capsule, b"dltensor")
    tensor = DLTensor.from_address(api.PyCapsule_GetPointer(capsule, b"dltensor"))  # DLManagedTensor starts with it
    return tensor.code, tensor.bits


@pytest.mark.gpu
def test_gpu_preprocess_hands_on_device_tensors_equal_to_the_cpu_path():
    """The GPU instance's path: our kernel's batch in device memory, exported through DLPack (cuda.core) with the
    dtypes and shapes Triton's Python backend maps to FP32 and BOOL; its bytes equal the CPU path's."""
    from cuda.bindings import driver

    from serve.models.steps import Preprocess, rows

    images = [Image.open(io.BytesIO(encoded(seed, size))).convert("RGB")
              for seed, size in ((1, (96, 64)), (2, (60, 90)))]
    cpu = Preprocess((32, 32), MAX_SIZE, MAX_PIXELS).batch(images)
    gpu = Preprocess((32, 32), MAX_SIZE, MAX_PIXELS, device_id=0, max_batch=4)
    batch, masks = gpu.batch(images)
    for device, host, code, bits in ((batch, cpu[0], 2, 32), (masks, cpu[1], 6, 8)):  # kDLFloat 32, kDLBool 8
        view = rows(device, 1, 2)
        assert view.__dlpack_device__()[0] == 2  # kDLCUDA
        assert tuple(view.shape) == host[1:2].shape and view.dtype == host.dtype
        assert dlpack_dtype(view.__dlpack__()) == (code, bits)
        copy = np.empty_like(host[1:2])
        (err,) = driver.cuMemcpyDtoH(copy.ctypes.data, view.ptr, copy.nbytes)
        assert int(err) == 0 and np.array_equal(copy, host[1:2])
    gpu.close()


@pytest.mark.gpu
def test_gpu_instance_decodes_with_nvimagecodec_into_the_kernel_in_place():
    """The GPU instance's real path: the batch's JPEGs decoded by nvImageCodec into device memory and read there by
    the kernel, the PNG by Pillow, the corrupt JPEG refused alone. Tolerance: 3 levels of the normalised pixels
    (nvImageCodec is within 1 level of Pillow, tests/test_gpu_decode.py, and the resize rounds each pass), on under
    1% of the values; the masks exactly."""
    pytest.importorskip("nvidia.nvimgcodec", reason="needs nvImageCodec: pip install -e '.[gpu-decode]'")
    from cuda.bindings import driver

    from runtime.decode import DeviceImage
    from runtime.preprocess import STD
    from serve.models.steps import Preprocess, RequestError

    files = [encoded(1, (96, 64)), corrupt_jpeg(2), encoded(3, (60, 90), "PNG"), encoded(4, (180, 120))]
    cpu = Preprocess((32, 32), MAX_SIZE, MAX_PIXELS)
    gpu = Preprocess((32, 32), MAX_SIZE, MAX_PIXELS, device_id=0, max_batch=4, decode="gpu")
    try:
        assert gpu.decoder is not None and gpu.decoding.startswith("nvImageCodec")
        answers = gpu.requests([one_image(data) for data in files])
        expected = cpu.requests([one_image(data) for data in files])
        assert isinstance(answers[1], RequestError) and "cannot decode the image" in str(answers[1])
        good = [answers[i][0] for i in (0, 2, 3)]
        assert [isinstance(image, DeviceImage) for image in good] == [True, False, True]
        assert [image.size for image in good] == [expected[i][0].size for i in (0, 2, 3)]
        batch, masks = gpu.batch(good)
        host_batch, host_masks = cpu.batch([expected[i][0] for i in (0, 2, 3)])
        copies = []
        for device, host in ((batch, host_batch), (masks, host_masks)):
            copy = np.empty_like(host)
            (err,) = driver.cuMemcpyDtoH(copy.ctypes.data, device.ptr, copy.nbytes)
            assert int(err) == 0
            copies.append(copy)
        assert np.array_equal(copies[1], host_masks)
        level = 1 / (255 * float(np.min(STD)))  # one level, normalised, of the channel where it is the largest step
        differ = np.abs(copies[0] - host_batch)
        assert differ.max() <= 3 * level + 1e-6 and (differ > 1e-6).mean() < 0.01
    finally:
        gpu.close()


def test_bundled_tritonserver_runs_the_models_with_this_environment(tmp_path):
    pytest.importorskip("pytriton", reason="needs PyTriton (its tritonserver): pip install -e '.[serve]'")
    import sysconfig

    from serve import triton

    launch = triton.bundled_tritonserver(tmp_path / "repo", tmp_path / "backends", http_port=1, grpc_port=2,
                                         metrics_port=3)
    python = tmp_path / "backends" / "python"
    assert sorted(p.name for p in python.iterdir()) == [
        "libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    assert os.access(python / "triton_python_backend_stub", os.X_OK)
    env = launch["env"]
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == sysconfig.get_config_var("LIBDIR")
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    # The stub ignores PYTHONPATH; its sys.path starts with its working folder: this checkout's root.
    assert (Path(launch["cwd"]) / "serve" / "models" / "steps.py").is_file()
    args = launch["args"]
    assert Path(args[0]).name == "tritonserver" and os.access(args[0], os.X_OK)
    assert args[args.index("--model-repository") + 1] == str(tmp_path / "repo")
    assert f"--backend-config=python,shm-region-prefix-name={triton.shm_prefix()}" in args
    assert [args[args.index(f"--{k}-port") + 1] for k in ("http", "grpc", "metrics")] == ["1", "2", "3"]


def test_a_model_that_fails_to_load_is_exit_3_and_leaves_nothing(tmp_path):
    pytest.importorskip("pytriton", reason="needs PyTriton (its tritonserver): pip install -e '.[serve]'")
    from helpers import save_random_weights, small_config

    from safetensors.numpy import save_file

    import weights as weights_file

    valid = save_random_weights(tmp_path / "valid.safetensors", small_config("r50_c5"))
    weights = tmp_path / "broken.safetensors"
    # our metadata (serve.triton reads the class names) over no model's tensors: the stand-in fails to load it
    save_file({"x": np.zeros(1, np.float32)}, str(weights), metadata=weights_file.read_metadata(valid))
    temp = tmp_path / "tmp"
    temp.mkdir()
    http, grpc, metrics = free_ports(3)
    process = subprocess.run(
        [sys.executable, "-m", "serve.triton", "--torch-weights", str(weights), "-o", str(tmp_path / "repo"), "--serve",
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        capture_output=True, text=True, timeout=START_TIMEOUT_S, start_new_session=True,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    assert process.returncode == 3, process.stderr[-2000:]
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m serve.triton: error: tritonserver exited with code")
    assert "before it was stopped" in last
    assert "anchor_detr_trt" in process.stderr  # Triton's log names the model that failed
    assert list(temp.iterdir()) == []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("pytriton", reason="needs PyTriton (its tritonserver): pip install -e '.[serve]'")
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[http,grpc]: pip install -e '.[serve]'")
    folder = tmp_path_factory.mktemp("ensemble")
    weights = folder / "r50_c5.safetensors"
    subprocess.run([sys.executable, "-m", "weights.extract", "--random-init", "r50_c5", "--seed", "0",
                    "-o", str(weights)], check=True, capture_output=True, timeout=120)
    temp = folder / "tmp"  # the server's TMPDIR: empty again after it stops
    temp.mkdir()
    http, grpc, metrics = free_ports(3)
    log = open(folder / "server.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "serve.triton", "--torch-weights", str(weights), "--device", "cpu",
         "--max-size", "x".join(map(str, MAX_SIZE)), "--max-pixels", str(MAX_PIXELS), "--max-batch", "4",
         "--max-queue-delay-us", "50000", "-o", str(folder / "repo"), "--serve",
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "TMPDIR": str(temp)},
    )
    clients = ready_clients(process, log, http, grpc, START_TIMEOUT_S,
                            lambda p: os.killpg(p.pid, signal.SIGKILL), "tritonserver")
    yield {"process": process, "weights": weights, "clients": clients, "log": log, "folder": folder,
           "temp": temp, "metrics": metrics}
    if process.poll() is None:  # only if the shutdown test did not run or failed
        for client in clients.values():
            client._client().close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            from serve.triton import shm_prefix

            for name in os.listdir("/dev/shm"):  # what a killed Python backend leaves
                if name.startswith(shm_prefix(process.pid)):
                    os.unlink(os.path.join("/dev/shm", name))


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """Detections of image bytes by runtime.infer's pipeline on the same reference (files, batch 1)."""
    from runtime.torch_detector import TorchReference

    model = TorchReference(server["weights"], "cpu")
    model.max_hw = MAX_SIZE  # as the stand-in's profile: scale images to fit, as runtime.infer does for an engine
    folder = tmp_path_factory.mktemp("images")

    def detect(data: bytes, threshold: float) -> dict[str, np.ndarray]:
        path = folder / f"{len(list(folder.iterdir()))}.img"
        path.write_bytes(data)
        (found,) = model.detect_files([path], threshold, batch=1, workers=1)
        return found

    yield detect
    model.close()


def test_requests_one_at_a_time_match_runtime_infer(server, reference):
    client = server["clients"]["http"]
    # Landscape, portrait (scaled to fit 64 high), and one larger than the profile (scaled down); PNG too.
    cases = ((1, (96, 64), "JPEG", 0.3), (2, (60, 90), "PNG", None), (3, (180, 120), "JPEG", 0.0))
    for seed, size, fmt, threshold in cases:
        data = encoded(seed, size, fmt)
        answer = client.detect(data, threshold)
        assert answer["size"].tolist() == [size[1], size[0]]  # boxes refer to the image as sent
        expected = reference(data, 0.5 if threshold is None else threshold)
        assert len(answer["scores"]) > 0 or len(expected["scores"]) == 0
        assert_same_detections(answer, expected)
        if threshold == 0.0:
            assert len(answer["scores"]) == 100  # the whole top-100


def test_good_and_bad_requests_batched_together(server, reference):
    client = server["clients"]["grpc"]
    jpeg = encoded(7)
    bad = {
        "not an image": (b"this is not an image", 0.5, "cannot decode"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], 0.5, "cannot decode"),
        "empty": (b"", 0.5, "empty"),
        "threshold above 1": (jpeg, 1.5, "outside [0, 1]"),
        "too many pixels": (encoded(3, size=(201, 200)), 0.5, "--max-pixels"),
    }
    good = [(encoded(100 + i), 0.2 + 0.1 * i) for i in range(4)]  # one size: batching cannot change the padding
    assert_good_and_bad_answered_together(client, good, bad, reference, also="anchor_detr")
    # The good ones were batched with each other and the bad ones: Triton's statistics say so.
    stats = server["clients"]["http"]._client().get_inference_statistics("anchor_detr_pre")["model_stats"][0]
    assert stats["execution_count"] < stats["inference_count"]
    assert isinstance(client.detect(encoded(9), 0.5), dict)  # still serving


def test_metrics_port_answers_prometheus(server):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert 'nv_inference_request_success{model="anchor_detr"' in text


def test_sigterm_stops_cleanly_without_leftovers(server):
    # Last in this module: it stops the shared server.
    from serve.triton import EXIT_TIMEOUT_S, shm_prefix

    process = server["process"]
    # Triton waits for open HTTP keep-alive connections for up to its exit timeout, which leaves the models none
    # of it to unload in: a client that is done says so, as a load balancer draining a pod does.
    for client in server["clients"].values():
        client._client().close()
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=90) == 0
    assert time.monotonic() - started < EXIT_TIMEOUT_S + 30
    deadline = time.monotonic() + 10
    while session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_processes(process.pid) == []
    assert list(server["temp"].iterdir()) == []
    assert [name for name in os.listdir("/dev/shm") if name.startswith(shm_prefix(process.pid))] == []
    server["log"].seek(0)
    log = server["log"].read()
    assert "Traceback" not in log and "serving anchor_detr" in log
    assert re.search(r"anchor_detr_pre instance \S+: decoding with Pillow", log)  # a CPU instance says its decoder

"""serve.server / serve.client: a real Triton server (PyTriton) serving the PyTorch reference on loopback.

The server tests start `python -m serve.server --torch-weights` on random r50_c5 weights with small images and
compare every answer with a direct reference call (same preprocessing, TorchReference, post-processing).
"""

from __future__ import annotations

import io
import math
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from runtime.detector import Detector, above
from serve import server as serve

MAX_SIZE = (64, 96)  # --max-size: images are scaled to fit it, so the CPU forward takes milliseconds
MAX_PIXELS = 100 * 100
START_TIMEOUT_S = 120
ENCODERS = {"jpeg": "JPEG", "png": "PNG"}


def encoded(seed: int, size=(96, 64), fmt="PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


# ---- without a server: the answer encoding and the missing-PyTriton error -----------------------------------


def test_encode_pads_to_one_row_and_counts():
    found = {"scores": np.array([0.9, 0.7], np.float32), "labels": np.array([1, 3], np.int32),
             "boxes": np.ones((2, 4), np.float32), "size": np.array([64, 96])}
    none = {"scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int32), "boxes": np.zeros((0, 4), np.float32),
            "size": np.array([10, 20])}
    out = serve._encode([found, none, "bad image"])
    assert out["count"].tolist() == [[2], [0], [0]]
    assert out["scores"].shape == (3, 2) and out["boxes"].shape == (3, 2, 4) and out["labels"].dtype == np.int32
    assert out["size"].tolist() == [[64, 96], [10, 20], [0, 0]]
    assert out["error"][:, 0].tolist() == [b"", b"", b"bad image"]
    empty = serve._encode([none])  # zero detections still give a (1, 1) array: (1, 0) fails inside PyTriton
    assert empty["scores"].shape == (1, 1) and empty["count"].tolist() == [[0]]


class FakeDetector(Detector):
    """In-engine top-2 outputs, the first box the whole image; records the batches it was given (as an engine
    would get them)."""

    min_hw, max_hw, max_batch = (32, 32), (64, 96), 3

    def __init__(self):
        self.batches = []

    def infer(self, images, masks):
        self.batches.append((images.shape, masks.copy()))
        batch = len(images)
        return {"scores": np.tile(np.float32([0.9, 0.2]), (batch, 1)), "labels": np.tile(np.int64([18, 1]), (batch, 1)),
                "boxes": np.tile(np.float32([[0, 0, 1, 1], [0.5, 0, 1, 1]]), (batch, 1, 1))}


def test_infer_function_batches_good_rows_and_answers_bad_ones_alone():
    detector = FakeDetector()
    infer = serve.InferFunction(detector, serve.HostPreprocess(detector, MAX_PIXELS), max_batch=3)
    small = encoded(1, size=(40, 40))  # resized to 64x64 within the 64x96 maximum
    requests = [
        {"image": np.array([[encoded(0)]], object)},  # default threshold 0.5
        {"image": np.array([[b"junk"]], object), "threshold": np.array([[0.1]], np.float32)},
        {"image": np.array([[small], [encoded(2)]], object), "threshold": np.array([[0.1], [0.5]], np.float32)},
        {"image": np.array([[encoded(3)]], object), "threshold": np.array([[-0.5]], np.float32)},
        {"image": np.array([[encoded(4)]], object)},
    ]
    answers = infer(requests)
    assert [a["count"].ravel().tolist() for a in answers] == [[1], [0], [2, 1], [0], [1]]
    assert answers[1]["error"][0, 0].startswith(b"cannot decode") and answers[3]["error"][0, 0].startswith(b"threshold")
    assert answers[2]["size"].tolist() == [[40, 40], [64, 96]]
    assert answers[2]["labels"].dtype == np.int32 and answers[2]["labels"][0].tolist() == [18, 1]
    np.testing.assert_array_equal(answers[2]["boxes"][0, 0], [0, 0, 40, 40])  # in the image's own pixels
    # Four good rows in batches of at most 3, each padded to its largest image, the small one masked.
    assert [shape for shape, _ in detector.batches] == [(3, 3, 64, 96), (1, 3, 64, 96)]
    masks = detector.batches[0][1]
    assert not masks[1, :, :64].any() and masks[1, :, 64:].all()


class FakeTriton:
    """Stands in for pytriton.triton: each Triton() is one server start; bind fails for the first `failures`."""

    def __init__(self, failures):
        self.failures, self.starts, self.stops, self.served = failures, 0, 0, 0
        fake = self

        class Triton:
            def __init__(self, config):
                fake.starts += 1

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                fake.stops += 1

            def bind(self, **model):
                if fake.starts <= fake.failures:
                    raise RuntimeError("[400] load failed for model 'anchor_detr'\nConnectionRefusedError")

            def serve(self):
                fake.served += 1

        self.Triton = Triton


def test_a_failed_load_starts_triton_again_then_gives_up(capsys):
    lucky = FakeTriton(failures=serve.LOAD_ATTEMPTS - 1)
    serve.serve_until_stopped(lucky, None, {}, "serving")
    assert (lucky.starts, lucky.stops, lucky.served) == (serve.LOAD_ATTEMPTS, serve.LOAD_ATTEMPTS, 1)
    assert "serving" in capsys.readouterr().out
    hopeless = FakeTriton(failures=serve.LOAD_ATTEMPTS)
    with pytest.raises(serve.Unavailable, match="could not load anchor_detr .*load failed"):
        serve.serve_until_stopped(hopeless, None, {}, "serving")
    assert hopeless.starts == hopeless.stops == serve.LOAD_ATTEMPTS and hopeless.served == 0


def test_serve_without_pytriton_is_one_line_exit_3(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytriton", None)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert serve.main(["--torch-weights", str(weights)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs PyTriton" in err[0] and "[serve]" in err[0]


def test_serve_bad_arguments_are_exit_2(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    assert serve.main(["--torch-weights", str(weights), "--http-port", "8001"]) == 2  # same as --grpc-port
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it while parsing
        serve.main(["--torch-weights", str(weights), "--instances", "0"])
    assert exit_.value.code == 2
    assert serve.main(["--engine", str(weights), "--max-size", "64x96"]) == 2
    assert serve.main(["--engine", str(tmp_path / "missing.plan")]) == 2  # before PyTriton is even looked for
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error:" in line]  # not argparse's usage
    assert len(err) == 4 and all(line.startswith("python -m serve.server: error: ") for line in err), err


# ---- a real server --------------------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _session_processes(sid: int) -> list[int]:
    """Processes still in the server's session (Triton and its Python backend stubs join it)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("pytriton", reason="needs PyTriton: pip install -e '.[serve]'")
    pytest.importorskip("tritonclient.http", reason="needs tritonclient[http,grpc]: pip install -e '.[serve]'")
    pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[http,grpc]: pip install -e '.[serve]'")
    from serve.client import Client

    folder = tmp_path_factory.mktemp("serve")
    weights = folder / "r50_c5.safetensors"
    subprocess.run([sys.executable, "-m", "weights.extract", "--random-init", "r50_c5", "-o", str(weights)],
                   check=True, capture_output=True, timeout=120)
    http, grpc, metrics = _free_ports(3)
    log = open(folder / "server.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "serve.server", "--torch-weights", str(weights), "--device", "cpu",
         "--max-size", "x".join(map(str, MAX_SIZE)), "--max-pixels", str(MAX_PIXELS), "--instances", "2",
         "--max-batch", "4", "--max-queue-delay-us", "20000",
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    # Generous per-request timeouts: 2 shared cores can queue a request behind a dozen CPU forwards.
    clients = {"http": Client(f"127.0.0.1:{http}", timeout=300),
               "grpc": Client(f"127.0.0.1:{grpc}", grpc=True, timeout=300)}
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            clients["http"].check_ready()
            break
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log.seek(0)
                pytest.fail(f"server did not become ready:\n{log.read()[-3000:]}")
            time.sleep(0.5)
    yield {"process": process, "weights": weights, "clients": clients, "log": log}
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)  # only if the shutdown test did not run or failed
        process.wait()


@pytest.fixture(scope="module")
def reference(server):
    from runtime.torch_detector import TorchReference

    model = TorchReference(server["weights"], "cpu", min_hw=(32, 32), max_hw=MAX_SIZE)
    prep = serve.HostPreprocess(model, MAX_PIXELS)

    def detect(data: bytes, threshold: float = serve.DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
        (found,) = model(*prep.batch([prep.decode(data)]))
        return above(found, threshold)

    return detect


def assert_same(answer, expected, score_tol=1e-4, box_tol=1e-2):
    """Equal up to float rounding. Batched and single-image forwards differ in the last bits, which reorders
    detections whose scores tie within that (random weights have many) and can swap which of them makes the
    top-100 cut; so each detection must match a reference one of the same label, score and box, and only
    those at the cut's score may be without a partner."""
    assert len(answer["scores"]) == len(expected["scores"])
    np.testing.assert_allclose(answer["scores"], expected["scores"], rtol=0, atol=score_tol)  # both sorted
    unused = list(range(len(expected["scores"])))
    unmatched = []
    for score, label, box in zip(answer["scores"], answer["labels"], answer["boxes"]):
        match = next((j for j in unused if expected["labels"][j] == label
                      and abs(expected["scores"][j] - score) <= score_tol
                      and np.allclose(expected["boxes"][j], box, rtol=0, atol=box_tol)), None)
        if match is None:
            unmatched.append(score)
        else:
            unused.remove(match)
    if unmatched:
        cut = min(expected["scores"].min(), answer["scores"].min())
        assert max(unmatched) - cut <= score_tol, f"{len(unmatched)} detections differ from the reference"


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_concurrent_requests_match_the_reference(server, reference, protocol):
    client = server["clients"][protocol]
    images = [encoded(seed, fmt="PNG" if seed % 2 else "JPEG") for seed in range(16)]
    thresholds = [None if i % 4 == 0 else i / 20 for i in range(16)]  # None: the server's default 0.5
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(client.detect, images, thresholds))
    for data, threshold, answer in zip(images, thresholds, answers):
        assert answer["size"].tolist() == [64, 96]
        assert_same(answer, reference(data, serve.DEFAULT_THRESHOLD if threshold is None else threshold))


@pytest.mark.slow
def test_zero_detections_answer_with_no_rows(server):
    answer = server["clients"]["http"].detect(encoded(1), threshold=1.0)
    assert answer["scores"].shape == (0,) and answer["boxes"].shape == (0, 4)


@pytest.mark.slow
def test_bad_requests_fail_alone_and_the_server_keeps_serving(server, reference):
    from serve.client import RequestFailed

    client = server["clients"]["grpc"]
    jpeg = encoded(7, fmt="JPEG")
    bad = {
        "not an image": (b"this is not an image", 0.5, "cannot decode"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], 0.5, "cannot decode"),
        "empty": (b"", 0.5, "empty"),
        "threshold above 1": (jpeg, 1.5, "outside [0, 1]"),
        "threshold nan": (jpeg, math.nan, "outside [0, 1]"),
        "too many pixels": (encoded(3, size=(101, 100)), 0.5, "--max-pixels"),
    }
    good = [(encoded(100 + i, fmt="JPEG"), 0.3) for i in range(8)]
    jobs = [("good", data, t, None) for data, t in good] + [(name, *spec) for name, spec in bad.items()]
    jobs = jobs[::2] + jobs[1::2]  # bad ones spread among good ones, all in flight together

    def send(job):
        try:
            return client.detect(job[1], job[2])
        except RequestFailed as exc:
            return str(exc)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, jobs))
    for (name, data, threshold, message), answer in zip(jobs, answers):
        if name == "good":
            assert isinstance(answer, dict), answer
            assert_same(answer, reference(data, threshold))
        else:
            assert isinstance(answer, str) and message in answer, (name, answer)

    # Wrong dtype and shape are refused by Triton itself, before the model sees them.
    module = client.module
    as_float = module.InferInput("image", [1, 1], "FP32")
    as_float.set_data_from_numpy(np.zeros((1, 1), np.float32))
    two = module.InferInput("image", [1, 2], "BYTES")
    two.set_data_from_numpy(np.array([[jpeg, jpeg]], dtype=object))
    from tritonclient.utils import InferenceServerException

    for inputs in ([as_float], [two]):
        with pytest.raises(InferenceServerException):
            client._client().infer(serve.MODEL_NAME, inputs)
    client.check_ready()
    assert_same(client.detect(jpeg), reference(jpeg))


@pytest.mark.slow
def test_client_cli_prints_table_and_coco_json(server, reference, tmp_path, capsys):
    from serve import client as client_cli

    paths = []
    for i in range(2):
        path = tmp_path / f"{1000 + i}.png"
        path.write_bytes(encoded(50 + i))
        paths.append(path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    url = server["clients"]["http"].url
    out = tmp_path / "results.json"
    code = client_cli.main([*map(str, paths + [broken]), "--url", url, "--threshold", "0.2", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and "broken.jpg: refused by the server: cannot decode" in captured.err
    import json

    records = json.loads(out.read_text())
    expected = [reference(p.read_bytes(), 0.2) for p in paths]
    assert len(records) == sum(len(e["scores"]) for e in expected)
    assert {r["image_id"] for r in records} == {1000, 1001}
    assert f"{paths[0]}  96x64  {len(expected[0]['scores'])} detections" in captured.out


def test_client_without_server_is_exit_3(capsys):
    pytest.importorskip("tritonclient.http", reason="needs tritonclient[http,grpc]: pip install -e '.[serve]'")
    from serve import client as client_cli

    (port,) = _free_ports(1)
    assert client_cli.main(["x.jpg", "--url", f"127.0.0.1:{port}"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Triton server answers" in err[0]


@pytest.mark.slow
def test_serve_load_levels_count_requests(server, capsys):
    from benchmarks import serve_load

    row = serve_load.load_level(server["clients"]["http"], encoded(5, fmt="JPEG"), 3, 5, 60)
    assert row["requests"] == 5 and row["errors"] == 0 and row["rps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    bad = serve_load.load_level(server["clients"]["grpc"], b"junk", 2, 3, 60)
    assert bad["requests"] == 0 and bad["errors"] == 3 and "cannot decode" in capsys.readouterr().err


def test_serve_load_and_client_bad_arguments(capsys):
    from benchmarks import serve_load
    from serve import client as client_cli

    for main, args in ((serve_load.main, ["--requests", "0"]), (client_cli.main, ["a.jpg", "--concurrency", "0"]),
                       (client_cli.main, ["a.jpg", "--threshold", "1.5"])):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
    assert serve_load.main(["--warmup", "-1"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error:" in line]
    assert [line.split(": error: ")[0] for line in err] == [
        "python -m benchmarks.serve_load", "python -m serve.client", "python -m serve.client",
        "python -m benchmarks.serve_load"]


@pytest.mark.slow
def test_sigterm_stops_cleanly_without_leftovers(server):
    # Last in this module: it stops the shared server.
    process = server["process"]
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert time.monotonic() - started < serve.EXIT_TIMEOUT_S + 15
    deadline = time.monotonic() + 10
    while _session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_processes(process.pid) == []
    server["log"].seek(0)
    assert "Traceback" not in server["log"].read()

"""Helpers shared by several test files (test files never import each other; they import from here).

tests/ is on sys.path through the rootdir conftest, so a test file says `from helpers import ...`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import io
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageOps

from core.config import AnchorDETRConfig
from core.sidecar import Profile
from runtime.preprocess import MEAN, STD
from runtime.detector import ProfileDetector

# ---------------------------------------------------------------------------------------------- expectations


def raises_unless(ok: bool, error: type[BaseException], match: str):
    """Nothing when ``ok``, else ``pytest.raises(error, match=match)``: one body for parameters that pass and fail."""
    return contextlib.nullcontext() if ok else pytest.raises(error, match=match)


# ---------------------------------------------------------------------------------------------- CLIs


def run_cli(cli_main, argv, capsys):
    """(exit code, stdout, stderr) of a CLI's main(argv)."""
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_main(argv, capsys):
    """run_cli on the build CLI (python -m netdef.build)."""
    from netdef.build import main

    return run_cli(main, argv, capsys)


SMALL_PROFILE = ["--min", "64x64", "--opt", "96x128", "--max", "128x160", "--batch", "1,1,2"]


def save_random_weights(path: Path, cfg) -> Path:
    import weights
    from weights import naming

    weights.save(path, cfg, naming.to_builder(weights.random_state_dict(cfg, 0), cfg), source="random-init")
    return path


# ---------------------------------------------------------------------------------------------- networks


def small_config(variant: str = "r50_dc5", **changes) -> AnchorDETRConfig:
    return dataclasses.replace(AnchorDETRConfig.from_variant(variant), enc_layers=2, dec_layers=2, **changes)


@functools.cache
def official_state_dict(cfg: AnchorDETRConfig, seed: int = 0):
    """Random peaked weights in the official layout (weights.random_state_dict), torch tensors."""
    from weights.random_init import random_state_dict

    return random_state_dict(cfg, seed)


@functools.cache
def builder_tensors(cfg: AnchorDETRConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """official_state_dict in builder naming (BN folded, projections sliced), float32 numpy."""
    from weights.naming import to_builder

    return {k: v.numpy() for k, v in to_builder(official_state_dict(cfg, seed), cfg).items()}


def define(trt, cfg: AnchorDETRConfig, tensors=None, **options):
    """A network definition of AnchorDETR: (builder, network, keepalive), all three to keep referenced."""
    from netdef.build import _creation_flags
    from core.backend import backend_of
    from netdef.network import define_network

    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    network = builder.create_network(_creation_flags(backend_of(trt)))
    keep = define_network(trt, network, cfg, builder_tensors(cfg) if tensors is None else tensors, **options)
    return builder, network, keep


# ---------------------------------------------------------------------------------------------- plugin wiring
class _TwoOutputs:
    """Stands in for a two-output plugin layer (mask2pos) built from native layers."""

    num_outputs = 2

    def __init__(self, *outputs):
        self.outputs, self.name = outputs, ""

    def get_output(self, i):
        return self.outputs[i]


def native_plugins(trt, cfg, monkeypatch):
    """Replace each plugin's add_layer by the native sub-graph with the plugin's documented contract, so the
    plugin path's wiring (which tensors, masks, biases, scales go where) is checked on TensorRT-RTX."""
    import plugins.add_bias_transpose
    from netdef import network as N
    from netdef.functional import Net
    import plugins.layer_norm
    import plugins.mask2pos
    import plugins.masked_softmax
    from core.backend import Backend

    counter = iter(range(10**6))

    def fake_net(network, like=None):
        """Verbs on the same network computing in `like`'s dtype; names under a fresh prefix."""
        return Net(trt, network, fp16=like is not None and like.dtype == trt.float16), f"fake{next(counter)}"

    def last_layer(network):
        return network.get_layer(network.num_layers - 1)

    def masked_softmax(trt_, network, logits, key_mask):
        net, p = fake_net(network, logits)
        ctx = N.BuildContext(net, cfg, {})
        N._masked_softmax(ctx, logits, N.KeyMask(key_mask, net.unsqueeze(key_mask, (1, 2), f"{p}.mask4")),
                          f"{p}.softmax")
        return last_layer(network)

    def layer_norm(trt_, network, x, gamma, beta, eps):
        net, p = fake_net(network)
        net.layer_norm(x, gamma, beta, f"{p}.ln", eps)
        return last_layer(network)

    def add_bias_transpose(trt_, network, x, bias, heads, scale):
        net, p = fake_net(network)
        y = net.mul(net.add(x, bias, f"{p}.bias"), np.float32(scale), f"{p}.scale")
        net.shuffle(y, f"{p}.heads", dims=(0, 0, heads, -1), second=(0, 2, 1, 3))
        return last_layer(network)

    def mask2pos(trt_, network, mask, d):
        net, p = fake_net(network)
        ctx = N.BuildContext(net, cfg, {})
        pos_col, pos_row = N.mask2pos(ctx, mask)
        return _TwoOutputs(N.pos2posemb1d(ctx, pos_col, f"{p}.col"), N.pos2posemb1d(ctx, pos_row, f"{p}.row"))

    monkeypatch.setattr(Backend, "plugin_problem", lambda self, numpy_version=None: None)
    for module, fake in ((plugins.masked_softmax, masked_softmax), (plugins.layer_norm, layer_norm),
                         (plugins.add_bias_transpose, add_bias_transpose), (plugins.mask2pos, mask2pos)):
        monkeypatch.setattr(module, "add_layer", fake)


# ---------------------------------------------------------------------------------------------- a stand-in engine

LABEL_OF_CHANNEL = (1, 3, 17)  # red -> person, green -> car, blue -> cat
QUERIES = 10


class NumpyDetector(ProfileDetector):
    """Stands in for the engine: answers AnchorDETR's I/O from the pixels it receives (the label is the brightest
    channel of the valid region, the box its centre half), so a test sees whether the right pixels and masks
    reached the network and whether boxes come back in each original image's coordinates."""

    def __init__(self, profile=Profile((1, 320, 512), (1, 800, 800), (2, 1344, 1344)), engine_postprocess=False):
        self.profile = profile
        self.engine_postprocess = engine_postprocess
        self.calls = []
        self.closed = False

    def infer(self, images, masks):
        images, masks = self.fit_profile(images, masks)
        self.calls.append((images.shape, masks.copy()))
        batch = images.shape[0]
        logits = np.full((batch, QUERIES, 91), -10.0, dtype=np.float32)
        boxes = np.tile(np.float32([0.5, 0.5, 0.25, 0.25]), (batch, QUERIES, 1))
        for b in range(batch):
            valid = ~masks[b]
            means = [(images[b, c][valid] * STD[c] + MEAN[c]).mean() for c in range(3)]
            logits[b, 0, LABEL_OF_CHANNEL[int(np.argmax(means))]] = 4.0
            boxes[b, 0] = (0.5, 0.5, 0.5, 0.5)
        if not self.engine_postprocess:
            return {"pred_logits": logits, "pred_boxes": boxes}
        scores = 1 / (1 + np.exp(-logits.reshape(batch, -1)))
        top = np.argsort(-scores, axis=1, kind="stable")[:, :100]
        cx, cy, w, h = np.moveaxis(np.take_along_axis(boxes, top[..., None] // 91, 1), -1, 0)
        return {
            "scores": np.take_along_axis(scores, top, 1).astype(np.float32),
            "labels": (top % 91).astype(np.int32),
            "boxes": np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1),
        }

    def close(self):
        self.closed = True


class CudaRunner(NumpyDetector):
    """A runtime.pipeline.DeviceRunner that is not an EngineRunner (`gpu` tests): device input buffers for its
    profile's largest batch and a stream of its own; its engine downloads the buffers and answers as
    NumpyDetector does. `siblings` are the extra buffer sets it made."""

    def __init__(self, profile=Profile((1, 320, 512), (1, 800, 800), (2, 1344, 1344))):
        from core import cuda

        super().__init__(profile)
        cuda.init()
        self.stream = cuda.Stream()
        b, h, w = profile.max
        self._images, self._masks = cuda.DeviceBuffer(b * 3 * h * w * 4), cuda.DeviceBuffer(b * h * w)
        self.siblings = []

    def sibling(self):
        self.siblings.append(CudaRunner(self.profile))
        return self.siblings[-1]

    @property
    def input_pointers(self):
        return self._images.ptr, self._masks.ptr

    def device_inputs(self, batch, height, width):
        return self.input_pointers

    def start_on_device(self, shape, batch=None):
        b, h, w = shape
        images, masks = np.empty((b, 3, h, w), np.float32), np.empty((b, h, w), bool)
        self._images.download(images, self.stream)
        self._masks.download(masks, self.stream)

        def finish():
            self.stream.synchronize()
            return {k: v[:batch] for k, v in NumpyDetector(self.profile).infer(images, masks).items()}

        return finish


def solid(width, height, channel):
    color = [30, 30, 30]
    color[channel] = 220
    return Image.new("RGB", (width, height), tuple(color))



# ---------------------------------------------------------------------------------------------- servers


def free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def session_processes(sid: int) -> list[int]:
    """Live processes of session `sid` (a server started with start_new_session, its Triton and the stubs)."""
    import os

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


def ready_clients(process, log, http: int, grpc: int, start_timeout: float, kill, what: str) -> dict:
    """serve.client Clients over HTTP and gRPC of the server `process` started, once it answers. Generous
    per-request timeouts: 2 shared cores can queue a request behind a dozen CPU forwards. If it exits or does not
    answer within `start_timeout` seconds, `kill(process)` and the test fails with the end of its `log`."""
    import time

    import pytest

    from serve.client import Client

    clients = {"http": Client(f"127.0.0.1:{http}", timeout=300),
               "grpc": Client(f"127.0.0.1:{grpc}", grpc=True, timeout=300)}
    deadline = time.monotonic() + start_timeout
    while True:
        try:
            clients["http"].check_ready()
            return clients
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                kill(process)
                log.seek(0)
                pytest.fail(f"{what} did not become ready:\n{log.read()[-4000:]}")
            time.sleep(0.5)


def assert_same_detections(answer, expected, score_tol=1e-4, box_tol=1e-2):
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


# ---------------------------------------------------------------------------------------------- host memory for the device


class HostMemory:
    """Host memory standing in for a device or pinned buffer: the kernel built for the CPU reads it directly."""

    def __init__(self, size: int, dtype=np.uint8) -> None:
        self.array = np.zeros(max(int(size), 1), dtype)[: int(size)]
        self.size, self.nbytes, self.ptr = int(size), self.array.nbytes, self.array.ctypes.data
        self.closed = False

    def view(self, shape):
        return self.array[: int(np.prod(shape))].reshape(shape)

    def upload(self, host: np.ndarray, stream) -> None:
        assert host.flags.c_contiguous and host.nbytes <= self.nbytes
        self.array.view(np.uint8)[: host.nbytes] = host.view(np.uint8).reshape(-1)

    def download(self, host: np.ndarray, stream) -> None:
        host.view(np.uint8).reshape(-1)[:] = self.array.view(np.uint8)[: host.nbytes]

    def close(self) -> None:
        self.closed = True


class Ordered:
    """A stream or event: work runs at once on the CPU, so these only record that they were used and closed."""

    handle = 0

    def __init__(self, timing: bool = True) -> None:
        self.closed = False

    def record(self, stream) -> None:
        pass

    def wait(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


# ---------------------------------------------------------------------------------------------- the GPU kernel built for the CPU

CXX = shutil.which("g++") or shutil.which("c++")
NO_CXX = "needs a C++ compiler (g++) to build the kernel for the CPU"

SHIM = r"""
#include <algorithm>
#include <cstddef>
using std::max;
using std::min;
struct Index3 { unsigned x, y, z; };
static Index3 blockIdx, blockDim, threadIdx;
#define __device__
#define __forceinline__ inline
#define __global__
#define __restrict__
#define __launch_bounds__(...)
#define __stcs(p, v) (*(p) = (v))
struct float2 { float x, y; };
struct uchar2 { unsigned char x, y; };
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline uchar2 make_uchar2(unsigned char x, unsigned char y) { return {x, y}; }
"""

DRIVER = r"""
static void grid(unsigned gx, unsigned gy, unsigned gz, void (*thread)(void*), void* arg) {
    blockDim = {BLOCK_X, BLOCK_Y, 1};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned by = 0; by < gy; ++by)
            for (unsigned bx = 0; bx < gx; ++bx)
                for (unsigned ty = 0; ty < BLOCK_Y; ++ty)
                    for (unsigned tx = 0; tx < BLOCK_X; ++tx) {
                        blockIdx = {bx, by, z};
                        threadIdx = {tx, ty, 0};
                        thread(arg);
                    }
}
struct Second { const Slot* slots; const float* normalised; float* images; bool* masks; int height, width; };
static void first_thread(void* arg) { first_pass((const Slot*)arg); }
static void second_thread(void* arg) {
    const Second* a = (const Second*)arg;
    second_pass(a->slots, a->normalised, a->images, a->masks, a->height, a->width);
}
extern "C" void run_first(unsigned gx, unsigned gy, unsigned gz, const Slot* slots) {
    grid(gx, gy, gz, first_thread, (void*)slots);
}
extern "C" void run_second(unsigned gx, unsigned gy, unsigned gz, const Slot* slots, const float* normalised,
                           float* images, bool* masks, int height, int width) {
    Second a = {slots, normalised, images, masks, height, width};
    grid(gx, gy, gz, second_thread, &a);
}
"""


def build_kernel_for_cpu(folder: Path, **overrides: int) -> dict:
    """Compile runtime/preprocess.cu with CXX behind SHIM and DRIVER into `folder`: its two kernels by name, each
    called as (grid x, y, z, slots, *args) and looping over the whole grid on the calling thread. `overrides`
    replace kernel_defines() values that leave the grid as it is (PAIRED)."""
    from plugins.nvrtc import format_define
    from runtime.gpu_preprocess import BLOCK, KERNEL_SOURCE, kernel_defines

    source = folder / "preprocess_cpu.cpp"
    source.write_text(SHIM + KERNEL_SOURCE.read_text() + DRIVER)
    defines = {"BLOCK_X": BLOCK[0], "BLOCK_Y": BLOCK[1], **kernel_defines(), **overrides}
    library = folder / "preprocess_cpu.so"
    subprocess.run([CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
                    *(format_define(k, v) for k, v in defines.items()), str(source), "-o", str(library)],
                   check=True, capture_output=True, timeout=120)
    lib = ctypes.CDLL(str(library))
    grid = [ctypes.c_uint] * 3
    lib.run_first.argtypes = [*grid, ctypes.c_void_p]
    lib.run_second.argtypes = [*grid, *[ctypes.c_void_p] * 4, ctypes.c_int, ctypes.c_int]
    return {"first_pass": lib.run_first, "second_pass": lib.run_second}


class HostRunner(NumpyDetector):
    """A DeviceRunner (not an EngineRunner) whose "device" input buffers are host memory: its engine is
    NumpyDetector's answer from what the kernels wrote there. Records its runs and whether it was closed."""

    def __init__(self, profile=None):
        super().__init__(*([profile] if profile else []))
        b, h, w = self.profile.max
        self._images, self._masks = HostMemory(b * 3 * h * w, np.float32), HostMemory(b * h * w, bool)
        self.runs, self.stream, self.last_sibling = [], Ordered(), None

    @property
    def input_pointers(self):
        return self._images.ptr, self._masks.ptr

    def device_inputs(self, batch, height, width):
        return self.input_pointers

    def sibling(self):
        self.last_sibling = HostRunner(self.profile)
        return self.last_sibling

    def start_on_device(self, shape, batch=None):
        b, h, w = shape
        self.runs.append((tuple(shape), batch))
        outputs = {k: v[:batch] for k, v in self.infer(self._images.view((b, 3, h, w)).copy(),
                                                       self._masks.view((b, h, w)).copy()).items()}
        return lambda: outputs

    def close(self):
        self.closed = True


def host_runner(profile=None) -> HostRunner:
    """A HostRunner for `profile` (NumpyDetector's default profile without one)."""
    return HostRunner(profile)


def assert_good_and_bad_answered_together(client, good, bad, reference, also: str = "") -> None:
    """Send every good (data, threshold) and bad {name: (data, threshold, message)} request at once, the bad ones
    spread among the good ones; each good answer must be the reference's detections, each bad one an error that
    says its message (and `also`)."""
    from concurrent.futures import ThreadPoolExecutor

    from serve.client import RequestFailed

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
            assert_same_detections(answer, reference(data, threshold))
        else:
            assert isinstance(answer, str) and message in answer and also in answer, (name, answer)


def noise_image_file(seed: int, size=(96, 64), fmt="JPEG") -> bytes:
    """An encoded image of random pixels, `size` (width, height): the same file for the same seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- GPU decoding


class FakeCodeStream:
    """nvImageCodec's CodeStream of a file's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class FakeCodec:
    """nvImageCodec's surface as BatchDecoder uses it: decodes bytes or CodeStreams with Pillow into host arrays
    exposed through __cuda_array_interface__ (pitched rows, as a decoder may give), refuses files named in
    `refuse`. `calls`: each call's files (bytes); `parsed`: how many of each call's came as CodeStreams."""

    def __init__(self, refuse: set[bytes] = frozenset()) -> None:
        self.refuse, self.calls, self.parsed = refuse, [], []
        self.CodeStream = FakeCodeStream
        self.Backend = lambda kind: kind
        self.BackendKind = SimpleNamespace(HW_GPU_ONLY="hw", HYBRID_CPU_GPU="hybrid", CPU_ONLY="cpu")
        self.NVIMGCODEC_DEVICE_CPU_ONLY = -99
        self.DecodeParams = lambda apply_exif_orientation: SimpleNamespace(exif=apply_exif_orientation)
        codec = self

        class Decoder:
            def __init__(self, device_id, backends):
                codec.made = (device_id, backends)

            def decode(self, data, params, cuda_stream=0):
                raw = [d.data if isinstance(d, FakeCodeStream) else d for d in data]
                codec.calls.append(raw)
                codec.parsed.append(sum(isinstance(d, FakeCodeStream) for d in data))
                return [None if d in codec.refuse else FakeImage(d, params.exif) for d in raw]

        self.Decoder = Decoder


class FakeImage:
    def __init__(self, data: bytes, exif: bool) -> None:
        image = Image.open(io.BytesIO(data))
        rgb = np.asarray((ImageOps.exif_transpose(image) if exif else image).convert("RGB"))
        self.rows = np.zeros((rgb.shape[0], rgb.shape[1] * 3 + 5), np.uint8)  # 5 spare bytes per row
        self.rows[:, : rgb.shape[1] * 3] = rgb.reshape(rgb.shape[0], -1)
        self.__cuda_array_interface__ = {"shape": rgb.shape, "typestr": "|u1", "strides": (self.rows.shape[1], 3, 1),
                                         "data": (self.rows.ctypes.data, False), "version": 3}

    def cpu(self):
        h, w, _ = self.__cuda_array_interface__["shape"]
        return self.rows[:, : w * 3].reshape(h, w, 3)


def fake_gpu_decoding(monkeypatch, refuse: set[bytes] = frozenset()) -> FakeCodec:
    """GPU decoding by the stand-in nvImageCodec on its CPU backend (Pillow's pixels, refusing the files in
    `refuse`): runtime.decode's `load_codec` and `BatchDecoder` replaced. Returns the codec; its `exif` lists the
    EXIF setting of each BatchDecoder made."""
    from runtime import decode

    codec, real = FakeCodec(refuse), decode.BatchDecoder
    codec.exif = []

    def made(exif=True):
        codec.exif.append(exif)
        return real(exif=exif, device=False, codec=codec)

    monkeypatch.setattr(decode, "load_codec", lambda: codec)
    monkeypatch.setattr(decode, "BatchDecoder", made)
    return codec


def pixels_at(image) -> np.ndarray:
    """The RGB pixels a DeviceImage points to (host memory with the stand-in codec)."""
    raw = (ctypes.c_uint8 * (image.pitch * image.height)).from_address(image.ptr)
    rows = np.frombuffer(raw, np.uint8).reshape(image.height, image.pitch)
    return rows[:, : image.width * 3].reshape(image.height, image.width, 3)

"""Image decoding for the GPU path: each batch's JPEGs in one nvImageCodec call, straight into device memory.

`BatchDecoder.decode(items)` takes a batch of encoded files (bytes, or the ImageError of a file that could not
be read) and returns, in order, a `DeviceImage` (RGB uint8 on the device, EXIF orientation applied unless
exif=False, grayscale already RGB), a Pillow image, or an `ImageError`. nvImageCodec gets the files it decodes
as the CPU path would: baseline or progressive JPEGs of 8 bits with 1 or 3 components, complete (ending in
EOI). Everything else (PNG, 16-bit, palette, alpha, CMYK/YCCK JPEGs, truncated files, anything nvImageCodec
refuses) is decoded by Pillow, that image alone, so the caller's `to_rgb` gives it the CPU path's pixels; a file
neither can decode is that file's ImageError, never its batch's.

nvImageCodec runs on the hardware JPEG decoder where the GPU has one (A100, H100, H200), else the CUDA decoder
(Huffman on the CPU, the rest on the GPU). Its pixels differ from Pillow's (libjpeg-turbo) by a level here and
there (docs/preprocess.md measures this, and its effect on detections); Pillow decoding stays the exact path.
It comes with the `gpu-decode` extra: `pip install -e '.[gpu-decode]'`.
"""

from __future__ import annotations

import io
import queue
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image

from core.errors import BadInput, Unavailable
from runtime.preprocess import ImageError, load_image

GPU_DECODE_HINT = "pip install -e '.[gpu-decode]' (nvidia-nvimgcodec-cu13 and nvidia-nvjpeg)"
# The command lines' --decode choices as `gpu_decode` values: None = GPU decoding where it can run.
DECODE = {"auto": None, "gpu": True, "cpu": False}
_DECODE_CHOICES = {
    "auto": "nvImageCodec into device memory where it is installed (the `gpu-decode` extra), else Pillow",
    "gpu": "nvImageCodec, required",
    "cpu": "Pillow, the exact path: GPU decoding moves pixels by a level here and there, docs/preprocess.md",
}


class DecoderUnavailable(Unavailable):
    """nvImageCodec is not installed, or cannot make a decoder on this machine: GPU decoding falls back to Pillow
    where it was not required (`batch_decoder(None)`), and is this error where it was."""


def add_decode_option(parser: Any, default: str = "auto", where: str = "", note: str = "") -> None:
    """The one `--decode auto|gpu|cpu` option of every command line (runtime.infer, runtime.bench --pipeline,
    eval.coco, serve.server): `where` opens its help, `note` ends it; `DECODE[args.decode]` is its `gpu_decode`."""
    choices = "; ".join(f"{k}{' (default)' if k == default else ''}: {v}" for k, v in _DECODE_CHOICES.items())
    text = (f"{where}where JPEG files are decoded when the GPU path preprocesses: {choices}. Other formats always "
            f"go through Pillow{'; ' + note if note else ''}")
    parser.add_argument("--decode", choices=tuple(DECODE), default=default, help=text.replace("%", "%%"))


class DeviceImage(NamedTuple):
    """An RGB uint8 image in device memory: `height` rows of width x 3 bytes, `pitch` bytes apart, kept alive by
    `owner` (the decoder's image, with what it needs alive: the decoder and the stream it was decoded on), complete
    once `ready` (a core.cuda.Event on the decoder's stream) has happened: a reader's stream waits for it."""

    ptr: int
    height: int
    width: int
    pitch: int
    owner: Any
    ready: Any = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow's Image.size."""
        return self.width, self.height

    def to_pil(self) -> Image.Image:
        """The pixels downloaded into a Pillow image (for drawing and keep_images)."""
        if self.ready is not None:
            self.ready.synchronize()
        return Image.fromarray(np.asarray(self.owner[0].cpu()), "RGB")


def read_file(path: str | Path) -> bytes | ImageError:
    """A file's bytes, or the ImageError naming why it cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return ImageError(f"{path}: no such file")
    except OSError as exc:
        return ImageError(f"{path}: cannot read image ({exc})")


# Start-of-frame markers of the JPEG processes nvImageCodec decodes as libjpeg does: baseline, extended and
# progressive Huffman (not lossless, not arithmetic-coded).
_SOF = {0xC0, 0xC1, 0xC2}
_OTHER_SOF = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(marker, bits per sample, components) of a JPEG's frame header, or None if `data` is not a JPEG whose
    header parses (markers are walked from SOI; nothing beyond the header is read)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        if marker in _SOF or marker in _OTHER_SOF:
            if at + 10 > len(data):
                return None
            return marker, data[at + 4], data[at + 9]
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a valid JPEG
            return None
        at += 2 + length
    return None


def gpu_decodable(data: bytes) -> bool:
    """Whether nvImageCodec should decode this file: a complete 8-bit Huffman JPEG, grayscale or YCbCr/RGB."""
    frame = jpeg_frame(data)
    if frame is None:
        return False
    marker, bits, components = frame
    return marker in _SOF and bits == 8 and components in (1, 3) and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


_BACKENDS = {"hw": "HW_GPU_ONLY", "hybrid": "HYBRID_CPU_GPU", "gpu": "GPU_ONLY", "cpu": "CPU_ONLY"}
DEFAULT_DECODERS = "hw,hybrid"


class Parsed(NamedTuple):
    """A JPEG's bytes with nvImageCodec's CodeStream of them (`BatchDecoder.parse`)."""

    data: bytes
    stream: Any


def _raw(item: Any) -> Any:
    """An item's bytes, whether parsed or not (anything else as it is)."""
    return item.data if isinstance(item, Parsed) else item


def gpu_decoders(spec: str | None = None) -> list[tuple[str, ...]]:
    """The GPU decoders to try in turn, from `spec` (default `$ANCHORTRT_GPU_DECODERS`, else "hw,hybrid"):
    comma-separated decoders, each one or more '+'-joined nvImageCodec backends (hw: the hardware JPEG decoder,
    hybrid: the CUDA decoder with Huffman decoding on the CPU, gpu: the CUDA decoder). A decoder after the first is
    made only when one before it refuses an image."""
    import os

    spec = spec if spec is not None else os.environ.get("ANCHORTRT_GPU_DECODERS", DEFAULT_DECODERS)
    plan = [tuple(k.strip() for k in part.split("+")) for part in spec.split(",") if part.strip()]
    unknown = [k for kinds in plan for k in kinds if k not in _BACKENDS or k == "cpu"]
    if not plan or unknown:
        raise BadInput(f"ANCHORTRT_GPU_DECODERS={spec!r}: expected decoders like 'hw,hybrid' of "
                       f"{', '.join(k for k in _BACKENDS if k != 'cpu')}")
    return plan


def _pillow(data: bytes, name: str) -> Image.Image | ImageError:
    try:
        return load_image(io.BytesIO(data))
    except ImageError as exc:  # load_image names the stream; name the file instead
        return ImageError(f"{name}: {str(exc).split(': ', 1)[-1]}")


def load_codec():
    """nvImageCodec's Python module, or DecoderUnavailable with the install command."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        raise DecoderUnavailable(f"GPU decoding needs nvImageCodec: {GPU_DECODE_HINT}; or decode with Pillow "
                                 "(--decode cpu, gpu_decode=False)") from None
    return nvimgcodec


class _Decoders:
    """nvImageCodec decoders and the stream they decode on, shared by every image they decoded. On the GPU they
    are made once per (device, decoder plan, lane) and kept for the life of the process (`_shared`): on the H200 a
    process crashed when a pipeline's decoders were destroyed and another pipeline made new ones (twice in a row
    a second `detect_stream` with GPU decoding), so they are never destroyed; `lock` lets one decode at a time."""

    def __init__(self, stream: Any) -> None:
        self.decoders: list = []
        self.stream = stream
        self.lock = threading.Lock()


_shared: dict[tuple, _Decoders] = {}
_shared_lock = threading.Lock()


DEFAULT_LANES = 1


def decode_lanes(value: str | int | None = None) -> int:
    """How many decode calls run side by side, each on decoders of its own (default `$ANCHORTRT_GPU_DECODE_LANES`,
    else DEFAULT_LANES)."""
    import os

    value = value if value is not None else os.environ.get("ANCHORTRT_GPU_DECODE_LANES", DEFAULT_LANES)
    try:
        lanes = int(value)
    except ValueError:
        lanes = 0
    if not 1 <= lanes <= 16:
        raise BadInput(f"ANCHORTRT_GPU_DECODE_LANES={value!r}: expected a whole number of decode lanes, 1 to 16")
    return lanes


class BatchDecoder:
    """nvImageCodec decoders on the current CUDA device: the hardware decoder, then the CUDA decoder (or the CPU
    backend with `device=False`, for tests and machines without a GPU). `decode` may be called from `lanes`
    threads at once: each call takes a lane of its own (decoders and a stream), waiting for one to be free.

    `codec` is nvImageCodec's module (a stand-in in tests). `pillow_workers` threads decode the files that go to
    Pillow."""

    def __init__(self, exif: bool = True, device: bool = True, codec: Any = None, pillow_workers: int = 4,
                 lanes: int | None = None) -> None:
        self.codec = codec if codec is not None else load_codec()
        n = self.codec
        self.device = device
        self.lanes = decode_lanes(lanes)
        if device:
            from core import cuda

            self._gpu = cuda.current_device()
            self._index = self._gpu.index
            self._plan = gpu_decoders()
            with _shared_lock:
                self._kept = []
                for lane in range(self.lanes):
                    key = (self._index, tuple(self._plan), id(self.codec), lane)
                    if key not in _shared:
                        _shared[key] = _Decoders(cuda.Stream())
                    self._kept.append(_shared[key])
        else:
            self._index, self._plan = n.NVIMGCODEC_DEVICE_CPU_ONLY, [("cpu",)]
            self._kept = [_Decoders(None) for _ in range(self.lanes)]  # each held by every image it decoded
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._problems: list[str] = []
        for lane in self._kept:
            with lane.lock:
                if not any(self._decoder(lane, turn) is not None for turn in range(len(self._plan))):
                    raise DecoderUnavailable(f"nvImageCodec cannot make a decoder here "
                                             f"({'; '.join(self._problems)}); decode with Pillow (--decode cpu, "
                                             "gpu_decode=False)")
            self._free.put(lane)
        self._params = n.DecodeParams(apply_exif_orientation=exif)
        self._pool = ThreadPoolExecutor(max_workers=pillow_workers, thread_name_prefix="anchortrt-pillow")
        self.counts = {"gpu": 0, "pillow": 0, "refused": 0}
        self._counted = threading.Lock()

    def parse(self, items: Sequence[bytes | ImageError]) -> list:
        """The items with each JPEG that goes to nvImageCodec as a `Parsed`, its CodeStream made here, on the
        caller's thread (the pipeline's read threads). Made inside the decode call, each CodeStream waited there for
        the GIL (py-spy --native on the H200), on the thread the whole GPU path waits for."""
        parsed = []
        for item in items:
            if isinstance(item, bytes) and gpu_decodable(item):
                try:
                    item = Parsed(item, self.codec.CodeStream(item))
                except Exception:  # nvImageCodec cannot parse it: Pillow decodes it, or says what is wrong
                    pass
            parsed.append(item)
        return parsed

    def decode(self, items: Sequence[bytes | Parsed | ImageError], names: Sequence[str] | None = None) -> list:
        """DeviceImage (or, on the CPU backend, an (H, W, 3) uint8 array), Pillow image or ImageError per item:
        file bytes, or `parse`'s items."""
        names = list(names) if names is not None else [f"image {i}" for i in range(len(items))]
        out: list = list(items)
        # Items that came through `parse` were chosen there: a JPEG left as bytes is one nvImageCodec could not
        # parse, and a call gets CodeStreams only or bytes only.
        parsed = any(isinstance(item, Parsed) for item in items)
        gpu = [i for i, item in enumerate(items)
               if isinstance(item, Parsed) or (not parsed and isinstance(item, bytes) and gpu_decodable(item))]
        lane = self._free.get()
        try:
            with lane.lock:
                todo = self._decode_gpu(lane, items, out, gpu)
        finally:
            self._free.put(lane)
        pillow = [i for i, item in enumerate(out) if isinstance(item, (bytes, Parsed))]
        with self._counted:
            self.counts["gpu"] += len(gpu)
            self.counts["pillow"] += len(pillow)
            self.counts["refused"] += len(todo)
        for i, image in zip(pillow, self._pool.map(lambda i: _pillow(_raw(items[i]), names[i]), pillow)):
            out[i] = image
        return out

    def _decode_gpu(self, lane: _Decoders, items: Sequence, out: list, gpu: list[int]) -> list[int]:
        """Decode items[gpu] into `out` with the lane's decoders in turn; returns the positions all of them refused.

        The host does not wait for the pixels: an event recorded on the lane's stream after the call goes with
        each image, and the stream that reads it waits for that event on the GPU (GpuPreprocessor.place). Waiting
        here held the decode stage for the whole device-side decode of every call."""
        todo = gpu
        for turn in range(len(self._plan)):  # each decoder gets what those before it refused
            decoder = self._decoder(lane, turn) if todo else None
            if decoder is None:
                continue
            kwargs = {"cuda_stream": lane.stream.handle} if lane.stream is not None else {}
            sources = [item.stream if isinstance(item, Parsed) else item for item in (items[i] for i in todo)]
            decoded = decoder.decode(sources, params=self._params, **kwargs)
            ready = None
            if lane.stream is not None:
                from core import cuda

                self._gpu.activate()  # decode runs on the pipeline's feeder thread, where no context may be current yet
                ready = cuda.Event(timing=False)
                ready.record(lane.stream)
            for i, image in zip(todo, decoded):
                wrapped = self._wrap(image, lane, ready)
                if wrapped is not None:
                    out[i] = wrapped
            todo = [i for i in todo if isinstance(out[i], (bytes, Parsed))]
        return todo

    def _decoder(self, lane: _Decoders, turn: int) -> Any:
        """The `turn`-th decoder of the plan in `lane`, made when first needed (None where it cannot be made, e.g.
        no hardware decoder on this GPU)."""
        while len(lane.decoders) <= turn:
            kinds = [getattr(self.codec.BackendKind, _BACKENDS[k]) for k in self._plan[len(lane.decoders)]]
            try:
                made = self.codec.Decoder(device_id=self._index, backends=[self.codec.Backend(k) for k in kinds])
            except Exception as exc:
                self._problems.append(f"{'+'.join(self._plan[len(lane.decoders)])}: {exc}")
                made = None
            lane.decoders.append(made)
        return lane.decoders[turn]

    def _wrap(self, image: Any, lane: _Decoders, ready: Any) -> Any:
        """The decoded image as a DeviceImage (or host array); the bytes again, for Pillow, if it is not RGB uint8."""
        if image is None:
            return None
        try:
            cai = image.__cuda_array_interface__
        except (AttributeError, RuntimeError):  # a host image (the CPU backend) has only __array_interface__
            cai = None
        interface = cai if cai is not None else getattr(image, "__array_interface__", None)
        if interface is None:
            return None
        shape, strides = tuple(interface["shape"]), interface.get("strides")
        if len(shape) != 3 or shape[2] != 3 or interface["typestr"] != "|u1" or (strides and strides[1:] != (3, 1)):
            return None
        if cai is None:
            return np.asarray(image)
        pitch = strides[0] if strides else shape[1] * 3
        return DeviceImage(int(interface["data"][0]), int(shape[0]), int(shape[1]), int(pitch), (image, lane), ready)

    def close(self) -> None:
        """Stop the Pillow threads and let go of the decoders (on the GPU they stay, shared, for the next one)."""
        self._pool.shutdown(wait=True)
        self._kept = []

    def __enter__(self) -> "BatchDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batch_decoder(gpu_decode: bool | None, exif: bool = True, **options: Any) -> BatchDecoder | None:
    """A BatchDecoder when GPU decoding is asked for (True: required, its absence a DecoderUnavailable) or by
    default (None) when nvImageCodec is installed and makes a decoder; else None (Pillow). A bad
    `ANCHORTRT_GPU_DECODERS` or `ANCHORTRT_GPU_DECODE_LANES` is a BadInput either way. `options` go to
    BatchDecoder."""
    if gpu_decode is False:
        return None
    try:
        return BatchDecoder(exif=exif, **options)
    except DecoderUnavailable:
        if gpu_decode:
            raise
        return None

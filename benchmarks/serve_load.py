"""Load a running ``serve.server`` server: requests/s and p50/p99 latency at several concurrencies.

    python -m serve.server --torch-weights W.safetensors --device cpu --max-size 64x96 &
    python -m benchmarks.serve_load --size 96x64 --concurrency 1,4,16,64 --requests 128

Each level is a closed loop: N threads (one tritonclient client each) send the same encoded image back to back
until the level's request count is reached or --max-seconds pass. Latency is per request as the client sees it
(encode, network, queueing, decode, preprocessing, inference, answer); requests/s is completed requests over the
level's wall time. A refused request counts as an error and is left out of the latency.
Exit codes: 0 ok, 1 some requests failed, 2 bad arguments, 3 no server at --url.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from core.progress import print_table
from core.cli import guarded, hw, int_list, positive_float, positive_int
from runtime.synthetic import synthetic_jpegs
from serve.client import Client, RequestFailed
from core.errors import BadInput


def load_level(client: Client, data: bytes, concurrency: int, requests: int, max_seconds: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    remaining = [requests]
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] == 0 or time.perf_counter() > deadline:
                    return
                remaining[0] -= 1
            started = time.perf_counter()
            try:
                client.detect(data)
            except RequestFailed as exc:
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000 if latencies else (float("nan"),) * 2
    if errors:
        print(f"concurrency {concurrency}: {len(errors)} failed, first: {errors[0]}", file=sys.stderr)
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "rps": len(latencies) / wall, "p50_ms": p50, "p99_ms": p99}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="server host:port (default localhost:8000, or localhost:8001 with --grpc)")
    p.add_argument("--grpc", action="store_true", help="use gRPC instead of HTTP")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--image", type=Path, help="image file to send (default: a synthetic JPEG of --size)")
    source.add_argument("--size", type=hw, default=(480, 640), metavar="HxW",
                        help="synthetic JPEG size, height x width (default 480x640)")
    p.add_argument("--concurrency", type=int_list, default=[1, 4, 16, 64], metavar="C,...",
                   help="requests in flight, one level each (default 1,4,16,64)")
    p.add_argument("--requests", type=positive_int, default=128, metavar="N", help="requests per level (default 128)")
    p.add_argument("--timeout", type=positive_float, default=600.0, metavar="S",
                   help="seconds one request may take before it counts as failed (default 600: a deep queue on a "
                   "slow model is measured, not cut off)")
    p.add_argument("--warmup", type=int, default=4, metavar="N", help="untimed requests first (default 4)")
    p.add_argument("--max-seconds", type=positive_float, default=120.0, metavar="S",
                   help="stop a level after this many seconds (default 120)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.warmup < 0:
        raise BadInput(f"--warmup {args.warmup}: must be at least 0")
    if args.image is not None:
        try:
            data = args.image.read_bytes()
        except OSError as exc:
            raise BadInput(f"--image {args.image}: cannot read ({exc.strerror or exc})") from None
    else:
        data = next(synthetic_jpegs(1, args.size[::-1]))  # (width, height)
    client = Client(args.url, args.grpc, args.timeout)
    client.check_ready()
    for _ in range(args.warmup):
        client.detect(data)
    rows = [load_level(client, data, c, args.requests, args.max_seconds) for c in args.concurrency]
    print_table(
        [[r["concurrency"], r["requests"], r["errors"], f"{r['rps']:.2f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}"]
         for r in rows],
        ["concurrency", "requests", "errors", "req/s", "p50 ms", "p99 ms"],
    )
    return 1 if any(r["errors"] for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    return guarded(p.prog, run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the plugin kernels against their PyTorch equivalents (eager and torch.compile) at the shapes of an
800x800 image (stride-16 feature map 50x50: 2500 encoder queries, 900 decoder queries, 256 channels, 8 heads).

Run from the repository root on a machine with an NVIDIA GPU:

    python -m benchmarks.plugins_bench --out plugins_bench.json

Times are per call. "GPU" times replay a CUDA graph of back-to-back calls, so they hold the kernels' time without
Python or launch overhead; "wall" times are a plain Python loop (what eager code pays, launches included).
Every call reads its own copy of the inputs (the copies together exceed the L2 cache) and keeps its output, so
GB/s is DRAM traffic: the bytes each call must read and write at least, over its GPU time. As the ceiling for
tensors this small (a few MB: launch and ramp-up are not negligible), each case also times a plain device copy that
reads and writes the same number of bytes, the same way.
Exit codes: 0 ok, 1 some case failed (recorded in the JSON), 2 bad arguments, 3 no GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from core.progress import ProgressBar, print_table

# Peak DRAM bandwidth (GB/s, vendor figures) by device-name fragment, most specific first; a GPU not listed is
# measured against its own device copy (copy_gbps) only.
PEAK_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),
             ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0),
             ("L4", 300.0), ("RTX 4090", 1008.0))
L2_BYTES = 50 * 2**20
H = W = 50
CHANNELS, HEADS = 256, 8


def peak_gbps(device_name: str) -> float | None:
    """The peak DRAM bandwidth of a device from PEAK_GBPS, None for one not in the table."""
    return next((gbps for fragment, gbps in PEAK_GBPS if fragment in device_name), None)


def derived(row: dict, hbm_gbps: float | None) -> dict:
    """Bandwidths and speed-ups of a measured row; each speed-up compares like with like (GPU with GPU time,
    wall with wall time)."""
    out = {"ours_gbps": row["bytes"] / row["ours_gpu_us"] / 1e3, "copy_gbps": row["bytes"] / row["copy_gpu_us"] / 1e3,
           "speedup_vs_eager_gpu": row["eager_gpu_us"] / row["ours_gpu_us"],
           "speedup_vs_eager_wall": row["eager_wall_us"] / row["ours_wall_us"]}
    if hbm_gbps:
        out["ours_hbm_fraction"] = out["ours_gbps"] / hbm_gbps
    if "compile_gpu_us" in row:
        out["speedup_vs_compile_gpu"] = row["compile_gpu_us"] / row["ours_gpu_us"]
    return out


def cases(torch, batch: int, dtype):
    """(name, inputs factory, ours, eager equivalent, minimum bytes moved per call)."""
    from reference import plugins as ref

    dev = "cuda"
    size = torch.finfo(dtype).bits // 8
    scale = (CHANNELS // HEADS) ** -0.5

    def feature_mask():
        mask = torch.ones(batch, H, W, dtype=torch.bool, device=dev)
        for i in range(batch):
            mask[i, : H - 3 * i, : W - 5 * i] = False
        return mask

    def softmax_inputs(queries):
        return lambda: (torch.randn(batch, HEADS, queries, W, device=dev).mul(8).to(dtype),
                        feature_mask()[:, 0, :].contiguous())

    def ln_inputs(queries):
        def make():
            return (torch.randn(batch, queries, CHANNELS, device=dev).to(dtype),
                    torch.randn(CHANNELS, device=dev), torch.randn(CHANNELS, device=dev))
        return make

    def softmax_eager(logits, key_mask):
        return torch.softmax(logits.masked_fill(key_mask[:, None, None, :], float("-inf")), dim=-1)

    def ln_eager(x, gamma, beta):
        return torch.nn.functional.layer_norm(x, (CHANNELS,), gamma.to(dtype), beta.to(dtype), 1e-5)

    def abt_eager(x, bias):
        b, q, c = x.shape
        return ((x + bias.to(dtype)) * scale).view(b, q, HEADS, c // HEADS).transpose(1, 2).contiguous()

    fp16 = dtype == torch.float16
    softmax_bytes = lambda q: batch * HEADS * q * W * size * 2 + batch * W  # noqa: E731
    ln_bytes = lambda q: batch * q * CHANNELS * size * 2 + 2 * CHANNELS * 4  # noqa: E731
    return [
        ("masked_softmax enc (B,8,2500,50)", softmax_inputs(H * W), ref.run_masked_softmax, softmax_eager,
         softmax_bytes(H * W)),
        ("masked_softmax dec (B,8,900,50)", softmax_inputs(900), ref.run_masked_softmax, softmax_eager,
         softmax_bytes(900)),
        ("layer_norm enc (B,2500,256)", ln_inputs(H * W), ref.run_layer_norm, ln_eager, ln_bytes(H * W)),
        ("layer_norm dec (B,900,256)", ln_inputs(900), ref.run_layer_norm, ln_eager, ln_bytes(900)),
        ("add_bias_transpose (B,2500,256)",
         lambda: (torch.randn(batch, H * W, CHANNELS, device=dev).to(dtype), torch.randn(CHANNELS, device=dev)),
         lambda x, bias: ref.run_add_bias_transpose(x, bias, HEADS, scale), abt_eager,
         batch * H * W * CHANNELS * size * 2 + CHANNELS * 4),
        ("mask2pos (B,50,50) d=256", lambda: (feature_mask(),),
         lambda mask: ref.run_mask2pos(mask, CHANNELS, fp16=fp16),
         lambda mask: ref.mask2pos(mask, CHANNELS, fp16=fp16),
         batch * H * W + batch * (H + W) * CHANNELS * size),
    ]


def gpu_time_us(torch, fn, inputs, iters: int, replays: int) -> float:
    """Median per-call time of a CUDA graph holding `iters` calls, each on its own input copy."""
    keep = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture wants
        for args in inputs[:2]:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            keep.append(fn(*inputs[i % len(inputs)]))  # kept: every call writes fresh memory
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iters)
    del graph, keep
    return sorted(times)[len(times) // 2]


def wall_time_us(torch, fn, inputs, iters: int) -> float:
    for args in inputs[:2]:
        fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(iters):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / iters


def max_error(torch, a, b) -> float:
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    return max(float((x.float() - y.float()).nan_to_num(0).abs().max()) for x, y in zip(a, b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.plugins_bench",
        description="Time the plugin kernels against eager PyTorch and torch.compile at 800x800-image shapes.",
    )
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default 1 4)")
    p.add_argument("--dtype", nargs="+", choices=["fp32", "fp16"], default=["fp32", "fp16"])
    p.add_argument("--compile-batch", type=int, nargs="*", default=[1],
                   help="batch sizes that also time torch.compile (default 1; compiling takes seconds per case)")
    p.add_argument("--iters", type=int, default=100, help="calls per timing (default 100)")
    p.add_argument("--replays", type=int, default=5, help="timed graph replays, median reported (default 5)")
    p.add_argument("--time-budget", type=float, default=300.0,
                   help="seconds after which torch.compile is skipped for the remaining cases (default 300)")
    args = p.parse_args(argv)
    if args.iters < 1 or args.replays < 1 or min(args.batch) < 1:
        p.error("--iters, --replays and --batch must be positive")

    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible to PyTorch; run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 3
    began = time.perf_counter()
    device = torch.cuda.get_device_name()
    hbm_gbps = peak_gbps(device)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    plan = [(b, d) for b in args.batch for d in args.dtype]
    total = len(plan) * 6
    results, failures = [], 0
    with ProgressBar(total, "plugins") as bar:
        for batch, dname in plan:
            for name, make, ours, eager, nbytes in cases(torch, batch, dtypes[dname]):
                bar.set(bar.done, status=f"{name} b{batch} {dname}")
                row = {"case": name, "batch": batch, "dtype": dname, "bytes": nbytes}
                try:
                    copies = max(2, math.ceil(3 * L2_BYTES / nbytes))
                    inputs = [make() for _ in range(min(copies, args.iters))]
                    row["max_abs_diff_vs_eager"] = max_error(torch, ours(*inputs[0]), eager(*inputs[0]))
                    row["ours_gpu_us"] = gpu_time_us(torch, ours, inputs, args.iters, args.replays)
                    row["ours_wall_us"] = wall_time_us(torch, ours, inputs, args.iters)
                    row["eager_gpu_us"] = gpu_time_us(torch, eager, inputs, args.iters, args.replays)
                    row["eager_wall_us"] = wall_time_us(torch, eager, inputs, args.iters)
                    sources = [(torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda"),) for _ in inputs]
                    row["copy_gpu_us"] = gpu_time_us(torch, lambda src: src.clone(), sources, args.iters, args.replays)
                    if batch in args.compile_batch and time.perf_counter() - began < args.time_budget:
                        compiled = torch.compile(eager, dynamic=False)
                        row["compile_gpu_us"] = gpu_time_us(torch, compiled, inputs, args.iters, args.replays)
                    row.update(derived(row, hbm_gbps))
                except Exception as exc:  # one failing case must not lose the others
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    failures += 1
                results.append(row)
                bar.update(1)
                if args.out:  # written after every case so that a timeout keeps what was measured
                    with open(args.out, "w") as f:
                        json.dump({"device": device, "torch": torch.__version__, "hbm_gbps": hbm_gbps,
                                   "iters": args.iters, "replays": args.replays, "results": results}, f, indent=1)
    print_results(device, results)
    return 1 if failures else 0


def print_results(device: str, results) -> None:
    def fmt(row, key, spec):
        return format(row[key], spec) if key in row else "-"

    print(f"device: {device}; times in us per call (GPU = CUDA-graph replay, wall = Python loop)")
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["case"], r["batch"], r["dtype"], "ERROR " + r["error"][:80]])
            continue
        rows.append([r["case"], r["batch"], r["dtype"], fmt(r, "ours_gpu_us", ".2f"), fmt(r, "ours_wall_us", ".2f"),
                     fmt(r, "eager_gpu_us", ".2f"), fmt(r, "eager_wall_us", ".2f"), fmt(r, "compile_gpu_us", ".2f"),
                     fmt(r, "ours_gbps", ".0f"), fmt(r, "ours_hbm_fraction", ".0%"), fmt(r, "copy_gbps", ".0f"),
                     fmt(r, "speedup_vs_eager_gpu", ".2f"), fmt(r, "speedup_vs_compile_gpu", ".2f")])
    print_table(rows, ["case", "B", "dtype", "ours GPU", "ours wall", "eager GPU", "eager wall", "compile", "GB/s",
                       "%HBM", "copy GB/s", "x eager", "x compile"])


if __name__ == "__main__":
    sys.exit(main())

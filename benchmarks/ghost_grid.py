"""The ghost kernel's launch order and tile settings on a GPU (H100 results in results/h100-2026-11-24-ghost-*.json).

    python benchmarks/ghost_grid.py --out ghost.json

Compares the kernel's flat grid (a sample's lower-triangle tile pairs next to each other, the batch slowest) with
the earlier 3-D grid (B, ni, ni) that put the batch fastest, at the benchmark's layer shapes, and times tile / step
/ warp variants of the flat kernel and of the split-feature kernel (GPT-2's 50257-word output layer). Every
variant is checked against the default kernel's norms. GPU time: 10 calls in a CUDA graph, median of 20 replays.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

from groupclip.kernels import triton_ops as T

SHAPES = [("vit-qkv", 128, 197, 768, 2304), ("vit-proj", 128, 197, 768, 768), ("vit-fc1", 128, 197, 768, 3072),
          ("vit-fc2", 128, 197, 3072, 768), ("g256-qkv", 64, 256, 768, 2304), ("g256-fc1", 64, 256, 768, 3072),
          ("g256-proj", 64, 256, 768, 768), ("g1024-fc1", 16, 1024, 768, 3072), ("g1024-qkv", 16, 1024, 768, 2304)]
#: (tile, bk, warps, stages) of the flat kernel; None: its default
VARIANTS = [(128, None, 8, None), (128, 64, 8, 3), (128, 32, 8, 3), (128, 16, 8, 6), (64, 64, 4, 3), (64, 64, 4, 4),
            (64, 32, 4, 4), (64, 128, 4, 3), (64, 64, 8, 3)]
#: (programs, bk, warps, stages) of the split-feature kernel
WIDE_VARIANTS = [(1024, 64, 8, None), (1024, 32, 8, 4), (2048, 32, 8, 4), (1024, 64, 4, 3), (1024, 32, 4, 4),
                 (4096, 64, 8, None)]


@triton.jit
def _batch_fastest_kernel(a_ptr, g_ptr, out_ptr, T_, DA, DG, sa_b, sa_t, sa_d, sg_b, sg_t, sg_d, NI,
                          BI: tl.constexpr, BK: tl.constexpr, FP32: tl.constexpr, TF32: tl.constexpr):
    """The earlier launch order: program (b, i, j) on a (B, ni, ni) grid; upper-triangle programs store 0."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    j = tl.program_id(2)
    total = 0.0
    if j <= i:
        ti = i * BI + tl.arange(0, BI)
        tj = j * BI + tl.arange(0, BI)
        acc_a = T._gram_tile(a_ptr, sa_b, sa_t, sa_d, b, ti, tj, ti < T_, tj < T_, DA, BI, BI, BK, FP32, TF32)
        acc_g = T._gram_tile(g_ptr, sg_b, sg_t, sg_d, b, ti, tj, ti < T_, tj < T_, DG, BI, BI, BK, FP32, TF32)
        total = T._pair_sum(acc_a * acc_g, ti, tj, i, j)
    tl.store(out_ptr + b * NI * NI + i * NI + j, total)


def batch_fastest(a, g, tile=128):
    bsz, t, da = a.shape
    ni = triton.cdiv(t, tile)
    out = torch.empty((bsz, ni * ni), device=a.device, dtype=torch.float32)
    fp32 = a.dtype == torch.float32
    _batch_fastest_kernel[(bsz, ni, ni)](a, g, out, t, da, g.shape[2], *a.stride(), *g.stride(), ni, BI=tile,
                                         BK=64, FP32=fp32, TF32=bool(torch.backends.cuda.matmul.allow_tf32),
                                         num_warps=8, num_stages=3 if fp32 else 4)
    return out


def gpu_ms(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / 10)
    return statistics.median(ts)


def timed(fn, ref):
    """(ms, max relative error of the per-sample norms against ref) or an error string."""
    try:
        err = float(((fn().sum(1) - ref).abs() / ref).max())
        return {"ms": round(gpu_ms(fn), 4), "rel_err": err}
    except Exception as e:  # a variant that does not fit in shared memory, say
        return {"error": f"{type(e).__name__}: {str(e)[:120]}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    for name, b, t, da, dg in SHAPES:
        for dt in (torch.float32, torch.bfloat16):
            a = torch.randn(b, t, da, device="cuda", generator=gen).to(dt)
            g = torch.randn(b, t, dg, device="cuda", generator=gen).to(dt)
            ref = T.ghost_partials(a, g).sum(1)
            row = {"shape": name, "dtype": str(dt).removeprefix("torch."),
                   "batch_fastest": timed(lambda a=a, g=g: batch_fastest(a, g), ref)}
            for v in VARIANTS:
                row["flat_{}_{}_{}_{}".format(*v)] = timed(lambda a=a, g=g, v=v: T.ghost_partials(a, g, *v), ref)
            print(json.dumps(row), flush=True)
            rows.append(row)
    for t, b in ((256, 64), (1024, 16)):
        for dt in (torch.float32, torch.bfloat16):
            a = torch.randn(b, t, 768, device="cuda", generator=gen).to(dt)
            g = torch.randn(b, t, 50257, device="cuda", generator=gen).to(dt)
            ref = T.ghost_partials_wide(a, g).sum(1)
            row = {"shape": f"lm-head-{t}", "dtype": str(dt).removeprefix("torch.")}
            for v in WIDE_VARIANTS:
                row["split_{}_{}_{}_{}".format(*v)] = timed(lambda a=a, g=g, v=v: T.ghost_partials_wide(a, g, *v), ref)
            print(json.dumps(row), flush=True)
            rows.append(row)
            del a, g
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/ghost_grid.py --out " + args.out,
                   "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

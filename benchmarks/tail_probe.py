"""Host and GPU time of one Linear layer's clip tail (ViT-base shapes, bf16, B=128, T=197): the eager kernel sequence
against the same sequence captured as a CUDA graph and replayed, with and without the two copies of its results
that `groupclip.tails` makes. Checks the replay's results equal the eager ones.

    python benchmarks/tail_probe.py --out results/h100-<date>-tail-probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from groupclip.kernels import triton_ops as T  # noqa: E402


def host_us(fn, n=300):
    """Median host time of one call (no sync inside; a sync every 10 calls keeps the queue short)."""
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if i % 10 == 9:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e6


def gpu_us(fn, n=50):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n * 1e3


def probe(b, t, p, d):
    x = torch.randn(b, t, p, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16)

    def tail():  # the layer-wise tail of a Linear layer on the GPU path: norm, coefficient, clipped sums
        part = T.ghost_partials(x, g)
        gb = g.sum(1, dtype=torch.float32)
        coef = T.clip_coef([(part, True), (gb, False)], "automatic", 1.0, float(b), 1.0 / b, 0.01, 0.01)
        xs = T.scale_rows(x, coef)
        gw = torch.mm(g.flatten(0, 1).t(), xs.flatten(0, 1), out_dtype=torch.float32)
        return gw, coef @ gb

    for _ in range(5):
        tail()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            tail()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = tail()
    ref = tail()
    graph.replay()
    torch.cuda.synchronize()

    def replay_and_copy():
        graph.replay()
        return [o.clone() for o in outs]

    return {"same_result": all(torch.equal(a, o) for a, o in zip(ref, outs, strict=True)),
            "eager_host_us": host_us(tail), "replay_clone_host_us": host_us(replay_and_copy),
            "replay_only_host_us": host_us(graph.replay), "eager_gpu_us": gpu_us(tail),
            "replay_clone_gpu_us": gpu_us(replay_and_copy)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": "python benchmarks/tail_probe.py --out " + args.out}
    for shape in [(128, 197, 768, 3072), (128, 197, 768, 768)]:
        res["x".join(map(str, shape))] = probe(*shape)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

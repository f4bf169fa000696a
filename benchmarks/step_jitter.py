"""Step by step: what a synchronised training step of one configuration spends, to tell the GPU's work from the host's.

For each mode (non-private and groupclip's, default `tail_graphs="auto"`), after `gpu.warm_setup` (the tail-graph
trial decided) and `--settle` more steps on two fresh batches taken in turn (the graphs captured for their
addresses), `--steps` steps each between two host syncs. Per step: its time (sync to sync), the host's time to
enqueue it (sync to the end of `optimizer.step()`) and to the end of `backward()` (eager modes: under all-layer
clipping the group's clipped sums can start on the GPU only then), the clip tails replayed, captured and skipped
because lent results were still held (`groupclip.tails`), and Python's garbage collections in it (generation, ms).
A step whose host time stays below the GPU's work takes the GPU's time; one whose host falls behind takes about the
host's.

    python benchmarks/step_jitter.py --out benchmarks/results/h100-2026-11-24-step-jitter.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

import groupclip

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu  # noqa: E402

MODES = "nonprivate,groupclip-layer-wise,groupclip-all-layer"


class _Collections:
    """Python's garbage collections while it is listening: (generation, ms) each."""

    def __init__(self) -> None:
        self.events: list[tuple[int, float]] = []
        self._start = None
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.events.append((info["generation"], round((time.perf_counter() - self._start) * 1e3, 3)))
            self._start = None

    def take(self) -> list[tuple[int, float]]:
        events, self.events = self.events, []
        return events


def _counters(s) -> tuple[int, int, int]:
    tails = s.engine.clipper.tails if s.engine is not None else None
    return (0, 0, 0) if tails is None else (tails.replays, tails.captures, tails.held)


def measure(workload: str, mode: str, precision: str, steps: int, settle: int, collections: _Collections) -> dict:
    s, _, _ = gpu.warm_setup(workload, mode, precision)
    gen = torch.Generator(gpu.DEV).manual_seed(1)
    batches = [gpu.make_batch(s.kind, s.batch, s.seq, gen, s.small) for _ in range(2)]
    for i in range(settle):
        s.step(*batches[i % 2])
    rows = []
    for i in range(steps):
        x, y = batches[i % 2]
        before = _counters(s)
        gpu.sync()
        collections.take()
        t0 = time.perf_counter()
        if s.graph:
            s.step(x, y)
            tb = None
        else:  # Setup.step's eager loop, with the host's time at the end of backward taken
            s.opt.zero_grad(set_to_none=True)
            s.loss(x, y).backward()
            tb = time.perf_counter()
            s.opt.step()
        t1 = time.perf_counter()
        gpu.sync()
        t2 = time.perf_counter()
        after = _counters(s)
        rows.append({"step_ms": (t2 - t0) * 1e3, "host_ms": (t1 - t0) * 1e3,
                     "backward_host_ms": None if tb is None else (tb - t0) * 1e3, "replays": after[0] - before[0],
                     "captures": after[1] - before[1], "held": after[2] - before[2], "gc": collections.take()})
    report = s.engine.clipper.tail_report if s.engine is not None else None
    s.close()
    ms = [r["step_ms"] for r in rows]
    host = [r["host_ms"] for r in rows]
    return {"workload": workload, "precision": precision, "mode": mode, "batch": s.batch, "steps": rows,
            "tail_trial": report, "median_step_ms": statistics.median(ms), "min_step_ms": min(ms),
            "max_step_ms": max(ms), "median_host_ms": statistics.median(host), "min_host_ms": min(host),
            "max_host_ms": max(host)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--workload", default="vit", choices=sorted(gpu.WORKLOADS))
    ap.add_argument("--precision", default="bf16", choices=gpu.PRECISIONS)
    ap.add_argument("--modes", default=MODES)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--settle", type=int, default=14, help="steps on the two fresh batches before the timed ones")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny models (a CPU smoke run)")
    args = ap.parse_args()
    gpu.DEV = args.device
    if args.tiny:
        for w in gpu.WORKLOADS.values():
            w.update(small=True, batch=4, seq=16 if w["seq"] else 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    collections = _Collections()
    rows = []
    for mode in args.modes.split(","):
        row = measure(args.workload, mode, args.precision, args.steps, args.settle, collections)
        rows.append(row)
        gpu.log(f"{mode:22s} step {row['min_step_ms']:.1f}-{row['max_step_ms']:.1f} ms (median "
                f"{row['median_step_ms']:.1f}), host {row['min_host_ms']:.1f}-{row['max_host_ms']:.1f} ms")
    versions = {"torch": torch.__version__, "groupclip": groupclip.__version__, "python": platform.python_version()}
    result = {"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.machine(),
              "versions": versions, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Step by step: what a synchronised training step of one configuration spends, to tell the GPU's work from the host's.

For each mode (non-private and groupclip's, default `tail_graphs="auto"`), after `gpu.warm_setup` with a sync per
step (the tail-graph trial decided for a synchronised loop) and `--settle` more steps on two fresh batches taken in
turn (the graphs captured for their addresses), `--steps` steps each between two host syncs. Per step: its time (sync
to sync), the host's time to enqueue it (sync to the end of `optimizer.step()`) and to the end of `backward()` (eager
modes: under all-layer clipping the group's clipped sums can start on the GPU only then), the clip tails replayed,
captured and skipped because lent results were still held (`groupclip.tails`), and Python's garbage collections in it
(generation, ms).
With `--marks`, also a timeline of each eager step: at the end of each block's forward, the start of its backward (a
hook on the block's output), and the ends of forward, backward and optimizer step, the host's time and the GPU's (a
CUDA event recorded there), both from the step's start. Where the GPU's time at a mark is about the host's, the GPU
had caught up with the host there (it waited for the host's work). A step whose host time stays below the GPU's work
takes the GPU's time; one whose host falls behind takes about the host's.

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


class _Marks:
    """Host time and a CUDA event at named points of one step (see the module's docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.points: list[tuple[str, float, torch.cuda.Event]] = []
        self.t0 = 0.0
        self.e0 = None
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers", "h"):
                for i, block in enumerate(m):
                    self.handles.append(block.register_forward_hook(self._forward_hook(f"b{i}")))

    def _forward_hook(self, label: str):
        def hook(module, args, out):
            self.mark(f"fwd {label}")
            t = out[0] if isinstance(out, tuple) else out
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda g: self.mark(f"bwd {label}"))
            return None

        return hook

    def start(self) -> None:
        self.points = []
        self.t0 = time.perf_counter()
        self.e0 = torch.cuda.Event(enable_timing=True)
        self.e0.record()

    def mark(self, label: str) -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.points.append((label, time.perf_counter(), e))

    def take(self) -> list[tuple[str, float, float]]:
        """After a sync: (label, host ms, GPU ms) since the step's start."""
        return [(label, round((t - self.t0) * 1e3, 3), round(self.e0.elapsed_time(e), 3))
                for label, t, e in self.points]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _timeline(rows: list[dict]) -> list[dict]:
    """Per mark label, the medians over the steps of the host's and the GPU's times."""
    labels = [label for label, _, _ in rows[0]["marks"]]
    out = []
    for k, label in enumerate(labels):
        pts = [r["marks"][k] for r in rows if len(r["marks"]) > k and r["marks"][k][0] == label]
        out.append({"mark": label, "host_ms": statistics.median(p[1] for p in pts),
                    "gpu_ms": statistics.median(p[2] for p in pts)})
    return out


def measure(workload: str, mode: str, precision: str, steps: int, settle: int, collections: _Collections,
            marks: bool = False) -> dict:
    s, _, _ = gpu.warm_setup(workload, mode, precision, sync_steps=True)  # (the timed steps are synchronised)
    gen = torch.Generator(gpu.DEV).manual_seed(1)
    batches = [gpu.make_batch(s.kind, s.batch, s.seq, gen, s.small) for _ in range(2)]
    for i in range(settle):
        s.step(*batches[i % 2])
    rows = []
    timer = _Marks(s.model) if marks and not s.graph else None
    for i in range(steps):
        x, y = batches[i % 2]
        before = _counters(s)
        gpu.sync()
        collections.take()
        t0 = time.perf_counter()
        if timer is not None:
            timer.start()
        if s.graph:
            s.step(x, y)
            tb = None
        else:  # Setup.step's eager loop, with the host's time at the end of backward taken
            s.opt.zero_grad(set_to_none=True)
            loss = s.loss(x, y)
            if timer is not None:
                timer.mark("forward")
            loss.backward()
            tb = time.perf_counter()
            if timer is not None:
                timer.mark("backward")
            s.opt.step()
            if timer is not None:
                timer.mark("step")
        t1 = time.perf_counter()
        gpu.sync()
        t2 = time.perf_counter()
        after = _counters(s)
        rows.append({"step_ms": (t2 - t0) * 1e3, "host_ms": (t1 - t0) * 1e3,
                     "backward_host_ms": None if tb is None else (tb - t0) * 1e3, "replays": after[0] - before[0],
                     "captures": after[1] - before[1], "held": after[2] - before[2], "gc": collections.take()})
        if timer is not None:
            rows[-1]["marks"] = timer.take()
    report = s.engine.clipper.tail_report if s.engine is not None else None
    timeline = None
    if timer is not None:
        timer.remove()
        timeline = _timeline(rows)
    s.close()
    ms = [r["step_ms"] for r in rows]
    host = [r["host_ms"] for r in rows]
    return {"workload": workload, "precision": precision, "mode": mode, "batch": s.batch, "steps": rows,
            "tail_trial": report, "median_step_ms": statistics.median(ms), "min_step_ms": min(ms),
            "max_step_ms": max(ms), "median_host_ms": statistics.median(host), "min_host_ms": min(host),
            "max_host_ms": max(host), "timeline": timeline}


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
    ap.add_argument("--marks", action="store_true", help="a host/GPU timeline of each eager step (CUDA only)")
    ap.add_argument("--rounds", type=int, default=1, help="the modes' measurements, interleaved")
    args = ap.parse_args()
    gpu.DEV = args.device
    if args.tiny:
        for w in gpu.WORKLOADS.values():
            w.update(small=True, batch=4, seq=16 if w["seq"] else 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    collections = _Collections()
    rows = []
    for rnd in range(args.rounds):
        for mode in args.modes.split(","):
            row = measure(args.workload, mode, args.precision, args.steps, args.settle, collections,
                          args.marks and args.device == "cuda")
            row["round"] = rnd
            rows.append(row)
            gpu.log(f"{mode:22s} step {row['min_step_ms']:.1f}-{row['max_step_ms']:.1f} ms (median "
                    f"{row['median_step_ms']:.1f}), host {row['min_host_ms']:.1f}-{row['max_host_ms']:.1f} ms")
            for m in row["timeline"] or []:
                gpu.log(f"    {m['mark']:10s} host {m['host_ms']:7.2f}  gpu {m['gpu_ms']:7.2f} ms")
    versions = {"torch": torch.__version__, "groupclip": groupclip.__version__, "python": platform.python_version()}
    result = {"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.machine(),
              "versions": versions, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

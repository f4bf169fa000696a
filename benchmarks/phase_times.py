"""Where a ViT-base bf16 step's time goes, per phase, with a sync per step and back to back (H100 results in
results/h100-2026-11-25-phase-times.json).

    python benchmarks/phase_times.py --out phase-times.json

Setups (`--setups`, default the first four): non-private, groupclip layer-wise with the clip-tail graphs off and on
(forced, no trial), all-layer with them off and on; `--rounds` repeats them, interleaved. Each: 8 warm-up steps,
then 10 synchronised steps, 10 back-to-back steps and 10 synchronised again, each phase's GPU time (CUDA events after
zero_grad + forward, backward, optimizer step) and host time, medians; then the CPU profiler's top operations by self
time over 4 steps back to back and 4 synchronised. Shows whether an eager loop's backward is host-bound and how its
host time moves within one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from gpu import Setup, host_probe_ms, make_batch
from torch.profiler import ProfilerActivity, profile

SETUPS = (("np", "nonprivate", None), ("lw_off", "groupclip-layer-wise", False),
          ("lw_on", "groupclip-layer-wise", True), ("al_off", "groupclip-all-layer", False),
          ("al_on", "groupclip-all-layer", True))


def phases(s: Setup, batches, n: int, back_to_back: bool) -> dict:
    ev = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(n + 1)]
    host = []
    torch.cuda.synchronize()
    for i in range(n):
        x, y = batches[i % 2]
        if not back_to_back:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ev[i][0].record()
        s.opt.zero_grad(set_to_none=True)
        loss = s.loss(x, y)
        ev[i][1].record()
        t1 = time.perf_counter()
        loss.backward()
        ev[i][2].record()
        t2 = time.perf_counter()
        s.opt.step()
        ev[i][3].record()
        t3 = time.perf_counter()
        host.append((t1 - t0, t2 - t1, t3 - t2))
        if not back_to_back:
            torch.cuda.synchronize()
    ev[n][0].record()
    torch.cuda.synchronize()

    def med(v):
        return round(statistics.median(v), 2)

    return {"gpu_fwd": med([ev[i][0].elapsed_time(ev[i][1]) for i in range(n)]),
            "gpu_bwd": med([ev[i][1].elapsed_time(ev[i][2]) for i in range(n)]),
            "gpu_opt": med([ev[i][2].elapsed_time(ev[i][3]) for i in range(n)]),
            "gpu_step": med([ev[i][0].elapsed_time(ev[i + 1][0]) for i in range(n)]),
            "host_fwd": med([h[0] * 1e3 for h in host]), "host_bwd": med([h[1] * 1e3 for h in host]),
            "host_opt": med([h[2] * 1e3 for h in host]), "host_step": med([sum(h) * 1e3 for h in host]),
            "probe": round(host_probe_ms(), 2)}


def top_ops(s: Setup, batches, back_to_back: bool, steps: int = 4) -> list:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            s.step(*batches[i % 2])
            if not back_to_back:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    tops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return [(e.key, e.count, round(e.self_cpu_time_total / (steps * 1e3), 2)) for e in tops]  # ms a step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--setups", default="np,lw_off,lw_on,al_off", help="comma-separated, of " +
                    ", ".join(label for label, _, _ in SETUPS))
    ap.add_argument("--rounds", type=int, default=1, help="the setups measured this many times, interleaved")
    args = ap.parse_args()
    wanted = args.setups.split(",")
    unknown = set(wanted) - {label for label, _, _ in SETUPS}
    if unknown:
        ap.error(f"unknown setups {sorted(unknown)}")
    torch.backends.cuda.matmul.allow_tf32 = True
    res = {"command": f"python benchmarks/phase_times.py --out {args.out} --setups {args.setups} --rounds "
                      f"{args.rounds}", "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for rnd, (label, mode, tails) in ((r, x) for r in range(args.rounds) for x in SETUPS if x[0] in wanted):
        s = Setup("vit", mode, "bf16", tail_graphs=tails)
        gen = torch.Generator("cuda").manual_seed(1)
        batches = [make_batch(s.kind, s.batch, s.seq, gen, s.small) for _ in range(2)]
        for i in range(8):
            s.step(*batches[i % 2])
            torch.cuda.synchronize()
        r = {"sync": phases(s, batches, 10, False), "b2b": phases(s, batches, 10, True),
             "sync2": phases(s, batches, 10, False)}
        r["b2b_cpu_top"] = top_ops(s, batches, True)
        r["sync_cpu_top"] = top_ops(s, batches, False)
        s.close()
        res[label if rnd == 0 else f"{label}_round{rnd + 1}"] = r
        print(label, rnd, json.dumps({k: v for k, v in r.items() if "top" not in k}), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

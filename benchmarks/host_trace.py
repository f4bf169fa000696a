"""Where a GPU step's host time and extra copies come from (diagnostics for benchmarks/NOTES.md, not a benchmark).

Phases (--phases, comma separated):
  launch   host time per call, no synchronisation, of a small PyTorch op and of each Triton kernel of groupclip
  enqueue  host time to enqueue one training step against its wall time (equal: the step is host-bound)
  casts    dtype conversions and copies of at least --min-numel elements in one step, attributed to the autograd
           node and the groupclip/transformers source line that made them; non-private against groupclip
  pyprofile  cProfile of a few steps (own time), to a text file next to --out

    python benchmarks/host_trace.py --out trace.json [--phases launch,enqueue,casts,pyprofile]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import gpu  # noqa: E402  (the benchmark's workloads and setup)


def host_per_call(fn, n=2000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return dt


def launch_costs() -> dict:
    from groupclip import kernels

    d = "cuda"
    x = torch.randn(64, 8, device=d)
    a = torch.randn(8, 32, 64, device=d, dtype=torch.bfloat16)
    g = torch.randn(8, 32, 96, device=d, dtype=torch.bfloat16)
    mean = torch.randn(8 * 32, device=d)
    rstd = torch.rand(8 * 32, device=d)
    xf = torch.randn(8, 32, 64, device=d)
    gf = torch.randn(8, 32, 64, device=d)
    parts = [(torch.randn(8, 40, device=d), False), (torch.rand(8, 4, device=d), True)]
    out = {
        "torch_add_us": host_per_call(lambda: x.add(1.0)),
        "torch_mm_us": host_per_call(lambda: x.t().mm(x)),
        "torch_sum_dim_us": host_per_call(lambda: x.sum(1, dtype=torch.float32)),
        "triton_clip_coef_us": host_per_call(lambda: kernels.clip_coef(parts, "automatic", 1.0, 8.0, 1.0)),
        "triton_ghost_us": host_per_call(lambda: kernels.ghost_partials(a, g)),
        "triton_layer_norm_ps_us": host_per_call(lambda: kernels.layer_norm_ps(xf, mean.view(8, 32, 1),
                                                                              rstd.view(8, 32, 1), gf, True, True)),
    }
    return {k: v * 1e6 for k, v in out.items()}


def enqueue(workload, mode, precision) -> dict:
    s, x, y = gpu.warm_setup(workload, mode, precision)
    enq, wall = [], []
    for _ in range(6):
        gpu.sync()
        t0 = time.perf_counter()
        s.step(x, y)
        enq.append(time.perf_counter() - t0)
        gpu.sync()
        wall.append(time.perf_counter() - t0)
    s.close()
    return {"workload": workload, "mode": mode, "precision": precision,
            "enqueue_ms": statistics.median(enq) * 1e3, "wall_ms": statistics.median(wall) * 1e3}


def _node(e) -> str:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith("autograd::engine::evaluate_function: "):
            return p.name.split(": ", 1)[1]
        p = p.cpu_parent
    return "-"


def _where(e) -> str:
    frames = [f for f in (e.stack or []) if "groupclip" in f or "transformers" in f or "benchmarks" in f]
    return " < ".join(f.rsplit("/", 1)[-1] for f in frames[:3])


def casts(workload, mode, precision, min_numel) -> dict:
    from torch.profiler import ProfilerActivity, profile

    s, x, y = gpu.warm_setup(workload, mode, precision)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True) as prof:
        s.step(x, y)
        gpu.sync()
    s.close()
    found = collections.Counter()
    for e in prof.events():
        if e.name not in ("aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous", "aten::cat"):
            continue
        shapes = e.input_shapes or []
        numel = max((_prod(sh) for sh in shapes if sh), default=0)
        if numel < min_numel:
            continue
        parent = e.cpu_parent.name if e.cpu_parent is not None else "-"
        if parent in ("aten::_to_copy", "aten::clone", "aten::contiguous", "aten::to"):
            continue  # counted at the outer call
        found[f"{e.name} {shapes[0] if shapes else ''} node={_node(e)} at {_where(e)}"] += 1
    return {"workload": workload, "mode": mode, "precision": precision,
            "copies": [{"what": k, "count": n} for k, n in found.most_common()]}


def _prod(shape) -> int:
    n = 1
    for v in shape:
        n *= int(v)
    return n


def pyprofile(workload, mode, precision) -> str:
    s, x, y = gpu.warm_setup(workload, mode, precision)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        s.step(x, y)
    gpu.sync()
    prof.disable()
    s.close()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(40)
    return f"\n===== {workload} {precision} {mode} (5 steps)\n" + buf.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--phases", default="launch,enqueue,casts,pyprofile")
    ap.add_argument("--min-numel", type=int, default=1 << 20)
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (smoke test of this script)")
    args = ap.parse_args()
    if args.tiny:
        gpu.DEV = "cpu"
        for w in gpu.WORKLOADS.values():
            w.update(small=True, batch=4, seq=16 if w["seq"] else 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    phases = args.phases.split(",")
    res: dict = {"device": torch.cuda.get_device_name() if gpu.DEV == "cuda" else "cpu", "torch": torch.__version__,
                 "command": "python benchmarks/host_trace.py " + " ".join(sys.argv[1:])}
    if "launch" in phases and gpu.DEV == "cuda":
        res["launch"] = launch_costs()
        print(json.dumps(res["launch"]), file=sys.stderr)
    if "enqueue" in phases:
        res["enqueue"] = []
        for w, prec in (("vit", "bf16"), ("vit", "fp32"), ("gpt2-256", "bf16")):
            for m in ("nonprivate", "groupclip-layer-wise", "groupclip-all-layer"):
                res["enqueue"].append(enqueue(w, m, prec))
                print(json.dumps(res["enqueue"][-1]), file=sys.stderr)
    if "casts" in phases:
        res["casts"] = [casts("gpt2-256", m, "bf16", args.min_numel)
                        for m in ("nonprivate", "groupclip-layer-wise")]
    if "pyprofile" in phases:
        with open(args.out + ".py.txt", "w") as f:
            for m in ("nonprivate", "groupclip-layer-wise"):
                f.write(pyprofile("vit", m, "bf16"))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

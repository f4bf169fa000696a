"""Compare two configurations of a `gpu.py --phases profile` run kernel by kernel (device time per step).

    python benchmarks/profile_diff.py profile.txt.jsonl gpt2-256 bf16 [nonprivate groupclip-layer-wise]
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    path, workload, prec = sys.argv[1:4]
    a_mode, b_mode = (sys.argv[4:6] if len(sys.argv) > 5 else ("nonprivate", "groupclip-layer-wise"))
    runs = {}
    for line in open(path):
        r = json.loads(line)
        if r["workload"] == workload and r["precision"] == prec:
            runs[r["mode"]] = {e["name"]: e for e in r["events"]}
    a, b = runs[a_mode], runs[b_mode]
    rows = []
    for name in set(a) | set(b):
        ta = a.get(name, {}).get("self_device_us", 0) / 3e3
        tb = b.get(name, {}).get("self_device_us", 0) / 3e3
        ca, cb = a.get(name, {}).get("calls", 0) / 3, b.get(name, {}).get("calls", 0) / 3
        rows.append((tb - ta, ta, tb, ca, cb, name))
    rows.sort(reverse=True)
    tot_a = sum(r[1] for r in rows if not r[5].startswith(("aten::", "Optimizer", "autograd")))
    tot_b = sum(r[2] for r in rows if not r[5].startswith(("aten::", "Optimizer", "autograd")))
    print(f"kernel time per step: {a_mode} {tot_a:.1f} ms, {b_mode} {tot_b:.1f} ms")
    print(f"{'delta ms':>9} {'a ms':>8} {'b ms':>8} {'a calls':>8} {'b calls':>8}  name")
    for d, ta, tb, ca, cb, name in rows[:30]:
        print(f"{d:9.2f} {ta:8.2f} {tb:8.2f} {ca:8.0f} {cb:8.0f}  {name[:90]}")


if __name__ == "__main__":
    main()

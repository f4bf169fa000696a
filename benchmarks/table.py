"""Markdown table from a `benchmarks/gpu.py` result file (both timing rounds, ratios to non-private).

    python benchmarks/table.py benchmarks/results/h100-2026-11-24.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(result: dict) -> str:
    rows = [r for r in result.get("time", [])]
    base = {(r["workload"], r["precision"], r["round"]): r for r in rows
            if r["mode"] == "nonprivate" and "error" not in r}
    gbase = {(r["workload"], r["precision"], r["round"]): r for r in rows
             if r["mode"] == "nonprivate-graph" and "error" not in r}
    maxb = {(r["workload"], r["precision"], r["mode"]): r for r in result.get("maxbatch", [])}
    cells: dict[tuple, list] = defaultdict(list)
    errors = {}
    for r in rows:
        key = (r["workload"], r["precision"], r["mode"])
        if "error" in r:
            errors[key] = r["error"]
            continue
        b = base[(r["workload"], r["precision"], r["round"])]
        gb = gbase.get((r["workload"], r["precision"], r["round"])) if r["mode"].endswith("-graph") else None
        cells[key].append((r["samples_per_s"], r["samples_per_s"] / b["samples_per_s"],
                           r["peak_mem_gib"], r["peak_mem_gib"] / b["peak_mem_gib"],
                           r["samples_per_s"] / gb["samples_per_s"] if gb else None))
    out = ["| workload | precision | mode | samples/s (round 1 / 2) | × non-private speed | × non-private graph "
           "| peak GiB | × memory | largest batch (× non-private) |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted(set(cells) | set(errors), key=lambda k: (k[0], k[1], _order(k[2])))
    for key in keys:
        w, p, m = key
        mb = maxb.get(key)
        mb0 = maxb.get((w, p, "nonprivate"))
        if mb and "max_batch" in mb:
            ratio = mb["max_batch"] / mb0["max_batch"] if mb0 and mb0.get("max_batch") else float("nan")
            big = f"{'≥' if mb.get('capped') else ''}{mb['max_batch']} ({ratio:.2f})"
        else:
            big = "–"
        if key in errors:
            out.append(f"| {w} | {p} | {m} | error: {errors[key][:60]} | | | | | |")
            continue
        c = cells[key]
        sp = " / ".join(f"{x[0]:.0f}" for x in c)
        ratio = " / ".join(f"{x[1]:.2f}" for x in c)
        gratio = " / ".join(f"{x[4]:.2f}" for x in c) if all(x[4] is not None for x in c) else "–"
        out.append(f"| {w} | {p} | {m} | {sp} | {ratio} | {gratio} | {c[0][2]:.1f} | {c[0][3]:.2f} | {big} |")
    return "\n".join(out)


def _order(mode: str) -> int:
    order = ["nonprivate", "groupclip-layer-wise", "groupclip-all-layer", "nonprivate-graph",
             "groupclip-layer-wise-graph", "groupclip-all-layer-graph", "opacus-hooks", "opacus-ghost"]
    return order.index(mode) if mode in order else 99


if __name__ == "__main__":
    print(table(json.load(open(sys.argv[1]))))

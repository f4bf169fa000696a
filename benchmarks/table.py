"""Markdown table from a `benchmarks/gpu.py` result file (both timing rounds, ratios to non-private).

    python benchmarks/table.py benchmarks/results/h100-2026-11-25.json

Largest batch: "≥" = the search's cap fitted; in parentheses the ratio to eager non-private's largest batch and,
for a graphed mode, also to nonprivate-graph's ("× graph"); "search stopped" = an error other than running out
of memory ended that search (the batch is the largest that fitted before it). Files from before the graphed
modes were searched show "–" there. "Back to back": the steps timed without a sync between them (files from before
that measurement show "–"). Peak memory: each round's (the tail-graph trial may decide differently in each).
"""

from __future__ import annotations

import argparse
import json
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
        b2b = (r["samples_per_s_b2b"] / b["samples_per_s_b2b"]
               if "samples_per_s_b2b" in r and "samples_per_s_b2b" in b else None)
        cells[key].append((r["samples_per_s"], r["samples_per_s"] / b["samples_per_s"],
                           r["peak_mem_gib"], r["peak_mem_gib"] / b["peak_mem_gib"],
                           r["samples_per_s"] / gb["samples_per_s"] if gb else None, b2b))
    out = ["| workload | precision | mode | samples/s (round 1 / 2) | × non-private speed | × non-private graph "
           "| × non-private, back to back | peak GiB (round 1 / 2) | × memory | largest batch (× non-private) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    # rows: every timed configuration, and every searched one (a run of the maxbatch phase alone)
    keys = sorted(set(cells) | set(errors) | set(maxb), key=lambda k: (k[0], k[1], _order(k[2])))
    for key in keys:
        w, p, m = key
        big = _largest(maxb, key)
        if key not in cells and key not in errors:
            out.append(f"| {w} | {p} | {m} | | | | | | | {big} |")
            continue
        if key in errors:
            out.append(f"| {w} | {p} | {m} | error: {errors[key][:60]} | | | | | | |")
            continue
        c = cells[key]
        sp = " / ".join(f"{x[0]:.0f}" for x in c)
        ratio = " / ".join(f"{x[1]:.2f}" for x in c)
        gratio = " / ".join(f"{x[4]:.2f}" for x in c) if all(x[4] is not None for x in c) else "–"
        b2b = " / ".join(f"{x[5]:.2f}" for x in c) if all(x[5] is not None for x in c) else "–"
        mem = " / ".join(f"{x[2]:.1f}" for x in c)
        mratio = " / ".join(f"{x[3]:.2f}" for x in c)
        out.append(f"| {w} | {p} | {m} | {sp} | {ratio} | {gratio} | {b2b} | {mem} | {mratio} | {big} |")
    return "\n".join(out)


def _largest(maxb: dict, key: tuple) -> str:
    """The largest-batch cell: the batch, ≥ where the cap fitted, and its ratios to non-private's."""
    w, p, m = key
    mb = maxb.get(key)
    if not mb:
        return "–"
    if "max_batch" not in mb:
        return "error"

    def ratio(base_mode):
        b0 = maxb.get((w, p, base_mode))
        return mb["max_batch"] / b0["max_batch"] if b0 and b0.get("max_batch") else None

    r = ratio("nonprivate")
    notes = [f"{r:.2f}" if r is not None else "nan"]
    if m.endswith("-graph") and ratio("nonprivate-graph") is not None:
        notes.append(f"{ratio('nonprivate-graph'):.2f} × graph")
    if "stopped" in mb:
        notes.append("search stopped")
    return f"{'≥' if mb.get('capped') else ''}{mb['max_batch']} ({'; '.join(notes)})"


def _order(mode: str) -> int:
    order = ["nonprivate", "groupclip-layer-wise", "groupclip-layer-wise-tails", "groupclip-all-layer",
             "nonprivate-graph", "groupclip-layer-wise-graph", "groupclip-all-layer-graph", "opacus-hooks",
             "opacus-ghost"]
    return order.index(mode) if mode in order else 99


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", help="a result file of benchmarks/gpu.py (JSON)")
    with open(ap.parse_args().result) as f:
        print(table(json.load(f)))

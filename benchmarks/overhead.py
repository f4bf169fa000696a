"""CPU overhead of groupclip on a small GPT-2-shaped model: non-private vs all-layer vs layer-wise.

Each variant runs in its own subprocess so its peak resident memory (ru_maxrss) is its own.
Usage: python benchmarks/overhead.py [--steps 10] [--out benchmarks/results/cpu-overhead.json]
Prints one JSON object (and writes it to --out if given).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

VARIANTS = ["nonprivate", "all-layer", "layer-wise"]


def build(batch: int, seq: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2048, n_positions=seq,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    return model, x


def run_variant(variant: str, steps: int, batch: int, seq: int) -> dict:
    import torch

    import groupclip

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, x = build(batch, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if variant != "nonprivate":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groupclip.PrivacyEngine(model, opt, batch_size=batch, sample_size=100 * batch, noise_multiplier=1.0,
                                    groups=variant, seed=0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "step_s_median": statistics.median(times), "step_s_all": times,
            "samples_per_s": batch / statistics.median(times), "peak_rss_mib": peak / 1024,
            "rss_growth_mib": (peak - base_rss) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.batch, args.seq)))
        return
    rows = []
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", v, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    base = rows[0]
    for r in rows:
        r["speed_vs_nonprivate"] = r["samples_per_s"] / base["samples_per_s"]
        r["peak_rss_vs_nonprivate"] = r["peak_rss_mib"] / base["peak_rss_mib"]
    import torch

    result = {"command": " ".join(["python", "benchmarks/overhead.py", *sys.argv[1:]]),
              "model": "GPT2LMHeadModel n_layer=4 n_embd=256 vocab=2048", "batch": args.batch, "seq": args.seq,
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

"""CPU proxy of the host time groupclip adds to a host-bound GPU step (ViT-base under bf16 autocast on an H100).

A host-bound step's speed is the Python and launch time of its forward, backward and optimizer step. This script
measures that time on the CPU for the same topology at tiny sizes (transformers' ViT: 12 blocks, 99 clipped
layers, hidden size 32, 16x16 images in 4x4 patches, batch 4), so the compute is small next to the per-layer
host work:

- the Triton kernels are replaced by stubs that only allocate their outputs (the GPU path's Python runs, its
  kernels do not: on the GPU they are launches, here they would be slow CPU loops);
- clip-tail graphs (mode `layer-wise-tails` / `all-layer-tails`) are replaced by a stand-in for the replay: the
  key is computed and looked up as on the GPU, the first capture's results are kept and lent or copied out (a
  CPU allocator does not return the same addresses step after step, so every later call counts as a hit). The
  replay itself (~5-10 us of host time on an H100) is not included.

Per mode: median host time of forward + loss, backward and the optimizer step (with groupclip: noise and the
engine's checks), in ms, over `--steps` steps after 30 warm-up steps, `--rounds` rounds interleaved. Numbers
are this machine's; an H100's host took about 3-4x as long per Python call in `benchmarks/NOTES.md`'s probes.

    python benchmarks/host_proxy.py --out benchmarks/results/cpu-host-proxy.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings

os.environ.setdefault("GROUPCLIP_TRITON", "force")  # before groupclip is imported: the GPU path's Python

import torch  # noqa: E402

import groupclip  # noqa: E402
from groupclip import kernels  # noqa: E402
from groupclip import tails as tail_graphs  # noqa: E402

MODES = ("nonprivate", "layer-wise", "layer-wise-tails", "all-layer-tails")
BATCH = 4


def _stub_kernels() -> None:
    """Triton ops that allocate their outputs and compute nothing."""

    def rows(x):
        return torch.empty(x.shape[0])

    def ln_ps(x, mean, rstd, g, weight, bias):
        return (torch.empty(x.shape[0], x.shape[-1]) if weight else None,
                torch.empty(x.shape[0], x.shape[-1]) if bias else None)

    def scale_rows_t(x, coef, *a, **k):
        b, t, w = x.shape
        return torch.empty((w, b * t), dtype=x.dtype).t().view(b, t, w)

    kernels._ops = types.SimpleNamespace(
        ghost_partials=lambda a, g, *args, **kw: torch.empty((a.shape[0], 3)),
        ghost_partials_wide=lambda a, g, *args, **kw: torch.empty((a.shape[0], 3)),
        gram_tiles=lambda a: torch.empty(1),
        clip_coef=lambda parts, *a, **k: rows(parts[0][0]),
        scale_rows=lambda x, coef, *a, **k: torch.empty(x.shape, dtype=x.dtype),
        scale_rows_t=scale_rows_t,
        coef_sum=lambda coef, ps, *a, **k: torch.empty(ps.shape[1]),
        layer_norm_backward=lambda x, g, w, eps, out=None: (
            torch.empty_like(x) if out is None else out, torch.empty(x.shape[0], x.shape[-1]),
            torch.empty(x.shape[0], x.shape[-1])),
        layer_norm_ps=ln_ps,
        LN_BWD_MAX_D=8192,
    )


class _StandinGraph:
    def replay(self) -> None:  # (~5-10 us of host time on an H100, not included)
        pass


def _standin_run(self, slot_id, key, tail, uses, own_gram=True, copy=True, owners=None, keep=None):
    """TailGraphs.run without CUDA: the key is looked up as on the GPU; a slot's first capture is kept and every
    later call replays it (the results lent or copied out as a replay's are)."""
    slot = self._slots.get(slot_id)
    if slot is None:
        slot = self._slots[slot_id] = tail_graphs._Slot()
    for gkey, graph, res, _ in slot.graphs:
        gkey == key  # noqa: B015 (the comparison a replay makes; the CPU allocator moves the tensors anyway)
        lend = self._lend(res, copy, owners)
        if lend is None:
            return None
        if own_gram:
            tail_graphs._own_gram(uses)
        return self._replay(graph, res, copy, lend)
    if not slot.seen:
        slot.seen.append(key)
        return None
    res = tail_graphs._results(tail(), slot, tail_graphs._place(tail(), slot))
    graph = _StandinGraph()
    slot.graphs.append((key, graph, res, keep))
    self.captures += 1
    lend = self._lend(res, copy, owners)
    return None if lend is None else self._replay(graph, res, copy, lend)


def _model(mode: str):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64, image_size=16,
                    patch_size=4, num_labels=10, attn_implementation="sdpa")
    model = ViTForImageClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine = None
    if mode != "nonprivate":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = groupclip.PrivacyEngine(model, opt, batch_size=BATCH, sample_size=10**6, noise_multiplier=1.0,
                                             groups=mode.removesuffix("-tails"), seed=0,
                                             tail_graphs=mode.endswith("-tails"))
    return model, opt, engine


def measure(mode: str, steps: int, warmup: int = 30) -> dict:
    model, opt, engine = _model(mode)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, 3, 16, 16, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)
    fwd, bwd, stp = [], [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits.float(), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            stp.append(t3 - t2)
    row = {"mode": mode, "forward_ms": statistics.median(fwd) * 1e3, "backward_ms": statistics.median(bwd) * 1e3,
           "step_ms": statistics.median(stp) * 1e3,
           "total_ms": statistics.median([a + b + c for a, b, c in zip(fwd, bwd, stp, strict=True)]) * 1e3}
    if engine is not None:
        tails = engine.clipper.tails
        row["tail_replays"] = 0 if tails is None else tails.replays
        engine.detach()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _stub_kernels()
    tail_graphs.GRAPH_DEVICE = "cpu"
    tail_graphs.TailGraphs.run = _standin_run
    rows = []
    for rnd in range(args.rounds):
        for mode in MODES:
            row = {**measure(mode, args.steps, args.warmup), "round": rnd}
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    base = {r["round"]: r for r in rows if r["mode"] == "nonprivate"}
    for r in rows:  # time over non-private's, per clipped layer (99)
        b = base[r["round"]]
        r["extra_us_per_layer"] = {k: (r[k] - b[k]) * 1e3 / 99 for k in ("forward_ms", "backward_ms", "step_ms")}
    result = {"command": "python benchmarks/host_proxy.py " + " ".join(sys.argv[1:]),
              "date": datetime.date.today().isoformat(),
              "versions": {"torch": torch.__version__, "groupclip": groupclip.__version__,
                           "python": platform.python_version()},
              "machine": platform.processor() or platform.machine(), "threads": 1, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""GPU speed and memory of groupclip next to non-private training and Opacus, in one run.

Rows: non-private; groupclip all-layer; groupclip layer-wise (also with `tail_graphs=True`: "-tails"); Opacus hooks
and ghost (where importable; their errors are recorded where they fail). Workloads: GPT-2 small LM (HF
GPT2LMHeadModel from config, tied embeddings, default position ids) at T=256/B=64 and T=1024/B=16; ViT-base/16 at
224² (HF ViTForImageClassification from config), 10 classes, B=128. Each in fp32 (TF32 on) and bf16 autocast. Every
configuration is timed twice, the two rounds interleaved; median of --steps timed steps after --warmup, synchronised
timers, random data. Then the same number of steps again back to back (no sync between steps, as a training loop
runs them; per-step times from CUDA events at each step's start, idle GPU time included): `samples_per_s_b2b`.

Phases (comma separated with --phases): check (clipped gradient vs a float64 one-sample-at-a-time oracle on a small
model, on the GPU), kernels (the fused Triton kernels vs float64, and timed against the PyTorch operations they
replace), ops (the row scaling, coefficient sums and shared-input ghost kernel against what they replaced),
pyprofile (cProfile of a few steps), time (throughput and peak memory), maxbatch (largest batch that
fits, searched for each mode of --modes but Opacus's, graphed ones included; each search in a fresh process).

Each timed row also records `host_probe_ms` (before its timed steps) and `host_probe_after_ms`: the time of a fixed
pure-Python workload, a measure of how fast the lent machine's host runs while that row is timed.

    python benchmarks/gpu.py --out results.json [--phases check,time,maxbatch] [--workloads gpt2-256,vit]
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

WORKLOADS = {
    "gpt2-256": {"kind": "gpt2", "batch": 64, "seq": 256},
    "gpt2-1024": {"kind": "gpt2", "batch": 16, "seq": 1024},
    "vit": {"kind": "vit", "batch": 128, "seq": 0},
}
GRAPH = "-graph"  # suffix: forward + backward replayed from a CUDA graph (groupclip.graphs.GraphedBackward)
TRIAL_CAP = 40  # warm-up steps a groupclip mode may add while its tail-graph trial runs or graphs are captured
TAILS = "-tails"  # suffix: the eager loop with each layer's clip tail replayed from a CUDA graph (groupclip.tails)
MODES = ["nonprivate", "groupclip-all-layer", "groupclip-layer-wise", "groupclip-layer-wise-tails", "opacus-hooks",
         "opacus-ghost", "nonprivate-graph", "groupclip-all-layer-graph", "groupclip-layer-wise-graph"]
# the modes the largest-batch search takes (not yet the tail-graph mode)
MAXBATCH_MODES = [m for m in MODES if not m.startswith("opacus")]
PRECISIONS = ["fp32", "bf16"]
DEV = "cuda"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- models and data
def build_model(kind: str, seq: int, small: bool = False):
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        if small:
            cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        else:
            cfg = GPT2Config(n_positions=max(seq, 1024))
        with torch.device(DEV):
            return GPT2LMHeadModel(cfg)
    from transformers import ViTConfig, ViTForImageClassification

    if small:
        cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=10)
    else:
        cfg = ViTConfig(image_size=224, patch_size=16, num_labels=10)
    with torch.device(DEV):
        return ViTForImageClassification(cfg)


def make_batch(kind: str, batch: int, seq: int, gen: torch.Generator, small: bool = False):
    if kind == "gpt2":
        vocab = 300 if small else 50257
        x = torch.randint(0, vocab, (batch, seq), generator=gen, device=DEV)
        return x, x
    size = 32 if small else 224
    return (torch.randn(batch, 3, size, size, generator=gen, device=DEV),
            torch.randint(0, 10, (batch,), generator=gen, device=DEV))


def loss_of(kind: str, model, x, y):
    if kind == "gpt2":
        logits = model(input_ids=x).logits
        # next-token loss, mean over all tokens (equal-length sequences: mean over samples of per-sample means)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), y[:, 1:].reshape(-1))
    return F.cross_entropy(model(pixel_values=x).logits.float(), y)


# ----------------------------------------------------------------------------------------- one configuration
class Setup:
    def __init__(self, workload: str, mode: str, precision: str, batch: int | None = None,
                 tail_graphs: bool | str | None = None):
        w = WORKLOADS[workload]
        self.kind, self.seq, self.small = w["kind"], w["seq"], w.get("small", False)
        self.batch = batch or w["batch"]
        self.mode, self.precision = mode, precision
        self.graph = mode.endswith(GRAPH)
        self.graphed = None
        tails = mode.endswith(TAILS)
        mode = mode.removesuffix(GRAPH).removesuffix(TAILS)
        torch.manual_seed(0)
        self.model = build_model(self.kind, self.seq, self.small)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.engine = None
        self._captures = -1  # clip-tail graphs captured when trial_pending was last asked
        self.crit_opacus = None
        if mode.startswith("groupclip"):
            import groupclip

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.engine = groupclip.PrivacyEngine(
                    self.model, self.opt, batch_size=self.batch, sample_size=1_000_000, noise_multiplier=1.0,
                    max_grad_norm=1.0, clipping="automatic", groups=mode.split("-", 1)[1], seed=0,
                    tail_graphs=tail_graphs if tail_graphs is not None else True if tails else "auto")
        elif mode.startswith("opacus"):
            self._opacus(mode)

    def _opacus(self, mode: str):
        from opacus import PrivacyEngine as OpacusEngine

        gsm = {"opacus-hooks": "hooks", "opacus-ghost": "ghost"}[mode]
        x, y = make_batch(self.kind, self.batch, self.seq, torch.Generator(DEV).manual_seed(0), self.small)
        dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=self.batch)
        pe = OpacusEngine()
        model = OpacusWrap(self.model, self.kind)
        kw = dict(module=model, optimizer=self.opt, data_loader=dl, noise_multiplier=1.0, max_grad_norm=1.0,
                  grad_sample_mode=gsm, poisson_sampling=False)
        if gsm == "ghost":
            crit = torch.nn.CrossEntropyLoss()
            self.model, self.opt, self.crit_opacus, _ = pe.make_private(criterion=crit, **kw)
        else:
            self.model, self.opt, _ = pe.make_private(**kw)
        self.kind_wrapped = True

    def loss(self, x, y):
        ctx = torch.autocast(DEV, dtype=torch.bfloat16) if self.precision == "bf16" else _null()
        with ctx:
            if not self.mode.startswith("opacus"):
                return loss_of(self.kind, self.model, x, y)
            out = self.model(x)
            shape = out.shape
            if self.kind == "gpt2":
                out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
            if self.crit_opacus is not None:
                return self.crit_opacus(out.float(), y, **({"shape": shape} if self.kind == "gpt2" else {}))
            return F.cross_entropy(out.float(), y)

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        if not self.graph:
            self.loss(x, y).backward()
        else:  # captured at the first step (a warm-up step), replayed after
            if self.graphed is None:
                from groupclip.graphs import GraphedBackward

                if self.engine is not None:
                    self.graphed = self.engine.graphed_backward(self.loss, x, y)
                else:
                    self.graphed = GraphedBackward(self.loss, (x, y), self.model.parameters(), [self.model])
            self.graphed(x, y)
        self.opt.step()

    def tail_captures(self) -> int | None:
        """Clip-tail graphs captured so far (None: not groupclip, or no graphs kept)."""
        tails = self.engine.clipper.tails if self.engine is not None else None
        return None if tails is None else tails.captures

    def trial_pending(self) -> bool:
        """Whether groupclip's clip-tail graphs have yet to settle (asked once a step): the trial (`tail_graphs=
        "auto"`) has not decided, or graphs were captured since the last time this was asked (a layer's graph is
        captured when its tensors come back to one address: a one-time cost of the first steps, which the timed
        steps of a forced-on mode would otherwise include)."""
        if self.engine is None:
            return False
        clipper = self.engine.clipper
        if clipper.tail_trial is not None:
            return True
        tails = clipper.tails
        if tails is None or not tails.active:
            return False
        before, self._captures = self._captures, tails.captures
        return tails.captures != before

    def close(self):
        if self.engine is not None:
            self.engine.detach()
        self.model = self.opt = self.engine = self.graphed = None


class OpacusWrap(torch.nn.Module):
    def __init__(self, m, kind):
        super().__init__()
        self.m, self.kind = m, kind

    def forward(self, x):
        if self.kind == "gpt2":
            # Opacus's per-sample hooks need position ids with a batch dimension (the default ones have none)
            pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            return self.m(input_ids=x, position_ids=pos).logits
        return self.m(pixel_values=x).logits


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def reset():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def device_name():
    return torch.cuda.get_device_name() if DEV == "cuda" else platform.processor()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")


def host_probe_ms() -> float:
    """How fast the host runs now: the fastest of three runs of a fixed pure-Python workload, in ms. The lent
    machine's host has run at about half speed for minutes at a time (`step_jitter.py` timelines): a step whose
    forward is then host-bound loses time that the same step on a fast host does not."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        d = {}
        for i in range(20000):
            d[i % 997] = (i, str(i))
        sorted(d.values())
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def pin_to_core(which: str = "fastest", probes: int = 6) -> dict:
    """Pin this process to the allowed CPU core whose `host_probe_ms` median is lowest ("fastest") or highest
    ("slowest"), and report every core's.

    On the lent H100 machine the probe runs in ~2.7 ms on some cores and ~5.5 ms on others (some switch between the
    two within a second: `benchmarks/results/h100-2026-11-25-cores.json`); unpinned, a process mostly ran at the
    slow speed. Every configuration of the run is then timed on that one core: "slowest" shows what a slow host
    costs each mode."""
    cores = sorted(os.sched_getaffinity(0))
    by_core = {}
    for c in cores:
        os.sched_setaffinity(0, {c})
        by_core[c] = statistics.median(host_probe_ms() for _ in range(probes))
    pick = (max if which == "slowest" else min)(by_core, key=by_core.get)
    os.sched_setaffinity(0, {pick})
    return {"core": pick, "which": which, "probe_ms_by_core": {str(c): round(v, 3) for c, v in by_core.items()}}


def tail_state(s: Setup) -> dict:
    """groupclip's clip-tail graph state of a setup: on, off or still on trial, and the trial's report."""
    clipper = s.engine.clipper if s.engine is not None else None
    if clipper is None:
        return {}
    out = {"tail_graphs": ("trial" if clipper.tail_trial is not None else
                           "on" if clipper.tails is not None and clipper.tails.active else "off")}
    if clipper.tail_report is not None:
        out["tail_trial"] = clipper.tail_report
    if clipper.tails is not None:
        out["tail_counts"] = {"captures": clipper.tails.captures, "replays": clipper.tails.replays,
                              "held": clipper.tails.held}
    return out


def time_config(workload, mode, precision, steps, warmup) -> dict:
    reset()
    row = {"workload": workload, "mode": mode, "precision": precision}
    s = None
    try:
        s = Setup(workload, mode, precision)
        row["batch"] = s.batch
        gen = torch.Generator(DEV).manual_seed(1)
        batches = [make_batch(s.kind, s.batch, s.seq, gen, s.small) for _ in range(2)]
        times = []
        # groupclip's default ("auto") times its first steps with and without clip-tail graphs and keeps the
        # faster (`groupclip.tail_trial`): warm up until it has decided and no more graphs are captured (at most
        # TRIAL_CAP steps more)
        i = done_warm = 0
        new_graphs = []  # clip-tail graphs captured in each timed step (a capture costs the host milliseconds)
        while len(times) < steps:
            x, y = batches[i % 2]
            sync()
            before = s.tail_captures()
            t0 = time.perf_counter()
            s.step(x, y)
            sync()
            i += 1
            if done_warm:
                times.append(time.perf_counter() - t0)
                after = s.tail_captures()
                new_graphs.append(after - before if after is not None and before is not None else None)
            elif i >= warmup and (not s.trial_pending() or i >= warmup + TRIAL_CAP):
                done_warm = i
                row["host_probe_ms"] = host_probe_ms()
        med = statistics.median(times)
        row.update(step_s=med, samples_per_s=s.batch / med, peak_mem_gib=peak_gib(),
                   step_s_all=times, warmup_steps=done_warm, host_probe_after_ms=host_probe_ms(), **tail_state(s))
        if any(n is not None for n in new_graphs):
            row["captures_per_step"] = new_graphs
        # the same steps back to back, as a training loop runs them: no host sync between steps, so the host
        # may prepare step i+1 while the GPU runs step i. Per-step times from CUDA events recorded on the
        # stream at each step's start (GPU timeline, idle gaps included); one sync at the end
        if DEV == "cuda":
            # warmed up back to back as well: groupclip's tail watch may start a new trial of its clip-tail graphs
            # when the loop's timing changes (h100-2026-11-25-vit-slowest-core.json: all-layer's graphs were off
            # after the synchronised steps, and its back-to-back window ran 70-140 ms steps while a new trial and
            # its captures ran); wait until it has settled, as for the synchronised steps (at most TRIAL_CAP)
            j = 0
            while j < warmup or (s.trial_pending() and j < warmup + TRIAL_CAP):
                s.step(*batches[j % 2])
                j += 1
            row["warmup_steps_b2b"] = j
            row.update({k + "_b2b": v for k, v in tail_state(s).items()})
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            sync()
            before = s.tail_captures()
            for i in range(steps):
                x, y = batches[i % 2]
                events[i].record()
                s.step(x, y)
            events[steps].record()
            sync()
            b2b = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
            med = statistics.median(b2b)
            row.update(step_s_b2b=med, samples_per_s_b2b=s.batch / med, step_s_b2b_all=b2b)
            after = s.tail_captures()
            if after is not None and before is not None:
                row["captures_b2b"] = after - before
    except Exception as e:  # record failures as findings
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        traceback.print_exc(limit=4)
    finally:
        if s is not None:
            s.close()
        del s
    row["left_gib"] = left_behind(f"{workload} {precision} {mode}")
    return row


def left_behind(label: str) -> float:
    """GiB still allocated on the GPU after a configuration closed (and the garbage collector ran): memory that
    outlives it and counts in the peaks of every later configuration. Logs the largest live CUDA tensors then."""
    reset()
    if DEV != "cuda":
        return float("nan")
    left = torch.cuda.memory_allocated() / 2**30
    if left > 0.1:
        sizes = collections.Counter()
        for o in gc.get_objects():
            try:
                if torch.is_tensor(o) and o.is_cuda:
                    sizes[(tuple(o.shape), str(o.dtype), type(o).__name__)] += 1
            except Exception:
                continue
        top = sorted(sizes.items(), key=lambda kv: -kv[1] * math.prod(kv[0][0]))[:8]
        log(f"left behind by {label}: {left:.2f} GiB; largest live CUDA tensors (shape, dtype, type): count {top}")
    return left


class SearchStopped(Exception):
    """A trial failed with an error other than running out of memory: the process may not be usable any more."""

    def __init__(self, batch: int, error: BaseException):
        super().__init__(f"b={batch}: {type(error).__name__}: {error}")
        self.batch, self.error = batch, error


def is_oom(e: BaseException | None) -> bool:
    """Out of memory, also where it is the cause of another error (a CUDA-graph capture that ran out of memory
    raises groupclip's EngineError from it) or a CUDA or library error that says so."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def max_batch(workload, mode, precision, cap_factor=4.0) -> dict:
    """Largest batch that runs two steps: grow by 1.5x until failure (cap: cap_factor x nominal), then bisect.

    Eager modes run every trial on one Setup. A graphed mode captures its graph at the batch size of its first
    step, so each trial builds its own Setup (a capture at that size) and closes it after. A `-tails` mode (clip
    tails forced on) also builds a Setup per trial and runs three steps: a tail is captured when its key comes back
    (step 2) and replayed after, so the peak holds the graphs' buffers and pool, and no graph of another batch size
    is left in it. A trial does not fit when it runs out of memory, in the capture too. Any other error ends the
    search (a failed capture can leave the process unusable): the row then keeps the largest batch that fitted so
    far, with "stopped" (the error) and "stopped_at" (the batch it came at); where nothing fitted yet, the error is
    raised.
    """
    nominal = WORKLOADS[workload]["batch"]
    graph, tails = mode.endswith(GRAPH), mode.endswith(TAILS)
    fresh, steps = graph or tails, 3 if tails else 2
    reset()
    # the default mode with tail graphs off: its trial would switch them on partway through the trials (it counts
    # every backward pass, at whatever batch); with them on a layer's results take one more buffer its size (the
    # `-tails` mode's search measures that)
    shared = None if fresh else Setup(workload, mode, precision, tail_graphs=False)
    gen = torch.Generator(DEV).manual_seed(2)
    peaks, trials = {}, []

    def fits(b):
        s, x, y, ok, stop = shared, None, None, False, None
        try:
            reset()
            if fresh:
                s = Setup(workload, mode, precision, batch=b, tail_graphs=False if graph else None)
            w = WORKLOADS[workload]
            x, y = make_batch(w["kind"], b, w["seq"], gen, w.get("small", False))
            for _ in range(steps):
                s.step(x, y)
            sync()
            peaks[b] = peak_gib()
            ok = True
        except Exception as e:
            if is_oom(e):
                log(f"maxbatch {workload} {precision} {mode} b={b}: {str(e).splitlines()[0][:300]}")
            else:
                stop = SearchStopped(b, e)
        x = y = None
        try:
            if fresh and s is not None:
                s.close()
            elif not ok and s is not None:
                s.opt.zero_grad(set_to_none=True)
        except Exception as e:
            stop = stop or SearchStopped(b, e)
        s = None
        if stop is not None:
            log(f"maxbatch {workload} {precision} {mode} {stop}"[:400])
            raise stop
        trials.append([b, ok])
        log(f"maxbatch {workload} {precision} {mode} b={b}: {'fits' if ok else 'does not fit'}"
            + (f", peak {peaks[b]:.2f} GiB" if ok and DEV == "cuda" else ""))
        return ok

    cap = int(cap_factor * nominal)
    lo, hi, b = 0, None, nominal
    row = {"workload": workload, "mode": mode, "precision": precision}
    try:
        while True:  # grow by 1.5x, the last step to exactly the cap: "capped" means the cap itself fits
            if not fits(b):
                hi = b
                break
            lo = b
            if b >= cap:
                break
            b = min(int(b * 1.5), cap)
        if hi is not None:
            for _ in range(4):
                if hi - lo <= max(1, nominal // 16):
                    break
                mid = (lo + hi) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid
    except SearchStopped as e:
        if lo == 0:
            raise e.error from None
        row.update(stopped=f"{type(e.error).__name__}: {str(e.error)[:400]}", stopped_at=e.batch)
    try:
        if shared is not None:
            shared.close()
        reset()
    except Exception as e:  # after a stop the process may not be usable: the row stands
        log(f"maxbatch {workload} {precision} {mode}: cleanup failed: {type(e).__name__}: {str(e)[:300]}")
    peak = peaks.get(lo)
    row.update(max_batch=lo, capped=lo >= cap, cap=cap, steps_per_trial=steps,
               peak_mem_gib_at_max=peak if peak is not None and peak == peak else None, trials=trials)
    return row


def max_batch_row(workload, mode, precision) -> dict:
    """max_batch's row, or the row with the error that ended it (--maxbatch-one: run in a process of its own)."""
    try:
        return max_batch(workload, mode, precision)
    except Exception as e:
        traceback.print_exc(limit=6)
        return {"workload": workload, "mode": mode, "precision": precision,
                "error": f"{type(e).__name__}: {e}"[:400]}


def max_batch_isolated(workload, mode, precision, timeout, tiny) -> dict:
    """One largest-batch search in a fresh Python process (`--maxbatch-one`): no allocator history, cached
    blocks or leftovers of failed steps from another search. Same device and --tiny, same environment
    (PYTORCH_CUDA_ALLOC_CONF included); its stderr goes to this log line by line, its last stdout line is the
    row. A search that runs past `timeout` seconds is killed and recorded as an error."""
    cmd = [sys.executable, os.path.abspath(__file__), "--maxbatch-one", f"{workload},{precision},{mode}",
           "--device", DEV] + (["--tiny"] if tiny else [])
    tag = f"[maxbatch {workload} {precision} {mode}]"
    row = {"workload": workload, "mode": mode, "precision": precision}
    if DEV == "cuda" and torch.cuda.is_initialized():  # an earlier phase of this run: its context stays on the GPU
        reset()
        row["parent_cuda_context"] = True
        log(f"{tag} note: this process holds a CUDA context ({torch.cuda.memory_reserved() / 2**30:.2f} GiB "
            "reserved) while the search runs; run --phases maxbatch alone for the whole GPU")
    out, tail = [], collections.deque(maxlen=5)

    def pump_err(stream):
        for line in stream:
            tail.append(line.rstrip("\n"))
            log(f"{tag} {tail[-1]}")

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    readers = [threading.Thread(target=pump_err, args=(proc.stderr,), daemon=True),
               threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)]
    for t in readers:
        t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None:  # timed out, or this process was interrupted: never leave a search running
            proc.kill()
            proc.wait()
    for t in readers:
        t.join(timeout=10)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    if rc is None:
        row["error"] = f"timeout: no result after {timeout:g} s (--maxbatch-timeout)"
    else:
        found = None
        for line in reversed(out):
            if line.strip():
                try:
                    found = json.loads(line)
                except ValueError:
                    pass
                break
        if isinstance(found, dict) and (found.get("workload"), found.get("mode"), found.get("precision")) == (
                workload, mode, precision):
            row = {**found, **row}
            if rc != 0:
                row["exit_code"] = rc
        else:
            row["error"] = (f"the search process exited with code {rc} without a result row"
                            + (f"; its stderr ended: {tail[-1][:300]}" if tail else ""))
    row["isolated"] = True
    return row


def warm_setup(workload, mode, precision, sync_steps=False):
    """A configuration with one batch of data, after three warm-up steps (more while groupclip's tail-graph trial
    has not decided, up to TRIAL_CAP). `sync_steps`: a host sync after each warm-up step, as in a loop that reads a
    result every step (the trial decides for the loop it sees: back to back, the host may catch up in the next
    forward what a sync'd step would wait for)."""
    reset()
    s = Setup(workload, mode, precision)
    gen = torch.Generator(DEV).manual_seed(1)
    x, y = make_batch(s.kind, s.batch, s.seq, gen, s.small)
    for i in range(3 + TRIAL_CAP):
        if i >= 3 and not s.trial_pending():
            break
        s.step(x, y)
        if sync_steps:
            sync()
    sync()
    return s, x, y


def profile_config(workload, mode, precision, path):
    """Top kernels by device time for a few steps of one configuration (appended to `path`)."""
    from torch.profiler import ProfilerActivity, profile

    s, x, y = warm_setup(workload, mode, precision)
    # host time to enqueue one step (no sync) against its wall time: equal means the step is CPU-bound
    enqueue, wall = [], []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        s.step(x, y)
        enqueue.append(time.perf_counter() - t0)
        sync()
        wall.append(time.perf_counter() - t0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            s.step(x, y)
        sync()
    s.close()
    key = "self_cuda_time_total" if DEV == "cuda" else "self_cpu_time_total"
    events = []
    for e in prof.key_averages():
        dev_t = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
        events.append({"name": e.key, "calls": e.count, "self_device_us": dev_t, "self_cpu_us": e.self_cpu_time_total})
    with open(path + ".jsonl", "a") as f:
        f.write(json.dumps({"workload": workload, "precision": precision, "mode": mode, "events": events,
                            "enqueue_s": statistics.median(enqueue), "wall_s": statistics.median(wall)}) + "\n")
    with open(path, "a") as f:
        f.write(f"\n===== {workload} {precision} {mode} (3 steps; one step: host enqueue "
                f"{statistics.median(enqueue) * 1e3:.1f} ms, wall {statistics.median(wall) * 1e3:.1f} ms)\n")
        f.write(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))


def pyprofile_config(workload, mode, precision, path):
    """Python-level profile (cProfile) of a few steps: where the host time of a CPU-bound step goes."""
    import cProfile
    import io
    import pstats

    s, x, y = warm_setup(workload, mode, precision)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        s.step(x, y)
    sync()
    prof.disable()
    s.close()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumtime").print_stats(35)
    with open(path, "a") as f:
        f.write(f"\n===== {workload} {precision} {mode} (5 steps)\n" + buf.getvalue())


# ----------------------------------------------------------------------------------------- correctness
def check_against_oracle() -> list[dict]:
    import groupclip

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = []
    for kind, seq, groups, via in [(k, s, g, v) for k, s in (("gpt2", 16), ("vit", 0))
                                   for g in ("all-layer", "layer-wise") for v in ("eager", "graph")]:
        torch.manual_seed(0)
        model = build_model(kind, seq, small=True).float()
        ref = copy.deepcopy(model).double().cpu()
        gen = torch.Generator(DEV).manual_seed(3)
        x, y = make_batch(kind, 6, seq, gen, small=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eng = groupclip.PrivacyEngine(model, opt, batch_size=6, sample_size=600, noise_multiplier=0.0,
                                          max_grad_norm=1.0, clipping="automatic", groups=groups)
        if via == "graph":  # captured on another batch of the same shape, replayed on this one
            other = make_batch(kind, 6, seq, gen, small=True)
            eng.graphed_backward(functools.partial(loss_of, kind, model), *other)(x, y)
        else:
            loss_of(kind, model, x, y).backward()
        got = {n: p.grad.double().cpu() for n, p in model.named_parameters()}
        eng.detach()
        expect = _oracle(kind, ref, x.cpu() if kind == "gpt2" else x.double().cpu(), y.cpu(), groups, 6)
        num = sum(((got[n] - expect[n]) ** 2).sum() for n in expect) ** 0.5
        den = sum((expect[n] ** 2).sum() for n in expect) ** 0.5
        rel = float(num / den)
        out.append({"model": kind, "groups": groups, "via": via, "rel_err": rel, "ok": rel <= 1e-3})
        log("check", kind, groups, via, rel)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return out


def _oracle(kind, model, x, y, groups, batch_size):
    names = [n for n, _ in model.named_parameters()]
    if groups == "all-layer":
        gl = [names]
    else:
        owner = {}
        for n in names:
            owner.setdefault(n.rpartition(".")[0], []).append(n)
        gl = list(owner.values())
    ck = 1.0 / len(gl) ** 0.5
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_of_cpu(kind, model, x[i : i + 1], y[i : i + 1]).backward()
        for g in gl:
            norm = sum((params[n].grad ** 2).sum() for n in g) ** 0.5
            for n in g:
                total[n] += params[n].grad * ck / (norm + 0.01) / batch_size
    return total


def loss_of_cpu(kind, model, x, y):
    if kind == "gpt2":
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
    return F.cross_entropy(model(pixel_values=x).logits, y)


# ----------------------------------------------------------------------------------------- fused kernels
KERNEL_SHAPES = [  # (name, B, T, Da, Dg): the ghost norms of the benchmark's layers
    ("vit-attn", 128, 197, 768, 768), ("vit-mlp-up", 128, 197, 768, 3072), ("vit-mlp-down", 128, 197, 3072, 768),
    ("gpt2-256-qkv", 64, 256, 768, 2304), ("gpt2-256-mlp", 64, 256, 768, 3072),
    ("gpt2-1024-qkv", 16, 1024, 768, 2304), ("gpt2-1024-mlp", 16, 1024, 3072, 768),
]
#: GPT-2's (tied) output layer: g is the (B, T, 50257) logits gradient, rows 50257 elements apart
LM_HEAD_SHAPES = [("gpt2-256-lm-head", 64, 256, 768, 50257), ("gpt2-1024-lm-head", 16, 1024, 768, 50257)]
#: sequence lengths between the two (same 16K tokens a batch): where the split-feature kernel stops paying off
LM_HEAD_BETWEEN = [(f"gpt2-{t}-lm-head", 16384 // t, t, 768, 50257) for t in (384, 512, 768)]
GHOST_VARIANTS = [  # (tile, bk, warps, stages); the first is the default (bk 32 in float32, 64 in 16-bit; 4 stages)
    (128, None, 8, None), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 5), (64, 64, 4, 3),
]


LN_VARIANTS = [  # (rows per step, columns per program, warps, programs wanted); the first is the default
    (32, 128, 4, 528), (64, 64, 4, 1056), (8, 256, 4, 528),
]


def check_kernels() -> list[dict]:
    """Triton kernels against float64 on the GPU (fp32 without TF32, bf16), and their speed against the
    PyTorch operations they replace."""
    from groupclip.kernels import triton_ops
    from groupclip.rules.base import Factors

    out = []
    gen = torch.Generator(DEV).manual_seed(5)

    def rel(x, y):
        return float((x.double() - y.double()).norm() / y.double().norm())

    torch.backends.cuda.matmul.allow_tf32 = False
    for dt in (torch.float32, torch.bfloat16):
        for b, t, da, dg in ((3, 70, 40, 33), (5, 197, 96, 160), (2, 1024, 64, 48)):
            a = torch.randn(b, t, da, device=DEV, generator=gen).to(dt)
            g = torch.randn(b, t, dg, device=DEV, generator=gen).to(dt)
            got = triton_ops.ghost_partials(a, g).sum(1)
            ref = torch.stack([(g[i].double().T @ a[i].double()).square().sum() for i in range(b)])
            out.append({"kernel": "ghost", "dtype": str(dt), "shape": [b, t, da, dg], "rel_err": rel(got, ref)})
        x = torch.randn(4, 77, 300, device=DEV, generator=gen)
        g = torch.randn(4, 77, 300, device=DEV, generator=gen).to(dt)
        _, mean, rstd = torch.native_layer_norm(x, (300,), None, None, 1e-5)
        gw, gb = triton_ops.layer_norm_ps(x, mean.reshape(-1), rstd.reshape(-1), g, True, True)
        xh = (x.double() - mean.double()) * rstd.double()
        out.append({"kernel": "layer_norm_ps", "dtype": str(dt),
                    "rel_err": max(rel(gw, (g.double() * xh).sum(1)), rel(gb, g.double().sum(1)))})
        w = torch.randn(300, device=DEV, generator=gen)
        x64 = x.double().requires_grad_(True)
        (dx_ref,) = torch.autograd.grad(F.layer_norm(x64, (300,), w.double(), None, 1e-5), x64, g.double())
        dx, gw, gb = triton_ops.layer_norm_backward(x, g, w, 1e-5)
        out.append({"kernel": "layer_norm_backward", "dtype": str(dt),
                    "rel_err": max(rel(dx, dx_ref), rel(gw, (g.double() * xh).sum(1)), rel(gb, g.double().sum(1)))})
    parts = [(torch.randn(64, 300, device=DEV, generator=gen), False),
             (torch.rand(64, 16, device=DEV, generator=gen), True)]
    for kind in ("norm2", "automatic", "abadi", "autov", "psac"):
        got = triton_ops.clip_coef(parts, kind, 0.5, 64.0, 1.0, 0.01, 0.01)
        n2 = parts[0][0].double().square().sum(1) + parts[1][0].double().sum(1)
        norm = 64.0 * n2.sqrt()
        ref = {"norm2": n2, "automatic": 0.5 / (norm + 0.01), "abadi": (0.5 / (norm + 1e-6)).clamp(max=1.0),
               "autov": 0.5 / norm, "psac": 0.5 / (norm + 0.01 / (norm + 0.01))}[kind]
        out.append({"kernel": "clip_coef", "kind": kind, "rel_err": rel(got, ref)})
    torch.backends.cuda.matmul.allow_tf32 = True
    for c in out:
        c["ok"] = c["rel_err"] <= (1e-5 if "float32" in c.get("dtype", "float32") else 2e-2)
        log("kernel check", json.dumps(c))

    def bench(fn, *args, n=10, **kw):
        for _ in range(3):
            fn(*args, **kw)
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(n):
            start.record()
            fn(*args, **kw)
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end))
        return statistics.median(ts)

    for name, b, t, da, dg in KERNEL_SHAPES:
        for dt in (torch.bfloat16, torch.float32):
            a = torch.randn(b, t, da, device=DEV, generator=gen).to(dt)
            g = torch.randn(b, t, dg, device=DEV, generator=gen).to(dt)
            row = {"bench": "ghost", "shape": name, "dtype": str(dt)}
            row["torch_ms"] = bench(_ghost_torch, Factors(g, a))
            for tile, bk, warps, stages in GHOST_VARIANTS:
                key = f"triton_{tile}_{bk}_{warps}_{stages}"
                try:
                    row[key] = bench(triton_ops.ghost_partials, a, g, tile, bk, warps, stages)
                except Exception as e:
                    row[key] = f"{type(e).__name__}: {str(e)[:100]}"
            log("kernel bench", json.dumps(row))
            out.append(row)
        x = torch.randn(b, t, 768, device=DEV, generator=gen)
        g = torch.randn(b, t, 768, device=DEV, generator=gen)
        _, mean, rstd = torch.native_layer_norm(x, (768,), None, None, 1e-5)

        row = {"bench": "layer_norm_ps", "shape": name, "torch_ms": bench(_ln_torch, x, mean, rstd, g)}
        m, r = mean.reshape(-1), rstd.reshape(-1)
        for bt, bd, warps, progs in LN_VARIANTS:
            row[f"triton_{bt}_{bd}_{warps}_{progs}"] = bench(triton_ops.layer_norm_ps, x, m, r, g, True, True,
                                                             bt, bd, warps, progs)
        # the whole LayerNorm backward: PyTorch's input gradient + the per-sample kernel, or one fused pass
        w = torch.randn(768, device=DEV, generator=gen)
        row["native_input_grad_ms"] = bench(_ln_native_dx, x, mean, rstd, g, w)
        row["native_plus_ps_ms"] = bench(_ln_native_plus_ps, x, mean, rstd, g, w)
        for warps, progs, rows in ((8, 528, None), (4, 1056, None), (8, 528, 8), (16, 528, 16), (4, 528, 2)):
            row[f"fused_{warps}_{progs}_{rows}_ms"] = bench(triton_ops.layer_norm_backward, x, g, w, 1e-5, warps,
                                                            progs, rows)
        out.append(row)
        log("kernel bench", json.dumps(out[-1]))
    # the output layer's norm three ways: ghost (aligned chunk copies of g + cuBLAS Grams), the fused kernel on g
    # in place, per-sample products a few samples at a time (chunked_norms)
    from groupclip.rules.base import chunked_norms

    for name, b, t, da, dg in LM_HEAD_SHAPES:
        for dt in (torch.bfloat16, torch.float32):
            a = torch.randn(b, t, da, device=DEV, generator=gen).to(dt)
            g = torch.randn(b, t, dg, device=DEV, generator=gen).to(dt)
            reset()
            row = {"bench": "lm_head_norm", "shape": name, "dtype": str(dt),
                   "ghost_torch_ms": bench(_ghost_torch, Factors(g, a)),
                   "ghost_triton_ms": bench(triton_ops.ghost_partials, a, g),
                   "chunked_norms_ms": bench(chunked_norms, g, a)}
            reset()
            before = torch.cuda.memory_allocated()
            chunked_norms(g, a)
            row["chunked_norms_extra_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
            ref = _ghost_torch(Factors(g, a))
            row["chunked_rel_err"] = float(((chunked_norms(g, a) - ref).abs() / ref).max())
            log("kernel bench", json.dumps(row))
            out.append(row)
            del a, g
    return out


def _bench_ms(fn, *args, n=20, **kw):
    """GPU time of one fn(*args) in ms: 10 calls captured in a CUDA graph, the median of n replays / 10 (the
    host's launch time, which eager timing of a small kernel would include, is not counted). Event timing of
    single calls where capture fails."""
    for _ in range(3):
        fn(*args, **kw)
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                fn(*args, **kw)
        run, per = graph.replay, 10
    except Exception as e:
        log(f"ops bench: no graph capture ({type(e).__name__}: {e}); timing single calls")
        run, per = functools.partial(fn, *args, **kw), 1
    ts = []
    for _ in range(n):
        start.record()
        run()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / per)
    return statistics.median(ts)


def bench_ops() -> list[dict]:
    """The clip path's smaller operations at the benchmark's shapes, each against what it replaced: scaling a
    factor by the clip coefficients (PyTorch broadcasting multiply vs the row-scaling kernel), the coefficient
    sum of instantiated 16-bit per-sample gradients (one 16-bit coefficient row vs head + tail rows), and the
    ghost kernel of a layer whose input Gram tiles another layer kept (q, k, v). Each also checked for values."""
    from groupclip import kernels
    from groupclip.kernels import triton_ops
    from groupclip.rules import base

    gen = torch.Generator(DEV).manual_seed(7)
    out = []
    for name, b, t, d in (("vit-768", 128, 197, 768), ("vit-3072", 128, 197, 3072), ("gpt2-256-768", 64, 256, 768),
                          ("gpt2-256-3072", 64, 256, 3072), ("gpt2-1024-768", 16, 1024, 768)):
        for dt in (torch.bfloat16, torch.float32):
            x = torch.randn(b, t, d, device=DEV, generator=gen).to(dt)
            coef = torch.rand(b, device=DEV, generator=gen)
            row = {"bench": "scale_rows", "shape": name, "dtype": str(dt),
                   "torch_mul_ms": _bench_ms(lambda x, c: x * c.to(x.dtype)[:, None, None], x, coef),
                   "equal_to_f32_product": bool(torch.equal(kernels.scale_rows(x, coef),
                                                            (x.float() * coef[:, None, None]).to(dt)))}
            for block, warps in ((1024, 4), (2048, 4), (4096, 8)):
                row[f"triton_{block}_{warps}_ms"] = _bench_ms(triton_ops.scale_rows, x, coef, block, warps)
            out.append(row)
            log("ops bench", json.dumps(row))
    for name, b, n in (("gpt2-1024-mlp", 16, 768 * 3072), ("gpt2-1024-attn", 16, 768 * 768),
                       ("gpt2-1024-qkv", 16, 768 * 2304)):
        for dt in (torch.bfloat16, torch.float32):
            ps = torch.randn(b, n, device=DEV, generator=gen).to(dt)
            coef = torch.rand(b, device=DEV, generator=gen)
            p = torch.empty(n, device=DEV)
            terms = coef.double()[:, None] * ps.double()
            exact, size = terms.sum(0), terms.abs().sum(0).clamp_min(1e-30)

            def err(got, exact=exact, size=size):
                return float(((got.double() - exact).abs() / size).max())

            def one_row(c, s, p):
                return base.mm_into(c.to(s.dtype)[None], s, p).view(-1)

            def head_tail(c, s, p):  # the PyTorch path of base.coef_sum
                ops = kernels._ops
                kernels._ops = None
                try:
                    return base.coef_sum(c, s, p)
                finally:
                    kernels._ops = ops

            row = {"bench": "coef_sum", "shape": name, "dtype": str(dt)}
            for key, fn in (("one_row", one_row), ("head_tail", head_tail), ("triton", base.coef_sum)):
                row[f"{key}_ms"] = _bench_ms(fn, coef, ps, p)
                row[f"{key}_err"] = err(fn(coef, ps, p))  # max |error| / Σ_i |coef_i ps_i|, per entry
            for block, warps in ((512, 4), (2048, 4), (2048, 8)):
                row[f"triton_{block}_{warps}_ms"] = _bench_ms(triton_ops.coef_sum, coef, ps, block, warps)
            out.append(row)
            log("ops bench", json.dumps(row))
    from groupclip.rules.base import Factors

    for name, b, t, da, dg in LM_HEAD_SHAPES + LM_HEAD_BETWEEN:  # the tied output layer's own norm term
        for dt in (torch.bfloat16, torch.float32):
            a = torch.randn(b, t, da, device=DEV, generator=gen).to(dt)
            g = torch.randn(b, t, dg, device=DEV, generator=gen).to(dt)
            old = _ghost_torch(Factors(g, a))
            new = kernels.ghost_partials(a, g).sum(1)
            row = {"bench": "lm_head_ghost", "shape": name, "dtype": str(dt),
                   "chunks_cublas_ms": _bench_ms(_ghost_torch, Factors(g, a)),
                   "wide_kernel_ms": _bench_ms(kernels.ghost_partials, a, g),
                   "rel_diff": float(((new.double() - old.double()).abs() / old.double()).max())}
            for progs in (512, 2048):
                row[f"wide_{progs}_ms"] = _bench_ms(triton_ops.ghost_partials_wide, a, g, progs)
            out.append(row)
            log("ops bench", json.dumps(row))
            del a, g
    reset()
    for name, b, t, d in (("vit-qkv", 128, 197, 768), ("gpt2-256", 64, 256, 768)):
        for dt in (torch.bfloat16, torch.float32):
            a = torch.randn(b, t, d, device=DEV, generator=gen).to(dt)
            g = torch.randn(b, t, d, device=DEV, generator=gen).to(dt)
            kept = triton_ops.gram_tiles(a)
            own = triton_ops.ghost_partials(a, g)
            row = {"bench": "ghost_shared_input", "shape": name, "dtype": str(dt),
                   "own_ms": _bench_ms(triton_ops.ghost_partials, a, g),
                   "keep_ms": _bench_ms(triton_ops.ghost_partials, a, g, keep_a_tiles=kept),
                   "read_ms": _bench_ms(triton_ops.ghost_partials, a, g, a_tiles=kept),
                   "read_equal_own": bool(torch.equal(triton_ops.ghost_partials(a, g, a_tiles=kept), own)),
                   "tiles_mib": kept.numel() * 4 / 2**20}
            out.append(row)
            log("ops bench", json.dumps(row))
    return out


def _ghost_torch(f):
    """The PyTorch ghost norm (padded cuBLAS Gram products), its Gram memo emptied so nothing is reused."""
    from groupclip.rules.base import GRAMS, ghost_inner

    GRAMS.clear()
    return ghost_inner(f, f)


def _ln_native_dx(x, mean, rstd, g, w):
    return torch.ops.aten.native_layer_norm_backward(g, x, (x.shape[-1],), mean, rstd, w, None, [True, False, False])


def _ln_native_plus_ps(x, mean, rstd, g, w):
    from groupclip.kernels import triton_ops

    _ln_native_dx(x, mean, rstd, g, w)
    return triton_ops.layer_norm_ps(x, mean.reshape(-1), rstd.reshape(-1), g, True, True)


def _ln_torch(x, mean, rstd, g):
    """The unfused per-sample LayerNorm gradients (what the kernel replaces)."""
    return (g * ((x - mean) * rstd)).sum(1), g.sum(1)


# ----------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="the result file (JSON); required")
    ap.add_argument("--phases", default="check,time,maxbatch")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pin-core", choices=("none", "fastest", "slowest"), default="none",
                    help="pin the process to the CPU core where a pure-Python probe runs fastest (or slowest)")
    ap.add_argument("--append", action="store_true",
                    help="keep the phases already in --out (from an earlier run) and add this run's")
    ap.add_argument("--profile-out", default="profile.txt", help="where the profile phase writes its tables")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script (with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny models (smoke test of this script)")
    ap.add_argument("--maxbatch-timeout", type=float, default=600.0,
                    help="seconds one largest-batch search (its own process) may take; past that it is killed and "
                         "recorded as an error")
    ap.add_argument("--maxbatch-one", help=argparse.SUPPRESS)  # WORKLOAD,PRECISION,MODE: one search, its row on stdout
    args = ap.parse_args()
    if args.out is None and args.maxbatch_one is None:
        ap.error("--out is required")
    global DEV
    DEV = args.device
    if args.tiny:
        for w in WORKLOADS.values():
            w.update(small=True, batch=4, seq=16 if w["seq"] else 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    pinned = pin_to_core(args.pin_core) if args.pin_core != "none" else None
    if args.maxbatch_one is not None:  # the child process of max_batch_isolated: one search, its row last on stdout
        w, prec, m = args.maxbatch_one.split(",")
        print(json.dumps(max_batch_row(w, m, prec)), flush=True)
        return
    phases = args.phases.split(",")
    workloads, modes, precisions = args.workloads.split(","), args.modes.split(","), args.precisions.split(",")
    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:
        opacus_version = None
        modes = [m for m in modes if not m.startswith("opacus")]
    import transformers

    import groupclip

    result = {
        "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        # named after the searches when maxbatch is the only phase: this process then makes no CUDA context
        # (about 0.5 GiB) that would stay on the GPU while the searches' processes run
        "device": device_name() if any(p != "maxbatch" for p in phases) else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "groupclip": groupclip.__version__, "opacus": opacus_version,
                     "python": platform.python_version(), "cuda": torch.version.cuda},
        "tiny": args.tiny,
        "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "tf32": True,
                     **({"cpu_affinity": pinned} if pinned is not None else {}),
                     "optimizer": "AdamW", "clipping": "automatic", "noise_multiplier": 1.0,
                     "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                     **({"maxbatch_timeout_s": args.maxbatch_timeout} if "maxbatch" in phases else {})},
    }

    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
        runs = earlier.pop("runs", [{k: earlier[k] for k in ("command", "date", "device", "versions", "settings")
                                     if k in earlier}])
        result = {**earlier, **result, "runs": [*runs, {k: result[k] for k in
                                                        ("command", "date", "device", "versions", "settings")}]}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if "check" in phases:
        result["check"] = check_against_oracle()
        save()
    if "kernels" in phases:
        result["kernels"] = check_kernels()
        save()
    if "ops" in phases:
        result["ops"] = bench_ops()
        save()
    if "time" in phases:
        # with --append: the earlier run's rows stay, except those this run measures again
        rows = [r for r in result.get("time", []) if (r["workload"], r["precision"], r["mode"]) not in
                {(w, p, m) for w in workloads for p in precisions for m in modes}]
        for rnd in range(args.rounds):
            for w in workloads:
                for prec in precisions:
                    for m in modes:
                        if rnd > 0 and m.startswith("opacus") and any(
                            "error" in r for r in rows if (r["workload"], r["mode"], r["precision"]) == (w, m, prec)
                        ):
                            continue  # a failure is recorded once
                        r = time_config(w, m, prec, args.steps, args.warmup)
                        r["round"] = rnd
                        rows.append(r)
                        log(json.dumps({k: v for k, v in r.items() if not k.endswith("_all")}))
                        result["time"] = rows
                        save()
    if "profile" in phases:
        for w in workloads:
            for prec in precisions:
                for m in modes:
                    profile_config(w, m, prec, args.profile_out)
    if "pyprofile" in phases:
        for w in workloads:
            for prec in precisions:
                for m in modes:
                    pyprofile_config(w, m, prec, args.profile_out + ".py.txt")
    if "maxbatch" in phases:
        # each search in a process of its own (max_batch_isolated); with --append the earlier rows stay, except
        # those this run searches again
        mb_modes = [m for m in modes if m in MAXBATCH_MODES]
        rows = [r for r in result.get("maxbatch", []) if (r["workload"], r["precision"], r["mode"]) not in
                {(w, p, m) for w in workloads for p in precisions for m in mb_modes}]
        for w in workloads:
            for prec in precisions:
                for m in mb_modes:
                    r = max_batch_isolated(w, m, prec, args.maxbatch_timeout, args.tiny)
                    rows.append(r)
                    log(json.dumps({k: v for k, v in r.items() if k != "trials"}))
                    result["maxbatch"] = rows
                    save()
        if result["device"] is None:
            result["device"] = device_name()
            for run in result.get("runs", [])[-1:]:
                run["device"] = result["device"]
            save()
    print(summary(result))


def summary(result) -> str:
    lines = []
    for c in result.get("check", []):
        verdict = "OK" if c["ok"] else "FAIL"
        lines.append(f"check {c['model']:5s} {c['groups']:11s} {c.get('via', 'eager'):5s} "
                     f"rel_err={c['rel_err']:.2e} {verdict}")
    rows = result.get("time", [])
    base = {}
    for r in rows:
        if r["mode"] == "nonprivate" and "error" not in r:
            base.setdefault((r["workload"], r["precision"], r["round"]), r)
    lines.append(f"{'workload':10s} {'prec':5s} {'mode':22s} {'rnd':3s} {'samples/s':>10s} {'x speed':>8s} "
                 f"{'peak GiB':>9s} {'x mem':>6s} {'b2b x speed':>11s}")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['workload']:10s} {r['precision']:5s} {r['mode']:22s} {r['round']:3d} "
                         f"ERROR {r['error'][:70]}")
            continue
        b = base.get((r["workload"], r["precision"], r["round"]))
        sp = r["samples_per_s"] / b["samples_per_s"] if b else float("nan")
        mem = r["peak_mem_gib"] / b["peak_mem_gib"] if b else float("nan")
        b2b = (r["samples_per_s_b2b"] / b["samples_per_s_b2b"] if b and "samples_per_s_b2b" in b
               and "samples_per_s_b2b" in r else float("nan"))
        lines.append(f"{r['workload']:10s} {r['precision']:5s} {r['mode']:22s} {r['round']:3d} "
                     f"{r['samples_per_s']:10.1f} {sp:8.3f} {r['peak_mem_gib']:9.2f} {mem:6.3f} {b2b:11.3f}")
    for r in result.get("maxbatch", []):
        found = r.get("max_batch", r.get("error", ""))
        if "stopped" in r:
            found = f"{found} (search stopped at {r.get('stopped_at')}: {r['stopped'][:60]})"
        lines.append(f"maxbatch {r['workload']:10s} {r['precision']:5s} {r['mode']:26s} {found}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Whether clip-tail graphs pay off in this loop: steps timed with and without them, then kept or dropped.

Clip-tail graphs (`groupclip.tails`) cut the host time of each layer's clip tail (~410 µs → ~35 µs a Linear layer on
an H100's host) at the price of result buffers the size of the parameters and a few percent of memory. They make a
host-bound loop (ViT-base under bf16 autocast) much faster and a GPU-bound one a point slower. `tail_graphs="auto"`
(the default) decides by measurement:

1. `WARM_STEPS` backward passes run eagerly (Triton compiles, the allocator settles);
2. the next `TIMED_STEPS` + 1 backward passes compare their host time (first clipped layer to the end) with their
   GPU time (CUDA events): where the host took less than `HOST_SHARE` (half) of it, the GPU is the slower by a
   margin a host running at half speed would not use up, and the graphs cannot help: they stay off, and the loop
   never pays their memory;
3. otherwise one more pass measures how long the GPU itself works in a backward pass: the GPU is first given a head
   start (`_head_start`: a spin kernel longer than the host's backward), so the GPU works through the pass without
   waiting for the host, and the time from the spin's end to the pass's end is pure GPU work. The time the GPU idled
   in a backward pass (its GPU time in step 2 minus that) is all the graphs could save now. The host's time for that
   pass is its own work plus any wait for a full launch queue (127-257 ms against 40-81 ms of GPU work for ViT-base,
   whose passes launch more than the queue holds); its own work is its time to the last clipped layer it reached
   while the spin still ran (until then it cannot have waited for the GPU), scaled to all the pass's clipped layers
   (`_own_ms`). Where the GPU idles less than `MIN_GAIN` of a step *and* the host's own work is less than
   `OWN_SHARE` of the GPU's (it keeps up now), the graphs stay off without being tried. A host that needs as long
   as the GPU or longer is tried even where the GPU did not idle: a snapshot of a loop at the edge does not last
   (the lent H100 host's Python runs at two speeds a factor of ~2 apart, `benchmarks/NOTES.md`; ViT-base bf16
   layer-wise judged GPU-bound, with the GPU idle 0 ms of a 39.7 ms pass, then took 61-75 ms a step with a sync per
   step and 74-105 ms back to back, against 58-60 ms with the graphs on in the same run:
   `benchmarks/results/h100-2026-11-25-run3.json`, `h100-2026-11-25-phase-times.json`). That the GPU never waited
   is checked at every clipped layer (`tick`): a mark recorded two layers earlier must still be ahead of the GPU (a
   spin shorter than the host's pass is fine as long as the launch queue stays full: the host then waits for the
   GPU, not the other way round). Where the GPU caught up with the host, the measurement says nothing: it is tried
   once more with a spin twice as long, then skipped;
4. otherwise the graphs are switched on; at least `SETTLE_STEPS` steps let the tails' keys repeat and get captured,
   and until a step captures nothing (after `MAX_ON_STEPS` steps that still capture, they are dropped);
5. then steps alternate without and with the graphs in blocks of two, the second of each block timed, `TIMED_STEPS`
   of each (a host's speed drifts by tens of percent within seconds; alternating exposes both to the same drift;
   the first step of a block lets the GPU's backlog settle to that mode's: a step with the graphs leaves the GPU
   behind the host, which a step right after it would be charged for). A step that captures starts this over;
6. the graphs stay on unless the median step with them took more than `MAX_LOSS` more time per sample than the median
   step without them (or no tail was replayed); otherwise they are dropped with their memory. A tie keeps them where
   the probe of step 3 showed that a backward pass on its own leaves the GPU idle (or could not tell, or did not run):
   a loop that times the same without them is then only hiding the host's backward behind its slack (the next
   forward overlapping it), which a sync per step (reading the loss for a log) or a slower host takes away. ViT-base
   bf16 layer-wise on an H100, trial run back to back: 0.453 ms a sample with them, 0.455 without, dropped under an
   older rule (at least 3% faster); the synchronised steps after that took 59-160 ms (median 75-84) without them,
   against 64-66 ms with them in the same session (`benchmarks/results/h100-2026-11-24-step-marks-b2b-trial.json`).
   Where the probe saw the GPU idle less than `MIN_GAIN` of a step (the graphs were tried because the host's own work
   reached the GPU's), a tie drops them as GPU-bound and the watch below takes over: GPT-2 bf16 T=256 layer-wise kept
   them as ties at 1.016x memory, its steps 136.4-139.8 ms with them against 136.6 without
   (`benchmarks/results/h100-2026-11-25.json` and the run before it). The decision is logged (INFO) and kept for the
   engine's life (but for the watch's new trials).

After a "GPU-bound" decision a `TailWatch` keeps timing the backward passes (two CUDA events a pass, read once the
GPU has passed them, never waited for): the loop was judged from a few steps, and a host that slows down later makes
a loop that was GPU-bound host-bound. Where, over `WATCH_PASSES` passes, the GPU now idles at least `MIN_GAIN` of a
step in a backward pass (against the head-start probe's measure of its own work; where the probe did not run, where
the host's share reaches `WATCH_SHARE`), a new trial starts, at most `MAX_RETRIALS` times in an engine's life. A new
trial after idle time was seen starts at step 4 (the graphs are timed: a new probe could catch the host at a fast
moment again and judge the same); after a rise of the host share, which a full launch queue causes as well, at step 3
(`from_step`).

After a decision to keep them, `CaptureChurn` drops the graphs where they keep being captured anew: `CHURN_PASSES`
backward passes in a row in which at least a quarter of the tails that went to a graph were captured rather than
replayed (the tensors they read come back at new addresses each pass: another model's steps in between, a batch
shape that changes every step), so that the loop pays captures and gains no replays.

A step's time is the GPU time between the ends of two consecutive backward passes (CUDA events on the stream of
the gradients), i.e. the loop's real period whether the host or the GPU is the slower, per sample of the later
pass. Marks are waited for when a decision is made. Nothing here changes what is computed: a replayed tail runs
the same kernels on the same tensors as the eager one (`groupclip.tails`).
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from groupclip.tails import TailGraphs, capturing

log = logging.getLogger(__name__)

WARM_STEPS = 2
TIMED_STEPS = 3
#: a loop alternating between two sets of addresses sees each key at steps 1 and 2, captures at 3 and 4
SETTLE_STEPS = 4
MAX_ON_STEPS = 24
MIN_GAIN = 0.03
#: the graphs are dropped where steps with them are slower than this share (step 6)
MAX_LOSS = 0.01
#: backward passes a `TailWatch` looks at before it judges them
WATCH_PASSES = 8
#: new trials a watch may start in an engine's life
MAX_RETRIALS = 2
#: backward passes in a row that captured a quarter or more of their graphed tails anew before kept graphs are
#: dropped (`CaptureChurn`); a loop settling after a change of batch size captures for one or two
CHURN_PASSES = 4
#: a backward pass whose host time is below this share of its GPU time is GPU-bound with a margin: less host time
#: cannot make it faster, and a host at half the speed would still keep up (step 2). H100
#: (`benchmarks/results/h100-2026-11-24.json`, the reports' "host_share"): host-bound ViT-base bf16 1.00-1.03;
#: GPU-bound rows mostly 0.45-0.95, but up to 1.66 (GPT-2, ViT fp32): a host share near or above 1 does not tell
#: whether the GPU waited (the host may wait for a full launch queue), only the head start does (those rows: the GPU
#: idles 0-1.1 ms of a 59-79 ms pass)
HOST_SHARE = 0.5
#: in the head-start pass, the host's own work (`_own_ms`) below this share of the GPU's: the host keeps up with the
#: GPU now (step 3); a host that slows down later is the watch's to catch
OWN_SHARE = 1.0
#: a watch without the probe's measure asks for a new trial where the host's share of a backward pass reaches this
WATCH_SHARE = 0.95
#: spin-kernel cycles per millisecond of head start: at least a millisecond on GPUs clocked up to 2.5 GHz (H100 SXM:
#: 1.98); a faster clock is caught by the check that the spin outlasted the host's pass
SPIN_CYCLES_PER_MS = 2.5e6
#: head start = this times the longest backward pass's host time, plus HEAD_START_MS
HEAD_START_FACTOR = 1.5
HEAD_START_MS = 2.0


class TailTrial:
    """The measurement that decides `tail_graphs="auto"` for one engine. Switches `tails.active` itself."""

    def __init__(self, tails: TailGraphs, from_step: int = 2) -> None:
        if from_step not in (2, 3, 4):
            raise ValueError(f"from_step={from_step!r}: a trial starts at step 2, 3 or 4")
        self.tails = tails
        self.from_step = from_step  # 3: step 2 cannot decide off; 4: the graphs go on after the warm-up (a watch's)
        self.samples = 0  # batch size of a clip tail on a CUDA tensor in the current backward pass, or 0
        self.device: torch.device | None = None
        self._passes = 0  # backward passes counted so far
        self._begin: tuple[object, float] | None = None  # (mark, host clock) at the start of this backward pass
        self._spans: list[tuple[object, object, float]] = []  # (begin mark, end mark, host ms) of passes
        self._on_from: int | None = None  # the pass from which the graphs are on (None: not yet)
        self._captures = 0  # tails.captures at the end of the last pass
        self._last = None  # mark at the end of the last pass of the alternating window
        self._replays = 0  # tails.replays when the window began
        self._window: list[tuple[object, object, int, bool]] = []  # (start, end, samples, with graphs)
        self._pos = 0  # passes into the window
        self._share: float | None = None  # the backward passes' host time / GPU time
        self._window_ms: float | None = None  # median GPU time of a backward pass (first clipped layer to end)
        self._period_ms: float | None = None  # median time from one backward pass's end to the next one's
        self._host_ms = 0.0  # the longest host time of a timed backward pass
        self._head_start_ms: float | None = None  # the next pass gets this head start (None: no probe due)
        self._probe = None  # the mark after the spin of this pass (None: no head start in it)
        self._probe_clock = 0.0  # the host clock when that pass began (its host time: own work + launch-queue waits)
        self._ticks: list = []  # marks at the clipped layers of the pass with a head start, the spin's end first
        self._caught_up = False  # the GPU reached a mark of that pass while the host was two layers further
        self._spin_seen: tuple[int, float] = (0, 0.0)  # (clipped layers, host ms) at the last one the spin outlasted
        self._probes = 0
        self._probe_idle: float | None = None  # the GPU's idle time in a backward pass, from the head start (ms)
        self._probe_report: dict = {}
        self.report: dict | None = None

    def begin_of_backward(self) -> None:
        """Called when a backward pass reaches its first clipped layer."""
        self._begin = None
        if self._on_from is None and self.device is not None and self._passes >= WARM_STEPS and not capturing():
            if self._head_start_ms is not None:
                self._head_start(self._head_start_ms)
                self._probe, self._probe_clock = self._mark(), self._clock()
                self._ticks, self._caught_up, self._spin_seen = [self._probe], False, (0, 0.0)
            else:
                self._begin = (self._mark(), self._clock())

    def saw(self, use) -> None:
        """A clip tail ran (or could have run) for `use` in this pass."""
        g = use.grad_out
        if isinstance(g, torch.Tensor) and g.is_cuda:
            self.samples, self.device = use.batch_size, g.device
        self.tick()

    def tick(self) -> None:
        """A clipped layer's backward reached the host (in the pass with a head start: is the GPU still behind?)."""
        if self._probe is None or self._caught_up:
            return
        ticks = self._ticks
        ticks.append(self._mark())
        if self._spin_seen[0] == len(ticks) - 2 and self._spinning():  # (asked until the spin is found over)
            self._spin_seen = (len(ticks) - 1, (self._clock() - self._probe_clock) * 1e3)
        if len(ticks) >= 3 and self._finished(ticks[-3]):
            self._caught_up = True

    def end_of_backward(self) -> bool | None:
        """Called at the end of each backward pass; True / False (keep the graphs or not) once decided."""
        samples, self.samples = self.samples, 0
        begin, self._begin = self._begin, None
        if capturing():
            return None  # a pass captured by `engine.graphed_backward`: its tails are never graphed
        if samples == 0:  # no clip tail on a GPU in this pass: nothing to graph
            return self._decide(None, None, "no clip tail on a CUDA device")
        self._passes += 1
        if self._passes <= WARM_STEPS:
            return None
        if self._on_from is None and self.from_step == 4:
            self._switch_on()
            return None
        if self._on_from is None:  # is the host the slower?
            probe, self._probe = self._probe, None
            if probe is not None:
                return self._probed(probe)
            if self._head_start_ms is not None:  # the pass that was to get the head start did not (yet)
                return None
            if begin is not None:
                self._spans.append((begin[0], self._mark(), (self._clock() - begin[1]) * 1e3))
            if self._passes <= WARM_STEPS + TIMED_STEPS:
                return None
            share = self._share = self._host_share()
            if share is not None and share < HOST_SHARE and self.from_step == 2:
                return self._decide(None, None, f"GPU-bound: a backward pass's host time is {share:.0%} of its "
                                                "GPU time")
            if share is not None and self._period_ms and self._can_spin():
                self._head_start_ms = HEAD_START_FACTOR * self._host_ms + HEAD_START_MS
                return None
            self._switch_on()
            return None
        return self._compare(samples)

    def _probed(self, after) -> bool | None:
        """End of a pass that began with a head start: off if the GPU idles too little in a backward pass and the
        host's own work in it is less than the GPU's."""
        end, host = self._mark(), (self._clock() - self._probe_clock) * 1e3
        ticks, self._ticks = self._ticks, []
        if self._caught_up or self._finished(ticks[-2] if len(ticks) >= 2 else after):
            # the GPU caught up with the host somewhere in the pass: it may have waited for it
            self._probes += 1
            if self._probes < 2:
                self._head_start_ms *= 2
                return None
            self._head_start_ms = None
            self._probe_report = {"gpu_busy_ms": None}
            log.debug("groupclip: the head-start probe was inconclusive twice; trying the graphs")
            self._switch_on()
            return None
        self._head_start_ms = None
        busy = self._elapsed_ms(after, end)
        idle = self._probe_idle = max(0.0, self._window_ms - busy)
        own = self._own_ms(host, len(ticks) - 1)
        self._probe_report = {"gpu_busy_ms": busy, "backward_gpu_ms": self._window_ms, "step_ms": self._period_ms,
                              "head_start_host_ms": host, "host_own_ms": own,
                              "layers_before_wait": f"{self._spin_seen[0]}/{len(ticks) - 1}"}
        if idle < MIN_GAIN * self._period_ms and own < OWN_SHARE * busy:
            return self._decide(None, None, f"GPU-bound: the GPU idles {idle:.3g} ms in a backward pass of "
                                            f"{self._window_ms:.3g} ms (busy {busy:.3g}), less than "
                                            f"{MIN_GAIN:.0%} of a {self._period_ms:.3g} ms step, and the host's own "
                                            f"work in it ({own:.3g} ms) is less than the GPU's")
        self._switch_on()
        return None

    def _own_ms(self, host: float, layers: int) -> float:
        """The host's own work in the pass with a head start, from its time to the last clipped layer it reached
        while the spin still ran, scaled to all `layers` of the pass. Until the spin ends the host cannot have
        waited for the GPU: a wait for a full launch queue (or a sync) lasts until the GPU moves on past the spin.
        That holds where the spin outlasted every layer too: a queue that fills after the last clipped layer (the
        pass's last launches; nothing drains it behind the spin) makes the host wait before the pass's end (ViT-base
        fp32 on an H100: 122-150 ms against ~50 in a pass without a head start). Where the spin outlasted no layer,
        the pass's whole host time (an upper bound)."""
        seen, ms = self._spin_seen
        return ms * layers / seen if seen else host

    def _switch_on(self) -> None:
        self.tails.active = True
        self._on_from, self._captures = self._passes + 1, self.tails.captures

    def _compare(self, samples: int) -> bool | None:
        """A pass with the graphs switched on: settling, then the alternating window."""
        with_graphs = self.tails.active  # how this pass ran
        captured, self._captures = self.tails.captures != self._captures, self.tails.captures
        on_steps = self._passes - self._on_from + 1
        if on_steps < SETTLE_STEPS or captured or self._last is None:
            if on_steps >= MAX_ON_STEPS:
                return self._decide(None, None, f"tails were still being captured after {MAX_ON_STEPS} steps "
                                                "(the tensors keep moving)")
            if on_steps >= SETTLE_STEPS and not captured:  # settled: this pass's end starts the window
                self._last, self._window, self._replays, self._pos = self._mark(), [], self.tails.replays, 0
                self.tails.active = False
            else:
                self._last, self.tails.active = None, True
            return None
        end = self._mark()
        if self._pos % 2:  # the second pass of a block: timed
            self._window.append((self._last, end, samples, with_graphs))
        self._last, self._pos = end, self._pos + 1
        self.tails.active = (self._pos // 2) % 2 == 1  # blocks of two: without, without, with, with, ...
        if len(self._window) < 2 * TIMED_STEPS:
            return None
        off = self._per_sample(False)
        on = self._per_sample(True)
        if self.tails.replays == self._replays:
            return self._decide(off, on, "no tail was replayed (the tensors never came back at one address)")
        if on > (1 + MAX_LOSS) * off:
            return self._decide(off, on, f"more than {MAX_LOSS:.0%} slower")
        if on < (1 - MIN_GAIN) * off:
            return self._decide(off, on, None, "faster")
        idle = self._probe_idle
        if idle is not None and idle < MIN_GAIN * self._period_ms:
            return self._decide(off, on, f"GPU-bound: as fast with them, and the GPU idled {idle:.3g} ms in a "
                                         "backward pass given a head start")
        return self._decide(off, on, None, "as fast")

    def _decide(self, off: float | None, on: float | None, why_not: str | None, why: str = "faster") -> bool:
        keep = why_not is None
        self.tails.active = keep
        self.report = {"kept": keep, "ms_per_sample_without": off, "ms_per_sample_with": on,
                       "host_share": self._share, **self._probe_report, "reason": why_not or why}
        if off is None:
            log.info("groupclip: clip-tail graphs off: %s", why_not)
        else:
            log.info("groupclip: clip-tail graphs %s: %.4g ms a sample with them, %.4g without (%s)",
                     "kept" if keep else "dropped", on, off, why_not or why)
        return keep

    def _per_sample(self, with_graphs: bool) -> float:
        """Median over the window's steps with (or without) the graphs of step time / samples."""
        return statistics.median(self._elapsed_ms(a, b) / n for a, b, n, w in self._window if w == with_graphs)

    def _host_share(self) -> float | None:
        """Median over the timed passes of host time / GPU time of the backward pass, or None if none was timed.
        Also keeps the median GPU time of a pass, the median step (end to end of consecutive passes) and the longest
        host time."""
        spans, self._spans = self._spans, []
        gpu = [self._elapsed_ms(a, b) for a, b, _ in spans]
        shares = [host / g for (_, _, host), g in zip(spans, gpu, strict=True) if g > 0]
        if not shares:
            return None
        self._window_ms = statistics.median(gpu)
        periods = [self._elapsed_ms(x[1], y[1]) for x, y in zip(spans[:-1], spans[1:], strict=True)]
        self._period_ms = statistics.median(periods) if periods else None
        self._host_ms = max(host for _, _, host in spans)
        return statistics.median(shares)

    def _mark(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    @staticmethod
    def _elapsed_ms(a, b) -> float:
        b.synchronize()
        return a.elapsed_time(b)

    @staticmethod
    def _clock() -> float:
        return time.perf_counter()

    @staticmethod
    def _can_spin() -> bool:
        """Whether this PyTorch has the spin kernel (a private helper of torch.cuda; without it the graphs are tried
        as they were before the head start existed)."""
        return callable(getattr(torch.cuda, "_sleep", None))

    def _head_start(self, ms: float) -> None:
        """Keep the GPU busy for at least `ms` on the gradients' stream (a spin kernel)."""
        with torch.cuda.stream(torch.cuda.current_stream(self.device)):
            torch.cuda._sleep(int(ms * SPIN_CYCLES_PER_MS))

    @staticmethod
    def _finished(mark) -> bool:
        """Whether the GPU has passed `mark` already."""
        return mark.query()

    def _spinning(self) -> bool:
        """Whether the GPU has yet to finish the head start of this pass."""
        return not self._finished(self._probe)


class TailWatch:
    """After the trial left the graphs off as GPU-bound: asks for a new trial where the backward passes now leave the
    GPU idle (see the module's docstring). `report`: the trial's; `device`: the gradients' device."""

    def __init__(self, report: dict, device: torch.device) -> None:
        self.busy = report.get("gpu_busy_ms")  # the GPU's own work in a backward pass (the probe), or None
        self.device = device
        # the step a new trial starts at: where the GPU was seen to idle against the probe's measure, the graphs are
        # timed at once (a new probe may catch the host at a fast moment again); where only the host share rose (a
        # full launch queue raises it too), the head start measures first
        self.retrial_from = 4 if self.busy is not None else 3
        self._begin: tuple[object, float] | None = None
        self._pending: list[tuple[object, object, float]] = []  # (begin mark, end mark, host ms), not yet read
        self._last_end = None  # end mark of the last pass read (for the period)
        self.windows: list[float] = []  # GPU ms of the passes read since the last look
        self.shares: list[float] = []  # their host ms / GPU ms
        self.periods: list[float] = []  # GPU ms from one pass's end to the next one's
        self.report: dict | None = None  # what made it ask, once it has

    def begin_of_backward(self) -> None:
        self._begin = None if capturing() else (self._mark(), self._clock())

    def end_of_backward(self) -> bool:
        """True: the passes now leave the GPU idle, time the graphs again."""
        begin, self._begin = self._begin, None
        if begin is None or capturing():
            return False
        self._pending.append((begin[0], self._mark(), (self._clock() - begin[1]) * 1e3))
        while self._pending and self._finished(self._pending[0][1]):  # (events complete in stream order)
            a, b, host = self._pending.pop(0)
            window = self._elapsed_ms(a, b)
            if window > 0:
                self.windows.append(window)
                self.shares.append(host / window)
            if self._last_end is not None:
                self.periods.append(self._elapsed_ms(self._last_end, b))
            self._last_end = b
        if len(self.windows) < WATCH_PASSES or not self.periods:
            return False
        window, share = statistics.median(self.windows), statistics.median(self.shares)
        period = statistics.median(self.periods)
        self.windows, self.shares, self.periods = [], [], []
        if self.busy is not None:
            idle = window - self.busy
            if idle < MIN_GAIN * period:
                return False
            why = (f"the GPU now idles {idle:.3g} ms in a backward pass of {window:.3g} ms (its own work "
                   f"{self.busy:.3g} ms) of a {period:.3g} ms step")
        else:
            if share < WATCH_SHARE:
                return False
            why = f"a backward pass's host time is now {share:.0%} of its GPU time"
        self.report = {"window_ms": window, "host_share": share, "step_ms": period, "reason": why}
        log.info("groupclip: %s; timing the clip-tail graphs again", why)
        return True

    # the trial's own (a CUDA event on the gradients' stream, the host clock, whether the GPU has passed a mark)
    _mark = TailTrial._mark
    _clock, _finished = staticmethod(TailTrial._clock), staticmethod(TailTrial._finished)

    @staticmethod
    def _elapsed_ms(a, b) -> float:  # (both marks passed already: no wait)
        return a.elapsed_time(b)


class CaptureChurn:
    """After a decision to keep the graphs: whether they keep being captured anew pass after pass (see the module's
    docstring). `end_of_backward` returns True when they should be dropped; `report` then says why."""

    def __init__(self, tails: TailGraphs) -> None:
        self.tails = tails
        self._last = (tails.captures, tails.replays)
        self._run = 0
        self.report: dict | None = None

    def end_of_backward(self) -> bool:
        captures, replays = self.tails.captures, self.tails.replays
        new, replayed = captures - self._last[0], replays - self._last[1]
        self._last = (captures, replays)
        # (a capture replays its graph once: those replays are not reuse)
        churn = new > 0 and 4 * new >= replayed
        self._run = self._run + 1 if churn else 0
        if self._run < CHURN_PASSES:
            return False
        self.report = {"dropped": f"{CHURN_PASSES} backward passes in a row captured new clip-tail graphs (a "
                                  f"quarter or more of their graphed tails): the tensors they read keep coming back "
                                  f"at new addresses", "captures": captures, "replays": replays}
        log.info("groupclip: clip-tail graphs dropped: %s", self.report["dropped"])
        return True

"""Whether clip-tail graphs pay off in this loop: a few steps timed with and without them, then kept or dropped.

Clip-tail graphs (`groupclip.tails`) cut the host time of every layer-wise Linear / LayerNorm layer's clip tail
(~410 µs → ~35 µs a layer on an H100's host) at the price of result buffers the size of the parameters and a few
percent of memory. They make a host-bound loop (ViT-base under bf16 autocast: 0.58× → ~0.9× non-private speed)
much faster and a GPU-bound one a point slower. `tail_graphs="auto"` (the default) decides by measurement:

1. `WARM_STEPS` backward passes run eagerly (Triton compiles, the allocator settles);
2. the end of the next pass starts the clock; the `TIMED_STEPS` after it are timed eagerly. Each of these backward
   passes also compares its host time (first clipped layer to the end) with its GPU time (CUDA events): where the
   host took less than `HOST_SHARE` of it, the GPU is the slower and the graphs cannot help: they stay off, and
   the loop never pays their memory;
3. the graphs are switched on; at least `SETTLE_STEPS` steps let the tails' keys repeat and get captured;
4. the next `TIMED_STEPS` steps in which nothing was captured are timed with the graphs (a pass that captured
   starts the clock again; after `MAX_ON_STEPS` steps with the graphs on that still capture, they are dropped);
5. the graphs stay on if those steps took at least `MIN_GAIN` less time per sample (and tails were replayed);
   otherwise they are dropped with their memory. The decision is logged (INFO) and kept for the engine's life.

A step's time is the GPU time between the ends of two consecutive backward passes (CUDA events on the stream of
the gradients), i.e. the loop's real period whether the host or the GPU is the slower, per sample of the later
pass. The last mark is waited for once, when the decision is made. Nothing here changes what is computed: a
replayed tail runs the same kernels on the same tensors as the eager one (`groupclip.tails`).
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
#: a backward pass whose host time is below this share of its GPU time is GPU-bound
HOST_SHARE = 0.8


class TailTrial:
    """The measurement that decides `tail_graphs="auto"` for one engine. Switches `tails.active` itself."""

    def __init__(self, tails: TailGraphs) -> None:
        self.tails = tails
        self.samples = 0  # batch size of a layer-wise tail on a CUDA tensor in the current backward pass, or 0
        self.device: torch.device | None = None
        self._passes = 0  # backward passes counted so far
        self._marks: list[tuple[object, int]] = []  # (mark at a pass's end, that pass's samples)
        self._off: float | None = None  # ms a sample without the graphs
        self._on_from = 0  # first pass whose end is marked with the graphs on
        self._replays = 0  # tails.replays when the timed steps with the graphs began
        self._captures = 0  # tails.captures at the end of the last pass
        self._begin: tuple[object, float] | None = None  # (mark, host clock) at the start of this backward pass
        self._spans: list[tuple[object, object, float]] = []  # (begin mark, end mark, host ms) of timed passes
        self.report: dict | None = None

    def begin_of_backward(self) -> None:
        """Called when a backward pass reaches its first clipped layer."""
        self._begin = None
        if self._off is None and self.device is not None and self._passes >= WARM_STEPS and not capturing():
            self._begin = (self._mark(), self._clock())

    def saw(self, use) -> None:
        """A layer-wise clip tail ran (or could have run) for `use` in this pass."""
        g = use.grad_out
        if isinstance(g, torch.Tensor) and g.is_cuda:
            self.samples, self.device = use.batch_size, g.device

    def end_of_backward(self) -> bool | None:
        """Called at the end of each backward pass; True / False (keep the graphs or not) once decided."""
        samples, self.samples = self.samples, 0
        begin, self._begin = self._begin, None
        if capturing():
            return None  # a pass captured by `engine.graphed_backward`: its tails are never graphed
        if samples == 0:  # no layer-wise tail on a GPU in this pass: nothing to graph
            return self._decide(None, None, "no layer-wise clip tail on a CUDA device")
        self._passes += 1
        if self._passes <= WARM_STEPS:
            return None
        if self._off is None:
            end = self._mark()
            self._marks.append((end, samples))
            if begin is not None:
                self._spans.append((begin[0], end, (self._clock() - begin[1]) * 1e3))
            if len(self._marks) > TIMED_STEPS:
                self._off, self._marks = self._per_sample(), []
                share = self._host_share()
                if share is not None and share < HOST_SHARE:
                    return self._decide(self._off, None, f"GPU-bound: a backward pass's host time is {share:.0%} of "
                                                         "its GPU time")
                self.tails.active = True
                self._on_from, self._captures = self._passes + SETTLE_STEPS, self.tails.captures
            return None
        captured, self._captures = self.tails.captures != self._captures, self.tails.captures
        if self._passes < self._on_from:
            return None
        if captured or not self._marks:  # a capture costs far more than a replay: its pass is not timed
            if self._passes >= self._on_from - SETTLE_STEPS + MAX_ON_STEPS:
                return self._decide(self._off, None, f"tails were still being captured after {MAX_ON_STEPS} steps "
                                                     "(the tensors keep moving)")
            self._marks, self._replays = [(self._mark(), samples)], self.tails.replays
            return None
        self._marks.append((self._mark(), samples))
        if len(self._marks) <= TIMED_STEPS:
            return None
        on = self._per_sample()
        if self.tails.replays == self._replays:
            return self._decide(self._off, on, "no tail was replayed (the tensors never came back at one address)")
        if on > (1 - MIN_GAIN) * self._off:
            return self._decide(self._off, on, f"less than {MIN_GAIN:.0%} faster")
        return self._decide(self._off, on, None)

    def _decide(self, off: float | None, on: float | None, why_not: str | None) -> bool:
        keep = why_not is None
        self.tails.active = keep
        self.report = {"kept": keep, "ms_per_sample_without": off, "ms_per_sample_with": on,
                       "reason": why_not or "faster"}
        if off is None:
            log.debug("groupclip: clip-tail graphs off: %s", why_not)
        elif on is None:
            log.info("groupclip: clip-tail graphs off: %s (%.4g ms a sample)", why_not, off)
        else:
            log.info("groupclip: clip-tail graphs %s: %.4g ms a sample with them, %.4g without (%s)",
                     "kept" if keep else "dropped", on, off, why_not or "faster")
        return keep

    def _host_share(self) -> float | None:
        """Median over the timed passes of host time / GPU time of the backward pass, or None if none was timed."""
        spans, self._spans = self._spans, []
        shares = [host / gpu for a, b, host in spans if (gpu := self._elapsed_ms(a, b)) > 0]
        return statistics.median(shares) if shares else None

    @staticmethod
    def _clock() -> float:
        return time.perf_counter()

    def _mark(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    @staticmethod
    def _elapsed_ms(a, b) -> float:
        b.synchronize()
        return a.elapsed_time(b)

    def _per_sample(self) -> float:
        """Median over the marked steps of (time since the previous mark) / samples."""
        m = self._marks
        return statistics.median(self._elapsed_ms(m[i - 1][0], m[i][0]) / m[i][1] for i in range(1, len(m)))

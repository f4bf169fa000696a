"""`tail_graphs="auto"`: the trial that times steps without and with clip-tail graphs and keeps them only when faster
(`groupclip.tail_trial`), with a fake clock; the mode switch; the engine wiring on the CPU (no CUDA: decided off)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import groupclip
from groupclip import tail_trial, tails
from groupclip.tail_trial import TailTrial


class _Tails:  # what the trial touches of TailGraphs
    def __init__(self):
        self.active = False
        self.replays = self.captures = 0


class _Use:
    def __init__(self, batch):
        self.batch_size = batch
        self.grad_out = torch.empty(0, device="meta")  # stands for a CUDA tensor (see _Trial.saw)


class _Trial(TailTrial):
    """The trial on fake clocks: `now` (GPU, ms) is what its marks read, `host` (ms) its host clock. A head start
    moves `now` by its length and records it in `spins`; `behind` says whether the GPU had passed a mark of the pass
    with the head start (a bool, or a function of whether it is asked at a clipped layer or at the pass's end)."""

    def __init__(self, t, from_step=2):
        super().__init__(t, from_step)
        self.now = self.host = 0.0
        self.spins: list[float] = []
        self.behind = False
        self.in_tick = False
        self.ticks = 0
        self.pass_ticks = 0  # clipped layers so far in this pass
        self.spin_layers = None  # in a pass with a head start: the layers the spin outlasts (None: all)

    def begin_of_backward(self):
        self.pass_ticks = 0
        super().begin_of_backward()

    def _spinning(self):
        return self.spin_layers is None or self.pass_ticks <= self.spin_layers

    def _head_start(self, ms):
        self.spins.append(ms)
        self.now += ms

    def tick(self):
        self.in_tick, self.ticks, self.pass_ticks = True, self.ticks + 1, self.pass_ticks + 1
        super().tick()
        self.in_tick = False

    def _finished(self, mark):
        return self.behind(self.in_tick) if callable(self.behind) else self.behind

    def saw(self, use):
        self.samples, self.device = use.batch_size, "a GPU"
        self.tick()

    def _clock(self):
        return self.host / 1e3

    def _mark(self):
        return self.now

    @staticmethod
    def _elapsed_ms(a, b):
        return b - a


def _run(trial, step_ms, batch=8, replays_per_step=1, limit=80, host_share=1.0, captures=lambda i: 0, busy=0.5,
         own=None, queue=None, wait=0.0, end_wait=0.0):
    """Backward passes until the trial decides: (decision, passes, tails.active during each pass). Each pass takes
    step_ms(with graphs, i) of GPU time and host_share of that of host time (1: host-bound), spread evenly over its
    four clipped layers, of which the GPU works `busy` (a share) and idles the rest; a pass with a head start takes
    only the GPU's work after it, and `own` (a share of step_ms; default host_share) of host time: the host's own
    work, no longer waiting for the GPU, plus `wait` ms at layer `queue` (0-based: the launch queue is full there, and
    the spin is over from then on; None: the spin outlasts every layer), and `end_wait` ms after its last layer.
    `batch` and `captures`: numbers or functions of (with graphs, i)."""
    active = []
    for i in range(1, limit + 1):
        on = trial.tails.active
        active.append(on)
        spins = len(trial.spins)
        trial.begin_of_backward()
        ms = step_ms(on, i)
        probe = len(trial.spins) > spins
        trial.now += busy * ms if probe else ms
        trial.spin_layers = queue if probe else None
        for j in range(4):  # four clipped layers
            if probe and j == queue:
                trial.host += wait
            trial.host += (host_share if own is None or not probe else own) * ms / 4
            trial.saw(_Use(batch(on, i) if callable(batch) else batch))
        if probe:
            trial.host += end_wait
        if on:
            trial.tails.replays += replays_per_step
            trial.tails.captures += captures(i)
        keep = trial.end_of_backward()
        if keep is not None:
            return keep, i, active
    raise AssertionError("no decision")


def _off_passes():
    """Passes before the graphs go on: the warm-up, the pass whose end starts the clock, the timed ones, the one
    with a head start."""
    return _timed_passes() + 1


def _timed_passes():
    """Passes up to the end of the host-share measurement."""
    return tail_trial.WARM_STEPS + 1 + tail_trial.TIMED_STEPS


def _window_start():
    """The pass whose end starts the alternating window (when nothing is captured late)."""
    return _off_passes() + tail_trial.SETTLE_STEPS


def _passes_to_decision():
    return _window_start() + 4 * tail_trial.TIMED_STEPS


def test_host_bound_loop_keeps_the_graphs():
    trial = _Trial(_Tails())
    keep, passes, active = _run(trial, lambda on, i: 60.0 if on else 100.0)
    assert keep is True and trial.tails.active
    assert passes == _passes_to_decision()
    assert not any(active[:_off_passes()]) and all(active[_off_passes():_window_start()])
    window = active[_window_start():]
    assert window == [False, False, True, True] * tail_trial.TIMED_STEPS  # blocks of two, without first
    assert trial.report["ms_per_sample_without"] == pytest.approx(100 / 8)
    assert trial.report["ms_per_sample_with"] == pytest.approx(60 / 8)
    assert trial.report["host_share"] == pytest.approx(1.0)


def test_alternating_steps_cancel_a_drift_of_the_host():
    # the host slows down by half while the graphs settle and the window runs: a before/after comparison would see
    # no gain; within the window steps with the graphs are still 40% faster
    def step(on, i):
        base = 100.0 if i <= _off_passes() else 150.0
        return base * (0.6 if on else 1.0)

    keep, _, _ = _run(_Trial(_Tails()), step)
    assert keep is True


def test_only_the_second_step_of_each_block_is_timed():
    # the first step after a switch carries the other mode's GPU backlog: it does not count
    def step(on, i):
        pos = i - _window_start() - 1
        if pos >= 0 and pos % 2 == 0:
            return 1000.0
        return 60.0 if on else 100.0

    trial = _Trial(_Tails())
    keep, _, _ = _run(trial, step)
    assert keep is True
    assert trial.report["ms_per_sample_without"] == pytest.approx(100 / 8)


def test_slower_with_them_drops_them():
    trial = _Trial(_Tails())
    keep, _, _ = _run(trial, lambda on, i: 101.5 if on else 100.0)  # 1.5% slower: over MAX_LOSS
    assert keep is False and not trial.tails.active
    assert "slower" in trial.report["reason"]


@pytest.mark.parametrize("with_them", [99.0, 100.0, 100.5])
def test_as_fast_with_them_keeps_them(with_them):
    """A tie (within MAX_LOSS) keeps them: the backward pass alone left the GPU idle (the probe), which only the loop's
    slack hid."""
    trial = _Trial(_Tails())
    keep, _, _ = _run(trial, lambda on, i: with_them if on else 100.0)
    assert keep is True and trial.tails.active
    assert trial.report["reason"] == "as fast"


@pytest.mark.parametrize("with_them", [99.0, 100.0, 100.5])
def test_a_tie_drops_them_where_the_head_start_saw_no_idle_gpu(with_them):
    """Tried because the host's own work reached the GPU's (120%), but the GPU idled 1% of a step given a head start:
    a tie drops them as GPU-bound (so the clipper watches), with both timings in the report."""
    trial = _Trial(_Tails())
    keep, passes, active = _run(trial, lambda on, i: with_them if on else 100.0, busy=0.99, own=1.2)
    assert keep is False and not trial.tails.active and passes == _passes_to_decision()
    assert trial.report["reason"].startswith("GPU-bound: as fast with them") and "idled 1 ms" in trial.report["reason"]
    assert trial.report["gpu_busy_ms"] == pytest.approx(99.0)
    assert trial.report["ms_per_sample_with"] == pytest.approx(with_them / 8)
    # faster by MIN_GAIN or more: kept all the same
    trial = _Trial(_Tails())
    keep, _, _ = _run(trial, lambda on, i: 96.0 if on else 100.0, busy=0.99, own=1.2)
    assert keep is True and trial.report["reason"] == "faster"


def test_a_tie_keeps_them_where_the_head_start_could_not_tell():
    trial = _Trial(_Tails())
    trial.behind = True  # inconclusive twice
    keep, _, _ = _run(trial, lambda on, i: 100.0, busy=0.99, own=1.2)
    assert keep is True and trial.report["reason"] == "as fast" and trial.report["gpu_busy_ms"] is None


def test_gpu_bound_backward_decides_off_without_trying_the_graphs():
    trial = _Trial(_Tails())
    keep, passes, active = _run(trial, lambda on, i: 60.0 if on else 100.0, host_share=0.45)
    assert keep is False and passes == _timed_passes() and not any(active) and not trial.tails.active
    assert "GPU-bound" in trial.report["reason"] and "45%" in trial.report["reason"]
    assert trial.report["ms_per_sample_with"] is None and not trial.spins


def test_a_host_share_of_half_or_more_goes_to_the_head_start():
    # 70% of the GPU's time: not GPU-bound by the margin of step 2 (a host at half speed would take 140%), so the
    # head start measures; the host's own work then (30%) is less than the GPU's: off after it
    trial = _Trial(_Tails())
    keep, passes, _ = _run(trial, lambda on, i: 60.0 if on else 100.0, host_share=0.7, busy=0.99, own=0.3)
    assert keep is False and len(trial.spins) == 1 and passes == _off_passes()
    assert trial.report["host_share"] == pytest.approx(0.7)


def test_host_bound_backward_with_a_busy_gpu_decides_off_after_the_head_start():
    # the host takes as long as the GPU's window (it waits for a full launch queue), but the GPU works 99% of it and
    # the host's own work is 30% of the GPU's: graphs could save at most 1% of a step
    trial = _Trial(_Tails())
    keep, passes, active = _run(trial, lambda on, i: 60.0 if on else 100.0, busy=0.99, own=0.3)
    assert keep is False and passes == _off_passes() and not any(active) and not trial.tails.active
    assert trial.spins == [pytest.approx(tail_trial.HEAD_START_FACTOR * 100.0 + tail_trial.HEAD_START_MS)]
    assert trial.report["gpu_busy_ms"] == pytest.approx(99.0)
    assert trial.report["head_start_host_ms"] == pytest.approx(30.0)
    assert trial.report["host_own_ms"] == pytest.approx(30.0) and trial.report["layers_before_wait"] == "4/4"
    assert trial.report["backward_gpu_ms"] == pytest.approx(100.0) and trial.report["step_ms"] == pytest.approx(100.0)
    assert "idles 1 ms" in trial.report["reason"] and "30 ms" in trial.report["reason"]


@pytest.mark.parametrize("own", [0.3, 0.6, 0.95])
def test_a_host_whose_own_work_is_under_the_gpus_decides_off_after_the_head_start(own):
    trial = _Trial(_Tails())
    keep, passes, active = _run(trial, lambda on, i: 60.0 if on else 100.0, busy=0.99, own=own)
    assert keep is False and passes == _off_passes() and not any(active)
    assert trial.report["host_own_ms"] == pytest.approx(100.0 * own)


@pytest.mark.parametrize("own", [1.0, 1.2, 2.0])
def test_a_gpu_bound_pass_whose_host_work_reaches_the_gpus_tries_the_graphs(own):
    """The GPU does not idle now, but the host's own work is as long as the GPU's or longer: a host a little slower
    later (the lent H100's host runs at two speeds) makes the loop host-bound, so the graphs are tried, and the timed
    comparison decides."""
    trial = _Trial(_Tails())
    keep, passes, active = _run(trial, lambda on, i: 60.0 if on else 100.0, busy=0.99, own=own)
    assert len(trial.spins) == 1 and active[_off_passes()] and keep is True and passes == _passes_to_decision()
    assert trial.report["gpu_busy_ms"] == pytest.approx(99.0)
    assert trial.report["head_start_host_ms"] == pytest.approx(100.0 * own)
    assert trial.report["host_own_ms"] == pytest.approx(100.0 * own)


@pytest.mark.parametrize("own, queue, keeps", [(0.6, 1, False), (0.6, 3, False), (1.2, 2, True)])
def test_own_work_leaves_out_the_wait_for_a_full_launch_queue(own, queue, keeps):
    """The launch queue fills at a layer of the pass with a head start: the host waits there until the spin ends
    (150 ms, more than the GPU's work). Its own work is its time to the last layer before, scaled to all four."""
    trial = _Trial(_Tails())
    keep, _, _ = _run(trial, lambda on, i: 60.0 if on else 100.0, busy=0.99, own=own, queue=queue, wait=150.0)
    assert keep is keeps
    assert trial.report["head_start_host_ms"] == pytest.approx(100.0 * own + 150.0)
    assert trial.report["host_own_ms"] == pytest.approx(100.0 * own)
    assert trial.report["layers_before_wait"] == f"{queue}/4"


def test_a_queue_that_fills_after_the_last_layer_is_left_out():
    # the spin outlasts all four layers; the host then waits 150 ms for the pass's last launches
    trial = _Trial(_Tails())
    keep, _, _ = _run(trial, lambda on, i: 60.0 if on else 100.0, busy=0.99, own=0.6, end_wait=150.0)
    assert keep is False and trial.report["layers_before_wait"] == "4/4"
    assert trial.report["head_start_host_ms"] == pytest.approx(210.0)
    assert trial.report["host_own_ms"] == pytest.approx(60.0)


def test_a_spin_over_before_the_first_layer_counts_the_whole_host_time():
    trial = _Trial(_Tails())
    keep, _, _ = _run(trial, lambda on, i: 60.0 if on else 100.0, busy=0.99, own=0.6, queue=0, wait=150.0)
    assert keep is True and trial.report["host_own_ms"] == pytest.approx(210.0)
    assert trial.report["layers_before_wait"] == "0/4"


def test_a_trial_from_step_3_does_not_decide_by_the_host_share():
    trial = _Trial(_Tails(), from_step=3)
    keep, passes, _ = _run(trial, lambda on, i: 60.0 if on else 100.0, host_share=0.45, busy=0.99, own=0.3)
    assert keep is False and len(trial.spins) == 1 and passes == _off_passes()
    assert "idles 1 ms" in trial.report["reason"]


def test_a_trial_from_step_4_times_the_graphs_after_the_warm_up():
    trial = _Trial(_Tails(), from_step=4)
    keep, passes, active = _run(trial, lambda on, i: 99.5 if on else 100.0, host_share=0.45, busy=0.99, own=0.3)
    assert keep is True and not trial.spins and trial.report["reason"] == "as fast"
    assert not any(active[:tail_trial.WARM_STEPS + 1]) and active[tail_trial.WARM_STEPS + 1]
    trial = _Trial(_Tails(), from_step=4)
    keep, _, _ = _run(trial, lambda on, i: 102.0 if on else 100.0)
    assert keep is False and "slower" in trial.report["reason"]


@pytest.mark.parametrize("step", [0, 1, 5, "3"])
def test_a_trial_starts_at_step_2_3_or_4(step):
    with pytest.raises(ValueError, match="from_step"):
        TailTrial(_Tails(), from_step=step)


def test_idle_share_is_of_the_whole_step():
    # the backward pass is a fifth of the step (other passes between its ends): 4 ms idle in it is 4% of 100 -> try
    trial = _Trial(_Tails())
    period = 100.0

    def step(on, i):
        return 20.0 if not on else 12.0

    def run():
        active = []
        for i in range(1, 80):
            on = trial.tails.active
            active.append(on)
            spins = len(trial.spins)
            trial.begin_of_backward()
            start = trial.now
            ms = step(on, i)
            trial.now += 16.0 if len(trial.spins) > spins else ms
            trial.host += ms if len(trial.spins) == spins else 5.0  # the host's own work: under half the GPU's
            trial.saw(_Use(8))
            if on:
                trial.tails.replays += 1
            keep = trial.end_of_backward()
            trial.now = start + period if len(trial.spins) == spins else trial.now + period - ms
            if keep is not None:
                return keep
            if trial.tails.active:
                return "tried"
        raise AssertionError("no decision")

    assert run() == "tried"
    assert trial.report is None
    # the same 4 ms of idle time in a 200 ms step is 2%: off
    trial, period = _Trial(_Tails()), 200.0
    assert run() is False
    assert trial.report["step_ms"] == pytest.approx(200.0)


def test_a_gpu_that_catches_up_within_the_pass_makes_the_head_start_inconclusive():
    # the pass's end alone looks fine, but at a clipped layer the GPU had reached a mark two layers back
    trial = _Trial(_Tails())
    trial.behind = lambda at_layer: at_layer
    keep, passes, active = _run(trial, lambda on, i: 60.0 if on else 100.0, busy=0.99)
    assert len(trial.spins) == 2 and keep is True and trial.report["gpu_busy_ms"] is None


def test_a_gpu_that_stays_behind_at_every_layer_gives_a_measurement():
    # the host may wait for the queue (a spin shorter than its pass): what counts is that the GPU never caught up
    trial = _Trial(_Tails())
    trial.behind = lambda at_layer: False
    keep, passes, _ = _run(trial, lambda on, i: 60.0 if on else 100.0, busy=0.99, own=0.3)
    assert keep is False and passes == _off_passes() and len(trial.spins) == 1
    assert trial.report["gpu_busy_ms"] == pytest.approx(99.0)


def test_without_a_spin_kernel_the_graphs_are_tried(monkeypatch):
    # a PyTorch without torch.cuda._sleep: no head start, the timed comparison decides as before
    monkeypatch.setattr(torch.cuda, "_sleep", None, raising=False)
    trial = _Trial(_Tails())
    keep, passes, _ = _run(trial, lambda on, i: 60.0 if on else 100.0, busy=0.99)
    assert not trial.spins and keep is True and passes == _passes_to_decision() - 1
    assert "gpu_busy_ms" not in trial.report


def test_a_head_start_the_host_did_not_outrun_is_doubled_then_the_graphs_are_tried():
    trial = _Trial(_Tails())
    trial.behind = True  # the GPU always passed the spin before the host's end: no measurement
    keep, passes, active = _run(trial, lambda on, i: 60.0 if on else 100.0, busy=0.99)
    first = tail_trial.HEAD_START_FACTOR * 100.0 + tail_trial.HEAD_START_MS
    assert trial.spins == [pytest.approx(first), pytest.approx(2 * first)]
    assert keep is True and trial.report["gpu_busy_ms"] is None
    assert not any(active[:_off_passes() + 1]) and active[_off_passes() + 1]


def test_the_settling_steps_are_not_timed():
    # captures make the first steps with the graphs slow; only the steps after them count
    slow = set(range(_off_passes() + 1, _window_start() + 1))
    keep, _, _ = _run(_Trial(_Tails()), lambda on, i: 500.0 if i in slow else (60.0 if on else 100.0))
    assert keep is True


def test_steps_that_capture_are_not_timed():
    # captures go on past the settling steps (keys that take longer to repeat): the window starts after the last one
    last = _window_start() + 5
    keep, passes, _ = _run(_Trial(_Tails()), lambda on, i: 500.0 if on and i <= last else (60.0 if on else 100.0),
                           captures=lambda i: int(i <= last))
    assert keep is True and passes == last + 1 + 4 * tail_trial.TIMED_STEPS


def test_tails_that_never_stop_capturing_are_dropped():
    trial = _Trial(_Tails())
    keep, passes, _ = _run(trial, lambda on, i: 60.0 if on else 100.0, captures=lambda i: 1)
    assert keep is False and passes == _off_passes() + tail_trial.MAX_ON_STEPS
    assert "captured" in trial.report["reason"]


def test_median_ignores_one_outlier_step():
    fast_off = _window_start() + 2  # the first timed step of the window, without the graphs
    keep, _, _ = _run(_Trial(_Tails()), lambda on, i: 1.0 if i == fast_off else (60.0 if on else 100.0))
    assert keep is True


def test_time_is_per_sample():
    # steps with the graphs are faster but process half the samples: slower per sample
    trial = _Trial(_Tails())
    keep, _, _ = _run(trial, lambda on, i: 60.0 if on else 100.0, batch=lambda on, i: 4 if on else 8)
    assert keep is False
    assert trial.report["ms_per_sample_with"] == pytest.approx(15.0)


def test_no_replay_drops_them_even_when_faster():
    keep, _, _ = _run(_Trial(_Tails()), lambda on, i: 60.0 if on else 100.0, replays_per_step=0)
    assert keep is False


def test_a_pass_without_gpu_tails_decides_off_at_once():
    trial = _Trial(_Tails())
    assert trial.end_of_backward() is False  # nothing seen in this pass
    assert trial.report["kept"] is False and "CUDA" in trial.report["reason"]


def test_mode(monkeypatch):
    monkeypatch.delenv("GROUPCLIP_TAIL_GRAPHS", raising=False)
    assert tails.mode(None) == "auto"
    assert (tails.mode(True), tails.mode(False), tails.mode("auto"), tails.mode("ON")) == ("on", "off", "auto", "on")
    monkeypatch.setenv("GROUPCLIP_TAIL_GRAPHS", "0")
    assert tails.mode(None) == "off" and tails.mode(True) == "on"  # the argument wins
    monkeypatch.setenv("GROUPCLIP_TAIL_GRAPHS", "sometimes")
    with pytest.raises(ValueError, match="GROUPCLIP_TAIL_GRAPHS"):
        tails.mode(None)
    with pytest.raises(ValueError, match="tail_graphs"):
        tails.mode("maybe")


def test_engine_on_the_cpu_decides_off_after_the_first_backward(monkeypatch):
    monkeypatch.delenv("GROUPCLIP_TAIL_GRAPHS", raising=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not private")
        eng = groupclip.PrivacyEngine(model, opt, batch_size=4, sample_size=400, noise_multiplier=0.0,
                                      groups="layer-wise", seed=0)
    clipper = eng.clipper
    assert clipper.tail_trial is not None and not clipper.tails.active
    model(torch.randn(4, 6)).square().mean().backward()
    assert clipper.tail_trial is None and clipper.tails is None
    assert clipper.tail_report["kept"] is False
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------- after the decision
class _Watch(tail_trial.TailWatch):
    """The watch on fake clocks: marks read `now` (GPU ms); `host` (ms) is its host clock; `done(mark)` says whether the
    GPU has passed a mark (default: always)."""

    def __init__(self, busy=None):
        super().__init__({"gpu_busy_ms": busy}, "a GPU")
        self.now = self.host = 0.0
        self.done = lambda mark: True

    def _mark(self):
        return self.now

    def _clock(self):
        return self.host / 1e3

    def _finished(self, mark):
        return self.done(mark)

    @staticmethod
    def _elapsed_ms(a, b):
        return b - a


def _watch(watch, window, host, passes, between=20.0):
    """`passes` backward passes of `window(i)` GPU ms and `host(i)` host ms, `between` GPU ms apart; the first pass
    (1-based) after which the watch asks for a new trial, or None."""
    for i in range(1, passes + 1):
        watch.now += between
        watch.begin_of_backward()
        watch.now += window(i)
        watch.host += host(i)
        if watch.end_of_backward():
            return i
    return None


def test_watch_leaves_a_loop_that_stays_gpu_bound_alone():
    watch = _Watch(busy=40.0)
    assert _watch(watch, lambda i: 40.0, lambda i: 39.0, 5 * tail_trial.WATCH_PASSES) is None
    assert watch.report is None


def test_watch_asks_again_when_the_gpu_starts_to_idle_in_backward():
    # GPU-bound at first (window = the probe's busy time); then the host slows: the pass takes 52 ms on the GPU, of
    # which 40 are its own work: 12 ms idle of a 72 ms step, over MIN_GAIN
    watch = _Watch(busy=40.0)
    slow_from = 2 * tail_trial.WATCH_PASSES + 3
    asked = _watch(watch, lambda i: 40.0 if i < slow_from else 52.0, lambda i: 39.0 if i < slow_from else 52.0,
                   6 * tail_trial.WATCH_PASSES)
    assert asked is not None and slow_from < asked <= slow_from + 2 * tail_trial.WATCH_PASSES
    assert watch.report["window_ms"] == pytest.approx(52.0) and "idles 12 ms" in watch.report["reason"]


def test_watch_counts_an_idle_time_under_min_gain_as_gpu_bound():
    watch = _Watch(busy=40.0)  # 1 ms idle of a 61 ms step: under 3%
    assert _watch(watch, lambda i: 41.0, lambda i: 41.0, 5 * tail_trial.WATCH_PASSES) is None


@pytest.mark.parametrize("share, asks", [(0.6, False), (0.94, False), (1.0, True)])
def test_watch_without_a_probe_asks_again_by_the_host_share(share, asks):
    watch = _Watch(busy=None)  # the trial decided by the host share alone
    asked = _watch(watch, lambda i: 40.0, lambda i: share * 40.0, 3 * tail_trial.WATCH_PASSES)
    assert (asked is not None) is asks
    if asks:
        assert asked == tail_trial.WATCH_PASSES and "100%" in watch.report["reason"]


def test_watch_reads_a_pass_only_once_the_gpu_has_passed_it():
    watch = _Watch(busy=40.0)
    watch.done = lambda mark: False  # the GPU never gets there: nothing is read, nothing decided
    assert _watch(watch, lambda i: 60.0, lambda i: 60.0, 3 * tail_trial.WATCH_PASSES) is None
    assert watch.windows == [] and len(watch._pending) == 3 * tail_trial.WATCH_PASSES
    watch.done = lambda mark: True  # caught up: the passes are read in order, and judged
    assert _watch(watch, lambda i: 60.0, lambda i: 60.0, 1) == 1
    assert watch._pending == []


class _Decided:
    """A trial that decides at the next pass's end."""

    def __init__(self, keep, reason, busy=None):
        self.keep, self.device = keep, "a GPU"
        self.report = {"kept": keep, "reason": reason, "gpu_busy_ms": busy}

    def begin_of_backward(self):
        pass

    def end_of_backward(self):
        return self.keep


class _Asks:
    """A watch that asks for a new trial (starting at `retrial_from`) at its first pass."""

    report = {"reason": "the GPU now idles"}

    def __init__(self, retrial_from):
        self.retrial_from = retrial_from

    def begin_of_backward(self):
        pass

    def end_of_backward(self):
        return True


def _engine(monkeypatch):
    """A small CPU model under an engine with the default tail_graphs ("auto")."""
    monkeypatch.delenv("GROUPCLIP_TAIL_GRAPHS", raising=False)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not private")
        return model, groupclip.PrivacyEngine(model, opt, batch_size=4, sample_size=400, noise_multiplier=0.0,
                                              seed=0)


def test_clipper_watches_after_a_gpu_bound_decision_and_tries_again_at_most_max_retrials_times(monkeypatch):
    clipper = _engine(monkeypatch)[1].clipper
    for attempt in range(tail_trial.MAX_RETRIALS + 1):
        busy = None if attempt % 2 else 40.0  # decided by the host share (no probe) / after the probe
        clipper.tail_trial = _Decided(False, "GPU-bound: a backward pass's host time is 80% of its GPU time", busy)
        clipper.end_of_backward()
        assert clipper.tail_trial is None and clipper.tails is None
        assert clipper.tail_report["reason"].startswith("GPU-bound")
        if attempt == tail_trial.MAX_RETRIALS:  # no more watching
            assert clipper.tail_watch is None
            assert len(clipper.tail_report["retrials"]) == tail_trial.MAX_RETRIALS
            break
        watch = clipper.tail_watch
        assert isinstance(watch, tail_trial.TailWatch) and watch.busy == busy
        # idle time seen against the probe's measure: the graphs are timed at once; a host share only: probe first
        assert watch.retrial_from == (3 if busy is None else 4)
        clipper.tail_watch = _Asks(watch.retrial_from)
        clipper.end_of_backward()
        assert isinstance(clipper.tail_trial, TailTrial) and clipper.tail_watch is None
        assert clipper.tail_trial.from_step == watch.retrial_from
        assert clipper.tails is not None and not clipper.tails.active  # a new trial, starting without the graphs
    # a decision that is not "GPU-bound" (measured slower, no CUDA) is not watched
    clipper._retrial_reports.clear()
    for reason in ("more than 1% slower", "no clip tail on a CUDA device"):
        clipper.tail_trial = _Decided(False, reason)
        clipper.end_of_backward()
        assert clipper.tail_watch is None
    clipper.tail_trial = _Decided(True, "as fast")
    clipper.tails = tails.TailGraphs(active=True)
    clipper.end_of_backward()
    assert clipper.tail_watch is None and clipper.tails is not None


@pytest.mark.skipif(not torch.cuda.is_available() or not callable(getattr(torch.cuda, "_sleep", None)),
                    reason="needs CUDA (and its spin kernel)")
@pytest.mark.parametrize("busy, asks", [(0.0, True), (1e4, False)])
def test_watch_on_cuda_events(busy, asks):
    """The watch's own marks and reads on a real GPU: passes that spin the GPU ~2 ms, one sync after each (so each
    pass is read at the next pass's end); against an own work of 0 ms the GPU 'idles' all of it, against 10 s none."""
    watch = tail_trial.TailWatch({"gpu_busy_ms": busy}, torch.device("cuda"))
    asked = None
    for i in range(1, 3 * tail_trial.WATCH_PASSES):
        watch.begin_of_backward()
        torch.cuda._sleep(int(2 * tail_trial.SPIN_CYCLES_PER_MS))
        if watch.end_of_backward():
            asked = i
            break
        torch.cuda.synchronize()
    assert (asked is not None) is asks
    if asks:
        assert watch.report["window_ms"] > 0.5


def test_watch_uses_the_trials_clock_and_completion_check():
    """The watch's own helpers (the CUDA test above runs them on a GPU): the host clock, and a mark's completion asked
    of the mark itself, without waiting."""

    class Mark:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

    watch = tail_trial.TailWatch({}, torch.device("cpu"))
    assert 0 < watch._clock() <= tail_trial.time.perf_counter()
    assert watch._finished(Mark(True)) is True and watch._finished(Mark(False)) is False
    trial = TailTrial(_Tails())  # the spin of a pass with a head start is running until its mark is passed
    for done in (True, False):
        trial._probe = Mark(done)
        assert trial._spinning() is not done


class _Counts:  # what CaptureChurn reads of TailGraphs
    def __init__(self):
        self.captures = self.replays = 0

    def run_pass(self, captured, replayed):
        self.captures += captured
        self.replays += replayed + captured  # a capture replays its new graph once


def test_churn_leaves_graphs_that_settle_or_churn_in_a_few_layers():
    counts = _Counts()
    churn = tail_trial.CaptureChurn(counts)
    # a loop settling after a change of batch size, then one layer of 70 that keeps capturing
    passes = [(70, 0), (35, 35), (0, 70)] * 3 + [(1, 69)] * 20
    for captured, replayed in passes:
        counts.run_pass(captured, replayed)
        assert churn.end_of_backward() is False
    assert churn.report is None


def test_churn_drops_graphs_captured_anew_pass_after_pass():
    counts = _Counts()
    churn = tail_trial.CaptureChurn(counts)
    counts.run_pass(0, 70)
    assert churn.end_of_backward() is False
    for i in range(tail_trial.CHURN_PASSES):
        counts.run_pass(20, 50)  # 20 of 70 captured: more than a quarter of the replays
        assert churn.end_of_backward() is (i == tail_trial.CHURN_PASSES - 1)
    assert "new addresses" in churn.report["dropped"]
    # a pass that replays (almost) everything breaks the run
    churn = tail_trial.CaptureChurn(counts)
    for captured, replayed in [(20, 50)] * (tail_trial.CHURN_PASSES - 1) + [(2, 68)] + [(20, 50)] * 2:
        counts.run_pass(captured, replayed)
        assert churn.end_of_backward() is False


def test_clipper_drops_kept_graphs_that_churn(monkeypatch):
    model, eng = _engine(monkeypatch)
    clipper = eng.clipper
    clipper.tail_trial = _Decided(True, "faster")
    clipper.tails = tails.TailGraphs(active=True)
    clipper.end_of_backward()
    assert isinstance(clipper.tail_churn, tail_trial.CaptureChurn) and clipper.tails is not None
    graphs = clipper.tails
    for i in range(tail_trial.CHURN_PASSES):
        graphs.captures += 2
        graphs.replays += 2
        clipper.end_of_backward()
        assert (clipper.tails is None) is (i == tail_trial.CHURN_PASSES - 1)
    assert clipper.tail_churn is None and clipper.tail_report["kept"] is True
    assert "new addresses" in clipper.tail_report["dropped"]
    # dropped: eager from now on, and stays so
    x = torch.randn(4, 6)
    model(x).sum().backward()
    assert clipper.tails is None and clipper.tail_trial is None

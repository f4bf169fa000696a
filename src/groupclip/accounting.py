"""Privacy accounting for DP-SGD on Google's ``dp_accounting`` library, and noise calibration.

Every training step is modelled as the Poisson-subsampled Gaussian mechanism: each example joins the batch
independently with probability ``sample_rate`` (q), and Gaussian noise of standard deviation
``noise_multiplier * C`` (σC) is added to the sum of clipped per-sample gradients. The neighbouring relation
is add-or-remove-one. Two accountants are offered:

* ``"rdp"``: Rényi DP (moments accountant), fast, a slightly loose upper bound;
* ``"pld"``: privacy loss distributions, tighter (a pessimistic estimate of the exact ε), slower.

The ε reported is valid only when batches are really Poisson-sampled (see :mod:`groupclip.data`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

__all__ = ["METHODS", "PrivacyAccountant", "default_delta", "epsilon", "noise_multiplier"]

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("rdp", "pld")
MAX_NOISE_MULTIPLIER = 1e4  # calibration gives up above this σ
# relative width of the final bisection bracket: PLD evaluations cost about a second each at realistic step
# counts, and a 0.2% bracket is still far tighter than the 2% at which calibration would count as loose
_CALIBRATION_RTOL = {"rdp": 1e-5, "pld": 2e-3}


# ----------------------------------------------------------------------------------------------- validation
def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown accounting method {method!r}; valid methods are {', '.join(METHODS)}")
    return method


def _check_sample_rate(sample_rate: float) -> float:
    if not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
        raise ValueError(
            f"sample_rate must be in (0, 1] (the probability that one example joins a batch, "
            f"batch_size / sample_size); got {sample_rate!r}"
        )
    return float(sample_rate)


def _check_steps(steps: int, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {steps!r}")
    return int(steps)


def _check_delta(delta: float) -> float:
    if not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), and should be well below 1/sample_size; got {delta!r}")
    return float(delta)


def _check_epsilon(eps: float) -> float:
    if not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
        raise ValueError(f"epsilon must be a positive finite number; got {eps!r}")
    return float(eps)


def _check_noise_multiplier(sigma: float) -> float:
    if not isinstance(sigma, numbers.Real) or not 0 <= sigma < math.inf:
        raise ValueError(f"noise_multiplier must be a finite number >= 0; got {sigma!r}")
    return float(sigma)


# ----------------------------------------------------------------------------------------------- core
@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence dp_accounting's benign 'order excluded from the epsilon computation' warnings."""
    absl_logger = logging.getLogger("absl")
    old = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(old)


def _compose_epsilon(segments: Sequence[tuple[float, float, int]], delta: float, method: str) -> float:
    """ε at ``delta`` of the composition of ``(noise_multiplier, sample_rate, steps)`` segments."""
    if any(sigma == 0 for sigma, _, _ in segments):
        return math.inf
    if not segments:
        return 0.0
    accountant: dp_accounting.PrivacyAccountant
    if method == "rdp":
        accountant = rdp_privacy_accountant.RdpAccountant()
    else:
        accountant = pld_privacy_accountant.PLDAccountant()
    with _quiet_absl():
        for sigma, q, n in segments:
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
            accountant.compose(event, n)
        return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(sigma: float, q: float, steps: int, delta: float, method: str) -> float:
    return _compose_epsilon([(sigma, q, steps)], delta, method)


def epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, method: str = "rdp"
) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps (noise σ, rate q) at ``delta``; inf when σ = 0."""
    _check_method(method)
    sigma = _check_noise_multiplier(noise_multiplier)
    return _cached_epsilon(
        sigma, _check_sample_rate(sample_rate), _check_steps(steps), _check_delta(delta), method
    )


def noise_multiplier(
    *, epsilon: float, delta: float, sample_rate: float, steps: int, method: str = "rdp"
) -> float:
    """Smallest σ (to a relative 1e-5 for RDP, 2e-3 for PLD) whose ε at ``delta`` is at most ``epsilon``;
    never above the target.

    Raises ValueError when even σ = 1e4 does not reach the target.
    """
    _check_method(method)
    target, delta = _check_epsilon(epsilon), _check_delta(delta)
    q, steps = _check_sample_rate(sample_rate), _check_steps(steps)

    def eps_of(sigma: float) -> float:
        return _cached_epsilon(sigma, q, steps, delta, method)

    if eps_of(MAX_NOISE_MULTIPLIER) > target:
        raise ValueError(
            f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon={target:g} at delta={delta:g} "
            f"with sample_rate={q:g} and steps={steps} ({method}); raise epsilon, lower the sample rate "
            "or train fewer steps"
        )
    # RDP bounds ε from above, so the PLD σ is at most the RDP σ: start PLD there with a narrow bracket.
    if method == "rdp":
        start, factor = 1.0, 2.0
    else:
        try:
            start = noise_multiplier(epsilon=target, delta=delta, sample_rate=q, steps=steps, method="rdp")
        except ValueError:  # only PLD reaches this target
            start = MAX_NOISE_MULTIPLIER
        factor = 1.25
    lo, hi = 0.0, MAX_NOISE_MULTIPLIER  # invariant: eps_of(lo) > target >= eps_of(hi) (eps_of(0) = inf)
    guess = min(start, MAX_NOISE_MULTIPLIER)
    if eps_of(guess) <= target:
        hi = guess
        while hi > 1e-6:
            if eps_of(hi / factor) > target:
                lo = hi / factor
                break
            hi /= factor
        else:
            return hi  # the target is so loose that almost no noise is needed
    else:
        lo = guess
        while lo * factor < MAX_NOISE_MULTIPLIER and eps_of(lo * factor) > target:
            lo *= factor
        hi = min(lo * factor, MAX_NOISE_MULTIPLIER)
    while hi - lo > _CALIBRATION_RTOL[method] * hi:
        mid = 0.5 * (lo + hi)
        if eps_of(mid) > target:
            lo = mid
        else:
            hi = mid
    logger.debug("calibrated noise_multiplier=%.6g for epsilon=%g (%s)", hi, target, method)
    return hi


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Logical batches in `epochs` passes of a Poisson loader with round(1/q) batches per pass."""
    return max(1, math.ceil(epochs * max(1, round(1 / sample_rate))))


def default_delta(sample_size: int) -> float:
    """The library's default δ: ``min(1e-5, 1 / (10 * sample_size))``, always below 1/N."""
    n = _check_steps(sample_size, "sample_size")
    return min(1e-5, 1.0 / (10 * n))


# ----------------------------------------------------------------------------------------------- accountant
class PrivacyAccountant:
    """Running record of the training steps taken, as ``(noise_multiplier, sample_rate, num_steps)`` segments."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []
        self._cache: dict[tuple[Any, ...], float] = {}

    def step(self, noise_multiplier: float, sample_rate: float, num: int = 1) -> None:
        """Record ``num`` steps with noise σ and sampling rate q (merged into the last segment if equal)."""
        sigma, q = _check_noise_multiplier(noise_multiplier), _check_sample_rate(sample_rate)
        num = _check_steps(num, "num")
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + num)
        else:
            self.history.append((sigma, q, num))

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float, method: str = "pld") -> float:
        """ε at ``delta`` of all recorded steps (0.0 before the first step)."""
        key = (tuple(self.history), _check_delta(delta), _check_method(method))
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = _compose_epsilon(self.history, delta, method)
        return self._cache[key]

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-serialisable) state."""
        return {"history": [[sigma, q, n] for sigma, q, n in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history saved by :meth:`state_dict`."""
        self.history = []
        for sigma, q, n in state["history"]:
            self.step(sigma, q, n)

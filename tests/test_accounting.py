"""groupclip.accounting checked against dp_accounting called directly."""

from __future__ import annotations

import itertools
import json
import math

import dp_accounting
import pytest
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from groupclip import accounting
from groupclip.accounting import PrivacyAccountant, default_delta, epsilon, noise_multiplier

SIGMAS = (0.5, 1.0, 2.0, 4.0)
RATES = (0.001, 0.01, 0.1, 1.0)
STEPS = (1, 100, 1000)
DELTAS = (1e-5, 1e-6)


def direct_epsilon(segments, delta, method):
    """Reference: compose (σ, q, steps) segments with a fresh dp_accounting accountant."""
    acc = RdpAccountant() if method == "rdp" else PLDAccountant()
    for sigma, q, n in segments:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    return acc.get_epsilon(delta)


def close(a, b, rel=0.01):
    return a == b or math.isclose(a, b, rel_tol=rel)


RDP_GRID = list(itertools.product(SIGMAS, RATES, STEPS, DELTAS))
# PLD is ~10x slower (up to 4 s a point at small σ): each (σ, q, steps) for σ >= 1 once, δ alternating, without
# the slowest point, plus one point at σ = 0.5.
PLD_GRID = [
    (*p, DELTAS[i % 2]) for i, p in enumerate(itertools.product(SIGMAS[1:], RATES, STEPS)) if p != (1.0, 1.0, 1000)
] + [(0.5, 0.01, 100, 1e-6)]


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), RDP_GRID)
def test_rdp_matches_dp_accounting(sigma, q, steps, delta):
    ours = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, method="rdp")
    assert close(ours, direct_epsilon([(sigma, q, steps)], delta, "rdp"))


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), PLD_GRID)
def test_pld_matches_dp_accounting(sigma, q, steps, delta):
    ours = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, method="pld")
    assert close(ours, direct_epsilon([(sigma, q, steps)], delta, "pld"))


def test_default_method_is_rdp_and_zero_noise_is_infinite():
    kw = dict(sample_rate=0.01, steps=100, delta=1e-5)
    assert epsilon(noise_multiplier=1.0, **kw) == epsilon(noise_multiplier=1.0, method="rdp", **kw)
    assert epsilon(noise_multiplier=0.0, **kw) == math.inf
    assert epsilon(noise_multiplier=0.0, method="pld", **kw) == math.inf


CALIBRATION = [  # (ε*, δ, q, steps, method)
    (3.0, 1e-5, 0.01, 1000, "rdp"),
    (1.0, 1e-5, 0.001, 10_000, "rdp"),
    (8.0, 1e-6, 1.0, 10, "rdp"),
    (0.5, 1e-5, 0.05, 500, "rdp"),
    (1.0, 1e-5, 1.0, 1, "pld"),
    (0.5, 1e-5, 0.05, 500, "pld"),
]


@pytest.mark.parametrize(("target", "delta", "q", "steps", "method"), CALIBRATION)
def test_calibration_is_tight_and_never_above_target(target, delta, q, steps, method):
    sigma = noise_multiplier(epsilon=target, delta=delta, sample_rate=q, steps=steps, method=method)
    kw = dict(sample_rate=q, steps=steps, delta=delta, method=method)
    assert epsilon(noise_multiplier=sigma, **kw) <= target
    assert epsilon(noise_multiplier=0.98 * sigma, **kw) > target
    # independent check of the returned σ with dp_accounting itself
    assert direct_epsilon([(sigma, q, steps)], delta, method) <= target


def test_pld_needs_less_noise_than_rdp():
    kw = dict(epsilon=0.5, delta=1e-5, sample_rate=0.05, steps=500)  # cached by the calibration test
    assert noise_multiplier(method="pld", **kw) <= noise_multiplier(method="rdp", **kw)


def test_impossible_target_raises():
    with pytest.raises(ValueError, match=r"no noise multiplier.*epsilon=1e-05.*sample_rate=1.*steps=1"):
        noise_multiplier(epsilon=1e-5, delta=1e-5, sample_rate=1.0, steps=1)


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_monotonicity(method):
    def eps(sigma=1.0, q=0.01, steps=100):
        return epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, method=method)

    assert eps(steps=10) < eps(steps=100) < eps(steps=1000)
    assert eps(q=0.001) < eps(q=0.01) < eps(q=0.1)
    assert eps(sigma=0.8) > eps(sigma=1.0) > eps(sigma=2.0)


GOOD = dict(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        (dict(sample_rate=0.0), "sample_rate must be in"),
        (dict(sample_rate=1.5), "sample_rate must be in"),
        (dict(sample_rate=float("nan")), "sample_rate must be in"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(steps=-3), "steps must be an integer >= 1"),
        (dict(steps=10.0), "steps must be an integer >= 1"),
        (dict(delta=0.0), "delta must be in"),
        (dict(delta=1.0), "delta must be in"),
        (dict(noise_multiplier=-0.1), "noise_multiplier must be"),
        (dict(noise_multiplier=math.inf), "noise_multiplier must be"),
        (dict(method="gdp"), "valid methods are rdp, pld"),
    ],
)
def test_epsilon_validation(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        epsilon(**{**GOOD, **changes})


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        (dict(epsilon=0.0), "epsilon must be a positive"),
        (dict(epsilon=-1.0), "epsilon must be a positive"),
        (dict(epsilon=math.inf), "epsilon must be a positive"),
        (dict(sample_rate=2.0), "sample_rate must be in"),
        (dict(steps=0), "steps must be an integer"),
        (dict(delta=0.0), "delta must be in"),
        (dict(method="moments"), "unknown accounting method 'moments'"),
    ],
)
def test_noise_multiplier_validation(changes, pattern):
    good = dict(epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=10)
    with pytest.raises(ValueError, match=pattern):
        noise_multiplier(**{**good, **changes})


def test_default_delta():
    assert default_delta(1000) == 1e-5
    assert default_delta(50_000) == pytest.approx(2e-6)
    for n in (1, 10, 1000, 10**5, 10**7):
        assert default_delta(n) < 1 / n
    with pytest.raises(ValueError, match="sample_size"):
        default_delta(0)
    assert "1e-5" in accounting.default_delta.__doc__


def test_accountant_single_segment_matches_one_shot():
    acc = PrivacyAccountant()
    assert acc.steps == 0 and acc.epsilon(1e-5) == 0.0
    for _ in range(50):
        acc.step(1.1, 0.02)
    acc.step(1.1, 0.02, num=50)
    assert acc.history == [(1.1, 0.02, 100)] and acc.steps == 100
    for method in ("rdp", "pld"):
        one_shot = epsilon(noise_multiplier=1.1, sample_rate=0.02, steps=100, delta=1e-5, method=method)
        assert acc.epsilon(1e-5, method=method) == pytest.approx(one_shot, rel=1e-9)


def test_accountant_composes_segments_and_round_trips():
    acc = PrivacyAccountant()
    acc.step(1.5, 0.01, num=200)
    acc.step(3.0, 0.05, num=100)
    acc.step(1.5, 0.01, num=10)
    assert len(acc.history) == 3 and acc.steps == 310
    for method in ("rdp", "pld"):
        assert close(acc.epsilon(1e-5, method=method), direct_epsilon(acc.history, 1e-5, method), rel=1e-6)
    state = json.loads(json.dumps(acc.state_dict()))
    restored = PrivacyAccountant()
    restored.load_state_dict(state)
    assert restored.history == acc.history
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5)
    acc.step(0.0, 0.01)
    assert acc.epsilon(1e-5) == math.inf


def test_accountant_caches(monkeypatch):
    acc = PrivacyAccountant()
    acc.step(1.0, 0.01, num=100)
    first = acc.epsilon(1e-5, method="rdp")
    monkeypatch.setattr(accounting, "_compose_epsilon", lambda *a: pytest.fail("not cached"))
    assert acc.epsilon(1e-5, method="rdp") == first


def test_accountant_validation():
    acc = PrivacyAccountant()
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.step(-1.0, 0.1)
    with pytest.raises(ValueError, match="sample_rate"):
        acc.step(1.0, 0.0)
    with pytest.raises(ValueError, match="num must be an integer"):
        acc.step(1.0, 0.1, num=0)
    with pytest.raises(ValueError, match="valid methods"):
        acc.epsilon(1e-5, method="xyz")
    with pytest.raises(ValueError, match="delta"):
        acc.epsilon(2.0)

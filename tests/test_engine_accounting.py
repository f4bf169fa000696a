"""The engine's privacy bookkeeping: σ calibrated from target_epsilon, ε of the steps actually taken, the
default δ, and the refusal of arguments no accountant can honour.

The accountant's own numbers are tested in test_accounting.py; here the engine must hand it the right
(σ, q, steps, δ) and count exactly one step per logical batch of a real training loop.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import groupclip
from groupclip import accounting


def dataset(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)
    )


def engine_for(n: int = 100, batch_size: int = 10, **kw):
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("seed", 0)
    if "target_epsilon" not in kw:
        kw.setdefault("noise_multiplier", 1.0)
    if "epochs" not in kw:
        kw.setdefault("steps", 10)
    return model, opt, groupclip.PrivacyEngine(model, opt, batch_size=batch_size, sample_size=n, **kw)


def train_epochs(model, opt, engine, loader, epochs: int, after_step=None) -> None:
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            if len(x):
                ((model(x) - y) ** 2).sum(1).mean().backward()
            opt.step()
            if after_step is not None:
                after_step(engine)


# ------------------------------------------------------------------------------------------ calibration
# (method, N, B, epochs, target): PLD with q = 0.2 (5 batches per epoch); RDP with q = 8/60, where
# 1/q = 7.5 rounds UP to 8 batches per loader epoch: `epochs` must mean passes of engine.data_loader, or
# a loop over 2 epochs would take 16 steps when σ was calibrated for ceil(2 * 7.5) = 15 and overshoot ε.
CALIBRATION = [("pld", 50, 10, 2, 1.0), ("rdp", 60, 8, 2, 2.0)]


@pytest.fixture(scope="module", params=CALIBRATION, ids=[c[0] for c in CALIBRATION])
def calibrated_run(request):
    method, n, b, epochs, target = request.param
    model, opt, engine = engine_for(n, b, epochs=epochs, target_epsilon=target, accountant=method)
    per_step = []
    checkpoints = {1, 3}
    train_epochs(model, opt, engine, engine.data_loader(dataset(n)), epochs,
                 after_step=lambda e: per_step.append(e.epsilon()) if e.steps in checkpoints else None)
    return dict(method=method, n=n, b=b, epochs=epochs, target=target, engine=engine, per_step=per_step)


def test_planned_steps_are_the_steps_of_the_loader_epochs(calibrated_run):
    r = calibrated_run
    steps_per_epoch = round(r["n"] / r["b"])
    assert r["engine"].planned_steps == r["epochs"] * steps_per_epoch == r["engine"].steps


def test_epsilon_after_the_planned_steps_is_at_most_and_close_to_the_target(calibrated_run):
    r = calibrated_run
    eps = r["engine"].epsilon()  # the engine's default method is the one it calibrated with
    assert eps <= r["target"], f"ε = {eps} exceeds the target {r['target']}"
    assert eps >= r["target"] * (1 - 1e-3), f"calibration is loose: ε = {eps} for a target of {r['target']}"


def test_epsilon_equals_the_accountant_of_the_steps_taken(calibrated_run):
    r = calibrated_run
    engine = r["engine"]
    sigma, q, delta = engine.noise_multiplier, engine.sample_rate, engine.delta
    assert q == r["b"] / r["n"] and delta == accounting.default_delta(r["n"])
    assert sigma == accounting.noise_multiplier(epsilon=r["target"], delta=delta, sample_rate=q,
                                                steps=engine.planned_steps, method=r["method"])

    def direct(steps, method=r["method"], d=delta):
        return accounting.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=d, method=method)

    assert r["per_step"] == pytest.approx([direct(1), direct(3)], rel=1e-9)
    assert r["per_step"][0] < r["per_step"][1] < engine.epsilon()
    k = engine.steps
    assert engine.epsilon() == pytest.approx(direct(k), rel=1e-9)
    other = "rdp" if r["method"] == "pld" else "pld"
    assert engine.epsilon(method=other) == pytest.approx(direct(k, other), rel=1e-9)
    assert engine.epsilon(delta=1e-3) == pytest.approx(direct(k, d=1e-3), rel=1e-9)
    assert engine.epsilon(delta=1e-3) < engine.epsilon()


def test_default_accountant_is_pld_and_rdp_on_request():
    _, opt, engine = engine_for(noise_multiplier=1.2, steps=5)
    assert engine.epsilon() == 0.0  # no step taken yet
    for _ in range(5):
        opt.zero_grad()
        opt.step()
    direct = {m: accounting.epsilon(noise_multiplier=1.2, sample_rate=0.1, steps=5, delta=engine.delta, method=m)
              for m in ("pld", "rdp")}
    assert engine.epsilon() == pytest.approx(direct["pld"], rel=1e-9)
    assert engine.epsilon(method="rdp") == pytest.approx(direct["rdp"], rel=1e-9)
    assert direct["pld"] < direct["rdp"]  # RDP is the looser bound
    with pytest.raises(ValueError, match="method"):
        engine.epsilon(method="gdp")


def test_zero_noise_has_infinite_epsilon_once_a_step_is_taken():
    with pytest.warns(UserWarning, match="not private"):
        _, opt, engine = engine_for(noise_multiplier=0.0)
    assert engine.epsilon() == 0.0
    opt.zero_grad()
    opt.step()
    assert engine.epsilon() == math.inf


@pytest.mark.parametrize("n, b, epochs, steps", [(100, 10, 3, 30), (100, 10, 2.5, 25), (100, 10, 0.01, 1),
                                                  (60, 8, 3, 24), (1000, 3, 1, 333), (10, 10, 4, 4)])
def test_epochs_count_passes_of_the_data_loader(n, b, epochs, steps):
    """planned_steps = ceil(epochs * round(1/q)), the number of logical batches in `epochs` loader passes."""
    _, _, engine = engine_for(n, b, epochs=epochs)
    assert engine.planned_steps == steps
    assert len(engine.data_loader(dataset(n))) == round(n / b)


# ------------------------------------------------------------------------------------------ delta
@pytest.mark.parametrize("n", [60, 1000, 50_000, 10**6])
def test_default_delta_is_below_one_over_n_and_silent(n):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, engine = engine_for(n=n, batch_size=min(10, n))
    assert engine.delta == min(1e-5, 1 / (10 * n)) < 1 / n


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_delta_at_or_above_one_over_n_warns(factor):
    with pytest.warns(UserWarning, match="1/N"):
        _, _, engine = engine_for(n=100, target_delta=factor / 100)
    assert engine.delta == factor / 100


def test_delta_below_one_over_n_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, engine = engine_for(n=100, target_delta=0.5 / 100)
    assert engine.delta == 0.005


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(batch_size=101), r"batch_size \(101\) exceeds sample_size \(100\).*q"),
        (dict(steps=0), "steps must be a positive int"),
        (dict(steps=-5), "steps must be a positive int"),
        (dict(steps=2.5), "steps must be a positive int"),
        (dict(steps=True), "steps must be a positive int"),
        (dict(steps=None, epochs=0), "epochs must be"),
        (dict(steps=None, epochs=-1.0), "epochs must be"),
        (dict(steps=None, epochs=math.nan), "epochs must be"),
        (dict(steps=None, epochs=math.inf), "epochs must be"),
        (dict(steps=10, epochs=1), "epochs or steps, not both"),
        (dict(noise_multiplier=-1.0), "noise_multiplier must be"),
        (dict(noise_multiplier=math.nan), "noise_multiplier must be"),
        (dict(noise_multiplier=math.inf), "noise_multiplier must be"),
        (dict(accountant="moments"), "unknown accountant 'moments'.*rdp.*pld"),
        (dict(target_delta=0.0), "target_delta must be in"),
        (dict(target_delta=1.0), "target_delta must be in"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(kw, pattern):
    args = {k: v for k, v in (dict(batch_size=10, noise_multiplier=1.0, steps=10) | kw).items() if v is not None}
    model = nn.Linear(3, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=pattern):
        groupclip.PrivacyEngine(model, opt, sample_size=100, **args)


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf, math.nan])
def test_target_epsilon_must_be_positive_and_finite(target):
    with pytest.raises(ValueError, match="target_epsilon must be a finite number > 0"):
        engine_for(target_epsilon=target)


def test_unreachable_target_epsilon_is_refused():
    """No σ up to the calibration's limit reaches ε = 1e-6 over 1000 steps at q = 0.1."""
    with pytest.raises(ValueError, match=r"(?s)target_epsilon=1e-06.*no noise multiplier.*raise epsilon"):
        engine_for(target_epsilon=1e-6, steps=1000)


def test_target_epsilon_needs_the_training_length():
    model = nn.Linear(3, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="epochs= or steps="):
        groupclip.PrivacyEngine(model, opt, batch_size=10, sample_size=100, target_epsilon=1.0)

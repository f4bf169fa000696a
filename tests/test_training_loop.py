"""The engine in a normal training loop: Poisson batches from engine.data_loader (variable and empty sizes),
logical batches split into physical micro-batches, and exact save / resume.

The loop the engine supports for an EMPTY Poisson batch (leading dimension 0) is either
  * skip forward/backward but keep `optimizer.zero_grad(); optimizer.step()`, or
  * run forward/backward on the 0-sized batch (a mean loss is then NaN; the clipped sum over zero samples is
    zero, so p.grad must be 0, never NaN).
Either way exactly one (noise-only) optimizer step is taken per logical batch, so engine.steps equals the
number of logical batches. A logical batch that ends without a step is refused (EngineError). Both ways
are tested on every layer kind below.

Tiny float64 models and TensorDatasets keep the whole file at a few seconds.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import groupclip
from groupclip import EngineError

N, B = 60, 8  # q = 8/60; one loader epoch = round(1/q) = 8 logical batches

@pytest.fixture(autouse=True)
def _quiet_zero_noise():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not private")
        yield


def dataset(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)
    )


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 2))).double()


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum(1).mean()  # mean over samples: NaN for an empty batch


def build(*, optimizer: str = "sgd", n: int = N, batch_size: int = B, **kw):
    model = mlp()
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    kw.setdefault("steps", 20)
    if "target_epsilon" not in kw:
        kw.setdefault("noise_multiplier", 0.0)
    engine = groupclip.PrivacyEngine(model, opt, batch_size=batch_size, sample_size=n, **kw)
    return model, opt, engine


def train(model, opt, engine, loader, until: int, *, empty: str = "skip", zero_grad: str = "first", log=None):
    """Train until engine.steps == until (over as many loader epochs as needed); returns physical sizes.

    empty: "skip" (no forward/backward on an empty batch) or "forward" (run them on the 0-sized batch).
    zero_grad: "first" (zero_grad; backward; step) or "last" (backward; step; zero_grad).
    """
    sizes = []
    while engine.steps < until:
        for x, y in loader:
            sizes.append(len(x))
            if zero_grad == "first":
                opt.zero_grad()
            if len(x) or empty == "forward":
                loss = loss_fn(model, x, y)
                loss.backward()
                if log is not None:
                    log.append((len(x), loss.detach(), [p.grad.clone() for p in model.parameters()]))
            opt.step()
            if zero_grad == "last":
                opt.zero_grad()
            if engine.steps == until:
                return sizes
    return sizes


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def count_real_steps(opt) -> list[int]:
    """Counts the wrapped optimizer's own steps (the step after noise), via torch's step post-hook."""
    calls = [0]
    opt.register_step_post_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---------------------------------------------------------------------------------------------- data_loader
def sizes_of(engine, opt, loader, epochs: int = 1) -> list[int]:
    """Batch sizes of `epochs` passes, with the (here noise-free, gradient-free) step each batch needs."""
    sizes = []
    for _ in range(epochs):
        for x, _ in loader:
            sizes.append(len(x))
            opt.zero_grad()
            opt.step()
    return sizes


def test_data_loader_uses_the_engine_sampling_rate():
    _, opt, engine = build()
    loader = engine.data_loader(dataset())
    assert loader.sample_rate == pytest.approx(B / N) == engine.sample_rate
    assert len(loader) == round(N / B)  # logical batches per epoch
    sizes = sizes_of(engine, opt, loader, epochs=40)  # 320 logical batches (no micro-batching)
    assert engine.steps == 320
    mean = sum(sizes) / len(sizes)
    # E = qN = 8, Var = Nq(1-q) ~ 6.9: std of the mean over 320 batches ~ 0.15
    assert abs(mean - B) < 0.75, mean
    assert len(set(sizes)) > 5, "Poisson batches should vary in size"


def test_data_loader_refuses_a_dataset_of_another_size_and_fixed_batching():
    _, _, engine = build()
    with pytest.raises(ValueError, match="sample_size=60"):
        engine.data_loader(dataset(n=N + 1))
    with pytest.raises(ValueError, match="batch_size"):
        engine.data_loader(dataset(), batch_size=8)


def test_data_loader_default_generator_follows_the_engine_seed():
    def run(seed):
        _, opt, engine = build(seed=seed)
        return sizes_of(engine, opt, engine.data_loader(dataset()))

    first, again, other = run(3), run(3), [run(4), run(5)]
    assert first == again
    assert any(o != first for o in other)


# ---------------------------------------------------------------------------------------------- empty batches
# q = 1/40 on 40 samples: P(empty batch) = (39/40)^40 ~ 0.36
EMPTY_N, EMPTY_B = 40, 1


@pytest.mark.parametrize("mpb", [None, 2])
@pytest.mark.parametrize("empty", ["skip", "forward"])
def test_empty_batches_in_a_training_loop(empty, mpb):
    model, opt, engine = build(n=EMPTY_N, batch_size=EMPTY_B, noise_multiplier=1.0, seed=0, steps=30,
                               max_physical_batch_size=mpb)
    real = count_real_steps(opt)
    loader = engine.data_loader(dataset(n=EMPTY_N))
    log = []
    sizes = train(model, opt, engine, loader, 30, empty=empty, log=log)
    assert sizes.count(0) >= 3, f"the test needs empty batches; got sizes {sizes}"
    assert engine.steps == 30 == real[0]  # one noisy step per logical batch, empty ones included
    assert engine.accountant.history == [(engine.noise_multiplier, EMPTY_B / EMPTY_N, 30)]
    assert torch.isfinite(flat(model)).all()
    if empty == "forward":
        empties = [(loss, grads) for n, loss, grads in log if n == 0]
        assert empties, "no backward on an empty batch was logged"
        for loss, grads in empties:
            assert torch.isnan(loss), "a mean loss over 0 samples is NaN in plain PyTorch too"
            for g in grads:
                assert torch.equal(g, torch.zeros_like(g)), "the clipped sum over zero samples must be 0"


@pytest.mark.parametrize("groups", ["all-layer", "layer-wise", "param-wise"])
@pytest.mark.parametrize("clipping", ["automatic", "autov", "abadi", "psac"])
def test_backward_on_a_zero_sized_batch_gives_zero_not_nan(clipping, groups):
    model, opt, engine = build(clipping=clipping, groups=groups)
    x, y = torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64)
    opt.zero_grad()
    loss = loss_fn(model, x, y)
    assert torch.isnan(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name
    before = flat(model)
    opt.step()  # noise_multiplier=0: a zero gradient, so SGD leaves the model as it was
    assert torch.equal(flat(model), before) and engine.steps == 1


def test_noise_only_step_for_a_skipped_empty_batch():
    """zero_grad(); step() with no backward: p.grad is pure noise, N(0, (σC/B)²) per coordinate."""
    model = nn.Linear(100, 100).double()  # 10,100 coordinates
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = groupclip.PrivacyEngine(model, opt, batch_size=5, sample_size=100, steps=10, noise_multiplier=2.0,
                                     max_grad_norm=1.5, seed=0)
    before = flat(model)
    opt.zero_grad()
    opt.step()
    noise = before - flat(model)
    assert engine.steps == 1
    assert float(noise.std()) == pytest.approx(2.0 * 1.5 / 5, rel=0.05)  # std error ~0.7%


def test_a_logical_batch_without_a_step_is_refused():
    model, opt, engine = build(n=EMPTY_N, batch_size=EMPTY_B)
    loader = engine.data_loader(dataset(n=EMPTY_N))
    with pytest.raises(EngineError, match=r"(?s)without optimizer\.step\(\).*empty"):
        for x, y in loader:
            opt.zero_grad()
            if len(x) == 0:
                continue  # wrong: an empty batch still needs its (noise-only) step
            loss_fn(model, x, y).backward()
            opt.step()


# ---------------------------------------------------------------------------------------------- physical batches
def _run(mpb, *, noise=0.0, seed=1, zero_grad="first", steps=10, optimizer="sgd"):
    model, opt, engine = build(noise_multiplier=noise, seed=seed, max_physical_batch_size=mpb, steps=steps,
                               optimizer=optimizer)
    real = count_real_steps(opt)
    loader = engine.data_loader(dataset(), generator=torch.Generator().manual_seed(5))
    sizes = train(model, opt, engine, loader, steps, zero_grad=zero_grad)
    return flat(model), engine, sizes, real[0]


@pytest.mark.parametrize("zero_grad", ["first", "last"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("noise", [0.0, 1.3])
def test_micro_batches_give_the_same_training_as_one_batch(noise, optimizer, zero_grad):
    """Logical batches split into physical chunks of <= 3 samples train the same model as unsplit ones.

    Not bit-identical: p.grad accumulates chunk by chunk, so the sum over samples is done in another order
    (differences ~1e-16 in float64). The noise is drawn once per logical batch from the same seeded
    generator, so with noise on the result agrees just as closely."""
    whole, e1, sizes1, real1 = _run(None, noise=noise, zero_grad=zero_grad, optimizer=optimizer)
    split, e3, sizes3, real3 = _run(3, noise=noise, zero_grad=zero_grad, optimizer=optimizer)
    assert max(sizes3) <= 3 < max(sizes1)
    assert sum(sizes1) == sum(sizes3) and len(sizes3) > len(sizes1)
    assert e1.steps == e3.steps == real1 == real3 == 10
    assert e1.accountant.history == e3.accountant.history
    assert e1.epsilon() == e3.epsilon()
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-12)
    if noise:
        other, *_ = _run(None, noise=noise, seed=2, zero_grad=zero_grad, optimizer=optimizer)
        assert (other - whole).abs().max() > 1e-3, "the noise should matter (control)"


def test_micro_batches_one_real_step_per_logical_batch():
    _, engine, sizes, real = _run(2, steps=6)
    assert engine.steps == real == 6
    assert len(sizes) > 6  # more physical batches than steps


# ---------------------------------------------------------------------------------------------- save / resume
TOTAL, SAVE_AT = 13, 5  # crosses a loader epoch boundary (8 logical batches per epoch)


def _make(seed, mpb=3):
    return build(optimizer="adam", target_epsilon=3.0, accountant="rdp", steps=TOTAL, seed=seed,
                 max_physical_batch_size=mpb, groups="layer-wise", clipping="abadi")


@pytest.mark.parametrize("loader_made", ["before_load", "after_load"])
def test_resume_from_a_checkpoint_is_exact(tmp_path, loader_made):
    data = dataset()
    model, opt, engine = _make(seed=7)
    train(model, opt, engine, engine.data_loader(data), TOTAL)
    reference, ref_eps = flat(model), engine.epsilon()
    ref_noise = engine.noise.state_dict()["generators"]

    model, opt, engine = _make(seed=7)
    train(model, opt, engine, engine.data_loader(data), SAVE_AT)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "engine": engine.state_dict()},
               tmp_path / "ckpt.pt")
    del model, opt, engine

    model, opt, engine = _make(seed=None)  # a fresh random seed: everything must come from the checkpoint
    if loader_made == "before_load":
        loader = engine.data_loader(data)
    ckpt = torch.load(tmp_path / "ckpt.pt")  # weights_only=True: the engine state is plain tensors and lists
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    engine.load_state_dict(ckpt["engine"])
    if loader_made == "after_load":
        loader = engine.data_loader(data)
    assert engine.steps == SAVE_AT
    train(model, opt, engine, loader, TOTAL)

    assert engine.steps == TOTAL
    assert torch.equal(flat(model), reference), "resumed training differs from the uninterrupted run"
    assert engine.epsilon() == ref_eps
    noise = engine.noise.state_dict()["generators"]
    assert noise.keys() == ref_noise.keys()
    assert all(torch.equal(noise[k], ref_noise[k]) for k in noise), "the noise generator state differs"


def test_state_dict_contents():
    thresholds = [0.3, 0.4]
    model, opt, engine = build(noise_multiplier=1.1, groups="layer-wise", thresholds=thresholds, seed=2)
    train(model, opt, engine, engine.data_loader(dataset()), 3)
    state = engine.state_dict()
    assert state["accountant"]["history"] == [[1.1, B / N, 3]]
    assert state["noise_multiplier"] == 1.1
    assert state["thresholds"] == thresholds
    assert len(state["loaders"]) == 1 and {"generator_state", "position"} <= state["loaders"][0].keys()
    assert state["loaders"][0]["position"] == 3
    assert state["noise"]["seed"] == 2 and state["noise"]["generators"]

    _, _, other = build(noise_multiplier=5.0, groups="layer-wise", seed=9)
    other.load_state_dict(state)
    assert other.steps == 3 and other.noise_multiplier == 1.1 and other.noise.noise_multiplier == 1.1
    assert other.groups.thresholds == thresholds
    # the noise scale follows the loaded thresholds: sensitivity sqrt(0.3² + 0.4²) = 0.5
    assert other.max_grad_norm == pytest.approx(0.5) and other.noise.sensitivity == pytest.approx(0.5)
    assert other.epsilon() == engine.epsilon()


def test_load_state_dict_refuses_other_groups():
    _, _, engine = build(groups="layer-wise")
    _, _, other = build(groups="all-layer")
    with pytest.raises(ValueError, match="thresholds"):
        other.load_state_dict(engine.state_dict())


# ---------------------------------------------------------------------------------------------- other layers
ZERO_SIZED = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), (0, 3, 7)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), (0, 3, 6, 6)),
    "embedding": (lambda: nn.Embedding(11, 6), (0, 5)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (0, 4, 3, 3)),
    "layernorm": (lambda: nn.LayerNorm(4), (0, 3, 4)),
    "lstm": (lambda: nn.LSTM(4, 3, batch_first=True), (0, 5, 4)),
}


@pytest.mark.parametrize("kind", list(ZERO_SIZED))
def test_zero_sized_batch_through_other_layers(kind):
    make, shape = ZERO_SIZED[kind]
    layer = make()
    x = torch.zeros(shape, dtype=torch.long) if kind == "embedding" else torch.zeros(shape, dtype=torch.float64)
    model = (_FirstOutput(layer) if kind == "lstm" else nn.Sequential(layer)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = groupclip.PrivacyEngine(model, opt, batch_size=4, sample_size=100, steps=5, noise_multiplier=0.0)
    try:
        model(x).pow(2).mean().backward()
        for p in model.parameters():
            assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p))
        opt.step()
        assert engine.steps == 1
    finally:
        engine.detach()


class _FirstOutput(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]

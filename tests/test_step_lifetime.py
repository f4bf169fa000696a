"""Nothing a step captures outlives it; forwards under no_grad capture nothing."""

import contextlib
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import groupclip
from groupclip import EngineError
from groupclip.rules.base import GRAMS
from groupclip.rules.linear import LAST_INPUT


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)
        self.seen: list = []

    def forward(self, x):
        h = torch.tanh(self.a(x))
        self.seen.append(weakref.ref(h))  # test-only: watch the activation layer b saves for its rule
        return self.b(h)


@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
def test_captured_tensors_are_freed_after_backward(groups):
    model = TwoLayer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = groupclip.PrivacyEngine(model, opt, batch_size=4, sample_size=40, noise_multiplier=1.0,
                                         groups=groups)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 5)).pow(2).mean().backward()
        opt.step()
    gc.collect()
    assert all(r() is None for r in model.seen), "an activation saved for clipping outlived its step"
    assert engine.hub.state is None
    assert not GRAMS.items and LAST_INPUT.empty()


def test_no_grad_forward_captures_nothing():
    model = TwoLayer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = groupclip.PrivacyEngine(model, opt, batch_size=4, sample_size=40, noise_multiplier=1.0)
    with torch.no_grad():
        out = model(torch.randn(4, 5))
    assert out.grad_fn is None
    assert engine.hub.state is None
    gc.collect()
    assert all(r() is None for r in model.seen)


class MaskFirst(nn.Module):
    """Takes a (1, T) mask before the batch: the batch size must still come out as B, not 1."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, mask, x):
        return self.lin(x) * mask[..., None]


def test_batch_size_is_not_taken_from_a_broadcast_argument():
    torch.manual_seed(0)
    model = MaskFirst().double()
    mask = torch.ones(1, 5, dtype=torch.float64)
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = groupclip.PrivacyEngine(model, opt, batch_size=6, sample_size=60, noise_multiplier=0.0)
    model(mask, x).pow(2).sum((1, 2)).mean().backward()
    got = model.lin.weight.grad.clone()
    engine.detach()
    # one sample at a time, automatic clipping with C = 1 over the whole model
    want = torch.zeros_like(got)
    for i in range(6):
        model.zero_grad()
        model(mask, x[i : i + 1]).pow(2).sum().backward()
        norm = torch.sqrt(model.lin.weight.grad.pow(2).sum() + model.lin.bias.grad.pow(2).sum())
        want += model.lin.weight.grad / (norm + 0.01) / 6
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class NormBetween(nn.Module):
    """Linear -> LayerNorm -> Linear; remembers (weakly) the LayerNorm's input, which its rule saves."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)
        self.seen: list = []

    def forward(self, x):
        h = self.a(x)
        self.seen.append(weakref.ref(h))
        return self.b(torch.tanh(self.norm(h)))


def test_waiting_norm_use_drops_its_input_and_gradient_before_backward_ends():
    """All-layer clipping keeps a use until the last norm is known; a LayerNorm use keeps only its (B, C)
    per-sample gradients from then on, not its (B, T, C) input and output gradient."""
    model = NormBetween()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = groupclip.PrivacyEngine(model, opt, batch_size=4, sample_size=40, noise_multiplier=0.0,
                                         groups="all-layer")
    waited, input_alive = [], []
    reduce, arrive = engine.hub.on_wait, engine.hub.on_use

    def spy_wait(use, names):
        reduce(use, names)
        if use.unit.module is model.norm:
            waited.append((use.saved, use.grad_out))

    def spy_use(st, use):
        if use.unit.module is model.a:  # the next layer back: the LayerNorm's autograd node is done by now
            gc.collect()
            input_alive.append(model.seen[-1]() is not None)
        arrive(st, use)

    engine.hub.on_wait, engine.hub.on_use = spy_wait, spy_use
    model(torch.randn(4, 7, 5)).pow(2).mean().backward()
    assert waited == [((), None)]
    assert input_alive == [False]  # the (B, T, C) input itself is gone while backward goes on
    assert all(p.grad is not None for p in model.parameters())


def _pair(model_cls, groups):
    """Two identical float64 models, each with its engine."""
    torch.manual_seed(0)
    models = [model_cls().double(), model_cls().double()]
    models[1].load_state_dict(models[0].state_dict())
    engines = []
    for m in models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engines.append(groupclip.PrivacyEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), batch_size=4,
                                                   sample_size=40, noise_multiplier=0.0, groups=groups))
    return models, engines


class FailsOnce(nn.Module):
    """Raises (like an out-of-memory error) after both layers ran, the first time only."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)
        self.fail = True

    def forward(self, x):
        h = torch.tanh(self.a(x)).to(x.dtype)  # under autocast: a wider input for b, cast (and cached) by b
        out = self.b(h)
        self.seen = [weakref.ref(h)]
        if self.fail:
            self.fail = False
            raise RuntimeError("simulated out of memory")
        return out


@pytest.mark.parametrize("autocast", [False, True], ids=["fp64", "autocast"])
@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
def test_a_forward_that_raised_is_abandoned_not_joined(groups, autocast, caplog):
    """A retry after a failed forward (e.g. a smaller batch after an out-of-memory error) starts its own step:
    no 'second forward' warning, layer-wise groups still clip inside backward, the same p.grad as an engine
    that never saw the failure, and the failed forward's activations are freed (under autocast the layers'
    shared input casts are cached: the cache must not hold the failed graph)."""
    models, engines = _pair(FailsOnce, groups)
    models[1].fail = False
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with pytest.raises(RuntimeError, match="simulated"), ctx:
        models[0](torch.randn(8, 5, dtype=torch.float64, requires_grad=True))
    failed = models[0].seen
    gc.collect()
    assert all(r() is None for r in failed), "the failed forward's activations are still alive"
    finished = []
    engines[0].hub.on_group = lambda g, uses, f=engines[0].hub.on_group: (finished.append(g), f(g, uses))
    x = torch.randn(4, 5, dtype=torch.float64)
    caplog.set_level("WARNING")
    for m in models:
        with ctx:
            loss = m(x).float().pow(2).mean()
        loss.backward()
    assert not [r for r in caplog.records if "second forward" in r.getMessage()]
    assert engines[0].hub.state is None
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
    assert len(finished) == (1 if groups == "all-layer" else 2)


class FailingBackward(torch.autograd.Function):
    """Identity whose backward raises while `armed` holds (a simulated out-of-memory error in backward)."""

    armed = [False]

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if FailingBackward.armed[0]:
            FailingBackward.armed[0] = False
            raise RuntimeError("simulated out of memory in backward")
        return g


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = FailingBackward.apply(torch.tanh(self.a(x)))  # b and c clip before the failure, a never does
        h2 = torch.tanh(self.b(h))
        self.seen = [weakref.ref(h), weakref.ref(h2)]  # test-only: the activations b and c save
        return self.c(h2)


@pytest.mark.parametrize("where", ["loss", "backward"])
@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
def test_a_step_that_failed_after_forward_leaves_nothing_behind(groups, where, caplog):
    """Out of memory in the loss (the forward returned) or midway through backward (some groups already
    clipped, others waiting): the retried step gives exactly the p.grad of an engine that never failed, with
    no stale contributions of the failed step, no 'second forward' warning, and its caches freed."""
    models, engines = _pair(Three, groups)
    x_fail = torch.randn(8, 5, dtype=torch.float64)
    if where == "loss":
        with pytest.raises(RuntimeError, match="simulated"):
            out = models[0](x_fail)
            raise RuntimeError("simulated out of memory in the loss")
        del out
    else:
        FailingBackward.armed[0] = True
        with pytest.raises(RuntimeError, match="simulated"):
            models[0](x_fail).pow(2).mean().backward()
        models[0].zero_grad(set_to_none=True)  # what a retry loop does (p.grad of b and c were written)
    failed = models[0].seen
    gc.collect()
    x = torch.randn(4, 5, dtype=torch.float64)
    caplog.set_level("WARNING")
    for m in models:
        m(x).pow(2).mean().backward()
    assert not [r for r in caplog.records if "second forward" in r.getMessage()]
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
    assert engines[0].hub.state is None and not engines[0].hub._pending
    assert not GRAMS.items and LAST_INPUT.empty()
    gc.collect()
    assert all(r() is None for r in failed), "the failed step's activations are still alive"


def test_detach_after_a_failed_backward_frees_its_activations():
    models, engines = _pair(Three, "all-layer")
    FailingBackward.armed[0] = True
    with pytest.raises(RuntimeError, match="simulated"):
        models[0](torch.randn(8, 5, dtype=torch.float64)).pow(2).mean().backward()
    failed = models[0].seen
    engines[0].detach()
    gc.collect()
    assert all(r() is None for r in failed), "the failed step's activations are still alive"


@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
def test_a_step_after_a_backward_that_failed_midway_needs_zero_grad(groups):
    """Layer-wise, the groups clipped before the failure are already in p.grad: a step (also after a retry that
    skipped zero_grad) would count those samples twice, so it is refused until optimizer.zero_grad(). All-layer,
    nothing was written before the failure and the step is allowed."""
    models, engines = _pair(Three, groups)
    opt = engines[0].optimizer
    x = torch.randn(8, 5, dtype=torch.float64)
    FailingBackward.armed[0] = True
    with pytest.raises(RuntimeError, match="simulated"):
        models[0](x).pow(2).mean().backward()
    if groups == "all-layer":
        assert all(p.grad is None for p in models[0].parameters())
        opt.step()
        assert engines[0].steps == 1
        return
    with pytest.raises(EngineError, match="count its samples twice"):
        opt.step()
    models[0](x).pow(2).mean().backward()  # a retry without zero_grad: the sum now holds b and c twice
    with pytest.raises(EngineError, match="count its samples twice"):
        opt.step()
    opt.zero_grad()
    for m in models:
        m(x).pow(2).mean().backward()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
    opt.step()
    assert engines[0].steps == 1



def _vit():
    import transformers

    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3)
    model = transformers.ViTForImageClassification(cfg)
    x = torch.randn(4, 3, 16, 16)
    return model, lambda: model(pixel_values=x).logits.pow(2).mean()


def _gpt2():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 50, (4, 16))
    return model, lambda: model(input_ids=ids, labels=ids).loss


def _convnet():
    import models

    model = models.ConvNet(2, 3, 4, kernel_size=3)
    x = torch.randn(4, 3, 6, 6)
    return model, lambda: model(x).pow(2).mean()


@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
@pytest.mark.parametrize("net", [_vit, _gpt2, _convnet], ids=["vit", "gpt2", "conv"])
def test_a_step_leaves_no_reference_cycles(net, groups):
    """Everything a training step creates through the rules' own paths is freed by reference counting: a cycle
    per step (as `torch.utils._pytree.tree_flatten` leaves) makes Python's collector run more often during
    training, and a full collection of a large process takes tens of milliseconds. (The generic rule's torch.func
    re-run leaves torch's own cycles; it is not covered here.)"""
    torch.manual_seed(0)
    model, loss = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = groupclip.PrivacyEngine(model, opt, batch_size=4, sample_size=40, noise_multiplier=1.0,
                                         groups=groups)

    def step():
        opt.zero_grad()
        loss().backward()
        opt.step()

    step()
    step()
    gc.collect()
    gc.disable()
    try:
        step()
        found = gc.collect()
    finally:
        gc.enable()
    engine.detach()
    assert found == 0, f"a {groups} step left {found} objects in reference cycles"

"""Group styles x clipping functions, thresholds, loss reduction, gradient accumulation, dtypes, no_grad
forwards and detach, all against the float64 one-sample-at-a-time oracle."""

from __future__ import annotations

import copy

import models as M
import pytest
import torch
from oracle import (
    CLIPPINGS,
    assert_grads_close,
    check_against_oracle,
    clip_factors,
    make_engine,
    make_mse_inputs,
    oracle_grads,
    per_sample_grads,
    rel_err,
    resolve_groups,
    spread_C,
    weighted_mse,
    weighted_mse_sum,
)
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    M.seeded(0)


def convgn():
    return M.ConvGNNet().double(), torch.randn(5, 3, 6, 6)


def tinyvit():
    return M.TinyViT().double(), torch.randn(5, 4, 6)


MODELS = {"convgn": convgn, "tinyvit": tinyvit}

# explicit groups: groups that cut across modules, listed in an order unrelated to the module order
EXPLICIT = {
    "convgn": [
        ["head.0.weight", "conv1.bias"],
        ["conv2.weight", "gn.weight", "gn.bias"],
        ["conv1.weight", "conv2.bias", "head.0.bias"],
    ],
    "tinyvit": [
        ["head.weight", "cls_token"],
        [
            "patch.weight",
            "patch.bias",
            "norm.weight",
            "norm.bias",
            "mlp.0.weight",
            "mlp.0.bias",
            "mlp.2.weight",
            "mlp.2.bias",
        ],
        ["pos_embed", "layer_scale", "head.bias"],
    ],
}
# Assumption: explicit thresholds are the C_k themselves; max_grad_norm is still the total sensitivity C used
# for the noise, so the tests pass thresholds with sqrt(sum C_k^2) == max_grad_norm (the design's invariant).
EXPLICIT_THRESHOLDS = [0.6, 0.48, 0.64]  # sqrt(0.36 + 0.2304 + 0.4096) = 1.0

GROUPINGS = [
    "all-layer",
    "layer-wise",
    "param-wise",
    "explicit",
    "explicit+thresholds",
    "layer-wise+thresholds",
]


def _grouping(name: str, model_name: str, model: nn.Module, C: float):
    if name in ("all-layer", "layer-wise", "param-wise"):
        return name, None
    if name == "explicit":
        return EXPLICIT[model_name], None
    if name == "explicit+thresholds":
        return EXPLICIT[model_name], [t * C for t in EXPLICIT_THRESHOLDS]
    # layer-wise with unequal thresholds (one per layer-wise group, in group order), sqrt(sum^2) == C
    k = len(resolve_groups(model, "layer-wise"))
    raw = torch.linspace(1.0, 3.0, k, dtype=torch.float64)
    return "layer-wise", (raw / raw.norm() * C).tolist()


def test_explicit_groups_partition_the_models():
    for name, build in MODELS.items():
        model, _ = build()
        listed = sorted(n for g in EXPLICIT[name] for n in g)
        assert listed == sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_groups_x_clipping(model_name, grouping, clipping):
    model, x = MODELS[model_name]()
    inputs = make_mse_inputs(model, x)
    C = spread_C(model, weighted_mse, inputs)
    groups, thresholds = _grouping(grouping, model_name, model, C)
    if clipping == "abadi":
        # sanity of the test: some (sample, group) pairs are clipped and some are not
        _, grads = per_sample_grads(model, weighted_mse, inputs)
        f = clip_factors(grads, resolve_groups(model, groups), C=C, clipping="abadi", thresholds=thresholds)
        assert (f < 1).any() and (f == 1).any()
    check_against_oracle(
        model, weighted_mse, inputs, C=C, clipping=clipping, groups=groups, thresholds=thresholds
    )


@pytest.mark.parametrize("clipping,kw", [("automatic", {"gamma": 0.5}), ("psac", {"psac_r": 0.3})])
def test_gamma_and_psac_r_are_used(clipping, kw):
    model, x = tinyvit()
    inputs = make_mse_inputs(model, x)
    # the non-default value must matter at this scale (otherwise the test would not see it ignored)
    default = oracle_grads(
        model, weighted_mse, inputs, batch_size=5, C=1.0, clipping=clipping, groups="layer-wise"
    )
    other = oracle_grads(
        model, weighted_mse, inputs, batch_size=5, C=1.0, clipping=clipping, groups="layer-wise", **kw
    )
    assert max(rel_err(other[n], default[n]) for n in default) > 1e-2
    check_against_oracle(model, weighted_mse, inputs, C=1.0, clipping=clipping, groups="layer-wise", **kw)


# ----------------------------------------------------------------------------------------------------
# loss reduction
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clipping", ["abadi", "automatic"])
@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
def test_loss_reduction_sum(clipping, groups):
    """loss = sum_i loss_i with loss_reduction="sum": g_i is still the gradient of sample i's own loss, so
    p.grad must equal the same oracle, (1/batch_size) sum_i phi(g_i) g_i."""
    model, x = convgn()
    inputs = make_mse_inputs(model, x)
    C = spread_C(model, weighted_mse, inputs)
    ref = copy.deepcopy(model)
    expected = oracle_grads(ref, weighted_mse, inputs, batch_size=5, C=C, clipping=clipping, groups=groups)
    got = _grads_after(
        model,
        [inputs],
        weighted_mse_sum,
        max_grad_norm=C,
        clipping=clipping,
        groups=groups,
        loss_reduction="sum",
        batch_size=5,
    )
    assert_grads_close(got, expected, 1e-6)


# ----------------------------------------------------------------------------------------------------
# gradient accumulation
# ----------------------------------------------------------------------------------------------------
def _grads_after(model, micro_batches, loss_fn, **engine_kw):
    """Attach an engine, run backward once per micro-batch (no step), return the grads, detach."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(model, opt, **engine_kw)
    try:
        opt.zero_grad(set_to_none=True)
        for mb in micro_batches:
            loss_fn(model, *mb).backward()
        return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
    finally:
        engine.detach()


def _split(inputs, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(tuple(t[start : start + s] for t in inputs))
        start += s
    return out


@pytest.mark.parametrize("clipping", ["abadi", "automatic"])
@pytest.mark.parametrize("sizes", [(3, 3), (2, 4), (1, 2, 3)], ids=["3+3", "2+4", "1+2+3"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_accumulation(sizes, clipping, reduction):
    """Backward on micro-batches (each loss reduced over its own samples), then the grads equal one backward
    on the whole batch, and both equal the oracle with batch_size = the whole batch."""
    M.seeded(1)
    model, _ = tinyvit()
    x = torch.randn(6, 4, 6)
    inputs = make_mse_inputs(model, x)
    C = spread_C(model, weighted_mse, inputs)
    loss_fn = weighted_mse if reduction == "mean" else weighted_mse_sum
    kw = dict(max_grad_norm=C, clipping=clipping, groups="layer-wise", batch_size=6, loss_reduction=reduction)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    whole = _grads_after(m1, [inputs], loss_fn, **kw)
    accumulated = _grads_after(m2, _split(inputs, sizes), loss_fn, **kw)
    expected = oracle_grads(
        model, weighted_mse, inputs, batch_size=6, C=C, clipping=clipping, groups="layer-wise"
    )
    assert_grads_close(whole, expected, 1e-6)
    assert_grads_close(accumulated, expected, 1e-6)


# ----------------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["float32", "bf16-autocast"])
@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_low_precision(model_name, groups, precision):
    """float32 model (rel err 1e-4), and the same under torch.autocast("cpu", bfloat16) at 5e-2, both against
    the float64 oracle. (Measured: the ordinary non-private bf16-autocast gradient of these models is within
    0.3-0.8% of float64.)"""
    model, x = MODELS[model_name]()
    model = model.float()
    inputs = make_mse_inputs(model, x)
    bf16 = precision == "bf16-autocast"
    check_against_oracle(
        model,
        weighted_mse,
        inputs,
        C=1.0,
        clipping="automatic",
        groups=groups,
        rtol=5e-2 if bf16 else 1e-4,
        dtype=torch.float32,
        **({"autocast": torch.bfloat16} if bf16 else {}),
    )


# ----------------------------------------------------------------------------------------------------
# no_grad forwards, multi-step training, detach
# ----------------------------------------------------------------------------------------------------
def _load_params(dst: nn.Module, src: nn.Module) -> None:
    sp = dict(src.named_parameters())
    with torch.no_grad():
        for n, p in dst.named_parameters():
            p.copy_(sp[n])


@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
def test_no_grad_forward_between_steps_and_multi_step_training(groups):
    """Three SGD steps (noise 0) with a torch.no_grad() forward on other data between steps (and before the
    first one): the no_grad forward returns the plain model's output and changes nothing, every step's p.grad
    matches the oracle on the current parameters, and optimizer.step applies exactly that gradient (SGD)."""
    M.seeded(2)
    model, _ = convgn()
    ref = copy.deepcopy(model)  # plain PyTorch copy, re-synced to the engine model's parameters every step
    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    engine = make_engine(model, opt, batch_size=5, max_grad_norm=1.0, clipping="automatic", groups=groups)
    try:
        for step in range(3):
            x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
            inputs = make_mse_inputs(ref, x, seed=step)
            other = torch.randn(7, 3, 6, 6, dtype=torch.float64)  # a different batch size, too
            with torch.no_grad():
                out = model(other)
            assert all(p.grad is None for p in model.parameters()) or step > 0
            torch.testing.assert_close(out, ref(other), rtol=1e-12, atol=1e-12)
            expected = oracle_grads(
                ref, weighted_mse, inputs, batch_size=5, C=1.0, clipping="automatic", groups=groups
            )
            opt.zero_grad(set_to_none=True)
            weighted_mse(model, *inputs).backward()
            got = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            assert_grads_close(got, expected, 1e-6)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            for n, p in model.named_parameters():
                torch.testing.assert_close(
                    p.detach(),
                    before[n] - lr * got[n],
                    rtol=1e-12,
                    atol=1e-14,
                    msg=f"parameter {n} after step {step}",
                )
            _load_params(ref, model)
    finally:
        engine.detach()


def _hook_counts(model: nn.Module) -> dict[str, int]:
    counts = {}
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            d = getattr(m, attr, None)
            if d:
                counts[f"{name or '<root>'}.{attr}"] = len(d)
    for name, p in model.named_parameters():
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            d = getattr(p, attr, None)
            if d:
                counts[f"{name}.{attr}"] = len(d)
    return counts


@pytest.mark.parametrize("model_name", list(MODELS))
def test_detach_restores_plain_pytorch(model_name):
    """After detach: no hooks left on modules or parameters, the forward is the plain one, backward gives the
    ordinary (non-private, unclipped) mean gradient, and optimizer.step is plain SGD (no noise, even with
    noise_multiplier > 0)."""
    model, x = MODELS[model_name]()
    inputs = make_mse_inputs(model, x)
    plain = copy.deepcopy(model)
    before = _hook_counts(model)
    lr = 0.25
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    engine = make_engine(
        model,
        opt,
        batch_size=5,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        clipping="abadi",
        groups="layer-wise",
    )
    # one private step while attached (moves the parameters), then detach
    opt.zero_grad(set_to_none=True)
    weighted_mse(model, *inputs).backward()
    opt.step()
    engine.detach()
    assert _hook_counts(model) == before, "hooks left behind after detach"
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert type(model) is type(plain)
    _load_params(plain, model)

    opt.zero_grad(set_to_none=True)
    plain.zero_grad(set_to_none=True)
    weighted_mse(model, *inputs).backward()
    weighted_mse(plain, *inputs).backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=f"{n}: grad after detach")
    expected = {n: p.detach() - lr * p.grad for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(
            p.detach(), expected[n], rtol=1e-12, atol=1e-14, msg=f"{n}: step after detach"
        )

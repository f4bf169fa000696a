"""What the engine must refuse, loudly, with a message that names the module / parameter / argument at fault.

Construction-time refusals may raise ValueError, TypeError or any groupclip-defined exception
(_groupclip_errors() collects every Exception subclass that groupclip exposes at top level or in
groupclip.errors)."""

from __future__ import annotations

import re

import models as M
import pytest
import torch
from oracle import make_engine
from torch import nn


def _groupclip_errors() -> tuple[type[BaseException], ...]:
    import groupclip

    found: list[type[BaseException]] = [ValueError, TypeError]
    mods = [groupclip]
    try:
        import groupclip.errors as errors  # optional module

        mods.append(errors)
    except ImportError:
        pass
    for mod in mods:
        for obj in vars(mod).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, Exception)
                and obj.__module__.startswith("groupclip")
            ):
                found.append(obj)
    return tuple(found)


def _refuse(model: nn.Module, optimizer=None, *, must_mention: list[str] = (), **kw) -> str:
    """Construct an engine, expect a refusal, check the message mentions each string (case-insensitive)."""
    if optimizer is None:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    kw.setdefault("batch_size", 4)
    kw.setdefault("max_grad_norm", 1.0)
    with pytest.raises(_groupclip_errors()) as info:
        make_engine(model, optimizer, **kw)
    msg = str(info.value)
    for s in must_mention:
        assert re.search(re.escape(s), msg, re.IGNORECASE), f"error message does not mention {s!r}: {msg!r}"
    return msg


@pytest.fixture(autouse=True)
def _seed():
    M.seeded(0)


# ----------------------------------------------------------------------------------------------------
# unsupported modules
# ----------------------------------------------------------------------------------------------------
def test_batchnorm_refused_and_groupnorm_suggested():
    # BNNet.features.1 is the BatchNorm2d
    _refuse(M.BNNet(), must_mention=["features.1", "GroupNorm"])


def test_batchnorm_refused_even_when_frozen_but_in_train_mode():
    """A frozen BatchNorm in train mode still mixes samples through its batch statistics (the other layers'
    per-sample gradients then depend on other samples), so it must be refused as well. Assumption: the engine
    cannot know the model will be put in eval mode, so it refuses at construction."""
    model = M.BNNet()
    model.features[1].requires_grad_(False)
    _refuse(model, must_mention=["features.1"])


def test_instancenorm_tracking_running_stats_refused():
    _refuse(M.TrackedInstanceNormNet(), must_mention=["inorm"])


def test_parametrization_refused():
    model = M.LinearNet()
    torch.nn.utils.parametrize.register_parametrization(model.head[0][0], "weight", _Symmetricish())
    _refuse(model, must_mention=["head.0.0"])


def test_weight_norm_refused():
    model = M.LinearNet()
    torch.nn.utils.parametrizations.weight_norm(model.body[0])
    _refuse(model, must_mention=["body.0"])


class _Symmetricish(nn.Module):
    def forward(self, w):
        return w * 2.0


# ----------------------------------------------------------------------------------------------------
# optimizer / argument mistakes
# ----------------------------------------------------------------------------------------------------
def test_optimizer_with_parameter_not_in_model():
    model = M.LinearNet().double()
    stray = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.SGD([*model.parameters(), stray], lr=0.1)
    # the stray tensor has no name in the model; the message should at least point at the optimizer
    _refuse(model, opt, must_mention=["optimizer"])


def test_target_epsilon_and_noise_multiplier_both_given():
    _refuse(
        M.LinearNet(),
        noise_multiplier=1.0,
        target_epsilon=3.0,
        must_mention=["noise_multiplier", "target_epsilon"],
    )


def test_neither_target_epsilon_nor_noise_multiplier():
    import groupclip

    model = M.LinearNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(_groupclip_errors()) as info:
        groupclip.PrivacyEngine(model, opt, batch_size=4, sample_size=1000, steps=10, max_grad_norm=1.0)
    msg = str(info.value)
    assert re.search("noise_multiplier", msg) and re.search("target_epsilon", msg), msg


def test_unknown_clipping():
    _refuse(M.LinearNet(), clipping="clamp-ish", must_mention=["clamp-ish"])


def test_unknown_group_style():
    _refuse(M.LinearNet(), groups="block-wise", must_mention=["block-wise"])


def test_groups_list_missing_a_trainable_parameter():
    model = M.LinearNet()  # params: body.0.weight, body.0.bias, head.0.0.weight, head.0.0.bias
    groups = [["body.0.weight", "body.0.bias"], ["head.0.0.weight"]]
    _refuse(model, groups=groups, must_mention=["head.0.0.bias"])


def test_groups_list_naming_an_unknown_parameter():
    model = M.LinearNet()
    groups = [["body.0.weight", "body.0.bias"], ["head.0.0.weight", "head.0.0.bias", "head.0.0.gain"]]
    _refuse(model, groups=groups, must_mention=["head.0.0.gain"])


def test_groups_list_with_a_parameter_in_two_groups():
    """Assumption (not spelled out in the contract): groups must partition the trainable parameters; a
    parameter in two groups would be clipped to C_a and C_b and count twice, breaking sqrt(sum C_k^2) = C."""
    model = M.LinearNet()
    groups = [["body.0.weight", "body.0.bias", "head.0.0.bias"], ["head.0.0.weight", "head.0.0.bias"]]
    _refuse(model, groups=groups, must_mention=["head.0.0.bias"])


@pytest.mark.parametrize(
    "groups,thresholds",
    [
        ("all-layer", [0.5, 0.5]),
        ("param-wise", [0.5, 0.5, 0.5]),  # LinearNet has 4 parameters
        ([["body.0.weight", "body.0.bias"], ["head.0.0.weight", "head.0.0.bias"]], [1.0]),
    ],
)
def test_thresholds_of_wrong_length(groups, thresholds):
    _refuse(M.LinearNet(), groups=groups, thresholds=thresholds, must_mention=["thresholds"])


# ----------------------------------------------------------------------------------------------------
# refusals at backward
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("also_call_child", [False, True], ids=["only-outside", "inside-and-outside"])
def test_parameter_used_outside_its_owner_raises_at_backward(also_call_child):
    """The parent computes x @ self.child_proj.weight.T itself. The per-sample gradient of child_proj.weight
    is then not seen by the child's rule, so clipping it would be wrong (a privacy leak): backward must raise
    RuntimeError naming the parameter, rather than produce a silently unclipped gradient."""
    model = M.ParentUsesChildWeight(also_call_child=also_call_child).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine(
        model, opt, batch_size=4, max_grad_norm=1.0, clipping="automatic", groups="layer-wise"
    )
    try:
        x = torch.randn(4, 4, dtype=torch.float64)
        loss = (model(x) ** 2).sum(1).mean()
        with pytest.raises(RuntimeError, match=re.escape("child_proj.weight")):
            loss.backward()
    finally:
        engine.detach()

"""What the host-time caches remember, and when they must forget it.

The capture hub keeps one call plan per (unit, trainable parameter names) for the engine's life, the clipper
caches per plan how its names split into groups, and the tensor memos key values by a live tensor's identity
and version. These tests check that a setting changed after the engine was built is still picked up, that a
new engine does not reuse an old engine's plans, and that a memo holds no autograd history.
"""

from __future__ import annotations

import copy
import warnings

import models as M
import pytest
import torch

import groupclip
from groupclip import EngineError
from groupclip.rules import base


def _engine(model, groups):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = groupclip.PrivacyEngine(model, opt, batch_size=4, sample_size=40, noise_multiplier=0.0,
                                         groups=groups, seed=0)
    return engine, opt


def _grads(model, opt, x):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for n in want:
        if want[n] is None:
            assert got[n] is None, n
        else:
            assert got[n] is not None and torch.equal(got[n], want[n]), n


@pytest.mark.parametrize("groups", ["layer-wise", "all-layer"])
def test_requires_grad_changed_after_creation_is_picked_up(groups):
    torch.manual_seed(0)
    model = M.LinearNet().double()
    frozen_from_start = copy.deepcopy(model)
    trainable = copy.deepcopy(model)
    frozen_from_start.head[0][0].bias.requires_grad_(False)
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    engine, opt = _engine(model, groups)
    _grads(model, opt, x)  # the engine has seen (and planned) every parameter trainable

    model.head[0][0].bias.requires_grad_(False)
    got = _grads(model, opt, x)
    _assert_same(got, _grads(frozen_from_start, _engine(frozen_from_start, groups)[1], x))
    assert got["head.0.0.bias"] is None

    model.head[0][0].bias.requires_grad_(True)  # trainable again: clipped with the rest as before
    _assert_same(_grads(model, opt, x), _grads(trainable, _engine(trainable, groups)[1], x))


def test_parameter_frozen_at_creation_then_unfrozen_is_refused():
    model = M.LinearNet()
    model.head[0][0].bias.requires_grad_(False)
    _, opt = _engine(model, "layer-wise")
    model.head[0][0].bias.requires_grad_(True)
    with pytest.raises(EngineError, match="head.0.0.bias"):
        _grads(model, opt, torch.randn(4, 6))


def test_new_engine_on_the_same_model_uses_its_own_plans():
    torch.manual_seed(0)
    model = M.TwiceLinear().double()
    fresh = copy.deepcopy(model)
    x = torch.randn(4, 5, dtype=torch.float64)
    first, opt = _engine(model, "layer-wise")
    _grads(model, opt, x)
    first.detach()
    _, opt = _engine(model, "all-layer")  # one group, every use waits for the others
    _assert_same(_grads(model, opt, x), _grads(fresh, _engine(fresh, "all-layer")[1], x))


def test_tensor_memo_makes_once_per_tensor_version_and_holds_no_history():
    memo = base._TensorMemo(size=2)
    made = []

    def make(t):
        made.append(1)
        return t.sum()

    a = torch.ones(3, requires_grad=True) * 2  # has autograd history
    memo.get_or_make(a, "t", make, a)
    memo.get_or_make(a, "t", make, a)
    assert len(made) == 1
    held = memo.items[0][1]
    assert not held.requires_grad and held.grad_fn is None and held._base is None
    assert held.data_ptr() == a.data_ptr()  # its storage stays reserved while the key lives

    b = torch.zeros(4, 4)
    view = b[1]  # no history, but a view: held without its base
    memo.get_or_make(view, "t", make, view)
    assert len(made) == 2 and memo.items[0][1]._base is None
    view.add_(1)  # modified in place: the kept value no longer applies
    memo.get_or_make(view, "t", make, view)
    assert len(made) == 3
    base.clear_step_memos()

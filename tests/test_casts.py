"""A step's autocast copies of the Linear weights (`groupclip.capture.casts`): made in one batch, equal to per-layer
casts, never stale (in-place updates inside a step, `.data` edits and optimizer steps between steps)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import groupclip
from groupclip.capture import casts as casts_mod
from groupclip.capture.casts import CastPlan, StepCasts

DT = torch.bfloat16


class Net(nn.Module):
    def __init__(self, conv1d=False):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 8)
        self.c = nn.Linear(8, 3, bias=False)
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.b = Conv1D(8, 8)
            nn.init.normal_(self.b.bias)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _engine(model, opt, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return groupclip.PrivacyEngine(model, opt, batch_size=5, sample_size=50, noise_multiplier=0.0,
                                       groups=kw.pop("groups", "layer-wise"), seed=0, **kw)


def _step(model, opt, x):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=DT):
        out = model(x)
    out.float().pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    opt.step()
    return out.detach(), grads


def _reference_forward(model, x):
    """The same weights through plain autocast (no engine)."""
    plain = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=DT), torch.no_grad():
        return plain(x)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("groups", ["layer-wise", "all-layer"])
def test_batched_copies_give_what_per_layer_casts_give(monkeypatch, conv1d, groups):
    if conv1d:
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = Net(conv1d)
    xs = [torch.randn(5, 6) for _ in range(3)]
    runs = {}
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(StepCasts, "get", lambda self, t, dtype: t.to(dtype))
            monkeypatch.setattr(StepCasts, "pair", lambda self, w, b, dtype: (w.to(dtype),
                                                                               None if b is None else b.to(dtype)))
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        engine = _engine(model, opt, groups=groups)
        runs[batched] = [_step(model, opt, x) for x in xs]
        engine.detach()
    for (out_a, g_a), (out_b, g_b) in zip(runs[True], runs[False], strict=True):
        assert torch.equal(out_a, out_b)
        for a, b in zip(g_a, g_b, strict=True):
            assert torch.equal(a, b)


def test_one_batched_copy_per_step(monkeypatch):
    calls = []
    real = torch._foreach_copy_
    monkeypatch.setattr(casts_mod.torch, "_foreach_copy_", lambda dst, src: (calls.append(len(src)), real(dst, src)))
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _engine(model, opt)
    for i in range(3):
        _step(model, opt, torch.randn(5, 6))
        assert calls == [5] * (i + 1)  # a.weight, a.bias, b.weight, b.bias, c.weight in one copy a step


def test_copies_follow_optimizer_steps_and_data_edits():
    torch.manual_seed(0)
    model = Net()
    model.b.weight.requires_grad_(False)  # frozen: only the edits below change it (its bias still trains)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    _engine(model, opt)
    for edit in (None, "data", "data"):
        if edit == "data":  # no version counter moves: only the step's end keeps this from going stale
            model.b.weight.data.mul_(-2.0)
        x = torch.randn(5, 6)
        want = _reference_forward(model, x)
        out, _ = _step(model, opt, x)
        assert torch.equal(out, want)


def test_weight_changed_in_place_inside_a_step_gets_a_copy_of_its_own():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _engine(model, opt)
    _step(model, opt, torch.randn(5, 6))
    x1, x2 = torch.randn(5, 6), torch.randn(5, 6)
    opt.zero_grad()
    want1 = _reference_forward(model, x1)
    with torch.autocast("cpu", dtype=DT):
        out1 = model(x1)
        with torch.no_grad():
            model.a.weight.add_(1.0)  # between two forwards of one step
        want2 = _reference_forward(model, x2)
        out2 = model(x2)
    assert torch.equal(out1.detach(), want1)
    assert torch.equal(out2.detach(), want2)


def test_tensors_outside_the_plan_are_cast_on_their_own():
    w = nn.Parameter(torch.randn(4, 3))
    other = torch.randn(4, 3)
    casts = StepCasts(CastPlan([w]))
    got = casts.get(other, DT)
    assert torch.equal(got, other.to(DT))
    a = casts.get(w, DT)
    assert torch.equal(a, w.detach().to(DT)) and a.dtype == DT
    assert casts.get(w, DT).data_ptr() == a.data_ptr()  # the same batched copy again
    with torch.no_grad():
        w.mul_(3.0)
    b = casts.get(w, DT)
    assert torch.equal(b, w.detach().to(DT)) and torch.equal(a, (w.detach() / 3.0).to(DT))


def test_pair_gives_what_two_gets_give():
    """`StepCasts.pair(w, b)`: views of the batched copy while both are unchanged; a copy of its own for whichever
    changed in place, or is not in the plan; b None stays None."""
    w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    other = nn.Parameter(torch.randn(4))
    casts = StepCasts(CastPlan([w, b]))
    cw, cb = casts.pair(w, b, DT)
    assert torch.equal(cw, w.detach().to(DT)) and torch.equal(cb, b.detach().to(DT))
    assert cw.dtype == cb.dtype == DT
    assert cw.untyped_storage().data_ptr() == cb.untyped_storage().data_ptr()  # one batched copy
    assert casts.get(w, DT).data_ptr() == cw.data_ptr()
    with torch.no_grad():
        b.mul_(2.0)
    cw2, cb2 = casts.pair(w, b, DT)
    assert cw2.data_ptr() == cw.data_ptr() and torch.equal(cb2, b.detach().to(DT))
    assert cb2.untyped_storage().data_ptr() != cw.untyped_storage().data_ptr()
    with torch.no_grad():
        w.mul_(2.0)
    cw3, cb3 = casts.pair(w, b, DT)
    assert torch.equal(cw3, w.detach().to(DT)) and torch.equal(cb3, b.detach().to(DT))
    assert torch.equal(cw, (w.detach() / 2.0).to(DT))  # the batched copy handed out before is left as it was
    cw4, co = casts.pair(w, other, DT)  # a bias outside the plan
    assert torch.equal(cw4, w.detach().to(DT)) and torch.equal(co, other.detach().to(DT))
    cw5, none = casts.pair(w, None, DT)
    assert none is None and torch.equal(cw5, w.detach().to(DT))
    w2 = nn.Parameter(torch.randn(4, 3))
    half = nn.Parameter(torch.randn(4, dtype=torch.float16))  # another batch (another dtype) of one plan
    casts = StepCasts(CastPlan([w2, half]))
    cw6, ch = casts.pair(w2, half, DT)
    assert torch.equal(cw6, w2.detach().to(DT)) and torch.equal(ch, half.detach().to(DT))


def test_float64_layers_are_left_as_autocast_leaves_them():
    """Autocast casts no float64 tensor: neither does the Linear rule (input, weight or bias)."""
    torch.manual_seed(0)
    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _engine(model, opt)
    x = torch.randn(5, 6, dtype=torch.float64)
    want = _reference_forward(model, x)
    out, _ = _step(model, opt, x)
    assert want.dtype == out.dtype == torch.float64
    assert torch.equal(out, want)


def test_a_registered_rule_with_the_older_forward_signature_still_runs(monkeypatch):
    """Only rules with `casts_weights` are handed the step's casts: a user rule written against the four-argument
    `forward` keeps working (here a Linear rule doing its own casts), with the default engine's gradients."""
    from groupclip import rules
    from groupclip.rules.linear import LinearRule

    class OwnCasts(LinearRule):
        name = "own_casts_linear"
        casts_weights = False
        calls = 0

        def forward(self, module, x, names, x_grad):  # the signature before `casts`
            OwnCasts.calls += 1
            return super().forward(module, x, names, x_grad)

    torch.manual_seed(0)
    base = Net()
    x = torch.randn(5, 6)
    ref = copy.deepcopy(base)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    _engine(ref, ref_opt)
    _, want = _step(ref, ref_opt, x)
    monkeypatch.setattr(rules, "REGISTRY", [OwnCasts(), *rules.REGISTRY])
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _engine(model, opt)
    _, got = _step(model, opt, x)
    assert OwnCasts.calls == 3
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


class ThreeReaders(nn.Module):
    """q, k and v read one input; `edit` changes it in place between k and v."""

    def __init__(self, edit=False):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)
        self.edit = edit

    def forward(self, x):
        h = x * 1.0  # fp32: autocast's layers would each cast it
        q, k = self.q(h), self.k(h)
        if self.edit:
            h.mul_(2.0)
        return q, k, self.v(h), self.o(x * 3.0)  # o: another input of the same shape, dtype and version


@pytest.mark.parametrize("edit", [False, True])
def test_layers_reading_one_input_share_its_copy_and_its_readers(edit):
    """Under autocast, the layers that read the very same input (unchanged) are handed one low-precision copy of it
    and one `SharedInput` (counted once per reader, for the Gram shared in backward); an input changed in place in
    between is a new input. Each layer's output is what autocast gives."""
    torch.manual_seed(0)
    model = ThreeReaders(edit)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _engine(model, opt)
    x = torch.randn(5, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=DT):
        outs = model(x)
        ref = copy.deepcopy(model)
    infos = [o.grad_fn.info for o in outs]  # LayerFn's (hub, plan, state, extra, ...) of each call
    shared = [info[3]["input"] for info in infos]
    saved = [o.grad_fn.saved_tensors[0] for o in outs]
    assert all(s.dtype == DT for s in saved)
    assert shared[3] not in shared[:3] and shared[3].readers == 1
    assert torch.equal(saved[3], (x.detach() * 3.0).to(DT))
    assert shared[0] is shared[1] and saved[0].data_ptr() == saved[1].data_ptr()
    if edit:
        assert shared[2] is not shared[0] and saved[2].data_ptr() != saved[0].data_ptr()
        assert (shared[0].readers, shared[2].readers) == (2, 1)
        assert torch.equal(saved[2], (x.detach() * 2.0).to(DT))
    else:
        assert shared[2] is shared[0] and saved[2].data_ptr() == saved[0].data_ptr() and shared[0].readers == 3
    h = x.detach()
    for layer, out, scale in zip((ref.q, ref.k, ref.v, ref.o), outs, (1.0, 1.0, 2.0 if edit else 1.0, 3.0),
                                 strict=True):
        with torch.autocast("cpu", dtype=DT):
            want = nn.functional.linear(h * scale, layer.weight, layer.bias)
        assert torch.equal(out.detach(), want)
    sum(o.float().sum() for o in outs).backward()  # the step ends (its memos are cleared)

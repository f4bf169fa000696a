"""Per-layer CUDA graphs of the clip tail (`groupclip.tails`, GROUPCLIP_TAIL_GRAPHS=1).

Everywhere: the capture/replay policy (a fake capture), the key's scope, the memo switch a capture runs under,
the shared-input bookkeeping of a reader that computes its own Gram, and the switch. On a CUDA machine: training
steps with the graphs against the eager engine on an identical model (which the oracle suites check against
float64 one-sample-at-a-time gradients), fresh random data every step, so a replay that read anything stale would
differ; with q, k, v reading one input, under bf16 autocast, across a change of batch size, and inside
`engine.graphed_backward`.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import groupclip
from groupclip import clipping, kernels, tails
from groupclip.rules import base
from groupclip.tails import TailGraphs


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not private")
        yield


class _FakeGraph:
    """Replay: the tail run again, its results written into the graph's buffers (what a CUDA graph's replay does)."""

    def __init__(self, tail=None, res=None):
        self.replayed = 0
        self.tail, self.res = tail, res

    def replay(self):
        self.replayed += 1
        if self.res is not None:
            self.res.write(self.tail())


def _fake_capture(tg: TailGraphs, log: list):
    def capture(slot, key, tail, uses, own_gram, copy, owners=None, keep=None):
        slot.captures += 1
        del slot.graphs[tails.GRAPHS_PER_SLOT - 1:]
        place = tails._place(tail(), slot)
        res = tails._results(tail(), slot, place)
        graph = _FakeGraph(tail, res)
        slot.graphs.insert(0, (key, graph, res, keep))
        slot.seen.remove(key)
        log.append(key)
        lend = tg._lend(res, copy, owners)
        if lend is None:
            return None
        return tg._replay(graph, res, copy, lend)

    tg._capture = capture


class _Use:  # what `run` touches of a use
    def __init__(self):
        self.extra = {}


def test_run_policy_capture_when_a_key_comes_back_then_replay():
    tg, captured = TailGraphs(), []
    _fake_capture(tg, captured)
    out = torch.arange(3.0)
    tail, use, slot = (lambda: [out]), (_Use(),), ("plan", 0)
    assert tg.run(slot, ("k1",), tail, use) is None  # first sighting: eager
    got = tg.run(slot, ("k1",), tail, use)  # the same key again: captured (and its result returned)
    assert captured == [("k1",)] and torch.equal(got[0], out) and got[0] is not out
    got = tg.run(slot, ("k1",), tail, use)  # replay: a copy of the graph's result buffer
    # (a capture replays its graph once for its results: 2 replays)
    assert tg._slots[slot].graphs[0][1].replayed == 2 and tg.replays == 2
    assert torch.equal(got[0], out) and got[0] is not out
    assert tg.run(("plan", 1), ("k1",), tail, use) is None  # another slot has its own history
    # addresses alternating between two sets, step after step (a batch moved to the GPU while the last one lives)
    assert tg.run(slot, ("k2",), tail, use) is None
    assert tg.run(slot, ("k1",), tail, use) is not None and tg.replays == 3
    assert tg.run(slot, ("k2",), tail, use) is not None and captured[-1] == ("k2",)
    assert tg.run(slot, ("k1",), tail, use) is not None and tg.replays == 5
    assert tg.run(slot, ("k2",), tail, use) is not None and tg.replays == 6
    # a third set: captured when it comes back, in place of the least recently used graph (k1)
    assert tg.run(slot, ("k3",), tail, use) is None
    assert tg.run(slot, ("k3",), tail, use) is not None and captured[-1] == ("k3",)
    assert [k for k, _, _, _ in tg._slots[slot].graphs] == [("k3",), ("k2",)]
    assert tg.run(slot, ("k1",), tail, use) is None


def test_run_gives_up_on_a_slot_whose_addresses_keep_changing():
    tg, captured = TailGraphs(), []
    _fake_capture(tg, captured)
    tail, use, slot = (lambda: [torch.ones(2)]), (_Use(),), ("plan", 0)
    for i in range(tails.MAX_CAPTURES):
        assert tg.run(slot, (i,), tail, use) is None
        assert tg.run(slot, (i,), tail, use) is not None
    assert tg.run(slot, ("new",), tail, use) is None
    assert tg.run(slot, ("new",), tail, use) is None  # no more captures for this slot
    assert len(captured) == tails.MAX_CAPTURES
    assert tg.run(slot, (tails.MAX_CAPTURES - 1,), tail, use) is not None  # its kept graphs still replay
    tg._broken = True
    assert tg.run(slot, (tails.MAX_CAPTURES - 1,), tail, use) is None  # after a failed capture: all eager


def test_input_gradient_buffers_one_per_shape_kept_by_the_graphs_that_write_them():
    tg, captured = TailGraphs(), []
    _fake_capture(tg, captured)
    bufs = [tg._out(torch.empty(n, 4)) for n in (2, 3)]
    assert tg._out(torch.empty(3, 4)) is bufs[1] and bufs[0].flat.numel() == 8  # one per shape, x's size
    tail, use, slot = (lambda: [torch.ones(2)]), (_Use(),), ("input", "plan")
    assert tg.run(slot, ("k1",), tail, use, copy=False, keep=bufs[0]) is None
    assert tg.run(slot, ("k1",), tail, use, copy=False, keep=bufs[0]) is not None  # captured: the graph keeps it
    tg._out(torch.empty(5, 4))
    assert len(tg._outs) == tails.SHARED_OUTS and bufs[0] not in tg._outs.values()  # the oldest shape left the
    assert tg._slots[slot].graphs[0][3] is bufs[0]  # registry, not the graph that writes it
    view = bufs[0].views()[0]
    assert view.shape == (2, 4) and not bufs[0].reclaim(())  # a view handed out holds the buffer
    del view
    assert bufs[0].reclaim(())


def test_results_one_flat_buffer_shared_by_a_slots_graphs():
    slot = tails._Slot()
    first = [torch.randn(3, 2), torch.randn(2)]
    res = tails._results(first, slot)  # no graph yet: a new flat buffer (made in the capture: copied out, never lent)
    assert res.flat is not None and res.flat.numel() == 8 and res.lender is None
    w, b = res.copies()
    assert torch.equal(w, first[0]) and torch.equal(b, first[1])
    assert w.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() != res.flat.data_ptr()  # one copy
    assert w.is_contiguous() and b.is_contiguous()
    slot.graphs.append((("k1",), _FakeGraph(), res, None))
    second = [torch.randn(3, 2), torch.randn(2)]
    assert tails._results(second, slot) is res  # written into the first graph's buffer
    w, b = res.copies()
    assert torch.equal(w, second[0]) and torch.equal(b, second[1])
    other = [torch.randn(3, 2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]  # other dtypes
    assert tails._results(other, slot) is not res
    mixed = [torch.randn(2), torch.randn(2, dtype=torch.float64)]  # no common dtype: the results themselves
    res = tails._results(mixed, slot)
    assert res.flat is None and res.outs is mixed and tails._place(mixed, tails._Slot()) is None
    copies = res.copies()
    assert all(torch.equal(c, m) and c is not m for c, m in zip(copies, mixed, strict=True))


def test_lent_results_are_views_of_the_buffer_and_reclaimed_before_it_is_written_again():
    tg, captured = TailGraphs(), []
    _fake_capture(tg, captured)
    vals = [torch.randn(3, 2), torch.randn(2)]
    w, b = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(2))
    slot, use, owners = ("plan", 0), (_Use(),), (w, b)

    def run():
        return tg.run(slot, ("k",), lambda: [v.clone() for v in vals], use, owners=owners)

    assert run() is None  # first sighting: eager
    got = run()  # captured and replayed: the results are lent, not copied
    res = tg._slots[slot].graphs[0][2]
    assert all(g._base is res.flat for g in got)
    assert torch.equal(got[0], vals[0]) and torch.equal(got[1], vals[1])
    clipping._add_grad(w, got[0])
    clipping._add_grad(b, got[1])
    del got
    assert w.grad._base is res.flat  # p.grad is the graph's buffer (no copy)
    # p.grad still there at the next replay (zero_grad(set_to_none=False), or micro-batches adding up): it gets its own
    # copy first, so the replay cannot change it
    first = [v.clone() for v in vals]
    lent_at = w.grad.data_ptr()
    vals = [torch.randn(3, 2), torch.randn(2)]
    got = run()
    assert got is not None and w.grad.data_ptr() != lent_at and w.grad._base is not res.flat
    assert torch.equal(w.grad, first[0]) and torch.equal(b.grad, first[1])
    assert torch.equal(got[0], vals[0]) and torch.equal(got[1], vals[1])
    clipping._add_grad(w, got[0])
    torch.testing.assert_close(w.grad, first[0] + vals[0])
    del got
    # a holder other than p.grad (a view of a lent p.grad): the buffer is not written, the tail runs eagerly
    w.grad = b.grad = None
    got = run()
    w.grad, b.grad = got
    kept = w.grad.view(-1)
    held = kept.clone()
    del got
    replays = tg.replays
    vals = [torch.randn(3, 2), torch.randn(2)]
    assert run() is None and tg.held == 1 and tg.replays == replays
    assert torch.equal(kept, held)
    del kept
    got = run()  # released: lent again
    assert got is not None and torch.equal(got[0], vals[0]) and tg.held == 1


def test_results_are_copied_without_owners_or_a_reference_count(monkeypatch):
    tg, captured = TailGraphs(), []
    _fake_capture(tg, captured)
    p = nn.Parameter(torch.zeros(2))
    tail, use = (lambda: [torch.ones(2)]), (_Use(),)
    tg.run(("plan", 0), ("k",), tail, use)
    got = tg.run(("plan", 0), ("k",), tail, use)  # no owners: copies
    assert got[0]._base is not tg._slots[("plan", 0)].graphs[0][2].flat
    monkeypatch.setattr(tails, "_USE_COUNT", None)  # a PyTorch without the storage reference count
    tg.run(("plan", 1), ("k",), tail, use, owners=(p,))
    got = tg.run(("plan", 1), ("k",), tail, use, owners=(p,))
    res = tg._slots[("plan", 1)].graphs[0][2]
    assert res.lender is None and got[0]._base is not res.flat


def test_replay_and_capture_leave_the_shared_input_without_reading_or_keeping_tiles():
    shared = kernels.SharedInput()
    shared.readers = 3
    use = _Use()
    use.extra["input"] = shared
    tails._own_gram([use])
    assert "input" not in use.extra and shared.arrived == 1 and shared.tiles is None
    a = torch.randn(2, 3, 4)
    tiles, keep = shared.arrive(a)  # the second reader keeps tiles for the third
    assert tiles is None and keep
    shared.keep(a, torch.zeros(1))
    shared.skip()  # the third is graphed: it is the last, the tiles go
    assert shared.arrived == 3 and shared.tiles is None and shared.source is None


def test_memos_off_neither_returns_nor_keeps():
    x = torch.randn(2, 3, 4)
    made = []

    def make():
        made.append(1)
        return torch.zeros(1)

    base.clear_step_memos()
    with base.memos_off():
        base.GRAMS.get_or_make(x, "t", make)
        base.GRAMS.put(x, "u", torch.ones(1))
        assert base.GRAMS.get(x, "u") is None
    assert base.GRAMS.get(x, "t") is None and base.GRAMS.get(x, "u") is None
    base.GRAMS.get_or_make(x, "t", make)
    base.GRAMS.get_or_make(x, "t", make)
    assert len(made) == 2  # once inside the scope, once outside (then remembered)
    base.clear_step_memos()


class QKV(nn.Module):
    """A LayerNorm, then q, k and v reading one input (their Gram tiles are shared by the eager engine), then an
    MLP."""

    def __init__(self, d=512):
        super().__init__()
        self.inp = nn.Linear(12, d)
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, 3)

    def forward(self, x):
        h = self.norm(self.inp(x))
        a = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 20.0, -1) @ self.v(h)
        return self.fc2(torch.relu(self.fc1(h + a))).mean(1)


def _engine(model, groups="layer-wise", **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    eng = groupclip.PrivacyEngine(model, opt, batch_size=8, sample_size=800, noise_multiplier=0.0,
                                  groups=groups, seed=0, **kw)
    return eng, opt


def test_switch(monkeypatch):
    monkeypatch.delenv("GROUPCLIP_TAIL_GRAPHS", raising=False)
    auto = _engine(QKV())[0].clipper  # the default: a trial decides, the graphs off until it switches them on
    assert auto.tail_trial is not None and not auto.tails.active
    forced = _engine(QKV(), tail_graphs=True)[0].clipper
    assert isinstance(forced.tails, TailGraphs) and forced.tails.active and forced.tail_trial is None
    monkeypatch.setenv("GROUPCLIP_TAIL_GRAPHS", "1")
    assert _engine(QKV(), tail_graphs=False)[0].clipper.tails is None  # the argument wins
    eng, opt = _engine(QKV())
    assert isinstance(eng.clipper.tails, TailGraphs) and eng.clipper.tails.active
    model = eng.model
    model(torch.randn(8, 3, 12)).square().mean().backward()  # CPU tensors: no key, the eager tail
    assert all(p.grad is not None for p in model.parameters())
    assert eng.clipper.tails._slots == {}


class EmbedNet(nn.Module):
    """An embedding (its sum is not graphed), then QKV's layers (theirs are)."""

    def __init__(self, d=64):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.body = QKV(d)

    def forward(self, ids):
        return self.body(self.emb(ids))


def test_all_layer_graph_paths_take_linear_and_layernorm_leave_the_rest_eager(monkeypatch):
    """The bookkeeping of all-layer clipping's graphs on the CPU (each waiting layer's norm, then the group's sums):
    `run` stands in for a graph by running the tail it is given, so the gradients must equal the eager engine's; the
    embedding's norm and sum stay outside."""
    monkeypatch.setattr(tails, "GRAPH_DEVICE", "cpu")
    calls = []

    def run(self, slot_id, key, tail, uses, own_gram=True, copy=True, owners=None, keep=None):
        calls.append((slot_id, [u.unit.label() for u in uses], own_gram, key))
        return tail()

    monkeypatch.setattr(TailGraphs, "run", run)
    torch.manual_seed(0)
    ref = EmbedNet()
    model = copy.deepcopy(ref)
    ref_eng, ref_opt = _engine(ref, groups="all-layer", tail_graphs=False)
    eng, opt = _engine(model, groups="all-layer", tail_graphs=True)
    ids = torch.randint(0, 50, (8, 5))
    for m in (ref, model):
        m(ids).square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8, msg=n)
    norms = [c for c in calls if c[0][0] == "norm"]
    groups = [c for c in calls if c[0][0] == "group"]
    assert len(norms) == 7 and len(groups) == 1  # every waiting layer but the embedding; the sums once
    assert all(own_gram for _, _, own_gram, _ in norms)
    slot_id, labels, own_gram, key = groups[0]
    assert slot_id == ("group", 0) and not own_gram and key is not None
    assert not any("emb" in lb for lb in labels) and len(labels) == 14  # 7 layers x (weight, bias)


def test_all_layer_sums_key_takes_the_norm_graphs_tokens(monkeypatch):
    """Where a Linear use's norm came from a graph in this pass, the group's sums key holds that graph's token (its
    key and output addresses) instead of the signatures of the tensors the sums read (the same tensors, or that
    graph's output); the embedding and anything whose norm ran eagerly keep their signatures."""
    monkeypatch.setattr(tails, "GRAPH_DEVICE", "cpu")
    keys = []

    def run(self, slot_id, key, tail, uses, own_gram=True, copy=True, owners=None, keep=None):
        keys.append((slot_id[0], key))
        return tail()

    monkeypatch.setattr(TailGraphs, "run", run)
    torch.manual_seed(0)
    model = EmbedNet()
    eng, _ = _engine(model, groups="all-layer", tail_graphs=True)
    model(torch.randint(0, 50, (8, 5))).square().mean().backward()
    norm_keys = [k for kind, k in keys if kind == "norm"]
    (group_key,) = [k for kind, k in keys if kind == "group"]
    tokens = [part for part in group_key if isinstance(part, tuple) and part and part[0] == "norm graph"]
    # the 7 waiting layers' norm graphs (the embedding arrives last, completing the group); a token per parameter
    # of the 6 Linear layers (weight, bias), each naming one of those keys; the LayerNorm keeps its signatures
    assert len(set(norm_keys)) == 7 and len(tokens) == 12
    assert len({t[1] for t in tokens}) == 6 and {t[1] for t in tokens} < set(norm_keys)
    assert eng.clipper._norm_graphs == {}  # consumed by the group's end


class _Rule:
    def __init__(self, name):
        self.name = name


class _KeyUse:
    """What `group_key` and `norm_graph_entry` read of a use."""

    def __init__(self, rule="linear"):
        self.plan = object()
        self.unit = type("U", (), {"rule": _Rule(rule), "params": {"weight": torch.zeros(1), "bias": torch.zeros(1)}})
        self.batch_size = 4
        self.saved = (torch.randn(4, 3, 5), torch.randn(6, 5))
        self.grad_out = torch.randn(4, 3, 6)
        self.cache = {}


def _group_key(uses, graphed):
    norm = torch.rand(4)
    entries = [(u, n) for u in uses for n in ("weight", "bias")]
    return TailGraphs.group_key(entries, [(norm, True)], ("s",), graphed)[0]


def test_group_key_token_only_where_the_sums_read_what_the_norm_graph_covers(monkeypatch):
    monkeypatch.setattr(tails, "GRAPH_DEVICE", "cpu")
    u = _KeyUse()
    outs = (torch.rand(4), torch.rand(4, 6))  # the norm graph's outputs: the norm, the per-sample bias gradients
    u.cache["gb"] = outs[1]
    entry = tails.norm_graph_entry(u, ("a norm key",), outs)
    token = entry[0]
    assert token == ("norm graph", ("a norm key",), (outs[0].data_ptr(), outs[1].data_ptr()))

    def has_token(key):
        return sum(part == token for part in key)

    assert has_token(_group_key([u], {id(u): entry})) == 2  # weight and bias
    assert has_token(_group_key([u], {})) == 0  # no norm graph in this pass: signatures
    # the sums would read something the token does not cover: signatures
    u.cache["gb"] = outs[1].clone()  # per-sample bias gradients not from that graph
    assert has_token(_group_key([u], {id(u): entry})) == 0
    u.cache["gb"] = outs[1]
    u.cache["G"] = torch.rand(4, 6, 5)  # instantiated weight gradients
    assert has_token(_group_key([u], {id(u): entry})) == 0
    del u.cache["G"]
    u.saved = (u.saved[0].clone(),)  # another input tensor than the norm graph's key was made from
    assert has_token(_group_key([u], {id(u): entry})) == 0
    entry = tails.norm_graph_entry(u, ("a norm key",), outs)
    u.grad_out = u.grad_out.clone()
    assert has_token(_group_key([u], {id(u): entry})) == 0
    # LayerNorm's per-sample gradients may be computed after its norm: no token for it
    assert tails.norm_graph_entry(_KeyUse("layer_norm"), ("k",), outs) is None


def test_group_key_tokens_differ_where_the_norm_graphs_outputs_moved(monkeypatch):
    monkeypatch.setattr(tails, "GRAPH_DEVICE", "cpu")
    u = _KeyUse()
    outs = (torch.rand(4), torch.rand(4, 6))
    u.cache["gb"] = outs[1]
    norm = torch.rand(4)
    entries = [(u, "weight"), (u, "bias")]

    def key(outputs):
        u.cache["gb"] = outputs[1]
        graphed = {id(u): tails.norm_graph_entry(u, ("a norm key",), outputs)}
        return TailGraphs.group_key(entries, [(norm, True)], ("s",), graphed)[0]

    assert key(outs) == key(outs)
    assert key(outs) != key((outs[0], outs[1].clone()))  # the same norm key, the bias gradients elsewhere
    assert key(outs) != key((outs[0].clone(), outs[1]))


class PreLN(nn.Module):
    """Two pre-LayerNorm residual blocks, a LayerNorm used twice, then a head. `keep`: a list that gets the input
    gradient of the second block's LayerNorm (a hook on the tensor only that LayerNorm reads)."""

    def __init__(self, d=64):
        super().__init__()
        self.inp = nn.Linear(12, d)
        self.n1, self.n2, self.twice = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.f1, self.f2, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x, keep=None):
        h = self.inp(x)
        h = h + self.f1(torch.tanh(self.n1(h)))
        u = h.clone()
        if keep is not None:
            u.register_hook(keep.append)
        h = h + self.f2(torch.tanh(self.n2(u)))
        return self.head(self.twice(h) + self.twice(2 * h)).mean(1)


@pytest.mark.parametrize("groups", ["layer-wise", "all-layer"])
@pytest.mark.parametrize("hold", [False, True])
@pytest.mark.parametrize("replay", [True, False], ids=["replay", "no-graph-yet"])
def test_layernorm_backward_graph_paths(monkeypatch, groups, hold, replay):
    """The bookkeeping of graphed LayerNorm backwards on the CPU (the fused kernel under Triton's interpreter; `run`
    stands in for a graph by running the tail, or with `no-graph-yet` returns None, as before a key's capture, and
    the backward runs eagerly into the same buffer): every step's input gradient is the shared buffer, so gradients
    equal the eager engine's only if each consumer is done with it before the next LayerNorm writes it. A kept input
    gradient (`hold`) sends the next LayerNorm's backward down the eager path and must keep its values; a LayerNorm
    used twice in a step never takes the graph (its per-sample gradients would share the graph's buffers)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("Triton runs CPU tensors only under its interpreter (CPU machines); the CUDA test below")
    monkeypatch.setattr(tails, "GRAPH_DEVICE", "cpu")
    monkeypatch.setattr(kernels, "_MODE", "force")
    calls = []

    def run(self, slot_id, key, tail, uses, own_gram=True, copy=True, owners=None, keep=None):
        calls.append((slot_id, key, keep))
        return tail() if replay else None

    monkeypatch.setattr(TailGraphs, "run", run)
    torch.manual_seed(0)
    ref = PreLN()
    model = copy.deepcopy(ref)
    ref_opt = _engine(ref, groups=groups, tail_graphs=False)[1]
    eng, opt = _engine(model, groups=groups, tail_graphs=True)
    tg = eng.clipper.tails
    for step in range(3):
        x = torch.randn(8, 5, 12)
        kept = []
        for m, o in ((ref, ref_opt), (model, opt)):
            o.zero_grad(set_to_none=True)
            keep = [] if hold else None
            m(x, keep).square().mean().backward()
            kept.append(keep)
        for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8, msg=f"step {step}, {n}")
        if hold:
            torch.testing.assert_close(kept[1][0], kept[0][0], rtol=0, atol=0)
            shared = next(iter(tg._outs.values())).flat
            assert kept[1][0].untyped_storage().data_ptr() == shared.data_ptr()  # n2's, in the buffer
    inputs = [c for c in calls if c[0][0] == "input"]
    graphed = {c[0][1].unit.module for c in inputs}
    assert model.twice not in graphed
    assert all(c[2] is not None and c[1][4] == c[2].flat.data_ptr() for c in inputs)  # the key has the buffer
    if hold:  # n2's input gradient is kept: n1's backward (next) finds the buffer taken
        assert graphed == {model.n2} and tg.held == 3 and len(inputs) == 3
    else:
        assert graphed == {model.n1, model.n2} and tg.held == 0 and len(inputs) == 6


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _compare_steps(ref, model, opt, batches, autocast):
    """Each batch through both models (their own engines); p.grad compared right away and not kept, so every
    step allocates as the one before (as a training loop does)."""
    for step, x in enumerate(batches):
        grads = []
        for m, o in (ref, (model, opt)):
            o.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = m(x).float().square().mean()
            loss.backward()
            grads.append([p.grad for p in m.parameters()])
        for (n, _), want, got in zip(model.named_parameters(), *grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"step {step}, {n}")


def _eager_and_tails(mode=True):
    """Two identical CUDA models: one with the eager engine, one with tail graphs (`mode`: True or "auto")."""
    torch.manual_seed(0)
    ref_model = QKV().cuda()
    model = copy.deepcopy(ref_model)
    return ref_model, _engine(ref_model, tail_graphs=False)[1], model, *_engine(model, tail_graphs=mode)


@cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_graphed_tails_equal_the_eager_engine(autocast):
    ref_model, ref_opt, model, eng, opt = _eager_and_tails()
    gen = torch.Generator("cuda").manual_seed(1)
    # activations of ≥ 1 MiB, as in real models (the allocator's small-block pool moves tiny tensors around)
    shapes = [(8, 160)] * 7 + [(6, 160)] * 3 + [(8, 160)] * 6  # a smaller batch in between, then back
    batches = (torch.randn(b, t, 12, device="cuda", generator=gen) for b, t in shapes)  # made as they come
    _compare_steps((ref_model, ref_opt), model, opt, batches, autocast)
    tg = eng.clipper.tails
    # (how many keys repeat depends on the allocator: at least a few layers were captured and replayed)
    assert tg.captures >= 3 and tg.replays > tg.captures, (tg.captures, tg.replays)
    for sid, slot in tg._slots.items():  # a layer's tail graphs share one result buffer (the size of its parameters)
        if sid[0] != "input":  # (a LayerNorm backward's per-sample gradients have one per batch size)
            assert all(res is slot.graphs[0][2] and res.flat is not None for _, _, res, _ in slot.graphs)


@cuda
@pytest.mark.parametrize("set_to_none,passes", [(True, 1), (True, 2), (False, 1)])
def test_lent_grads_with_kept_grads_and_micro_batches_equal_the_eager_engine(set_to_none, passes):
    """p.grad lent from the graphs' buffers: kept by zero_grad(set_to_none=False) or added up over two backward
    passes a step, they must still equal the eager engine's (a replay first gives them their own copy)."""
    ref_model, ref_opt, model, eng, opt = _eager_and_tails()
    gen = torch.Generator("cuda").manual_seed(4)
    lent = 0
    for step in range(10):
        x = torch.randn(8, 160, 12, device="cuda", generator=gen)
        for m, o in ((ref_model, ref_opt), (model, opt)):
            o.zero_grad(set_to_none=set_to_none)
            for part in x.split(8 // passes):  # several backward passes add up into p.grad
                m(part).float().square().mean().backward()
        lent += sum(p.grad._base is not None for p in model.parameters())
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=f"step {step}, {n}")
    tg = eng.clipper.tails
    assert tg.replays > tg.captures >= 1, (tg.captures, tg.replays)
    if set_to_none and passes == 1:  # replayed layers' p.grad are the graphs' buffers
        assert lent > 0


@cuda
def test_inside_graphed_backward_the_tails_stay_out():
    ref_model, ref_opt, model, eng, opt = _eager_and_tails()
    x = torch.randn(8, 160, 12, device="cuda")
    step = eng.graphed_backward(lambda b: model(b).square().mean(), torch.randn(8, 160, 12, device="cuda"))
    opt.zero_grad(set_to_none=True)
    step(x)
    ref_opt.zero_grad(set_to_none=True)
    ref_model(x).square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    replays = eng.clipper.tails.replays
    step(x)  # the step's graph runs no Python: no tail is replayed or captured inside it
    assert eng.clipper.tails.replays == replays


@cuda
def test_auto_mode_decides_and_stays_equal_to_the_eager_engine():
    ref_model, ref_opt, model, eng, opt = _eager_and_tails("auto")
    gen = torch.Generator("cuda").manual_seed(2)
    batches = (torch.randn(8, 160, 12, device="cuda", generator=gen) for _ in range(48))
    _compare_steps((ref_model, ref_opt), model, opt, batches, autocast=False)
    clipper = eng.clipper
    report = clipper.tail_report
    assert clipper.tail_trial is None and report is not None, "no decision after 48 steps"
    assert (clipper.tails is not None) == report["kept"]
    assert report["host_share"] > 0
    if report.get("gpu_busy_ms") is not None:  # the head-start probe measured the GPU's work in a backward pass
        assert 0 < report["gpu_busy_ms"] <= 1.5 * report["backward_gpu_ms"], report
    if report["reason"] in ("faster", "as fast") or "slower" in report["reason"]:  # timed against the eager tails
        assert report["ms_per_sample_without"] > 0 and report["ms_per_sample_with"] > 0, report


@cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_all_layer_sums_graph_equals_the_eager_engine(autocast):
    torch.manual_seed(0)
    ref_model = QKV().cuda()
    model = copy.deepcopy(ref_model)
    ref_opt = _engine(ref_model, groups="all-layer", tail_graphs=False)[1]
    eng, opt = _engine(model, groups="all-layer", tail_graphs=True)
    gen = torch.Generator("cuda").manual_seed(3)
    batches = (torch.randn(8, 160, 12, device="cuda", generator=gen) for _ in range(8))
    _compare_steps((ref_model, ref_opt), model, opt, batches, autocast)
    tg = eng.clipper.tails
    assert tg.captures >= 1 and tg.replays >= 4, (tg.captures, tg.replays)
    assert ("group", 0) in tg._slots and any(slot[0] == "norm" for slot in tg._slots)


@cuda
@pytest.mark.parametrize("groups,autocast,hold", [("layer-wise", False, False), ("layer-wise", True, False),
                                                  ("all-layer", True, False), ("layer-wise", False, True)])
def test_graphed_layernorm_backward_equals_the_eager_engine(groups, autocast, hold):
    """LayerNorm's fused backward replayed as a CUDA graph writing the shared input-gradient buffer: the same
    gradients as the eager engine's step after step (fresh data each step), and a kept input gradient (`hold`)
    keeps its values while the next LayerNorm runs eagerly."""
    torch.manual_seed(0)
    ref = PreLN(512).cuda()
    model = copy.deepcopy(ref)
    ref_opt = _engine(ref, groups=groups, tail_graphs=False)[1]
    eng, opt = _engine(model, groups=groups, tail_graphs=True)
    gen = torch.Generator("cuda").manual_seed(5)
    for step in range(10):
        x = torch.randn(8, 160, 12, device="cuda", generator=gen)
        kept = []
        for m, o in ((ref, ref_opt), (model, opt)):
            o.zero_grad(set_to_none=True)
            keep = [] if hold else None
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = m(x, keep).float().square().mean()
            loss.backward()
            kept.append(keep)
        for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=f"step {step}, {n}")
        if hold:
            torch.testing.assert_close(kept[1][0], kept[0][0], rtol=0, atol=0)
    tg = eng.clipper.tails
    inputs = [sid for sid in tg._slots if sid[0] == "input"]
    replayed = sum(len(tg._slots[sid].graphs) for sid in inputs)
    assert {sid[1].unit.module for sid in inputs} == ({model.n2} if hold else {model.n1, model.n2})
    assert replayed >= 1 and tg.replays > tg.captures, (replayed, tg.captures, tg.replays)
    assert (tg.held > 0) == hold

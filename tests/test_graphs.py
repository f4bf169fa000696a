"""engine.graphed_backward: forward + clipped backward captured once and replayed.

On a CUDA machine these tests run the real CUDA-graph capture and replay (device "cuda"); everywhere they also
run the same object without a graph (device "cpu"), which exercises everything around the replay: copying the
batch into the captured inputs, pointing p.grad at the captured gradient buffers (fresh, accumulated or carried
over), the eager fallback and the refusals. The reference is always the eager engine on an identical model, which
the oracle suites check against one-sample-at-a-time float64 gradients; one test here also compares with the
oracle directly.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import TiedEmbedLinear, TinyViT, seeded
from oracle import oracle_grads
from torch import nn

import groupclip
from groupclip import EngineError
from groupclip.graphs import GraphedBackward

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
B = 6


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not private")
        yield


def dtype_of(device: str) -> torch.dtype:
    return torch.float64 if device == "cpu" else torch.float32


def tol(device: str) -> float:
    return 1e-12 if device == "cpu" else 2e-5


def vit_batch(device, gen, b=B):
    x = torch.randn(b, 4, 6, generator=gen, dtype=torch.float64).to(device, dtype_of(device))
    y = torch.randint(0, 3, (b,), generator=gen).to(device)
    return x, y


def on(device, t):
    return t.to(device, dtype_of(device)) if t.is_floating_point() else t.to(device)


def vit_loss(model, x, y):
    return F.cross_entropy(model(x), y)


def tied_batch(device, gen, b=B):
    ids = torch.randint(0, 13, (b, 5), generator=gen).to(device)
    return ids, torch.randint(0, 13, (b, 5), generator=gen).to(device)


def tied_loss(model, ids, target):
    return F.cross_entropy(model(ids).flatten(0, 1), target.flatten())


CASES = {"tinyvit": (TinyViT, vit_batch, vit_loss), "tied": (TiedEmbedLinear, tied_batch, tied_loss)}


def pair(case, device, groups="all-layer", noise=0.0, dtype=None):
    """Two identical models, each with its optimizer and engine (same noise seed)."""
    make, batch, loss = CASES[case]
    seeded(0)
    base = make().to(device, dtype or dtype_of(device))
    out = []
    for _ in range(2):
        m = copy.deepcopy(base)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        eng = groupclip.PrivacyEngine(m, opt, batch_size=B, sample_size=100, noise_multiplier=noise,
                                      max_grad_norm=0.5, groups=groups, seed=3)
        out.append((m, opt, eng))
    return out, batch, loss


def grads(model):
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same(a, b, rtol):
    assert a.keys() == b.keys()
    for n in a:
        if a[n] is None or b[n] is None:
            assert a[n] is None and b[n] is None, n
            continue
        scale = b[n].abs().max().clamp_min(1e-30)
        assert ((a[n] - b[n]).abs().max() / scale) <= rtol, n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
def test_replays_match_eager_steps(device, case, groups):
    """Several full steps (zero_grad, backward, noisy optimizer step) on different batches: the graphed step's
    gradients and parameters follow the eager engine's exactly, noise included."""
    ((me, oe, _), (mg, og, eg)), batch, loss = pair(case, device, groups, noise=1.0)
    gen = torch.Generator().manual_seed(1)
    data = [batch(device, gen) for _ in range(4)]
    step = eg.graphed_backward(lambda *a: loss(mg, *a), *data[0])
    assert step.use_graph == (device == "cuda")
    for x, y in data[1:] + data[:1]:
        oe.zero_grad()
        le = loss(me, x, y)
        le.backward()
        og.zero_grad()
        lg = step(x, y)
        torch.testing.assert_close(lg, le.detach(), rtol=tol(device), atol=0)
        assert_same(grads(mg), grads(me), tol(device))
        oe.step()
        og.step()
        assert_same(dict(mg.named_parameters()), dict(me.named_parameters()), tol(device) * 10)
    assert step.eager_calls == 0
    assert eg.steps == 4


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_replays_follow_the_weight_updates(device):
    """bf16 autocast inside the graphed loss: the Linear layers' low-precision weight copies are made again by
    every replay (a copy made before or during the capture and replayed as is would train on stale weights), so
    each step's gradients and updates follow the eager engine's."""
    ((me, oe, _), (mg, og, eg)), batch, loss = pair("tinyvit", device, "layer-wise", dtype=torch.float32)
    for o in (oe, og):
        o.param_groups[0]["lr"] = 0.5  # large updates: a stale copy would show

    def amp_loss(model, x, y):
        with torch.autocast(device, dtype=torch.bfloat16):
            return F.cross_entropy(model(x).float(), y)

    gen = torch.Generator().manual_seed(5)
    data = [(x.float(), y) for x, y in (batch(device, gen) for _ in range(5))]
    step = eg.graphed_backward(lambda *a: amp_loss(mg, *a), *data[0])
    for x, y in data:
        oe.zero_grad()
        amp_loss(me, x, y).backward()
        og.zero_grad()
        step(x, y)
        assert_same(grads(mg), grads(me), 1e-2)
        oe.step()
        og.step()
        assert_same(dict(mg.named_parameters()), dict(me.named_parameters()), 1e-3)
    assert step.eager_calls == 0


@pytest.mark.parametrize("device", DEVICES)
def test_graphed_gradient_matches_the_oracle(device):
    seeded(0)
    mg = TinyViT().to(device, dtype_of(device))
    ref = copy.deepcopy(mg).cpu()
    eg = groupclip.PrivacyEngine(mg, torch.optim.SGD(mg.parameters(), lr=0.1), batch_size=B, sample_size=100,
                                 noise_multiplier=0.0, max_grad_norm=0.5, groups="layer-wise")
    gen = torch.Generator().manual_seed(2)
    x0, y0 = vit_batch(device, gen)
    x, y = vit_batch(device, gen)
    step = eg.graphed_backward(lambda *a: vit_loss(mg, *a), x0, y0)
    step(x, y)
    expected = oracle_grads(ref, vit_loss, (x.cpu(), y.cpu()), batch_size=B, C=0.5, clipping="automatic",
                            groups="layer-wise")
    got = {n: p.grad.cpu().double() for n, p in mg.named_parameters()}
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4 if device == "cuda" else 1e-10, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_accumulation_fresh_and_carried_gradients(device):
    """Without zero_grad calls accumulate (micro-batches); after zero_grad(set_to_none) they start from zero; a
    gradient p.grad already holds (an eager backward before) is carried into the captured buffers."""
    ((me, _, _), (mg, og, eg)), batch, loss = pair("tinyvit", device)
    gen = torch.Generator().manual_seed(3)
    x0, y0 = batch(device, gen)
    batches = [batch(device, gen) for _ in range(3)]
    step = eg.graphed_backward(lambda *a: loss(mg, *a), x0, y0)
    for x, y in batches[:2]:  # two micro-batches, no zero_grad between them
        step(x, y)
        loss(me, x, y).backward()
    assert_same(grads(mg), grads(me), tol(device))
    og.zero_grad(set_to_none=True)
    me.zero_grad(set_to_none=True)
    x, y = batches[2]
    loss(mg, x, y).backward()  # eager backward on the graphed model: p.grad are new tensors
    loss(me, x, y).backward()
    step(*batches[0])
    loss(me, *batches[0]).backward()
    assert_same(grads(mg), grads(me), tol(device))


@pytest.mark.parametrize("device", DEVICES)
def test_capture_leaves_gradients_untouched(device):
    """The warm-up and capture compute gradients of the example batch and discard them."""
    ((_, _, _), (mg, _, eg)), batch, loss = pair("tied", device, "layer-wise")
    gen = torch.Generator().manual_seed(4)
    x, y = batch(device, gen)
    loss(mg, x, y).backward()
    before = grads(mg)
    held = {n: p.grad for n, p in mg.named_parameters()}
    eg.graphed_backward(lambda *a: loss(mg, *a), *batch(device, gen))
    assert all(p.grad is held[n] for n, p in mg.named_parameters())
    assert_same(grads(mg), before, 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
def test_smaller_batches_replay_with_padding(device, case, groups):
    """Batches of b < captured size replay: the free rows are filled, their coefficient is 0, and p.grad is
    the eager engine's on the b real samples (mean-reduced loss rescaled by the size the layers see)."""
    ((me, oe, _), (mg, og, eg)), batch, loss = pair(case, device, groups)
    gen = torch.Generator().manual_seed(5)
    step = eg.graphed_backward(lambda *a: loss(mg, *a), *batch(device, gen))
    assert step.capacity == B
    for b in (B - 1, 1, B, B - 2):
        x, y = batch(device, gen, b)
        oe.zero_grad()
        og.zero_grad()
        loss(me, x, y).backward()
        step(x, y)
        assert_same(grads(mg), grads(me), tol(device))
    assert step.eager_calls == 0


@pytest.mark.parametrize("device", DEVICES)
def test_poisson_training_replays_every_nonempty_batch(device):
    """A whole epoch of the engine's own Poisson loader (batch sizes vary, some may be empty): the graphed
    step, captured with the largest batch the run allows, trains the same parameters as the eager loop."""
    ((me, oe, ee), (mg, og, eg)), _, loss = pair("tinyvit", device, "layer-wise", noise=1.0)
    gen = torch.Generator().manual_seed(7)
    n = 100
    data = torch.utils.data.TensorDataset(*vit_batch("cpu", gen, n))
    cap = 3 * B
    x0, y0 = (on(device, t[:cap]) for t in data.tensors)
    step = eg.graphed_backward(lambda *a: loss(mg, *a), x0, y0)
    sizes = []
    for (xe, ye), (xg, yg) in zip(ee.data_loader(data), eg.data_loader(data), strict=True):
        assert torch.equal(ye, yg)
        sizes.append(len(ye))
        oe.zero_grad()
        og.zero_grad()
        if len(ye):
            loss(me, on(device, xe), on(device, ye)).backward()
            step(on(device, xg), on(device, yg))
        oe.step()
        og.step()
    assert len(set(sizes)) > 3 and max(sizes) <= cap
    assert step.eager_calls == 0 and eg.steps == ee.steps == len(sizes)
    assert_same(dict(mg.named_parameters()), dict(me.named_parameters()), tol(device) * 100)


@pytest.mark.parametrize("device", DEVICES)
def test_other_batches_run_eagerly_and_are_logged_once(device, caplog):
    """More samples than captured, other trailing shapes, an empty batch: eager, same gradients, one log."""
    ((me, oe, _), (mg, og, eg)), batch, loss = pair("tied", device)
    gen = torch.Generator().manual_seed(5)
    step = eg.graphed_backward(lambda *a: loss(mg, *a), *batch(device, gen))
    caplog.set_level(logging.WARNING, logger="groupclip.graphs")
    x, y = batch(device, gen, B + 2)
    others = [(x, y), (x[:, :3], y[:, :3]), (x[:0], y[:0]), (x[:3], y[:4])]
    for xo, yo in others[:2]:
        oe.zero_grad()
        og.zero_grad()
        loss(me, xo, yo).backward()
        step(xo, yo)
        assert_same(grads(mg), grads(me), tol(device))
    og.zero_grad()
    step(*others[2])  # an empty batch (a NaN mean loss); the clipped sum over no samples is 0
    assert all(p.grad is None or not p.grad.any() for p in mg.parameters())
    with pytest.raises(Exception):  # noqa: B017 - inconsistent batch sizes fail in the model itself
        step(*others[3])
    assert step.eager_calls == 4
    assert sum("runs eagerly" in r.getMessage() for r in caplog.records) == 1
    x, y = batch(device, gen)  # the captured shape replays again
    step(x, y)
    assert step.eager_calls == 4


@pytest.mark.parametrize("device", DEVICES)
def test_refusals(device):
    ((_, _, _), (mg, og, eg)), batch, loss = pair("tinyvit", device)
    gen = torch.Generator().manual_seed(6)
    x, y = batch(device, gen)
    with pytest.raises(EngineError, match="scalar"):  # at capture (CUDA) or at the first call
        eg.graphed_backward(lambda a, b: mg(a), x, y)(x, y)
    with pytest.raises(ValueError, match="warmup"):
        eg.graphed_backward(lambda *a: loss(mg, *a), x, y, warmup=0)
    step = eg.graphed_backward(lambda *a: loss(mg, *a), x, y)
    mg.eval()
    with pytest.raises(EngineError, match="train/eval mode"):
        step(x, y)
    mg.train()
    with torch.no_grad(), pytest.raises(EngineError, match="gradients disabled"):
        step(x, y)
    with torch.autocast(device, dtype=torch.bfloat16), pytest.raises(EngineError, match="autocast"):
        step(x, y)
    step(x, y)
    eg.detach()
    with pytest.raises(EngineError, match="detached"):
        step(x, y)
    with pytest.raises(EngineError, match="detached"):
        eg.graphed_backward(lambda *a: loss(mg, *a), x, y)


def test_non_tensor_arguments_are_part_of_the_capture():
    seeded(0)
    m = nn.Linear(4, 2).double()
    calls = []

    def fn(x, scale):
        calls.append(scale)
        return (m(x) * scale).pow(2).mean()

    x = torch.randn(3, 4, dtype=torch.float64)
    step = GraphedBackward(fn, (x, 2.0), m.parameters(), [m], use_graph=False)
    step(x, 2.0)
    assert step.eager_calls == 0
    step(x, 3.0)  # a different constant: eager, with the value given
    assert step.eager_calls == 1 and calls[-1] == 3.0


def test_without_an_engine_it_is_plain_autograd():
    seeded(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    ref = copy.deepcopy(m)
    x0, x = torch.randn(2, 3, 4, dtype=torch.float64)
    step = GraphedBackward(lambda v: m(v).pow(2).sum(), (x0,), m.parameters(), [m])
    step(x)
    ref(x).pow(2).sum().backward()
    for p, q in zip(m.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_replays_draw_fresh_dropout_and_read_new_data():
    seeded(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 2)).cuda()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    eng = groupclip.PrivacyEngine(m, opt, batch_size=4, sample_size=100, noise_multiplier=0.0, seed=0)
    x = torch.randn(4, 8, device="cuda")
    step = eng.graphed_backward(lambda v: m(v).pow(2).mean(), x)
    assert step.use_graph
    losses = []
    for _ in range(3):
        opt.zero_grad()
        losses.append(step(x).item())
    assert len(set(losses)) == 3  # different dropout masks on every replay
    m.eval()
    with torch.no_grad():
        base = m(x).pow(2).mean().item()
    m.train()
    opt.zero_grad()
    assert step(torch.zeros_like(x)).item() != base


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphed_steps_made_one_after_another_leave_no_memory_behind():
    """Each capture's warm-up used a new stream, for which PyTorch keeps a cuBLAS workspace until the process
    ends (about 64 MiB per graphed step on an H100)."""
    import gc

    def make_and_use():
        seeded(0)
        m = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 8)).cuda()
        eng = groupclip.PrivacyEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), batch_size=16, sample_size=100,
                                      noise_multiplier=0.0, seed=0)
        step = eng.graphed_backward(lambda v: m(v).pow(2).mean(), torch.randn(16, 64, device="cuda"))
        assert step.use_graph
        step(torch.randn(16, 64, device="cuda"))
        eng.detach()

    def make_and_drop():
        make_and_use()  # everything it made is unreachable once it returns
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    first = make_and_drop()
    for _ in range(3):
        last = make_and_drop()
    assert last - first < 8 * 2**20, (first, last)


_UNCAPTURABLE = """
import torch, warnings, groupclip
from torch import nn
m = nn.Linear(8, 2).cuda()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    eng = groupclip.PrivacyEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), batch_size=4, sample_size=100,
                                  noise_multiplier=0.0, seed=0)
def loss_fn(v):
    out = m(v)
    if out.sum().item() > 1e9:  # a host round trip: not capturable
        out = out * 2
    return out.pow(2).mean()
try:
    eng.graphed_backward(loss_fn, torch.randn(4, 8, device="cuda"))
except groupclip.EngineError as e:
    assert all(p.grad is None for p in m.parameters())
    print("REFUSED", e)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_a_forward_that_cannot_be_captured_is_refused_with_the_reason():
    """In a child process: a failed capture can leave the process's CUDA random state unusable."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _UNCAPTURABLE], capture_output=True, text=True, timeout=300)
    assert "REFUSED" in run.stdout and "cannot be captured" in run.stdout, (run.stdout, run.stderr[-2000:])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
def test_gpt2_padded_replays_match_eager(device, groups, checkpointing):
    """Hugging Face GPT-2 (tied embeddings, position ids without a batch dimension, LayerNorm, Conv1D; with and
    without non-reentrant activation checkpointing) through a step captured for 5 sequences and replayed with
    5, 3 and 1."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=8, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    seeded(0)
    base = transformers.GPT2LMHeadModel(cfg).to(device, dtype_of(device))
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.train()
    models, engines = [], []
    for _ in range(2):
        m = copy.deepcopy(base)
        engines.append(groupclip.PrivacyEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), batch_size=4,
                                               sample_size=100, noise_multiplier=0.0, groups=groups))
        models.append(m)
        assert m.transformer.gradient_checkpointing == checkpointing

    def lm_loss(m, ids):
        logits = m(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    gen = torch.Generator().manual_seed(8)
    step = engines[1].graphed_backward(lambda ids: lm_loss(models[1], ids), torch.randint(0, 50, (5, 8)).to(device))
    for b in (5, 3, 1):
        ids = torch.randint(0, 50, (b, 8), generator=gen).to(device)
        for m in models:
            m.zero_grad(set_to_none=True)
        lm_loss(models[0], ids).backward()
        step(ids)
        assert_same(grads(models[1]), grads(models[0]), tol(device))
    assert step.eager_calls == 0

"""Activation checkpointing: non-reentrant is exact (every group clipped once, over the whole step);
reentrant (a nested backward per segment) is refused, since it would clip each segment apart."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import groupclip


class Block(nn.Module):
    """Inside the checkpointed segment: a position embedding looked up without a batch dimension."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(4, 8)
        self.lin = nn.Linear(8, 8)

    def forward(self, h):
        return torch.tanh(self.lin(h + self.pos(torch.arange(h.shape[1]))))


class Net(nn.Module):
    def __init__(self, reentrant: bool | None):
        super().__init__()
        self.reentrant = reentrant
        self.a = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8))
        self.b = Block()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if self.reentrant is None:
            h = self.b(h)
        else:
            h = checkpoint(self.b, h, use_reentrant=self.reentrant)
        return self.head(h.mean(1))


def _grads(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = groupclip.PrivacyEngine(model, opt, batch_size=len(x), sample_size=100, noise_multiplier=0.0,
                                         groups="all-layer")
    nn.functional.cross_entropy(model(x), y).backward()
    engine.detach()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_non_reentrant_checkpointing_matches_plain_run():
    torch.manual_seed(0)
    plain = Net(None).double()
    ckpt = copy.deepcopy(plain)
    ckpt.reentrant = False
    x, y = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    want, got = _grads(plain, x, y), _grads(ckpt, x, y)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)


def test_reentrant_checkpointing_is_refused():
    torch.manual_seed(0)
    model = Net(True).double()
    x, y = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (6,))
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        _grads(model, x, y)


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing(reentrant):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = transformers.GPT2LMHeadModel(cfg).double().train()
    x = torch.randint(0, 40, (3, 9))

    def run(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = groupclip.PrivacyEngine(model, opt, batch_size=3, sample_size=30, noise_multiplier=0.0)
        try:
            model(input_ids=x, labels=x).loss.backward()
        finally:
            engine.detach()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ckpt = copy.deepcopy(base)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        with pytest.raises(RuntimeError, match="use_reentrant"):
            run(ckpt)
        return
    want, got = run(copy.deepcopy(base)), run(ckpt)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)

"""Internals the GPU path relies on, checked on the CPU: aligned (padded) Grams, one-pass norms, coef sums."""

import pytest
import torch

from groupclip.rules import base, linear


def test_padded_gram_equals_plain():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 13, 21, dtype=torch.float64, generator=g)
    y = torch.randn(3, 11, 21, dtype=torch.float64, generator=g)
    plain = base._gram(x, y, pad=False)
    padded = base._gram(x, y, pad=True)
    assert padded.shape == plain.shape == (3, 13, 11)
    torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(base._gram(x, x, pad=True), x @ x.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_chunked_gram_equals_plain(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 45, dtype=torch.float64, generator=g)
    y = torch.randn(2, 5, 45, dtype=torch.float64, generator=g)
    monkeypatch.setattr(base, "CHUNK_BYTES", 0)
    torch.testing.assert_close(base._gram(x, y, pad=True), x @ y.transpose(1, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(base._chunked_gram(x, x, width=16), x @ x.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_sq_norms_and_coef_sum_match_definitions():
    g = torch.Generator().manual_seed(1)
    ps = torch.randn(5, 4, 3, dtype=torch.float64, generator=g)
    coef = torch.rand(5, dtype=torch.float64, generator=g)
    torch.testing.assert_close(base.sq_norms(ps), ps.pow(2).sum((1, 2)))
    p = torch.zeros(4, 3, dtype=torch.float64)
    torch.testing.assert_close(base.coef_sum(coef, ps, p), (coef[:, None, None] * ps).sum(0))
    low = ps.to(torch.bfloat16)
    assert base.sq_norms(low).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_coef_sum_does_not_round_the_coefficient_of_16_bit_per_sample_gradients(dtype):
    """One sample (the sum is coef_0 · ps_0): the clipped gradient's norm is coef_0 · ‖ps_0‖ up to rounding that
    averages out over its entries, not off by the coefficient's own rounding to 16 bits (which scales every entry
    alike and would let the clipped norm exceed the threshold)."""
    g = torch.Generator().manual_seed(3)
    ps = torch.randn(1, 4096, generator=g).to(dtype)
    p = torch.zeros(4096)
    worst = 0.0
    for c in torch.linspace(0.31, 0.93, 25):
        coef = c.reshape(1).float()
        want = coef.double() * ps.double().norm()
        got = base.coef_sum(coef, ps, p).double().norm()
        rounded = coef.to(dtype).double() * ps.double().norm()  # what a 16-bit coefficient gives
        worst = max(worst, abs((rounded / want).item() - 1))
        assert abs((got / want).item() - 1) < torch.finfo(dtype).eps / 64, (c, got, want)
    # the coefficients chosen do round visibly in 16 bits: the check above can fail
    assert worst > torch.finfo(dtype).eps / 8


def test_scaled_input_is_shared_only_within_one_coefficient_scope(monkeypatch):
    made = []
    real = base.kernels.scale_rows
    monkeypatch.setattr(base.kernels, "scale_rows", lambda x, c, *a: made.append(1) or real(x, c, *a))
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    coef = torch.rand(4, dtype=torch.float64)
    want = x * coef[:, None, None]
    base.scaled_input(x, coef, shared=True)
    assert len(made) == 1 and not base.SCALED.items  # outside a scope: nothing kept
    with base.one_coefficient():
        first = base.scaled_input(x, coef, shared=True)
        again = base.scaled_input(x, coef, shared=True)
        assert again is first and len(made) == 2
        torch.testing.assert_close(first, want, rtol=0, atol=0)
        other = coef.clone()  # another coefficient tensor (another group), equal values: made anew
        assert base.scaled_input(x, other, shared=True) is not first and len(made) == 3
        other.mul_(0.5)  # modified in place: made anew, with the new values
        torch.testing.assert_close(base.scaled_input(x, other, shared=True), want * 0.5, rtol=0, atol=0)
        assert len(made) == 4
        x.add_(1.0)  # the input modified in place: made anew
        torch.testing.assert_close(base.scaled_input(x, other, shared=True), x * other[:, None, None], rtol=0, atol=0)
        assert len(made) == 5
        base.scaled_input(x, other, shared=False)  # a layer whose input nobody else reads: never memoised
        assert len(made) == 6
        # the feature-major layout is another copy (same values), itself made once
        km = base.scaled_input(x, other, shared=True, k_major=True)
        assert len(made) == 7 and km.flatten(0, 1).t().is_contiguous()
        torch.testing.assert_close(km, x * other[:, None, None], rtol=0, atol=0)
        assert base.scaled_input(x, other, shared=True, k_major=True) is km and len(made) == 7
    assert not base.SCALED.items  # the scope's end drops the copy


def test_tensor_memo_is_keyed_by_identity_and_version():
    memo = base._TensorMemo(size=2)
    a = torch.ones(3)
    memo.put(a, "t", 1)
    assert memo.get(a, "t") == 1
    a.add_(1)  # in-place change bumps the version: the cached value no longer applies
    assert memo.get(a, "t") is None
    b, c = torch.zeros(2), torch.zeros(2)
    memo.put(b, "t", 2)
    memo.put(c, "t", 3)
    memo.put(torch.zeros(1), "t", 4)
    assert memo.get(b, "t") is None and memo.get(c, "t") == 3


def _clipped_grads(model_fn, x, y, groups):
    import warnings

    import groupclip

    torch.manual_seed(0)
    model = model_fn().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = groupclip.PrivacyEngine(model, opt, batch_size=len(x), sample_size=10 * len(x),
                                         noise_multiplier=0.0, groups=groups)
    torch.nn.functional.cross_entropy(model(x).flatten(0, -2), y.flatten()).backward()
    engine.detach()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


class _Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(input_ids=x).logits


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv2d(3, 4, 3, padding=1, groups=1)
        self.g = torch.nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.f = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.f(self.g(torch.relu(self.c(x))).mean((2, 3)))


@pytest.mark.parametrize("groups", ["all-layer", "layer-wise"])
@pytest.mark.parametrize("kind", ["linear", "conv", "gpt2"])
def test_ghost_and_instantiated_norms_agree(monkeypatch, kind, groups):
    """Both ways of getting a per-sample norm (and the clipped sums that follow) give the same p.grad."""
    g = torch.Generator().manual_seed(3)
    if kind == "linear":
        def model_fn():
            return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5))
        x, y = torch.randn(4, 9, 6, dtype=torch.float64, generator=g), torch.randint(0, 5, (4, 9), generator=g)
    elif kind == "conv":
        model_fn = _Conv
        x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=g), torch.randint(0, 3, (4,), generator=g)
    else:  # HF Conv1D layers, tied wte/lm_head (several uses of one weight), position embeddings
        transformers = pytest.importorskip("transformers")

        def model_fn():
            cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            return _Logits(transformers.GPT2LMHeadModel(cfg))
        x = torch.randint(0, 40, (3, 9), generator=g)
        y = torch.randint(0, 40, (3, 9), generator=g)
    monkeypatch.setattr(base, "GHOST_BALANCE", float("inf"))
    ghost = _clipped_grads(model_fn, x, y, groups)
    monkeypatch.setattr(base, "GHOST_BALANCE", 0.0)
    inst = _clipped_grads(model_fn, x, y, groups)
    for n in ghost:
        torch.testing.assert_close(inst[n], ghost[n], rtol=1e-10, atol=1e-12)
    if kind == "conv":
        return
    # a third way for layers too large to instantiate for the whole batch: a few samples' G_i at a time, norms
    # only (here one sample a round), the clipped sums from the factors
    monkeypatch.setattr(base, "INSTANTIATE_MAX_BYTES", 0)
    monkeypatch.setattr(base, "NORM_CHUNK_BYTES", 1)
    monkeypatch.setattr(linear, "prefer_chunks", lambda *args: True)
    widths = []
    orig = linear.chunked_norms
    monkeypatch.setattr(linear, "chunked_norms", lambda r, c: widths.append(r.shape[2]) or orig(r, c))
    chunks = _clipped_grads(model_fn, x, y, groups)
    # every linear layer took it; in GPT-2 also the tied output layer (40 rows: the vocabulary), whose norm is
    # that of wte's summed gradient
    assert len(widths) == {"linear": 2, "gpt2": 5}[kind] and (kind != "gpt2" or 40 in widths), widths
    for n in ghost:
        torch.testing.assert_close(chunks[n], ghost[n], rtol=1e-10, atol=1e-12)


def test_chunked_norms_match_float64_per_sample_gradients(monkeypatch):
    """A few samples' G_i per round (here 2, with a ragged last round), rows not a multiple of 8."""
    g = torch.Generator().manual_seed(4)
    r, c = torch.randn(5, 7, 13, generator=g), torch.randn(5, 7, 6, generator=g) * torch.arange(1, 6)[:, None, None]
    monkeypatch.setattr(base, "NORM_CHUNK_BYTES", 2 * 13 * 6 * 4)
    ref = torch.stack([(r[i].double().T @ c[i].double()).square().sum() for i in range(5)])
    for pad in (False, True):  # the GPU's zero-padded widths (13 -> 16, 6 -> 8) add nothing to the norms
        torch.testing.assert_close(base.chunked_norms(r, c, pad).double(), ref, rtol=1e-6, atol=0)
    assert base.chunked_norms(r[:0], c[:0]).shape == (0,)


def test_chunks_only_where_ghost_costs_more_than_a_second_product():
    # GPT-2's tied output layer (50257 x 768), bf16: too large to instantiate for the batch at either length;
    # ghost at T=256 (T(R+C) = 1.3e7 < R·C = 3.9e7), chunks at T=1024 (5.2e7 > 3.9e7)
    assert base.prefer_ghost(256, 50257, 768, 64, 2) and not base.prefer_chunks(256, 50257, 768, 64, 2)
    assert base.prefer_ghost(1024, 50257, 768, 16, 2) and base.prefer_chunks(1024, 50257, 768, 16, 2)
    # small enough to instantiate for the whole batch (and cache for the clipped sum), or float32: never chunks
    assert not base.prefer_chunks(1024, 768, 3072, 16, 2)
    assert not base.prefer_chunks(1024, 50257, 768, 16, 4)

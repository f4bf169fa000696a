"""Internals the GPU path relies on, checked on the CPU: aligned (padded) Grams, one-pass norms, coef sums."""

import torch

from groupclip.rules import base


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

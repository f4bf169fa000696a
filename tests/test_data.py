"""Poisson sampling statistics, physical chunks, empty batches and exact resume."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from groupclip.data import PoissonBatchSampler, PoissonDataLoader


def logical_batches(sampler):
    """Re-assemble the chunks yielded by ``sampler`` into logical batches using ``chunk_info``."""
    batches, current = [], []
    for chunk in sampler:
        is_last, size = sampler.chunk_info.popleft()
        current += chunk
        if is_last:
            assert len(current) == size
            batches.append(current)
            current = []
    assert not current
    return batches


def test_batch_size_mean_and_variance():
    n, q, num = 1000, 0.05, 2000
    sampler = PoissonBatchSampler(n, q, steps_per_epoch=num, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    assert len(sizes) == num == len(sampler)
    mean, var = n * q, n * q * (1 - q)  # Binomial(N, q): 50 and 47.5
    # 5 standard errors: se(mean) = sqrt(var / num); se(sample variance) ≈ var * sqrt(2 / (num - 1)).
    assert abs(sizes.mean().item() - mean) < 5 * math.sqrt(var / num)
    assert abs(sizes.var().item() - var) < 5 * var * math.sqrt(2 / (num - 1))


def test_each_index_sampled_independently_at_rate_q():
    n, q, num = 200, 0.1, 2000
    sampler = PoissonBatchSampler(n, q, steps_per_epoch=num, generator=torch.Generator().manual_seed(1))
    counts = collections.Counter(i for b in sampler for i in b)
    rate = torch.tensor([counts[i] / num for i in range(n)])
    # mean over indices of the per-index frequency: se = sqrt(q(1-q) / (n * num))
    assert abs(rate.mean().item() - q) < 5 * math.sqrt(q * (1 - q) / (n * num))
    assert all(len(set(b)) == len(b) and all(0 <= i < n for i in b) for b in PoissonBatchSampler(n, 0.5))


def test_default_steps_per_epoch():
    assert len(PoissonBatchSampler(100, 0.03)) == 33
    assert len(PoissonBatchSampler(100, 1.0)) == 1


def test_chunks_partition_logical_batches():
    n, q, m = 500, 0.2, 16  # logical batches around 100: about 7 chunks each
    ref = PoissonBatchSampler(n, q, steps_per_epoch=50, generator=torch.Generator().manual_seed(3))
    chunked = PoissonBatchSampler(
        n, q, steps_per_epoch=50, generator=torch.Generator().manual_seed(3), max_physical_batch_size=m
    )
    whole = list(ref)
    chunks = list(chunked)
    info = list(chunked.chunk_info)
    assert len(info) == len(chunks) > len(whole)
    assert all(0 < len(c) <= m for c in chunks)
    assert logical_batches_from(chunks, info) == whole


def logical_batches_from(chunks, info):
    out, current = [], []
    for chunk, (is_last, size) in zip(chunks, info, strict=True):
        current += chunk
        if is_last:
            assert len(current) == size
            out.append(current)
            current = []
    assert not current
    return out


def test_chunk_info_flags():
    sampler = PoissonBatchSampler(
        100, 0.5, steps_per_epoch=20, max_physical_batch_size=7, generator=torch.Generator().manual_seed(4)
    )
    batches = logical_batches(sampler)
    assert len(batches) == 20
    assert not sampler.chunk_info


def test_empty_logical_batches_are_one_empty_chunk():
    sampler = PoissonBatchSampler(10, 1e-9, steps_per_epoch=5, max_physical_batch_size=4)
    assert list(sampler) == [[]] * 5
    assert list(sampler.chunk_info) == [(True, 0)] * 5


def test_empty_batches_give_empty_tensors():
    x, y = torch.randn(10, 3, 4), torch.arange(10)
    calls = []
    loader = PoissonDataLoader(
        TensorDataset(x, y),
        1e-9,
        steps_per_epoch=4,
        max_physical_batch_size=2,
        on_chunk=lambda last, size: calls.append((last, size)),
    )
    batches = list(loader)
    assert len(batches) == len(loader) == 4 and calls == [(True, 0)] * 4
    for bx, by in batches:
        assert bx.shape == (0, 3, 4) and bx.dtype == x.dtype
        assert by.shape == (0,) and by.dtype == y.dtype


class DictDataset(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": torch.full((2,), float(i)), "label": i, "name": f"s{i}"}


def test_empty_batches_for_dict_samples():
    (batch,) = list(PoissonDataLoader(DictDataset(), 1e-9, steps_per_epoch=1))
    assert batch["x"].shape == (0, 2) and batch["label"].shape == (0,) and batch["name"] == []


def test_loader_batches_and_callbacks_match():
    ds = TensorDataset(torch.arange(300).float())
    calls = []
    loader = PoissonDataLoader(
        ds,
        0.1,
        steps_per_epoch=30,
        max_physical_batch_size=8,
        generator=torch.Generator().manual_seed(5),
        on_chunk=lambda last, size: calls.append((last, size)),
    )
    chunks = [b[0].long().tolist() for b in loader]
    assert len(calls) == len(chunks)
    assert len(logical_batches_from(chunks, calls)) == 30


def test_loader_rejects_fixed_size_batching_arguments():
    ds = TensorDataset(torch.zeros(4))
    for kw in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
        with pytest.raises(ValueError, match=f"does not accept {kw}.*Poisson sampling"):
            PoissonDataLoader(ds, 0.5, **{kw: 2})
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonDataLoader(ds, 0.0)
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        PoissonDataLoader(ds, 0.5, max_physical_batch_size=0)


def test_sampler_state_dict_resume():
    make = lambda: PoissonBatchSampler(100, 0.1, steps_per_epoch=10, generator=torch.Generator().manual_seed(6))
    full = make()
    epoch1, epoch2 = list(full), list(full)
    partial = make()
    it = iter(partial)
    head = [next(it) for _ in range(4)]
    state = partial.state_dict()
    resumed = make()
    torch.manual_seed(123)  # unrelated global RNG use must not matter
    resumed.load_state_dict(state)
    assert head + list(resumed) == epoch1
    assert list(resumed) == epoch2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_dict_resume_is_exact_despite_prefetch(num_workers):
    ds = TensorDataset(torch.arange(200))
    kw = dict(steps_per_epoch=12, max_physical_batch_size=5, num_workers=num_workers)
    ref = PoissonDataLoader(ds, 0.05, generator=torch.Generator().manual_seed(7), **kw)
    expected = [b[0].tolist() for b in ref] + [b[0].tolist() for b in ref]

    calls = []
    loader = PoissonDataLoader(
        ds, 0.05, generator=torch.Generator().manual_seed(7), on_chunk=lambda last, size: calls.append(last), **kw
    )
    seen = []
    for (b,) in loader:  # stop after the 5th logical batch; workers have already drawn further ahead
        seen.append(b.tolist())
        if sum(calls) == 5:
            break
    state = loader.state_dict()
    resumed = PoissonDataLoader(ds, 0.05, generator=torch.Generator().manual_seed(99), **kw)
    resumed.load_state_dict(state)
    rest = [b[0].tolist() for b in resumed] + [b[0].tolist() for b in resumed]
    assert seen + rest == expected


def test_callbacks_match_batches_with_workers():
    n = 400
    ds = TensorDataset(torch.arange(n))
    calls = []
    loader = PoissonDataLoader(
        ds,
        0.08,
        steps_per_epoch=25,
        max_physical_batch_size=6,
        num_workers=2,
        generator=torch.Generator().manual_seed(8),
        on_chunk=lambda last, size: calls.append((last, size)),
    )
    ref = PoissonBatchSampler(n, 0.08, steps_per_epoch=25, generator=torch.Generator().manual_seed(8))
    for _ in range(2):  # two epochs: the deque is reset between them
        calls.clear()
        chunks = [b[0].tolist() for b in loader]
        assert logical_batches_from(chunks, calls) == list(ref)

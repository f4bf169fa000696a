"""Poisson sampling, and logical batches split into physical chunks.

The privacy accountant (:mod:`groupclip.accounting`) assumes **Poisson sampling**: at every step each of the N
examples joins the batch independently with probability q, so batch sizes vary (mean qN, variance
Nq(1-q)) and may even be 0. Shuffled fixed-size batches (``DataLoader(shuffle=True, batch_size=B)``) are
NOT what the accountant assumes, and the ε it reports does not hold for them. Use :class:`PoissonDataLoader`.

A *logical* batch is one privacy step (one noise draw, one optimizer step). When it does not fit in memory,
``max_physical_batch_size`` splits it into *physical* chunks; the ``on_chunk(is_last, logical_batch_size)``
callback tells the training machinery, before each chunk is yielded, whether that chunk ends its logical
batch. An empty logical batch is still yielded, as one chunk of empty tensors, so that a (noise-only) step
is taken for it, as the accounting requires.
"""

from __future__ import annotations

import collections
import logging
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

__all__ = ["EmptyBatchCollate", "PoissonBatchSampler", "PoissonDataLoader"]

logger = logging.getLogger(__name__)

_INFO_MAXLEN = 4096  # chunks drawn but not yet consumed that are remembered (far above any prefetch depth)
_REJECTED_KWARGS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return int(value)


class PoissonBatchSampler:
    """Yields lists of dataset indices: each logical batch is a Poisson sample with rate ``sample_rate``.

    Args:
        num_samples: dataset size N.
        sample_rate: probability q that an example joins a logical batch.
        steps_per_epoch: logical batches per epoch (default ``round(1 / q)``).
        generator: random source of the sampling (default: a CPU generator seeded from torch's global RNG).
        max_physical_batch_size: if set, each logical batch is yielded as consecutive chunks of at most this
            size; an empty logical batch is yielded as one empty chunk.

    For every chunk yielded, ``(is_last_chunk_of_logical_batch, logical_batch_size)`` is appended to
    :attr:`chunk_info`. ``len()`` is the number of *logical* batches per epoch (the number of chunks is
    random).
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps_per_epoch: int | None = None,
        generator: torch.Generator | None = None,
        max_physical_batch_size: int | None = None,
    ) -> None:
        self.num_samples = _check_int(num_samples, "num_samples")
        if not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1]; got {sample_rate!r}")
        self.sample_rate = float(sample_rate)
        if steps_per_epoch is None:
            steps_per_epoch = max(1, round(1 / self.sample_rate))
        self.steps_per_epoch = _check_int(steps_per_epoch, "steps_per_epoch")
        self.max_physical_batch_size = (
            None if max_physical_batch_size is None
            else _check_int(max_physical_batch_size, "max_physical_batch_size")
        )
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        self.generator = generator
        self.chunk_info: collections.deque[tuple[bool, int]] = collections.deque(maxlen=_INFO_MAXLEN)
        # Sampler state after each drawn logical batch; filled only for PoissonDataLoader (to resume exactly).
        self._states: collections.deque[dict[str, Any]] = collections.deque(maxlen=_INFO_MAXLEN)
        self._record_states = False
        self._position = 0  # logical batches of the current epoch drawn so far
        self._start = 0  # where the next epoch's iteration starts (non-zero only after load_state_dict)

    def __len__(self) -> int:
        """Number of logical batches per epoch (not the number of physical chunks, which is random)."""
        return self.steps_per_epoch

    def _chunks(self, indices: list[int]) -> list[list[int]]:
        m = self.max_physical_batch_size
        if m is None or not indices:
            return [indices]
        return [indices[i : i + m] for i in range(0, len(indices), m)]

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0
        self._position = start
        for k in range(start, self.steps_per_epoch):
            mask = torch.rand(self.num_samples, generator=self.generator, device=self.generator.device)
            indices = (mask < self.sample_rate).nonzero().flatten().tolist()
            self._position = (k + 1) % self.steps_per_epoch
            if self._record_states:
                self._states.append(self.state_dict())
            chunks = self._chunks(indices)
            for i, chunk in enumerate(chunks):
                self.chunk_info.append((i == len(chunks) - 1, len(indices)))
                yield chunk

    def state_dict(self) -> dict[str, Any]:
        """Generator state and position in the epoch (take it between logical batches)."""
        return {"generator_state": self.generator.get_state(), "position": self._position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next iteration continues the saved epoch with the same draws."""
        self.generator.set_state(state["generator_state"])
        self._position = self._start = int(state["position"]) % self.steps_per_epoch


def _empty_like_batch(batch: Any) -> Any:
    """A batch structure like ``batch`` whose tensors have leading dimension 0."""
    if isinstance(batch, torch.Tensor):
        return batch[:0].clone()
    if isinstance(batch, Mapping):
        items = {k: _empty_like_batch(v) for k, v in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_empty_like_batch(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        if batch and all(isinstance(v, (str, bytes)) for v in batch):  # a collated batch of strings
            return type(batch)()
        return type(batch)(_empty_like_batch(v) for v in batch)
    return batch


class EmptyBatchCollate:
    """Wraps a collate function so that an empty index list gives tensors with leading dimension 0."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any], example: Any) -> None:
        self.collate_fn = collate_fn
        self.empty = _empty_like_batch(collate_fn([example]))

    def __call__(self, samples: list[Any]) -> Any:
        if len(samples) == 0:
            return _empty_like_batch(self.empty)
        return self.collate_fn(samples)


class PoissonDataLoader:
    """A ``torch.utils.data.DataLoader`` whose batches are Poisson samples (see the module docstring).

    Args:
        dataset: a map-style dataset (``len`` and ``__getitem__``).
        sample_rate: q; the expected logical batch size is ``q * len(dataset)``.
        steps_per_epoch, generator, max_physical_batch_size: as in :class:`PoissonBatchSampler`.
        on_chunk: called as ``on_chunk(is_last, logical_batch_size)`` just before each chunk is yielded.
        collate_fn: as in DataLoader (default ``default_collate``); empty chunks are handled.
        **kwargs: other DataLoader arguments (num_workers, pin_memory, ...). ``batch_size``, ``shuffle``,
            ``sampler``, ``batch_sampler`` and ``drop_last`` are rejected: Poisson sampling replaces them.
    """

    def __init__(
        self,
        dataset: Dataset,
        sample_rate: float,
        *,
        steps_per_epoch: int | None = None,
        max_physical_batch_size: int | None = None,
        generator: torch.Generator | None = None,
        on_chunk: Callable[[bool, int], None] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        bad = [k for k in _REJECTED_KWARGS if k in kwargs]
        if bad:
            raise ValueError(
                f"PoissonDataLoader does not accept {', '.join(bad)}: Poisson sampling with sample_rate decides "
                "which examples form each batch (use max_physical_batch_size to bound memory)"
            )
        if kwargs.get("in_order", True) is False:
            raise ValueError("PoissonDataLoader needs in_order=True: chunks must arrive in sampling order")
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("PoissonDataLoader needs a non-empty dataset")
        self.dataset = dataset
        self.sampler = PoissonBatchSampler(n, sample_rate, steps_per_epoch, generator, max_physical_batch_size)
        self.sampler._record_states = True
        self.on_chunk = on_chunk
        self.collate_fn = EmptyBatchCollate(collate_fn or default_collate, dataset[0])
        self.dataloader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=self.collate_fn, **kwargs)
        self._resume_state = self.sampler.state_dict()

    @property
    def sample_rate(self) -> float:
        """q, the probability that an example joins a logical batch."""
        return self.sampler.sample_rate

    @property
    def steps_per_epoch(self) -> int:
        """Logical batches per epoch."""
        return self.sampler.steps_per_epoch

    def __len__(self) -> int:
        """Number of logical batches per epoch (``steps_per_epoch``)."""
        return self.sampler.steps_per_epoch

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        sampler.chunk_info.clear()
        sampler._states.clear()
        self._resume_state = {"generator_state": sampler.generator.get_state(), "position": sampler._start}
        for batch in self.dataloader:
            is_last, logical_size = sampler.chunk_info.popleft()
            if is_last:
                self._resume_state = sampler._states.popleft()
            if self.on_chunk is not None:
                self.on_chunk(is_last, logical_size)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Sampler state after the last fully consumed logical batch (exact even with worker prefetching).

        A partly consumed logical batch is drawn again, whole, after :meth:`load_state_dict`.
        """
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self._resume_state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration draws the batches that would have followed."""
        self.sampler.load_state_dict(state)
        self._resume_state = self.sampler.state_dict()

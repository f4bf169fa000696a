"""Gaussian noise for the DP step, from seedable per-device torch.Generators.

Secure mode draws the seed from the operating system's CSPRNG and never reports it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch


class GaussianNoise:
    """Adds N(0, std²) per coordinate to each gradient, std = σ·C / batch_size."""

    def __init__(self, noise_multiplier: float, sensitivity: float, batch_size: int,
                 seed: int | None = None, secure_mode: bool = False) -> None:
        self.noise_multiplier = float(noise_multiplier)
        self.sensitivity = float(sensitivity)
        self.batch_size = int(batch_size)
        if secure_mode and seed is not None:
            raise ValueError("secure_mode draws its own seed from the OS; do not pass seed=")
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self._generators: dict[str, torch.Generator] = {}
        self._pending_state: dict[str, torch.Tensor] = {}

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.sensitivity / self.batch_size

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + len(self._generators))
            if key in self._pending_state:
                gen.set_state(self._pending_state.pop(key))
            self._generators[key] = gen
        return gen

    @torch.no_grad()
    def add_to(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Add noise to every gradient: one draw per device and dtype (in chunks of at most CHUNK elements)
        and one fused add, rather than two launches per parameter."""
        std = self.std
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:
            g = p.grad
            if g is None:
                g = p.grad = torch.zeros_like(p)
            if std > 0:
                by_kind.setdefault((g.device, g.dtype), []).append(g)
        for (device, dtype), grads in by_kind.items():
            gen = self.generator(device)
            for chunk in _chunks(grads, CHUNK):
                sizes = [g.numel() for g in chunk]
                flat = torch.randn(sum(sizes), generator=gen, device=device, dtype=dtype)
                noise = [v.view_as(g) for v, g in zip(flat.split(sizes), chunk, strict=True)]
                torch._foreach_add_(chunk, noise, alpha=std)

    def state_dict(self) -> dict:
        states = {k: g.get_state() for k, g in self._generators.items()}
        states.update(self._pending_state)
        return {"seed": self.seed, "generators": states}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self._generators.clear()
        self._pending_state = dict(state["generators"])


#: Largest single noise draw, in elements (a transient buffer of this size exists during the step).
CHUNK = 2**26


def _chunks(grads: list[torch.Tensor], limit: int):
    batch, size = [], 0
    for g in grads:
        if batch and size + g.numel() > limit:
            yield batch
            batch, size = [], 0
        batch.append(g)
        size += g.numel()
    if batch:
        yield batch

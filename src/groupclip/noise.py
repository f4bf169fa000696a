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
        grads = []
        for p in params:
            g = p.grad
            if g is None:
                g = p.grad = torch.zeros_like(p)
            grads.append(g)
        if std <= 0:
            return
        for (device, dtype), kind in _by_kind(grads):
            gen = self.generator(device)
            for chunk in _chunks(kind, CHUNK):
                flat = torch.randn(sum([g.numel() for g in chunk]), generator=gen, device=device, dtype=dtype)
                # the draw cut into views shaped like the gradients, in one call (not one Python view each)
                torch._foreach_add_(chunk, torch._utils._unflatten_dense_tensors(flat, chunk), alpha=std)

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


try:
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype as _GROUP
except ImportError:  # (a private helper of PyTorch's optimizers; grouped in Python where it is missing)
    _GROUP = None


def _by_kind(grads: list[torch.Tensor]) -> list[tuple[tuple[torch.device, torch.dtype], list[torch.Tensor]]]:
    """The gradients grouped by (device, dtype), in order of first appearance (each kind's draws come from its
    device's generator in this order, as they always have: a seed gives the same noise)."""
    if _GROUP is not None:
        found = _GROUP([grads], with_indices=True)
        kinds = sorted(found.items(), key=lambda kv: kv[1][1][0] if kv[1][1] else 0)
        return [(kind, lists[0]) for kind, (lists, _) in kinds]
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    return list(by_kind.items())


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

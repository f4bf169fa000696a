"""Per-step state: one `Use` per forward call of a unit, one `StepState` per forward/backward pair.

Nothing here is attached to tensors or parameters; a `StepState` is dropped when its backward ends.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from groupclip.capture.units import Unit


@dataclass(eq=False)
class Use:
    """One call of a unit: what its rule saved in forward and the output gradient from backward."""

    unit: Unit
    saved: tuple[torch.Tensor, ...]
    grad_out: Any  # a tensor, or a tuple of tensors/None for generic units
    batch_size: int
    extra: dict[str, Any] = field(default_factory=dict)  # non-tensor forward facts (shapes, flags)
    cache: dict[str, Any] = field(default_factory=dict)  # per-sample results shared by norm and sum

    @property
    def names(self) -> tuple[str, ...]:
        return self.extra["names"]


class StepState:
    """Uses recorded between a forward and the end of its backward, and the group completion counts."""

    def __init__(self) -> None:
        self.batch_size: int | None = None
        self.expected: dict[int, int] = defaultdict(int)
        self.param_uses: dict[int, int] = defaultdict(int)  # id(param) -> forward calls that used it
        self.arrived: dict[int, list[Use]] = defaultdict(list)
        self.done: set[int] = set()
        self.backward_started = False
        self.root_calls = 0  # forwards of the whole model in this step
        self.recompute = False  # created for a forward re-run inside a backward pass (checkpointing)

    def count_forward(self, groups: set[int], params) -> None:
        for g in groups:
            self.expected[g] += 1
        for p in params:
            self.param_uses[id(p)] += 1

    def add(self, use: Use, groups: set[int]) -> list[int]:
        """Record a use; return the groups that just became complete."""
        complete = []
        for g in groups:
            self.arrived[g].append(use)
            if len(self.arrived[g]) >= self.expected[g] and g not in self.done:
                complete.append(g)
        return complete

    def abandon(self) -> None:
        """Drop the uses that arrived (their backward pass failed): nothing of them reaches p.grad."""
        self.done.update(self.arrived)
        self.arrived.clear()

    def pending(self) -> list[int]:
        return [g for g, uses in self.arrived.items() if uses and g not in self.done]

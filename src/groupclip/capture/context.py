"""Per-step state: one `Use` per forward call of a unit, one `StepState` per forward/backward pair.

Nothing here is attached to tensors or parameters; a `StepState` is dropped when its backward ends.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from groupclip.capture.casts import StepCasts
    from groupclip.capture.units import Unit


@dataclass(frozen=True, eq=False)
class CallPlan:
    """What every call of one unit with one set of trainable parameters needs, worked out once per engine: the
    trainable parameters (`names`, `params`, their ids) and the clipping groups they belong to. The hub keys it
    by (unit, names), so a change of requires_grad selects another plan; units, their parameters and the
    groups are fixed when the engine is created."""

    unit: Unit
    names: tuple[str, ...]
    params: tuple[torch.nn.Parameter, ...]
    param_ids: tuple[int, ...]
    groups: tuple[int, ...]
    #: one None per parameter: the gradients LayerFn / Tap return for them
    no_grads: tuple[None, ...]


class Use:
    """One call of a unit: what its rule saved in forward and the output gradient from backward.

    `extra` holds the rule's non-tensor forward facts (shapes, flags); `cache` the per-sample results shared by
    the norm and the clipped sum."""

    __slots__ = ("plan", "unit", "names", "saved", "grad_out", "batch_size", "extra", "cache")

    def __init__(self, plan: CallPlan, saved: tuple[torch.Tensor, ...], grad_out: Any, batch_size: int,
                 extra: dict[str, Any]) -> None:
        self.plan, self.unit, self.names = plan, plan.unit, plan.names
        self.saved = saved
        self.grad_out = grad_out  # a tensor, or a tuple of tensors/None for generic units
        self.batch_size = batch_size
        self.extra = extra
        self.cache: dict[str, Any] = {}


class StepState:
    """Uses recorded between a forward and the end of its backward, and the group completion counts."""

    def __init__(self) -> None:
        self.batch_size: int | None = None
        self._expected: dict[int, int] = defaultdict(int)
        self._param_uses: dict[int, int] = defaultdict(int)
        self._calls: list[CallPlan] = []  # forward calls not yet counted into the two above
        self.arrived: dict[int, list[Use]] = defaultdict(list)
        self.done: set[int] = set()
        self.backward_started = False
        self.root_calls = 0  # forwards of the whole model in this step
        self.recompute = False  # created for a forward re-run inside a backward pass (checkpointing)
        self.casts: StepCasts | None = None  # the step's autocast copies of the layers' weights (set by the hub)

    def count_forward(self, plan: CallPlan) -> None:
        """Count one forward call of `plan` (counted when the counts are first read, in backward: a forward layer
        call only appends)."""
        self._calls.append(plan)

    def _count(self) -> None:
        calls, self._calls = self._calls, []
        expected, uses = self._expected, self._param_uses
        for plan in calls:
            for g in plan.groups:
                expected[g] += 1
            for i in plan.param_ids:
                uses[i] += 1

    @property
    def expected(self) -> dict[int, int]:
        """group -> forward calls of its units in this step."""
        if self._calls:
            self._count()
        return self._expected

    @property
    def param_uses(self) -> dict[int, int]:
        """id(param) -> forward calls that used it in this step."""
        if self._calls:
            self._count()
        return self._param_uses

    def add(self, use: Use) -> list[int]:
        """Record a use; return the groups that just became complete."""
        complete = []
        expected = self.expected
        for g in use.plan.groups:
            arrived = self.arrived[g]
            arrived.append(use)
            if len(arrived) >= expected[g] and g not in self.done:
                complete.append(g)
        return complete

    def abandon(self) -> None:
        """Drop the uses that arrived (their backward pass failed): nothing of them reaches p.grad."""
        self.done.update(self.arrived)
        self.arrived.clear()

    def pending(self) -> list[int]:
        return [g for g, uses in self.arrived.items() if uses and g not in self.done]


@dataclass(eq=False)
class ChildOutput:
    """One call of a rule-handled child inside a generic unit's forward: which of the parent's inputs it read
    (`slot` in the parent's flattened arguments) and what it returned (detached; `version` at the time)."""

    unit: Unit
    call: int  # the how-many-th call of this child in the parent's forward
    slot: int
    out: torch.Tensor
    version: int


class ChildOutputs:
    """Records, during a generic unit's forward, the calls of rule-handled child units whose only argument is
    one of the parent's own inputs. Such a call depends on no parameter the generic rule differentiates (its
    input is data; its parameters are its own), so the generic rule's per-sample re-run can use the recorded
    output instead of running the child again (ViT's embeddings: the patch convolution). A child sharing a
    parameter with the parent, an output modified in place after the call, or a re-run that passes anything
    else runs the child as before."""

    def __init__(self, parent: Unit, leaves: list) -> None:
        self.parent_params = {id(p) for p in parent.params.values()}
        self.leaves = leaves
        self.records: list[ChildOutput] = []
        self._calls: dict[int, int] = {}

    @staticmethod
    def wanted(st: StepState) -> bool:
        # not while activations are being re-computed in backward (checkpointing), nor where saved tensors are
        # packed by hooks (checkpointing, offloading): holding the output would defeat what those save. Where
        # this PyTorch cannot say (no such query), nothing is recorded and children re-run as before.
        top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        return (top_hooks is not None and not st.recompute and torch._C._current_graph_task_id() == -1
                and top_hooks(True) is None)

    def offer(self, unit: Unit, x: Any, out: Any) -> None:
        call = self._calls.get(id(unit), 0)
        self._calls[id(unit)] = call + 1
        if not isinstance(out, torch.Tensor) or not out.dim():
            return
        if any(id(p) in self.parent_params for p in unit.params.values()):
            return
        slot = next((i for i, v in enumerate(self.leaves) if v is x), None)
        if slot is not None:
            self.records.append(ChildOutput(unit, call, slot, out.detach(), out._version))

"""Wires units into a model: replaces each unit's forward, tracks the batch size, guards every parameter,
and turns arriving uses into completed groups for the clipper.

Layer-wise style clipping happens inside backprop: a group is clipped the moment its last use's output
gradient arrives, and its saved tensors are dropped right after. Groups still open when backward ends
(a use whose output never got a gradient) are clipped by an end-of-backward callback.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_unflatten

from groupclip import trees
from groupclip.capture.casts import CastPlan, StepCasts, cast_sources
from groupclip.capture.context import CallPlan, ChildOutputs, StepState, Use
from groupclip.capture.functions import Tap, apply_layer
from groupclip.capture.units import Unit, batchify
from groupclip.rules import EngineError
from groupclip.rules.base import clear_step_memos

log = logging.getLogger(__name__)


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a model call: the largest leading size among its tensor arguments.

    Taking the largest errs on the safe side: a batch size guessed too small (from, say, a (1, T) mask passed
    first) would make layers treat the whole batch as one sample; one guessed too large only makes shapes
    disagree, which fails loudly.
    """
    sizes = [int(v.shape[0]) for v in trees.leaves((args, kwargs)) if isinstance(v, torch.Tensor) and v.dim()]
    return max(sizes) if sizes else None


@contextlib.contextmanager
def _swapped(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """Temporarily let `module` see plain tensors in place of some of its parameters."""
    old = []
    for name, t in tensors.items():
        prefix, _, attr = name.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        old.append((owner, attr, owner._parameters[attr]))
        owner._parameters[attr] = t
    try:
        yield
    finally:
        for owner, attr, p in old:
            owner._parameters[attr] = p


class CaptureHub:
    def __init__(
        self,
        model: nn.Module,
        units: list[Unit],
        group_of: dict[int, int],
        on_group: Callable[[int, list[Use]], None],
        on_wait: Callable[[Use, tuple[str, ...]], None] | None = None,
        on_end: Callable[[], None] | None = None,
        on_begin: Callable[[], None] | None = None,
        on_input_grad: Callable[[Use], torch.Tensor | None] | None = None,
    ) -> None:
        self.model = model
        self.units = units
        self.group_of = group_of  # id(param) -> group index
        self.on_group = on_group
        self.on_wait = on_wait  # called for a use whose group must wait for later uses
        self.on_end = on_end  # called at the end of each backward pass, after its last groups
        self.on_begin = on_begin  # called when a backward pass reaches its first use
        # a use's input gradient from a CUDA graph of its rule's fused backward (`groupclip.tails`), or None
        self.on_input_grad = on_input_grad
        # the current step: held strongly while a forward of the model runs, then only by the autograd graph
        # its forward built (ctx.state of LayerFn / Tap), so a step whose graph is dropped without backward
        # (an out-of-memory error in the loss, say) disappears instead of being joined by the next forward
        self._live: StepState | None = None
        self._ref: weakref.ref | None = None
        self._callback_task = -1  # graph task of the backward pass the end-of-backward callback was queued in
        self._bypass = False
        # generic re-run: (unit, args, kwargs) -> a recorded output to use instead of running that child
        self._replay: Callable[[Unit, tuple, dict], torch.Tensor | None] | None = None
        self._recorders: list[ChildOutputs] = []  # generic forwards running now, innermost last
        self._handles: list[Any] = []
        self._pending: list[StepState] = []
        self._callback_queued = False
        # (unit, trainable names) -> its CallPlan; the units, their parameters and the groups are fixed for the
        # hub's life, and which parameters are trainable is part of the key
        self._plans: dict[Unit, dict[tuple[str, ...], CallPlan]] = {}  # unit -> its plans by trainable names
        self._warned_two_forwards = False
        self._root_open = False  # a forward of the model started and has not returned (yet, or ever: it raised)
        # a backward pass failed after clipping some groups into p.grad: until p.grad is cleared, a step would
        # count those samples once more if the batch is run again
        self.partial_grad = False
        # the tensors rules cast under autocast (Linear weights and biases): a step makes their copies in one batch
        self._casts = CastPlan(cast_sources([u.module for u in units if getattr(u.rule, "casts_weights", False)]))

    # ---------------------------------------------------------------- install / remove
    def install(self) -> None:
        for unit in self.units:
            if "forward" in unit.module.__dict__:
                raise EngineError(f"module {unit.label()} already has a patched forward; detach other engines.")
            unit.module.forward = self._make_forward(unit)
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._root_post_hook))
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p in {id(p): p for u in self.units for p in u.params.values()}.values():
            if p.requires_grad:
                self._handles.append(p.register_hook(self._make_guard(names.get(id(p), "?"))))

    @property
    def state(self) -> StepState | None:
        if self._live is not None:
            return self._live
        return None if self._ref is None else self._ref()

    @state.setter
    def state(self, st: StepState | None) -> None:
        self._live, self._ref = st, (None if st is None else weakref.ref(st))

    def _drop_failed_backward(self) -> None:
        """A backward pass raised before its end (its callback never ran): its steps are abandoned, their
        waiting groups are never clipped into p.grad, and the caches it filled are freed. (Also called on
        removal, where nothing may be pending.)"""
        if self._pending:
            log.debug("groupclip: a backward pass did not finish; dropping its %d pending step(s)",
                      len(self._pending))
        for st in self._pending:
            self.partial_grad |= bool(st.done)  # groups of the failed pass already written into p.grad
            # its uses hold saved tensors whose autograd nodes hold the step (ctx.state): a cycle through C++
            # objects that Python's garbage collector cannot free, i.e. the failed step's activations
            st.abandon()
        self._pending = []
        self._callback_queued = False
        clear_step_memos()

    def failed_partially(self) -> bool:
        """Whether a backward pass failed after writing part of its clipped gradient into p.grad (and p.grad
        was not cleared since)."""
        if self._callback_queued and torch._C._current_graph_task_id() == -1:
            self._drop_failed_backward()  # no backward runs, yet its end never came: it raised
        return self.partial_grad

    def clear_failed_partially(self) -> bool:
        """p.grad is being cleared: forget a partially written failed pass; return whether there was one."""
        found, self.partial_grad = self.failed_partially(), False
        return found

    def remove(self) -> None:
        self._drop_failed_backward()
        for unit in self.units:
            unit.module.__dict__.pop("forward", None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.state = None

    @contextlib.contextmanager
    def bypass(self, replay: Callable[[Unit, tuple, dict], torch.Tensor | None] | None = None):
        """Run original forwards (used by the generic rule's per-sample re-run). `replay` may hand back a child
        unit's recorded output instead of running it (`ChildOutputs`)."""
        old, self._bypass = (self._bypass, self._replay), True
        if replay is not None:
            self._replay = replay
        try:
            yield
        finally:
            self._bypass, self._replay = old

    @staticmethod
    def _make_guard(name: str):
        def guard(grad):
            if grad is None:  # our Functions return None for parameters; autograd still calls the hook
                return None
            raise EngineError(
                f"parameter '{name}' received a gradient that did not pass through its module's per-sample "
                "rule: it is used directly in another module's forward (or in the loss). Use it only through "
                "the module that owns it (e.g. call the layer, or tie weights by sharing the Parameter "
                "between modules), or move the computation that uses it into that module."
            )

        return guard

    # ---------------------------------------------------------------- per-step state
    def _root_pre_hook(self, module, args, kwargs):
        if self._bypass or not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return None  # no capture, a generic re-run, or a checkpoint re-computation inside backward
        if self._callback_queued:
            self._drop_failed_backward()
        if self._root_open and self.state is not None and not self.state.backward_started:
            # the previous forward raised before returning (e.g. out of memory, then a retry with a smaller
            # batch): its step is abandoned, so this forward starts a new one instead of joining it
            log.debug("groupclip: the previous forward did not return; starting a new step")
            self.state = None
            clear_step_memos()
        self._root_open = True
        st = self._current()
        st.root_calls += 1
        if st.root_calls == 2 and not self._warned_two_forwards:
            self._warned_two_forwards = True
            log.warning(
                "groupclip: a second forward of the model joined the same step before backward(). Sample i is "
                "index i of every forward in a step: this is exact when all forwards see the same samples (e.g. "
                "two augmentations), but two forwards over different records are clipped as one combined sample."
            )
        st.batch_size = _batch_size(args, kwargs)
        return None

    def _root_post_hook(self, module, args, output):
        self._root_open = False
        self._live = None  # from now on the step lives as long as the graph of this forward
        return None

    def _current(self) -> StepState:
        st = self.state
        if st is None or st.backward_started:
            st = self.state = StepState()
            st.casts = StepCasts(self._casts)
        return st

    def _recompute_state(self, current: StepState | None) -> StepState:
        """A forward that runs inside a backward pass re-computes activations (checkpointing). Non-reentrant
        checkpointing only unpacks the tensors saved there: those nodes never run backward, so they get a
        throw-away state and the step's own counts stay untouched. If such a node does run backward
        (reentrant checkpointing: a nested backward), `on_use` refuses it."""
        st = StepState()
        st.batch_size = None if current is None else current.batch_size
        st.recompute = True
        st.casts = StepCasts(self._casts)
        return st

    def _plan(self, unit: Unit, items: tuple, plans: dict) -> CallPlan | None:
        """The plan of a call of `unit` with its parameters' current requires_grad (`items`: its parameters' (name,
        parameter) pairs; `plans`: `self._plans[unit]`); None if none is trainable."""
        names = tuple([n for n, p in items if p.requires_grad])
        plan = plans.get(names)
        if plan is None and names:
            plan = plans[names] = self._make_plan(unit, names)
        return plan

    def _make_plan(self, unit: Unit, names: tuple[str, ...]) -> CallPlan:
        params = tuple(unit.params[n] for n in names)
        try:
            groups = {self.group_of[id(p)] for p in params}
        except KeyError:
            bad = [unit.global_names[n] for n in names if id(unit.params[n]) not in self.group_of]
            raise EngineError(
                f"parameter(s) {bad} are trainable but were frozen when the engine was created, so they "
                "belong to no clipping group. Set requires_grad before creating the PrivacyEngine."
            ) from None
        return CallPlan(unit, names, params, tuple(id(p) for p in params), tuple(groups), (None,) * len(params))

    # ---------------------------------------------------------------- forwards
    def _make_forward(self, unit: Unit):
        orig = type(unit.module).forward.__get__(unit.module)
        hub = self
        items, plans = tuple(unit.params.items()), self._plans.setdefault(unit, {})  # (one dict lookup per call)
        in_function = unit.rule.in_function
        grad_enabled, task_id = torch.is_grad_enabled, torch._C._current_graph_task_id

        def forward(*args, **kwargs):
            if hub._bypass or not grad_enabled():
                if hub._replay is not None and hub._bypass:
                    recorded = hub._replay(unit, args, kwargs)
                    if recorded is not None:
                        return recorded
                return orig(*args, **kwargs)
            plan = hub._plan(unit, items, plans)
            if plan is None:
                return orig(*args, **kwargs)
            if task_id() != -1:  # a re-computation inside backward (checkpointing)
                st = hub._recompute_state(hub.state)
            else:
                st = hub._current()
            if in_function and len(args) == 1 and not kwargs:
                x = batchify(args[0], st.batch_size, unit)
                st.count_forward(plan)
                # the parameters are inputs only where the output would otherwise not require grad (an input
                # that needs no gradient): each parameter edge costs backward a node and a guard-hook call
                out = apply_layer(hub, plan, st, x) if x.requires_grad else apply_layer(hub, plan, st, x,
                                                                                          *plan.params)
                if hub._recorders:
                    hub._recorders[-1].offer(unit, args[0], out)
                return out
            return hub._generic_forward(orig, plan, st, args, kwargs)

        return forward

    def _generic_forward(self, orig, plan: CallPlan, st: StepState, args, kwargs):
        unit, names = plan.unit, plan.names
        leaves, spec = trees.flatten((args, kwargs))
        facts = unit.rule.forward_facts(unit.module, args, kwargs)
        # children's outputs are recorded only for a per-sample re-run
        rec = ChildOutputs(unit, leaves) if facts is None and ChildOutputs.wanted(st) else None
        if rec is not None:
            self._recorders.append(rec)
        try:
            with _swapped(unit.module, {n: p.detach() for n, p in zip(names, plan.params, strict=True)}):
                out = orig(*args, **kwargs)
        finally:
            if rec is not None:
                self._recorders.pop()
        slots = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        saved = [leaves[i] for i in slots]
        kept = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        out_leaves, out_spec = trees.flatten(out)
        out_slots = [
            i for i, v in enumerate(out_leaves) if isinstance(v, torch.Tensor) and v.is_floating_point()
        ]
        if not out_slots:
            return out
        batch = st.batch_size if st.batch_size is not None else _batch_size(args, kwargs)
        dev = out_leaves[out_slots[0]].device.type
        extra = {"leaves": kept, "tensor_slots": slots, "spec": spec,
                 "out_slots": out_slots, "batch": batch if batch is not None else 1,
                 "autocast": (dev, torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None}
        if rec is not None and rec.records:
            extra["replay"] = rec.records
        if facts:
            extra.update(facts)
        st.count_forward(plan)
        tapped = Tap.apply(
            self, plan, st, extra, len(out_slots), len(saved),
            *[out_leaves[i] for i in out_slots], *saved, *plan.params,
        )
        for i, t in zip(out_slots, tapped, strict=True):
            out_leaves[i] = t
        return tree_unflatten(out_leaves, out_spec)

    # ---------------------------------------------------------------- backward side
    def graphed_input_grad(self, st: StepState, use: Use) -> torch.Tensor | None:
        """The input gradient of `use` (its rule has `graphs_input_grad`) from `on_input_grad`, or None: the rule
        computes it. Only for a use whose parameters have no other use in the step: the graph keeps its per-sample
        gradients in buffers of its own until its next replay."""
        if self.on_input_grad is None:
            return None
        calls = st.param_uses
        for i in use.plan.param_ids:
            if calls[i] != 1:
                return None
        return self.on_input_grad(use)

    def on_use(self, st: StepState, use: Use) -> None:
        if st.recompute:
            raise EngineError(
                f"layer {use.unit.label()} was re-run and back-propagated inside another backward pass "
                "(reentrant activation checkpointing). Its per-sample norms would be clipped apart from the rest "
                "of the step. Use non-reentrant checkpointing: torch.utils.checkpoint.checkpoint(..., "
                "use_reentrant=False), or in transformers "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})."
            )
        st.backward_started = True
        task = torch._C._current_graph_task_id()
        if self._callback_queued and task != self._callback_task:
            self._drop_failed_backward()
        if not self._callback_queued:
            self._callback_queued = True
            self._callback_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            if self.on_begin is not None:
                self.on_begin()
        if st not in self._pending:
            self._pending.append(st)
        rule = use.unit.rule
        if not rule.in_function:
            rule.per_sample_all(use, self.bypass)
        complete = st.add(use)
        if self.on_wait is not None and len(complete) < len(use.plan.groups):
            # this use must wait: reduce it now to its norms, so only (input, output grad) stay alive
            calls = st.param_uses
            single = tuple([n for n, i in zip(use.names, use.plan.param_ids, strict=True) if calls[i] == 1])
            self.on_wait(use, single)
        for g in complete:
            self._finish(st, g)

    def _finish(self, st: StepState, g: int) -> None:
        uses = st.arrived[g]
        st.done.add(g)
        st.arrived[g] = []
        self.on_group(g, uses)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        clear_step_memos()
        pending, self._pending = self._pending, []
        for st in pending:
            for g in st.pending():
                self._finish(st, g)
            if self.state is st:
                self.state = None
        if self.on_end is not None:
            self.on_end()

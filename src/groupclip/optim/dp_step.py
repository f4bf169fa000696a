"""The DP step on any torch optimizer: noise once per logical batch, then the optimizer's own step.

The optimizer instance's `step` and `zero_grad` are wrapped (not subclassed), so user code keeps calling
`optimizer.step()`; `detach()` restores them. With physical micro-batches, `step` is a no-op until the last
micro-batch of a logical batch, and `zero_grad` is a no-op while a logical batch is being accumulated (after a
skipped `step`), so gradients accumulate and noise is added exactly once, whether the loop calls `zero_grad`
before `backward` or after `step`.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable

import torch

from groupclip.noise import GaussianNoise

log = logging.getLogger(__name__)


class DPStep:
    def __init__(self, optimizer: torch.optim.Optimizer, noise: GaussianNoise,
                 check: Callable[[], None], after_step: Callable[[], None],
                 must_clear: Callable[[], bool] = lambda: False) -> None:
        self.optimizer = optimizer
        self.noise = noise
        self.check = check
        self.after_step = after_step
        self.must_clear = must_clear  # True: zero_grad clears p.grad even inside a logical batch
        self.skip_next = False  # set by the physical-batch loader for non-final micro-batches
        self.accumulating = False  # a step was skipped: the current logical batch's gradients are incomplete
        self._orig_step = None
        self._orig_zero_grad = None

    def params(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield p

    def install(self) -> None:
        opt = self.optimizer
        previous = opt.__dict__.get("step")
        if getattr(previous, "_groupclip", False):
            raise RuntimeError("this optimizer's step is already wrapped by a PrivacyEngine; detach it first")
        # a learning-rate scheduler may already have wrapped step (it marks it _wrapped_by_lr_sched): keep it
        self._previous = {k: opt.__dict__[k] for k in ("step", "zero_grad") if k in opt.__dict__}
        self._orig_step = opt.step
        self._orig_zero_grad = opt.zero_grad
        dp = self

        # plain functions bound to the optimizer, so that a scheduler created later can re-wrap and re-bind them
        def step(_opt, closure=None):
            return dp.step(closure)

        def zero_grad(_opt, set_to_none: bool = True):
            return dp.zero_grad(set_to_none)

        step._groupclip = True
        opt.step = types.MethodType(step, opt)
        opt.zero_grad = types.MethodType(zero_grad, opt)

    def remove(self) -> None:
        for k in ("step", "zero_grad"):
            self.optimizer.__dict__.pop(k, None)
        self.optimizer.__dict__.update(self._previous)

    def step(self, closure=None):
        if self.skip_next:
            self.accumulating = True
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.check()
        self.noise.add_to(self.params())
        self._orig_step()
        self.accumulating = False
        self.after_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.must_clear():  # a failed backward left part of a gradient: drop this logical batch's sum
            self.accumulating = False
        if self.accumulating:  # keep the earlier micro-batches of this logical batch
            return None
        return self._orig_zero_grad(set_to_none=set_to_none)

"""The DP step on any torch optimizer: noise once per logical batch, then the optimizer's own step.

The optimizer instance's `step` and `zero_grad` are wrapped (not subclassed), so user code keeps calling
`optimizer.step()`; `detach()` restores them. With physical micro-batches, both are no-ops until the last
micro-batch of a logical batch, so gradients accumulate and noise is added exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from groupclip.noise import GaussianNoise

log = logging.getLogger(__name__)


class DPStep:
    def __init__(self, optimizer: torch.optim.Optimizer, noise: GaussianNoise,
                 check: Callable[[], None], after_step: Callable[[], None]) -> None:
        self.optimizer = optimizer
        self.noise = noise
        self.check = check
        self.after_step = after_step
        self.skip_next = False  # set by the physical-batch loader for non-final micro-batches
        self._orig_step = None
        self._orig_zero_grad = None

    def params(self):
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield p

    def install(self) -> None:
        if "step" in self.optimizer.__dict__:
            raise RuntimeError("this optimizer's step is already wrapped (another PrivacyEngine?); detach it first")
        self._orig_step = self.optimizer.step
        self._orig_zero_grad = self.optimizer.zero_grad
        self.optimizer.step = self.step
        self.optimizer.zero_grad = self.zero_grad

    def remove(self) -> None:
        self.optimizer.__dict__.pop("step", None)
        self.optimizer.__dict__.pop("zero_grad", None)

    def step(self, closure=None):
        if self.skip_next:
            return None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.check()
        self.noise.add_to(self.params())
        self._orig_step()
        self.after_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.skip_next:
            return None
        return self._orig_zero_grad(set_to_none=set_to_none)

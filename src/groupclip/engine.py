"""PrivacyEngine: the one class users need. It wires units (capture/), layer rules (rules/), clipping
groups (clipping.py), noise (noise.py), the DP optimizer step (optim/) and the accountant together."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from groupclip import accounting, tails
from groupclip.capture.hub import CaptureHub
from groupclip.capture.units import build_units, check_reachable, report_generic
from groupclip.clipping import Clipper, build_groups
from groupclip.noise import GaussianNoise
from groupclip.optim.dp_step import DPStep
from groupclip.rules import EngineError

log = logging.getLogger(__name__)


class PrivacyEngine:
    """Make `loss.backward(); optimizer.step()` differentially private, with one backward pass.

    After `backward()`, p.grad = (1/batch_size) Σ_i φ_k(‖g_i^k‖) g_i^k; `optimizer.step()` adds
    N(0, σ²C²)/batch_size per coordinate and then runs the wrapped optimizer.

    Args:
        model, optimizer: any nn.Module and any torch optimizer built from the model's parameters.
        batch_size: expected logical batch size B; divisor of the clipped sum; q = B / sample_size.
        sample_size: number of records N in the training set.
        epochs / steps: training length (one of them; needed with target_epsilon). An epoch is one pass of
            `data_loader()`, i.e. round(1/q) logical batches.
        target_epsilon / noise_multiplier: exactly one. A target ε calibrates σ with the accountant.
        target_delta: δ; default min(1e-5, 1/(10·N)). A δ ≥ 1/N warns.
        max_grad_norm: total sensitivity C; group k gets C_k = C/sqrt(K) unless `thresholds` are given.
        clipping: "automatic" (C/(‖g‖+γ)), "autov" (C/‖g‖), "abadi" (min(1, C/‖g‖)), "psac".
        groups: "all-layer", "layer-wise", "param-wise", or a list of lists of parameter names.
        thresholds: explicit per-group C_k (the noise then follows sqrt(Σ C_k²)).
        gamma, psac_r: constants of automatic and PSAC clipping (0.01).
        loss_reduction: "mean" (loss averaged over the samples of a batch) or "sum".
        accountant: "pld" (default) or "rdp", for calibration and `epsilon()`.
        seed: seed of the noise (and, by default, of the Poisson sampler); secure_mode draws it from the OS.
        max_physical_batch_size: split each logical batch of `data_loader()` into micro-batches.
        tail_graphs: replay the clip work of Linear / Conv1D / LayerNorm layers (layer-wise: each layer's norm,
            coefficient and clipped sums; all-layer: each layer's norm, then the group's coefficient and sums) from
            CUDA graphs when the tensors it reads sit where they sat before (`groupclip.tails`): for eager loops
            bound by the host CPU. "auto" times a few steps with and without them and keeps them only
            where the loop runs faster (`groupclip.tail_trial`; the decision is logged); True / False force.
            Default: the `GROUPCLIP_TAIL_GRAPHS` environment variable (1, 0 or auto), else "auto".
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        batch_size: int,
        sample_size: int,
        epochs: float | None = None,
        steps: int | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        clipping: str = "automatic",
        groups: str | Sequence[Sequence[str]] = "all-layer",
        thresholds: Sequence[float] | None = None,
        gamma: float = 0.01,
        psac_r: float = 0.01,
        loss_reduction: str = "mean",
        accountant: str = "pld",
        seed: int | None = None,
        secure_mode: bool = False,
        max_physical_batch_size: int | None = None,
        tail_graphs: bool | str | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(sample_size, int) or sample_size < 1:
            raise ValueError(f"sample_size must be a positive int, got {sample_size!r}")
        if batch_size > sample_size:
            raise ValueError(f"batch_size ({batch_size}) exceeds sample_size ({sample_size}): q would be > 1")
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon and noise_multiplier")
        if epochs is not None and steps is not None:
            raise ValueError("give epochs or steps, not both")
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise ValueError("max_physical_batch_size must be >= 1")
        self.model, self.optimizer = model, optimizer
        self.batch_size, self.sample_size = batch_size, sample_size
        self.sample_rate = batch_size / sample_size
        self.max_physical_batch_size = max_physical_batch_size
        if accountant not in accounting.METHODS:
            raise ValueError(f"unknown accountant {accountant!r}; use one of {', '.join(accounting.METHODS)}")
        self.accountant_method = accountant
        if steps is None and epochs is not None:
            if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not 0 < epochs < math.inf:
                raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")
            # One epoch is as many logical batches as one pass of engine.data_loader: round(1/q) of them, so
            # a loop over `epochs` passes of the loader takes exactly the steps the noise is calibrated for.
            steps = accounting.steps_for_epochs(epochs, self.sample_rate)
        if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        self.planned_steps = None if steps is None else int(steps)
        self.delta = accounting.default_delta(sample_size) if target_delta is None else float(target_delta)
        if not 0 < self.delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {self.delta}")
        if self.delta >= 1 / sample_size:
            warnings.warn(f"target_delta={self.delta} is not below 1/N = {1 / sample_size:.3g}: the guarantee "
                          "allows leaking a whole record with probability δ; use δ < 1/N", stacklevel=2)
        if target_epsilon is not None:
            if steps is None:
                raise ValueError("target_epsilon needs the training length: give epochs= or steps=")
            if not 0 < target_epsilon < math.inf:
                raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
            try:
                noise_multiplier = accounting.noise_multiplier(
                    epsilon=target_epsilon, delta=self.delta, sample_rate=self.sample_rate, steps=int(steps),
                    method=accountant)
            except ValueError as e:
                raise ValueError(f"target_epsilon={target_epsilon:g} cannot be calibrated: {e}") from None
        if not 0 <= noise_multiplier < math.inf:
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier=0: gradients are clipped but no noise is added; this run is not "
                          "private (no differential privacy guarantee)", stacklevel=2)
        self.noise_multiplier = float(noise_multiplier)
        self.target_epsilon = target_epsilon

        self._check_optimizer()
        self.units = build_units(model)
        check_reachable(model, self.units)
        report_generic(self.units, log)
        self.groups = build_groups(model, groups, max_grad_norm, thresholds)
        self.max_grad_norm = self.groups.sensitivity
        self.clipper = Clipper(self.groups, clipping, batch_size, loss_reduction, gamma, psac_r,
                               tails.mode(tail_graphs))
        self.noise = GaussianNoise(self.noise_multiplier, self.max_grad_norm, batch_size, seed, secure_mode)
        self.accountant = accounting.PrivacyAccountant()
        self.hub = CaptureHub(model, self.units, self.groups.index(), self.clipper, self.clipper.reduce_waiting,
                              self.clipper.end_of_backward, self.clipper.begin_of_backward,
                              self.clipper.graphed_input_grad)
        self._named_params = list(self.model.named_parameters())  # walked once: the step check runs every step
        self.dp_step = DPStep(optimizer, self.noise, self._check_step, self._after_step,
                              self.hub.clear_failed_partially)
        self._loaders: list = []
        self._sampling_generator: torch.Generator | None = None
        self._pending_loader_states: list[dict] = []  # loader states loaded before their loader was created
        self._step_due: int | None = None  # engine.steps expected before the next chunk (a logical batch ended)
        self.hub.install()
        self.dp_step.install()
        self._attached = True
        log.info("groupclip: σ=%.4g, C=%.4g, q=%.4g, δ=%.3g, %d groups, clipping=%s, %d units",
                 self.noise_multiplier, self.max_grad_norm, self.sample_rate, self.delta,
                 len(self.groups.names), clipping, len(self.units))

    # ------------------------------------------------------------------ checks
    def _check_optimizer(self) -> None:
        model_params = {id(p) for p in self.model.parameters()}
        for gi, group in enumerate(self.optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) not in model_params:
                    raise EngineError(
                        f"optimizer param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) is not a "
                        "parameter of the model: groupclip cannot clip it. Build the optimizer from "
                        "model.parameters()."
                    )

    def _check_step(self) -> None:
        if self.hub.failed_partially():
            raise EngineError(
                "a backward pass failed (e.g. out of memory) after part of its clipped gradient was written into "
                "p.grad: running that batch again would count its samples twice. Call optimizer.zero_grad() (it "
                "clears this state; the current logical batch is dropped), then run the batch again."
            )
        index = self.hub.group_of
        for n, p in self._named_params:
            if p.requires_grad and id(p) not in index:
                raise EngineError(
                    f"parameter '{n}' was made trainable after the PrivacyEngine was created and belongs to "
                    "no clipping group; set requires_grad before creating the engine."
                )

    def _after_step(self) -> None:
        self.accountant.step(self.noise_multiplier, self.sample_rate)

    # ------------------------------------------------------------------ public API
    @property
    def steps(self) -> int:
        return self.accountant.steps

    def epsilon(self, delta: float | None = None, method: str | None = None) -> float:
        """ε spent by the steps taken so far, at `delta` (default: the engine's δ)."""
        if self.noise_multiplier == 0:
            return math.inf if self.steps else 0.0
        return self.accountant.epsilon(self.delta if delta is None else delta,
                                       method=method or self.accountant_method)

    def graphed_backward(self, loss_fn, *example, warmup: int = 3):
        """Capture forward + clipped backward of `loss_fn(*example)` as a CUDA graph; returns `step` with
        `loss = step(*batch)` doing what `loss = loss_fn(*batch); loss.backward()` does, without the host time
        of launching each layer's kernels. `optimizer.zero_grad()` and `optimizer.step()` stay as they are.

        `example` is a batch of the largest size to replay (the capacity); smaller batches, e.g. Poisson
        batches, replay too: the rows they leave free are filled and get clip coefficient 0. Put autocast
        inside `loss_fn`. See `groupclip.graphs.GraphedBackward` for what is captured.
        """
        from groupclip.graphs import GraphedBackward

        self._check_attached()
        return GraphedBackward(loss_fn, example, [p for _, p in self._named_params], [self.model],
                               warmup=warmup, guard=self._check_attached, sample_mask=self._set_sample_mask)

    def _set_sample_mask(self, mask) -> None:
        self.clipper.sample_mask = mask

    def _check_attached(self) -> None:
        if not self._attached:
            raise EngineError("this PrivacyEngine was detached: its graphed steps no longer clip; make them again "
                              "from a new engine")

    def data_loader(self, dataset, generator: torch.Generator | None = None, **kwargs):
        """A Poisson-sampled loader (rate q = batch_size / sample_size), split into physical batches of at
        most `max_physical_batch_size` with exactly one optimizer step per logical batch.

        Every logical batch, even an empty one (its tensors have leading dimension 0), needs exactly one
        `optimizer.step()`: for an empty batch either skip forward/backward (keep zero_grad and step) or run
        them on the 0-sized batch; the step then adds noise only. A logical batch that ends without a step
        raises EngineError when the next batch is drawn, since the accountant counts one step per batch.
        """
        from groupclip.data import PoissonDataLoader

        if len(dataset) != self.sample_size:
            raise ValueError(f"dataset has {len(dataset)} samples but the engine was built with "
                             f"sample_size={self.sample_size}; the sampling rate would be wrong")
        if generator is None:
            # one sampling generator per engine: every loader it makes continues the same random stream, so
            # calling data_loader() again (e.g. once per epoch) never repeats the batches
            if self._sampling_generator is None:
                self._sampling_generator = torch.Generator().manual_seed(self.noise.seed ^ 0x5EED)
            generator = self._sampling_generator
        loader = PoissonDataLoader(dataset, self.sample_rate, generator=generator,
                                   max_physical_batch_size=self.max_physical_batch_size,
                                   on_chunk=self._on_chunk, **kwargs)
        if self._pending_loader_states:  # load_state_dict ran before this loader was created
            loader.load_state_dict(self._pending_loader_states.pop(0))
        self._loaders.append(loader)
        return loader

    def _on_chunk(self, is_last: bool, logical_batch_size: int) -> None:
        if self._step_due is not None and self.steps < self._step_due:
            self._step_due = None
            raise EngineError(
                "the previous logical batch ended without optimizer.step(). Call optimizer.step() once for "
                "every batch of engine.data_loader, also for an empty one (skip forward/backward if you like, "
                "the step then adds noise only): the accountant counts one step per batch, and skipping the "
                "step of an empty batch would reveal that it was empty."
            )
        self.dp_step.skip_next = not is_last
        self._step_due = self.steps + 1 if is_last else None

    def state_dict(self) -> dict:
        """Steps taken (accountant history), noise and sampler generator states, σ and thresholds.

        Save it together with the model's and optimizer's state_dict between logical batches; the loaders
        are those made by `data_loader`, in order of creation.
        """
        return {
            "accountant": self.accountant.state_dict(),
            "noise": self.noise.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "thresholds": list(self.groups.thresholds),
            "loaders": [ld.state_dict() for ld in self._loaders],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`. Loaders made by `data_loader` before or after this call resume too."""
        thresholds = [float(c) for c in state["thresholds"]]
        if len(thresholds) != len(self.groups.thresholds):
            raise ValueError(f"the saved state has {len(thresholds)} clipping thresholds but this engine has "
                             f"{len(self.groups.thresholds)} groups: build the engine with the same groups")
        self.accountant.load_state_dict(state["accountant"])
        self.noise.load_state_dict(state["noise"])
        self.noise_multiplier = float(state["noise_multiplier"])
        self.noise.noise_multiplier = self.noise_multiplier
        self.groups.thresholds = thresholds
        # the noise follows the sensitivity sqrt(Σ C_k²) of the loaded thresholds
        self.max_grad_norm = self.noise.sensitivity = self.groups.sensitivity
        loader_states = list(state.get("loaders", []))
        for ld, s in zip(self._loaders, loader_states, strict=False):
            ld.load_state_dict(s)
        self._pending_loader_states = loader_states[len(self._loaders):]
        self._step_due = None
        self.dp_step.skip_next = self.dp_step.accumulating = False

    def detach(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Return model and optimizer to plain PyTorch."""
        if self._attached:
            self.hub.remove()
            self.dp_step.remove()
            self._attached = False
        return self.model, self.optimizer

"""Replay a step's forward and clipped backward as one CUDA graph.

The clip path runs a few small kernels per layer, launched from Python. On a fast GPU with little work per layer
the host then sets the pace (ViT-base under bf16 autocast on an H100 spends more host time launching a step
than the GPU spends running it). Capturing forward + backward once and replaying it removes that host time:
every replay runs exactly the captured kernels, the same per-sample norms, clip coefficients and clipped sums,
on new data copied into the captured input tensors.

Noise and the optimizer step stay outside the graph (call `optimizer.step()` as usual), so the accountant, the
noise generator, learning-rate schedulers and gradient accumulation over micro-batches behave as without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_unflatten

from groupclip import trees
from groupclip.rules import EngineError

log = logging.getLogger(__name__)

__all__ = ["GraphedBackward"]

_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def _warmup_stream() -> torch.cuda.Stream:
    """One side stream per device for every capture's warm-up runs (as `torch.cuda.graph` keeps one capture
    stream): PyTorch keeps a cuBLAS workspace for each stream it multiplies on until the process ends, so a new
    stream per capture left about 64 MiB allocated for good per graphed step made (measured on an H100)."""
    dev = torch.cuda.current_device()
    stream = _WARMUP_STREAMS.get(dev)
    if stream is None:
        stream = _WARMUP_STREAMS[dev] = torch.cuda.Stream(dev)
    return stream


class GraphedBackward:
    """`loss = step(*batch)`: forward + backward of `loss_fn(*batch)` replayed from a CUDA graph.

    Made by `PrivacyEngine.graphed_backward(loss_fn, *example)`. Gradients accumulate into p.grad exactly as
    `loss_fn(*batch).backward()` would (clipped per sample when an engine is attached); `optimizer.zero_grad()`
    and `optimizer.step()` are called as usual around it.

    Captured once, at construction, from `example` (warm-up runs on it compute gradients that are discarded;
    the example's values are never used after that): the batch's shapes and dtypes, every non-tensor argument,
    the modules' train/eval modes, autocast (put it inside `loss_fn`) and the Python control flow of the
    forward. Dropout and other random ops draw fresh values on every replay. A call after a module's train/eval
    mode changed is refused: make a new graphed step.

    Smaller batches replay too, when a `sample_mask` setter is given (the engine gives its clipper's): the
    example's batch size P (the largest leading size among its tensors) is the capacity. A batch of b < P
    samples (every tensor of leading size P at capture has leading size b) is copied into the first b rows,
    the other rows are filled with copies of its first sample, and their clip coefficient is exactly 0: p.grad
    is what the b real samples give (per-sample gradients of a mean-reduced loss are rescaled by the batch
    size the layers see, here P). So Poisson batches of any size up to P replay; the loss returned for such
    a call is the loss of the filled batch. Anything else that differs (other shapes, dtypes, devices,
    non-tensor arguments, an empty batch, more than P samples) runs eagerly instead: same result, no speed-up,
    logged once.

    Where no CUDA graph can be used (parameters or inputs not all on one CUDA device) the same object runs
    every call eagerly.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], example: Sequence[Any],
                 params: Iterable[nn.Parameter], modules: Sequence[nn.Module] = (), *, warmup: int = 3,
                 guard: Callable[[], None] | None = None, use_graph: bool | None = None,
                 sample_mask: Callable[[torch.Tensor | None], None] | None = None) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (kernels compile and libraries initialise there), got {warmup}")
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise EngineError("graphed_backward: no trainable parameters to capture gradients for")
        self.modules = list(modules)
        self.guard = guard
        self.eager_calls = 0  # calls that could not replay the graph (different shapes or arguments)
        self._warned = False
        leaves, self._spec = trees.flatten(tuple(example))
        self._slots = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        self._consts = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        self._meta = [(leaves[i].shape, leaves[i].dtype, leaves[i].device) for i in self._slots]
        sizes = [m[0][0] for m in self._meta if len(m[0])]
        self.capacity = max(sizes) if sizes else 0
        self._set_mask = sample_mask
        # positions (in self._slots) of the batched tensors: those a smaller batch may fill partly
        self._batched = set() if sample_mask is None or not self.capacity else {
            j for j, m in enumerate(self._meta) if len(m[0]) and m[0][0] == self.capacity}
        self._modes = self._module_modes()
        self._autocast = _autocast_state()
        devices = {p.device for p in self.params} | {m[2] for m in self._meta}
        graphable = len(devices) == 1 and next(iter(devices)).type == "cuda"
        if use_graph is None:
            use_graph = graphable
        elif use_graph and not graphable:
            raise EngineError(f"graphed_backward: a CUDA graph needs every trainable parameter and input tensor on "
                              f"one CUDA device; found {sorted(str(d) for d in devices)}")
        self.use_graph = use_graph
        if not use_graph:
            log.info("graphed_backward: no CUDA graph (devices %s): every call runs eagerly",
                     sorted(str(d) for d in devices))
        # the captured inputs: replays read them, calls copy the batch into them
        self._static = [leaves[i].detach().clone() for i in self._slots]
        self._grads = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self._mask = None if not self._batched else torch.ones(
            self.capacity, dtype=torch.float32, device=self._meta[min(self._batched)][2])
        self._valid = self.capacity  # real samples in the captured inputs (rows of self._mask that are 1)
        self._graph = None
        self._loss: torch.Tensor | None = None
        self._capture(warmup)

    # ---------------------------------------------------------------- capture
    def _args(self, tensors: Sequence[torch.Tensor]) -> tuple:
        leaves = list(self._consts)
        for i, t in zip(self._slots, tensors, strict=True):
            leaves[i] = t
        return tree_unflatten(leaves, self._spec)

    def _forward_backward(self, args: tuple) -> torch.Tensor:
        loss = self.loss_fn(*args)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise EngineError("graphed_backward: loss_fn must return a scalar tensor (the batch's loss), got "
                              f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
        loss.backward()
        return loss.detach()

    def _masked(self, fn: Callable[[], Any]) -> Any:
        """Run fn with the clipper reading the sample mask (capture, warm-up, a call without a graph)."""
        if self._mask is None:
            return fn()
        self._set_mask(self._mask)
        try:
            return fn()
        finally:
            self._set_mask(None)

    def _capture(self, warmup: int) -> None:
        if self.use_graph:
            self._masked(lambda: self._record(warmup))

    def _record(self, warmup: int) -> None:
        saved = [p.grad for p in self.params]
        args = self._args(self._static)
        try:
            side = _warmup_stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):  # compiles kernels, creates library handles; the gradients are discarded
                    for p in self.params:
                        p.grad = None
                    self._forward_backward(args)
            torch.cuda.current_stream().wait_stream(side)
            for p, g in zip(self.params, self._grads, strict=True):
                p.grad = g
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    loss = self._forward_backward(args)
            except RuntimeError as e:  # CUDA errors (torch.AcceleratorError) included
                raise EngineError(
                    "graphed_backward: this forward/backward cannot be captured as a CUDA graph (it synchronises "
                    f"with the host, copies from unpinned CPU memory or otherwise leaves the GPU stream: {e}). "
                    "Remove the host round trip from the forward, or train with the eager loop (loss.backward()); "
                    "a failed capture can leave this process's CUDA random number state unusable, so restart it."
                ) from e
            replaced = [i for i, (p, g) in enumerate(zip(self.params, self._grads, strict=True)) if p.grad is not g]
            if replaced:
                raise EngineError(
                    f"graphed_backward: {len(replaced)} parameter(s) (first of shape "
                    f"{tuple(self.params[replaced[0]].shape)}) got a new gradient tensor during capture instead of "
                    "accumulating into the existing one, so replays could not update it; run this model eagerly"
                )
            self._graph, self._loss = graph, loss
        finally:
            for p, g in zip(self.params, saved, strict=True):
                p.grad = g

    # ---------------------------------------------------------------- calls
    def __call__(self, *args: Any) -> torch.Tensor:
        if self.guard is not None:
            self.guard()
        if not torch.is_grad_enabled():
            raise EngineError("graphed_backward: called with gradients disabled (inside torch.no_grad())")
        if self._module_modes() != self._modes:
            raise EngineError("graphed_backward: a module's train/eval mode changed since capture; the graph "
                              "replays the captured mode. Set the modes back, or make a new graphed step.")
        if _autocast_state() != self._autocast:
            raise EngineError("graphed_backward: autocast differs from capture time; put the autocast context "
                              "inside loss_fn so the graph captures it")
        leaves, spec = trees.flatten(tuple(args))
        reason, b = self._plan(leaves, spec)
        if reason is not None:
            return self._eager(args, reason)
        self._attach_grads()
        for j, (dst, i) in enumerate(zip(self._static, self._slots, strict=True)):
            v = leaves[i]
            if j in self._batched and b < self.capacity:
                dst[:b].copy_(v, non_blocking=True)
                dst[b:].copy_(v[:1].expand(self.capacity - b, *v.shape[1:]), non_blocking=True)
            else:
                dst.copy_(v, non_blocking=True)
        if b != self._valid:
            self._mask[:b].fill_(1.0)
            self._mask[b:].fill_(0.0)
            self._valid = b
        if self._graph is None:  # no CUDA graph: the same steps, run eagerly on the captured inputs
            return self._masked(lambda: self._forward_backward(self._args(self._static))).clone()
        self._graph.replay()
        return self._loss.clone()

    def _attach_grads(self) -> None:
        """Point every p.grad at the buffer the graph accumulates into, keeping what it holds."""
        fresh = []
        for p, g in zip(self.params, self._grads, strict=True):
            cur = p.grad
            if cur is g:
                continue
            if cur is None:
                fresh.append(g)
            else:  # a gradient accumulated elsewhere (an eager call, user code): carry it over
                g.copy_(cur)
            p.grad = g
        if fresh:
            torch._foreach_zero_(fresh)

    def _plan(self, leaves: list, spec) -> tuple[str | None, int]:
        """(why this call cannot replay, or None; the number of real samples)."""
        if spec != self._spec:
            return "the arguments are structured differently", 0
        for i, v in enumerate(leaves):
            const = self._consts[i]
            if isinstance(v, torch.Tensor) != (const is None):
                return f"argument leaf {i} changed between tensor and non-tensor", 0
            if const is not None and not _same(v, const):
                return f"non-tensor argument leaf {i} is {v!r}, captured with {const!r}", 0
        b = None
        for j, ((shape, dtype, device), i) in enumerate(zip(self._meta, self._slots, strict=True)):
            v = leaves[i]
            ok = v.dtype == dtype and v.device == device
            if j in self._batched:  # any leading size, the same for all batched tensors
                ok = ok and v.dim() == len(shape) and v.shape[1:] == shape[1:] and b in (None, v.shape[0])
                b = v.shape[0] if ok else b
            else:
                ok = ok and v.shape == shape
            if not ok:
                return (f"tensor argument {i} is {tuple(v.shape)} {v.dtype} on {v.device}, captured as "
                        f"{tuple(shape)} {dtype} on {device}"), 0
        b = self.capacity if b is None else b
        if not 0 < b <= self.capacity:
            return f"the batch has {b} samples, the captured step {self.capacity}", 0
        return None, b

    def _eager(self, args: tuple, reason: str) -> torch.Tensor:
        self.eager_calls += 1
        if not self._warned:
            self._warned = True
            log.warning("graphed_backward: %s, so this call runs eagerly (same result, no graph speed-up). Batches "
                        "of the captured shape replay the graph; this is logged once.", reason)
        return self._forward_backward(args)

    def _module_modes(self) -> tuple[bool, ...]:
        return tuple(m.training for root in self.modules for m in root.modules())


def _autocast_state() -> tuple:
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu"))


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # objects without a plain equality: require the same object
        return a is b

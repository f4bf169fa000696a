"""CUDA graphs of the clip tails: a layer-wise group's norm, coefficient and clipped sums in one host call; under
all-layer clipping each waiting layer's norm, then the group's coefficient and clipped sums.

For eager training loops that are bound by the host CPU (many small layers on a fast GPU, e.g. ViT-base under bf16
autocast on an H100), where `engine.graphed_backward` cannot be used. `PrivacyEngine(tail_graphs=...)` or
`GROUPCLIP_TAIL_GRAPHS`: "auto" (the default) times a few steps with and without them and keeps them only where
they make the loop faster (`groupclip.tail_trial`); on (1) or off (0) forces.

Layers: Linear (and transformers' Conv1D) and LayerNorm. The clip tail of a Linear layer launches about six kernels
from Python; on an H100's host that took 410 µs for 560 µs of GPU work (ViT-base fc1, bf16; `benchmarks/NOTES.md`).
In a steady training loop the caching allocator hands every layer the same blocks step after step, so its saved
input and output gradient usually sit at the same addresses as in the step before. When a layer's tail sees the very
same key again (addresses, shapes, strides and dtypes of every tensor the tail reads: a Linear layer's saved input
and output gradient, LayerNorm's per-sample gradients from its fused backward; the batch size, the parameters'
dtypes, the group's threshold and every clipping setting, the TF32 switch, whether the Triton kernels are on), the
tail is captured as a CUDA graph; from then on, whenever the key matches again, the graph is replayed (~5 µs) and
its results, which the graph gathers into one flat buffer, are lent: p.grad of the layer's parameters become views
of that buffer, which a later replay writes only once nothing holds them any more (`_Results`). A replay reads
whatever the tensors at those addresses hold now, which the key proves to be this step's input and output gradient
of this layer; anything else runs eagerly, as without this module. The results are the same kernels' results on the
same inputs (q, k and v recompute their input's Gram instead of sharing it: equal up to float32 rounding).

What a captured tail must not read: values cached outside it. It runs with the tensor memos off, the per-use cache
as backward left it before the tail, and without the Gram tiles that q, k and v otherwise share (each computes its
own; the reader still counts as arrived). A layer's graphs keep one result buffer between them (the size of its
parameters, float32), made outside the graphs' memory pool, for as long as they live; all graphs share that pool for
their intermediates.

LayerNorm's backward itself (its input gradient and per-sample gradients: one fused kernel, ~250 µs of host time a
call on an H100 for its Python and Triton launch) is a graph of its own where its key comes back (`input_grad`): the
input gradient goes into one buffer all LayerNorms of that shape share, in turn.

A group with several uses (all-layer clipping) waits for its last use: each waiting Linear / LayerNorm use's squared
norm is a graph of its own (`key` with the "norm2" setting; its buffers, with the per-sample bias gradients the sums
read, are used in place: they are read later in the same backward pass, before that graph's next replay), and at
the end the coefficient and the clipped sums of every such parameter are one graph (`group_key`: the norms, and per
parameter the tensors its sum reads). Parameters with several uses and other rules are summed eagerly with the
coefficient the graph returns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from groupclip import kernels
from groupclip.graphs import _warmup_stream
from groupclip.rules.base import memos_off

if TYPE_CHECKING:
    from groupclip.capture.context import Use

log = logging.getLogger(__name__)

#: graphs kept per (layer, group): a loop that moves each batch to the GPU while the previous one is still referenced
#: alternates between two sets of addresses, step after step
GRAPHS_PER_SLOT = 2
#: keys remembered per (layer, group) from eager runs (a key is captured when it comes back)
SEEN_PER_SLOT = 4
#: captures per (layer, group) before giving up on it (its addresses keep changing)
MAX_CAPTURES = 8
#: input-gradient buffers of graphed LayerNorm backwards kept ready, by shape (`TailGraphs.input_grad`); a buffer a
#: graph writes lives as long as that graph
SHARED_OUTS = 2


MODES = ("auto", "on", "off")
GRAPH_DEVICE = "cuda"  # (tests of the group key's bookkeeping set "cpu")


def mode(arg: bool | str | None = None) -> str:
    """"auto", "on" or "off" from the engine's argument, or where it is None from `GROUPCLIP_TAIL_GRAPHS`."""
    if isinstance(arg, bool):
        return "on" if arg else "off"
    source = "tail_graphs"
    if arg is None:
        arg, source = os.environ.get("GROUPCLIP_TAIL_GRAPHS", "auto"), "GROUPCLIP_TAIL_GRAPHS"
    v = str(arg).strip().lower()
    if v in ("1", "on", "true", "yes"):
        return "on"
    if v in ("0", "off", "false", "no"):
        return "off"
    if v in ("auto", ""):
        return "auto"
    raise ValueError(f"{source}={arg!r}: use True / 1 (on), False / 0 (off) or 'auto'")


class _Slot:
    __slots__ = ("seen", "graphs", "captures")

    def __init__(self) -> None:
        self.seen: list[tuple] = []  # keys of recent eager runs, newest first
        # (key, graph, its result buffers, what else it writes (or None)), most recently used first
        self.graphs: list[tuple[tuple, torch.cuda.CUDAGraph, _Results, _Results | None]] = []
        self.captures = 0


class TailGraphs:
    """The captured tails of one engine, by (call plan, group)."""

    def __init__(self, active: bool = True) -> None:
        self.active = active  # whether the clipper uses them now (`groupclip.tail_trial` switches it in "auto")
        self._slots: dict[tuple, _Slot] = {}
        self._pool = None  # the memory pool all graphs share
        self._outs: dict[tuple, _Results] = {}  # (shape, dtype, device) -> input-gradient buffer (`input_grad`)
        self._told_input_held = False  # (its own note: `held` also counts lent tail results still held)
        self._broken = False
        self.replays = 0  # counters, for tests and benchmarks
        self.captures = 0
        self.held = 0  # replays skipped (run eagerly) because lent results were still held

    @staticmethod
    def key(use: Use, names: tuple[str, ...], settings: tuple) -> tuple | None:
        """Everything the tail of `use` reads, or None where its tail is not graphed."""
        read = _read_by_tail(use, names)
        if read is None:
            return None
        g = use.grad_out
        if not isinstance(g, torch.Tensor) or g.device.type != GRAPH_DEVICE or capturing():
            return None  # not inside another capture (`engine.graphed_backward`)
        index = g.get_device()
        sig = _signature(read, index)
        if sig is None:
            return None
        params = use.unit.params
        return (index, sig, use.batch_size, tuple(use.cache), tuple([params[n].dtype for n in names]), settings,
                _tf32(), kernels.active(g))

    @staticmethod
    def group_key(entries: list[tuple[Use, str]], norms: list[tuple[torch.Tensor, bool]],
                  settings: tuple, norm_graphs: dict[int, tuple] | None = None) -> tuple[tuple | None, list[int]]:
        """The key of a group's sums phase (a group with several uses, e.g. all-layer clipping, at its end: the
        coefficient from the norms, then the clipped sums), and which of `entries` (each parameter's single use and
        name) the graph computes; the others are summed eagerly. (None, []) where no graph applies.

        `norm_graphs`: id(use) -> (token, saved input, output gradient, outputs) of a waiting Linear / Conv1D use
        whose norm a graph replayed or captured in this pass (`Clipper._graphed_norm`; token: that graph's key and
        its outputs' addresses). Where its sums read that very input and output gradient (the same tensors) and,
        besides them, only one of those outputs (the per-sample bias gradients), the token stands in for their
        signatures: the norm graph's key holds the input's and output gradient's addresses, shapes, strides and
        dtypes, and the outputs' layout follows from that key, so equal tokens mean equal signatures (a signature
        is ~4 host calls a tensor, ~150 tensors for ViT-base's group)."""
        if not norms or not isinstance(norms[0][0], torch.Tensor):
            return None, []
        if norms[0][0].device.type != GRAPH_DEVICE or capturing():
            return None, []
        index = norms[0][0].get_device()
        parts: list = [index]
        for t, squared in norms:
            sig = _signature((t,), index)
            if sig is None:
                return None, []
            parts += (sig, squared)
        taken = []
        by_use: dict[int, tuple | None] = {}  # a Linear use's signature: its names' sums read the same tensors
        for i, (u, n) in enumerate(entries):
            same = u.unit.rule.name in _ONE_READ_PER_USE
            sig = by_use.get(id(u), False) if same else False
            if sig is False:
                read = _read_by_sums(u, n)
                graphed = norm_graphs.get(id(u)) if same and norm_graphs else None
                if read is None:
                    sig = None
                elif graphed is not None and _read_by_norm_graph(read, graphed):
                    sig = graphed[0]
                else:
                    sig = _signature(read, index)
                if same:
                    by_use[id(u)] = sig
            if sig is None:
                continue
            parts += (id(u.plan), n, u.unit.params[n].dtype, u.batch_size, sig)
            taken.append(i)
        if not taken:
            return None, []
        parts += (settings, _tf32(), kernels.active(norms[0][0]))
        return tuple(parts), taken

    def input_grad(self, use: Use) -> torch.Tensor | None:
        """The input gradient of a use whose rule has a fused backward (`Rule.graphs_input_grad`: LayerNorm), written
        into a buffer that all such layers of that shape share, by a CUDA graph of that backward where its key comes
        back (everything the backward reads: the saved input, the weight and the output gradient, their addresses,
        shapes, strides and dtypes; eps; and where it writes), eagerly otherwise; its per-sample gradients cached as
        the eager backward caches them. None: the buffer cannot be used now, the caller runs the backward as
        without graphs.

        The input gradient is returned as a new view of the buffer. A model's LayerNorms take turns with it: each
        one's input gradient is consumed (added into the residual stream's gradient) before the next LayerNorm's
        backward runs; where something still holds the last one (the buffer's storage reference count), this
        backward does not write it. Writing the buffer in eager runs too keeps the caching allocator's pattern the
        same whether or not a layer's graph exists, so that one capture does not move the tensors every later layer
        in the backward pass reads (their keys would change and they would be captured again). The per-sample
        gradients are the graph's own buffers (so the layer's clip tail, which reads them, finds them where they were
        the step before): they are read before this layer's next replay, as the caller takes this path only for a
        use whose parameters have no other use in the step."""
        g = use.grad_out
        if not isinstance(g, torch.Tensor) or g.device.type != GRAPH_DEVICE or capturing():
            return None
        rule = use.unit.rule
        ops = rule.fused_operands(use)
        if ops is None or not kernels.layer_norm_fits(*ops[:3]):
            return None
        index = g.get_device()
        sig = _signature(ops[:3], index)
        out = self._out(use.saved[0]) if sig is not None else None
        if out is None:
            return None
        if not out.reclaim(()):
            if not self._told_input_held:
                self._told_input_held = True
                log.info("groupclip: the input gradient of a LayerNorm is still referenced when the next one's "
                         "backward runs; that backward runs as without tail graphs (slower, same results)")
            self.held += 1
            return None
        names, flat = use.names, out.flat
        key = ("input", index, sig, ops[3], flat.data_ptr(), use.batch_size, names)

        def tail() -> list[torch.Tensor]:
            rule.fused_input_grad(use, flat, ops)
            return [use.cache["ps_" + n] for n in names]

        ps = self.run(("input", use.plan), key, tail, (use,), own_gram=False, copy=False, keep=out)
        if ps is None:
            rule.fused_input_grad(use, flat, ops)
        else:
            cache = use.cache
            for n, v in zip(names, ps, strict=True):
                cache["ps_" + n] = v
        return out.views()[0]

    def _out(self, x: torch.Tensor) -> _Results | None:
        """The input-gradient buffer of x's shape, dtype and device (`input_grad`); None without the storage
        reference count (nothing could tell when it is free)."""
        if _USE_COUNT is None:
            return None
        k = (x.shape, x.dtype, x.device)
        out = self._outs.get(k)
        if out is None:
            out = self._outs[k] = _Results([x], lend=True)
            if len(self._outs) > SHARED_OUTS:  # (graphs that write an older one keep it)
                self._outs.pop(next(iter(self._outs)))
        return out

    def run(self, slot_id: tuple, key: tuple, tail: Callable[[], list[torch.Tensor]],
            uses: Sequence[Use], own_gram: bool = True, copy: bool = True,
            owners: Sequence[torch.nn.Parameter | None] | None = None,
            keep: _Results | None = None) -> list[torch.Tensor] | None:
        """The tail's results from a replay or a new capture, or None: the caller runs the tail eagerly. `uses`: the
        uses it reads (their caches are restored around a capture); `own_gram`: they are single-use tails whose
        shared q/k/v Gram tiles the graph does not touch (`_own_gram`). `copy=False`: the graph's own buffers are
        returned, valid until this slot's next replay (results consumed within the same backward pass).
        `owners`: the parameter whose p.grad each result becomes (None: a result not kept); the results are then
        lent (views of the graph's buffer, no copy, `_Results.reclaim`). `keep`: a buffer outside the pool the tail
        writes besides its results, kept as long as its graph (`input_grad`)."""
        if self._broken:
            return None
        slot = self._slots.get(slot_id)
        if slot is None:
            slot = self._slots[slot_id] = _Slot()
        graphs = slot.graphs
        for i, (gkey, graph, res, _) in enumerate(graphs):
            if gkey == key:
                if i:
                    graphs.insert(0, graphs.pop(i))
                lend = self._lend(res, copy, owners)
                if lend is None:
                    return None
                if own_gram:
                    _own_gram(uses)
                return self._replay(graph, res, copy, lend)
        seen = key in slot.seen
        if not seen or slot.captures >= MAX_CAPTURES:
            if not seen:
                slot.seen.insert(0, key)
                del slot.seen[SEEN_PER_SLOT:]
            return None
        return self._capture(slot, key, tail, uses, own_gram, copy, owners, keep)

    def _lend(self, res: _Results, copy: bool, owners: Sequence | None) -> bool | None:
        """Whether the next replay lends its results (False: they are copied out, or with copy=False used in place),
        or None where it may not rewrite the buffer of `res` now: something still holds results it lent."""
        if not copy or owners is None or res.lender is None:
            return False
        if res.reclaim(owners):
            return True
        if not self.held:
            log.info("groupclip: a clip-tail graph's results, lent as p.grad, are still referenced (e.g. a view of "
                     "p.grad kept from the step before): such tails run eagerly (slower, same results) until the "
                     "reference is dropped")
        self.held += 1
        return None

    def _replay(self, graph: torch.cuda.CUDAGraph, res: _Results, copy: bool = True,
                lend: bool = False) -> list[torch.Tensor]:
        """Run the graph on the current stream; its results lent (`_lend`, `_Results.reclaim`), copied (its buffers
        are rewritten next replay), or with copy=False the buffers themselves."""
        graph.replay()
        self.replays += 1
        return res.views() if lend or not copy else res.copies()

    def _capture(self, slot: _Slot, key: tuple, tail: Callable[[], list[torch.Tensor]], uses: Sequence[Use],
                 own_gram: bool, copy: bool, owners: Sequence | None = None,
                 keep: _Results | None = None) -> list[torch.Tensor] | None:
        slot.captures += 1
        del slot.graphs[GRAPHS_PER_SLOT - 1:]  # the least recently used goes first: its memory returns to the pool
        if own_gram:
            _own_gram(uses)
        before = [dict(u.cache) for u in uses]  # computed outside the tail (e.g. per-sample gradients), in the key
        current = torch.cuda.current_stream()
        side = _warmup_stream()
        graph = torch.cuda.CUDAGraph()
        capturing = False
        try:
            side.wait_stream(current)
            with torch.cuda.stream(side), memos_off():
                _reset(uses, before)
                # warm-up on the capture stream: libraries set up their per-stream state outside the capture
                place = _place(tail(), slot, current)
                _reset(uses, before)
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                capturing = True
                res = _results(tail(), slot, place)
                capturing = False
                graph.capture_end()
            current.wait_stream(side)
        except Exception as e:  # an operation that cannot be captured: every tail runs eagerly from now on
            if capturing:
                try:
                    graph.capture_end()
                except Exception:  # the capture was already invalidated
                    pass
            current.wait_stream(side)
            _reset(uses, before)
            self._broken = True
            log.warning("groupclip: capturing the clip tail of %s as a CUDA graph failed (%s: %s); clip tails "
                        "run eagerly from now on", ", ".join(u.unit.label() for u in uses[:3]) +
                        (", ..." if len(uses) > 3 else ""), type(e).__name__, e)
            return None
        _reset(uses, before)
        if self._pool is None:
            self._pool = graph.pool()
        slot.graphs.insert(0, (key, graph, res, keep))
        slot.seen.remove(key)
        self.captures += 1
        lend = self._lend(res, copy, owners)
        if lend is None:  # the buffer it shares with the slot's other graph is still held
            return None
        return self._replay(graph, res, copy, lend)


class _Results:
    """Where a graph leaves its results: one flat buffer holding them all (one copy out per replay instead of one
    per result), or, where they differ in dtype or device, the results themselves.

    A flat buffer made before its capture (`_place`) lives outside the graphs' memory pool, so no graph uses it as
    scratch memory: its results can be lent instead of copied, p.grad becoming views of the buffer itself (no copy,
    no second buffer) that later replays of other layers' graphs leave alone. Before the graph writes the buffer
    again, `reclaim` makes sure nothing still reads what it lent: in a loop that sets p.grad to None between steps
    (`zero_grad()`'s default) nothing does. A p.grad that is still there (`zero_grad(set_to_none=False)`,
    micro-batches adding up into it) gets its own copy first; any other holder (a view of a lent p.grad kept
    elsewhere) keeps the buffer, and that replay is skipped (the tail runs eagerly). Holders are counted by the
    reference count of the buffer's storage."""

    __slots__ = ("flat", "places", "outs", "signature", "lender", "_cdata", "_idle")

    def __init__(self, outs: list[torch.Tensor], lend: bool = False) -> None:
        self.signature = [(o.shape, o.dtype, o.device) for o in outs]
        self.outs: list[torch.Tensor] | None = None  # the results themselves, where there is no flat buffer
        self.flat = None
        self.lender = None  # the flat buffer's storage, where its results are lent (None: they are copied)
        self.places: list[tuple[torch.Size, tuple[int, ...], int]] = []  # (shape, contiguous strides, offset)
        if not (outs and all(o.dtype == outs[0].dtype and o.device == outs[0].device for o in outs)):
            self.outs = outs
            return
        start = 0
        for o in outs:
            self.places.append((o.shape, _contiguous_strides(o.shape), start))
            start += o.numel()
        self.flat = torch.empty(start, dtype=outs[0].dtype, device=outs[0].device)
        if lend and _USE_COUNT is not None:
            # kept, so that the count of references with no result lent (`_idle`) stays what it is now
            self.lender = self.flat.untyped_storage()
            self._cdata = self.lender._cdata
            self._idle = _USE_COUNT(self._cdata)

    def fits(self, outs: list[torch.Tensor]) -> bool:
        return len(outs) == len(self.signature) and all(
            o.shape == shape and o.dtype == dtype and o.device == device
            for o, (shape, dtype, device) in zip(outs, self.signature, strict=True))

    def write(self, outs: list[torch.Tensor]) -> None:
        if self.flat is not None:
            torch.cat([o.reshape(-1) for o in outs], out=self.flat)
        else:
            for b, o in zip(self.outs, outs, strict=True):
                b.copy_(o)

    def reclaim(self, owners: Sequence[torch.nn.Parameter | None]) -> bool:
        """Whether nothing holds the results lent at the last replay any more, after giving each p.grad among
        `owners` that is still one of them its own copy. (Only for a buffer with a `lender`.)"""
        cdata = self._cdata
        if _USE_COUNT(cdata) <= self._idle:
            return True
        flat = self.flat
        for p in owners:
            if p is not None and p.grad is not None and p.grad._base is flat:
                p.grad = p.grad.clone()  # (no local name may keep the old one while counting below)
        return _USE_COUNT(cdata) <= self._idle

    def copies(self) -> list[torch.Tensor]:
        """The results as new tensors (the graph rewrites its buffers at its next replay): views of one copy."""
        if self.flat is None:
            return [o.clone() for o in self.outs]
        return self._split(self.flat.clone())

    def views(self) -> list[torch.Tensor]:
        """The results in the graph's own buffers (rewritten at its next replay)."""
        return list(self.outs) if self.flat is None else self._split(self.flat)

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        # as_strided: one call a result instead of a slice and a view (half the host time)
        base = flat.storage_offset()
        return [flat.as_strided(shape, stride, base + start) for shape, stride, start in self.places]


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, n = [], 1
    for d in reversed(shape):
        strides.append(n)
        n *= d
    return tuple(reversed(strides))


def _place(warm: list[torch.Tensor], slot: _Slot, stream: torch.cuda.Stream | None = None) -> _Results | None:
    """Before a capture, from the results of its warm-up run: the buffer the graph will write, i.e. that of another
    graph of the slot with results of the same shapes and dtypes (a layer's graphs keep one buffer, the size of its
    parameters, between them), or a new flat one, made now so that it lies outside the graphs' memory pool and its
    results can be lent. It is allocated on `stream`, where the graph replays and its results are read. None where
    the results have no common dtype and device."""
    for _, _, res, _ in slot.graphs:
        if res.fits(warm):
            return res
    with torch.cuda.stream(stream):
        res = _Results(warm, lend=True)
    return res if res.flat is not None else None


def _results(outs: list[torch.Tensor], slot: _Slot, place: _Results | None = None) -> _Results:
    """Inside a capture: the place of the new graph's results, which are copied into it (the copy is part of the
    graph; the capture's own results become scratch memory of the pool): `place` (`_place`) or another graph's
    buffer where they fit. Otherwise the results themselves, or a new flat buffer in the pool (its results are
    copied out after each replay, never lent)."""
    for res in ([place] if place is not None else []) + [res for _, _, res, _ in slot.graphs]:
        if res.fits(outs):
            res.write(outs)
            return res
    res = _Results(outs)
    if res.flat is not None:
        res.write(outs)
    return res


def _read_by_tail(use: Use, names: tuple[str, ...]) -> tuple | None:
    """The tensors the tail of `use` reads (its rule's norm parts and clipped sums), or None for other rules.

    Linear / Conv1D: the saved input and the output gradient (the autocast copy of the weight served the input
    gradient only). LayerNorm: the per-sample gradients its fused backward cached, or, where it did not, the saved
    tensors and the output gradient they are computed from."""
    rule = use.unit.rule.name
    if rule in ("linear", "hf_conv1d"):
        return (use.saved[0], use.grad_out, *use.cache.values())
    if rule == "layer_norm":
        cache = use.cache
        if all("ps_" + n in cache for n in names):
            return tuple(cache.values())
        return (*use.saved, use.grad_out, *cache.values())
    return None


#: references to a storage (tensors and views on it): how `_Results.reclaim` knows whether lent results are still held
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
_STREAM_CAPTURING: list = []  # the query, once CUDA's availability is known
_GET_TF32 = getattr(torch._C, "_get_cublas_allow_tf32", None)


def capturing() -> bool:
    """Whether the current CUDA stream is being captured (e.g. by `engine.graphed_backward`). (Called per layer and
    step: CUDA's availability is looked up once, ~10x cheaper than asking torch.cuda.is_available() each time.)"""
    if not _STREAM_CAPTURING:
        query = bool
        if torch.cuda.is_available():  # the C function itself where this PyTorch has it (one Python frame less)
            query = getattr(torch._C, "_cuda_isCurrentStreamCapturing", torch.cuda.is_current_stream_capturing)
        _STREAM_CAPTURING.append(query)
    return _STREAM_CAPTURING[0]()


def _tf32() -> bool:
    """torch.backends.cuda.matmul.allow_tf32, without the module's Python __getattr__."""
    return _GET_TF32() if _GET_TF32 is not None else torch.backends.cuda.matmul.allow_tf32


def _read_by_sums(use: Use, name: str) -> tuple | None:
    """The tensors the clipped sum of `name` reads once the use's norm was taken (its cache as the norm left it), or
    None where that sum is not graphed. Linear / Conv1D: the saved input, the output gradient, and the per-sample bias
    gradients or instantiated weight gradients where the norm cached them. LayerNorm: its per-sample gradients."""
    rule, cache = use.unit.rule.name, use.cache
    if rule in ("linear", "hf_conv1d"):
        return (use.saved[0], use.grad_out, cache.get("gb"), cache.get("G"))
    if rule == "layer_norm":
        ps = cache.get("ps_" + name)
        return None if ps is None else (ps,)
    return None


#: rules whose clipped sums read the same tensors for every parameter of a use (`_read_by_sums` ignores the name)
_ONE_READ_PER_USE = ("linear", "hf_conv1d")


def norm_graph_entry(use: Use, key: tuple, outs: Sequence[torch.Tensor]) -> tuple | None:
    """What `TailGraphs.group_key` takes of a waiting use whose norm the graph with this key gave (replayed or just
    captured; `outs`: its outputs): (token, saved input, output gradient, outputs), or None for a rule whose sums it
    does not cover (LayerNorm's per-sample gradients may be computed after its norm, at new addresses)."""
    if use.unit.rule.name not in _ONE_READ_PER_USE:
        return None
    return ("norm graph", key, tuple([t.data_ptr() for t in outs])), use.saved[0], use.grad_out, tuple(outs)


def _read_by_norm_graph(read: tuple, graphed: tuple) -> bool:
    """Whether a Linear / Conv1D use's sums read (`_read_by_sums`: saved input, output gradient, per-sample bias
    gradients, instantiated weight gradients) only what its norm graph's token covers (`TailGraphs.group_key`):
    the input and output gradient that graph's key was made from, and an output of that graph or nothing."""
    _, x, g, outs = graphed
    gb = read[2]
    return (read[0] is x and read[1] is g and read[3] is None
            and (gb is None or any(gb is o for o in outs)))


def _signature(read, index: int) -> tuple | None:
    """(address, shape, strides, dtype) of each tensor in `read` (None kept as None), or None if one is not a tensor
    on the device with this index (`Tensor.get_device()`: -1 for the CPU)."""
    out = []
    for t in read:
        if t is None:
            out.append(None)
        elif isinstance(t, torch.Tensor) and t.get_device() == index:
            out.append((t.data_ptr(), t.shape, t.stride(), t.dtype))
        else:
            return None
    return tuple(out)


def _reset(uses: Sequence[Use], before: list[dict]) -> None:
    """The uses' caches as they were before the tail: a capture must compute what the tail itself caches."""
    for u, cache in zip(uses, before, strict=True):
        u.cache.clear()
        u.cache.update(cache)


def _own_gram(uses: Sequence[Use]) -> None:
    """A graphed tail computes its input's Gram itself: it never keeps or reads the tiles q, k, v share."""
    for use in uses:
        shared = use.extra.pop("input", None)
        if shared is not None:
            shared.skip()

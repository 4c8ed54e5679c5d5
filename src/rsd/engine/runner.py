"""A model's runner: one call's rows in its arena, fed through its forward; decode tokens as CUDA graph replays.

An eager forward is hundreds of kernel launches; decoding one token at a time on a GPU is then bound by the host,
not the device. A decode forward here reads only device buffers, so it is captured once per (rows, width) bucket
as a CUDA graph and replayed with one launch; the host's only round trip per token is reading the chosen ids, and
the step loop queues the next forward before it does (`rsd.engine.steps`).

The life of a call: `open` places the rows' cached prefixes and runs their new tokens (a prefill), `decode` feeds
one token to every row, `extend` feeds several to some rows (a verification), `rollback` forgets tokens a row fed,
`keep` drops finished rows to a smaller bucket, `row_cache` copies a row out. Two runners share that interface:
`ModelRunner` over rsd's own forward (Llama, Mistral, Qwen layouts) and `TransformersRunner` over transformers'
forward (every other causal LM, and the escape hatch `RSD_DECODE=eager`).
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rsd.core import RSDError
from rsd.engine.forward import Feed, ModelForward, layout_problem
from rsd.engine.kv_cache import RowCache

if TYPE_CHECKING:
    from rsd.engine.transformers_runner import TransformersRunner

DECODE_ENV = "RSD_DECODE"  # "eager": every model runs transformers' own forward (a kernel misbehaves, say)
MAX_GRAPHS = 24  # captured decode graphs kept per model (least recently used dropped first)


def engine_problem(model: Any) -> str | None:
    """Why a causal LM cannot run in rsd's engine (so transformers' forward runs it), or None."""
    if os.environ.get(DECODE_ENV, "") == "eager":
        return f"{DECODE_ENV}=eager asks for transformers' forward"
    body = getattr(model, "model", None)
    if body is None or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} does not have the usual decoder layout (model.layers, model.norm, lm_head)"
    return layout_problem(body)


def check_decode_env() -> None:
    value = os.environ.get(DECODE_ENV, "")
    if value not in ("", "eager"):
        raise RSDError(f"{DECODE_ENV}={value!r}: the one value it takes is 'eager'; unset it or set it to eager.")


def make_runner(model: Any) -> ModelRunner | TransformersRunner:
    """The engine's runner for a model it can run, else transformers' forward."""
    check_decode_env()
    if engine_problem(model) is None:
        return ModelRunner(model)
    from rsd.engine.transformers_runner import TransformersRunner

    return TransformersRunner(model)


class ModelRunner:
    """One model's forward over its arena, one call at a time."""

    def __init__(self, model: Any, body: Any = None) -> None:
        """`body`: a bare transformer body when `model` is one (a PRM's): its calls return hidden states."""
        self.forward = ModelForward(model, body)
        self.arena = self.forward.new_arena()
        self.device = self.forward.device
        self.use_graphs = self.device.type == "cuda"
        self._graphs: OrderedDict[tuple[int, int, bool], tuple[Any, torch.Tensor]] = OrderedDict()
        self._generation = self.arena.generation

    @property
    def slots(self) -> int:
        """Slots of the current call (a power of two at least its rows): per-slot tensors have this many rows."""
        return self.arena.rows

    # -- a call ---------------------------------------------------------------------------------------------------
    def open(self, prefixes: Sequence[torch.Tensor | None], tails: list[list[int]], room: int) -> torch.Tensor:
        """Start a call: row i's cached keys and values `prefixes[i]` (`RowCache.kv`, or None), then its `tails[i]`
        run (at least one token each), with `room` more columns a row for what it feeds later. Returns the logits
        (float32) at each row's last tail token, or with a bare body the hidden states."""
        self.arena.open(prefixes, max(len(t) for t in tails) + room)
        return self.extend(tails, last_only=True)

    def extend(self, tokens: list[list[int]], last_only: bool = False) -> torch.Tensor:
        """Feed `tokens[slot]` to each slot (none to slots with an empty list, or beyond the list): the logits of every
        fed token, row after row (`last_only`: of each row's last token only)."""
        feed = Feed.placed(self.arena, tokens)
        self.arena.sync()
        keep = feed.last_tokens() if last_only else list(range(len(feed.ids)))
        hidden = self.forward.hidden(self.arena, feed, keep)
        return self.forward.logits(hidden) if self.forward.lm_head is not None else hidden

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed `ids` ([slots], on the device: no host data, so the caller can queue the next forward before it reads
        the last one's tokens) to every slot: the next-token logits (float32) of every slot. Slots whose rows are done
        run on whatever they are fed and are ignored."""
        arena = self.arena
        arena.check_decode()
        arena.ids[: arena.rows].copy_(ids)
        logits = self._run_decode()
        arena.cursor[:, : arena.rows] += 1
        arena.advanced()
        return logits

    def rollback(self, counts: Sequence[int]) -> None:
        """Forget the last `counts[slot]` tokens each slot fed."""
        self.arena.rollback(list(counts) + [0] * (self.arena.rows - len(counts)))

    def keep(self, slots: Sequence[int]) -> torch.Tensor | None:
        """Move the rows at `slots` to the front when a smaller bucket then runs; the index that moved them, or
        None."""
        return self.arena.keep(slots)

    def row_cache(self, slot: int, ids: list[int]) -> RowCache:
        """A row's keys and values for `ids` (every token it holds), copied out of the arena."""
        return self.arena.row_cache(slot, ids)

    # -- decode forwards and their graphs ------------------------------------------------------------------------
    def _run_decode(self) -> torch.Tensor:
        forward, arena = self.forward, self.arena
        if forward.kernels and not forward.decode_checked:
            # The first decode forward with rsd's Triton kernels compiles its own (a prefill's are others): outside
            # any graph capture, so that a failure is theirs and decoding goes on without them. The forward is
            # idempotent (it rewrites the same column).
            try:
                forward.decode(arena)
            except Exception as exc:
                forward.without_kernels(exc)
            forward.decode_checked = True
        if not self.use_graphs:
            return forward.decode(arena)
        if arena.generation != self._generation:  # the buffers were made again: graphs read the old ones
            self._graphs.clear()
            self._generation = arena.generation
        key = (arena.rows, arena.width, forward.kernels)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture()
            except Exception as exc:  # a layer that cannot be captured (a quantized kernel that syncs, say)
                warnings.warn(
                    f"CUDA graph capture failed ({type(exc).__name__}: {exc}); this model decodes without graphs.",
                    stacklevel=3,
                )
                self.use_graphs = False
                return forward.decode(arena)
            self._graphs[key] = entry
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, logits = entry
        graph.replay()
        return logits

    def _capture(self) -> tuple[Any, torch.Tensor]:
        # A decode forward is idempotent for given buffers (it rewrites the same column with the same keys), so the
        # warm-up run that capturing needs can use the live call.
        device = self.device
        with torch.cuda.device(device):  # a model on cuda:1 captures there, whatever the current device
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self.forward.decode(self.arena)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.forward.decode(self.arena)
        return graph, logits

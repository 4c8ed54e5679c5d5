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
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from rsd.core import RSDError
from rsd.engine.forward import Feed, ModelForward, layout_problem
from rsd.engine.kv_cache import MAX_FEED, RowCache, bucket_rows, to_device
from rsd.hf_loading import first_line

if TYPE_CHECKING:
    from rsd.engine.transformers_runner import TransformersRunner

DECODE_ENV = "RSD_DECODE"  # "eager": every model runs transformers' own forward (a kernel misbehaves, say)
# A model's captured graphs, the least recently used dropped past this many. A runner's graphs share one memory pool,
# which holds their intermediates (one forward's at a time: graphs replay one after another), and write their output
# (a verification's logits: tokens x vocabulary) into one buffer of the runner's; so the memory they hold is about
# one forward's, the largest, whatever their number, and dropping one frees none of it (the next capture reuses it).
MAX_GRAPHS = 512
MAX_GRAPHED_OPEN = 1024  # the most tokens (padding included) a call opens with through a graph


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
        self._graphs = GraphCache()
        self._generation = self.arena.generation
        self._uncapturable: set[int] = set()  # tokens a slot whose forwards failed to capture (they run eagerly)
        self._captures, self._capture_seconds = 0, 0.0
        self._pool: Any = None  # the memory pool every graph of this runner is captured into (made at the first)
        self._pool_bytes = 0  # what the pool has grown by (it lives as long as a graph captured into it)
        self._outputs: torch.Tensor | None = None  # every graph's output is a view of its front (`_output_buffer`)

    @property
    def graph_stats(self) -> GraphStats:
        """What this runner's CUDA graphs have cost so far (all zero off CUDA)."""
        outputs = 0 if self._outputs is None else self._outputs.numel() * self._outputs.element_size()
        held = len(self._graphs), self._pool_bytes + outputs
        return GraphStats(self._captures, self._capture_seconds, *held, tuple(sorted(self._uncapturable)))

    @property
    def slots(self) -> int:
        """Slots of the current call (a power of two at least its rows): per-slot tensors have this many rows."""
        return self.arena.rows

    # -- a call ---------------------------------------------------------------------------------------------------
    def open(
        self,
        prefixes: Sequence[torch.Tensor | None],
        tails: list[list[int]],
        room: int,
        logits_of: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Start a call: row i's cached keys and values `prefixes[i]` (`RowCache.kv`, or None), then its `tails[i]`
        run (at least one token each), with `room` more columns a row for what it feeds later. Returns the logits
        (float32) of each row's last tail token (or of its last `logits_of[i]`, row after row); with a bare body
        the hidden states."""
        fed = self._graphed_open_tokens(tails) if all(n == 1 for n in logits_of or ()) else None
        self.arena.open(prefixes, (fed or max(len(t) for t in tails)) + room)
        if fed is not None:
            return self._feed_padded(tails, fed)
        return self.extend(tails, [1] * len(tails) if logits_of is None else logits_of)

    def _graphed_open_tokens(self, tails: list[list[int]]) -> int | None:
        """The tokens a slot a call opens with through a graphed forward (its tails padded to a power of two), or
        None for an eager prefill. An eager forward is hundreds of launches, bound by the host (about 15 ms for a
        1.5B model, whatever its tokens); a step after a kept one reads one token, a PRM a step, and a graph replays
        them in the device's time. Long or ragged tails stay eager: padding would more than double their tokens."""
        if not self.use_graphs:
            return None
        fed = bucket_rows(max(len(t) for t in tails))  # a power of two: calls reuse a few graphs
        if fed == 1:
            return 1
        padded = fed * bucket_rows(len(tails))
        if not self.can_verify(fed) or padded > MAX_GRAPHED_OPEN or padded > 2 * sum(len(t) for t in tails):
            return None
        return fed

    def feed_last(self, tails: list[list[int]]) -> torch.Tensor:
        """Feed row i its short `tails[i]` (at least one token) in one forward: the logits (a body's hidden states) of
        each row's last token. Tails of one token are a decode; longer ones a verification padded to the longest where
        rsd's kernels run, else an eager forward."""
        tokens = max(len(tail) for tail in tails)
        if tokens == 1 or self.can_verify(tokens):
            return self._feed_padded(tails, tokens)
        return self.extend(tails, [1] * len(tails))

    def _feed_padded(self, tails: list[list[int]], tokens: int) -> torch.Tensor:
        """The tails fed as a decode (one token each) or a verification of `tokens` tokens a slot, each tail padded
        at its end (rolled back after: a causal forward's earlier tokens never see it); the logits (a body's hidden
        states) of each row's last tail token, row after row."""
        slots = self.arena.rows
        fed = [*tails, *([[0]] * (slots - len(tails)))]  # the bucket's idle slots read a harmless id
        ids = torch.tensor([[*tail, *[0] * (tokens - len(tail))] for tail in fed], dtype=torch.long).flatten()
        ids = to_device(ids, self.device)
        if tokens == 1:
            return self.decode(ids)[: len(tails)]
        last = torch.tensor([slot * tokens + len(tail) - 1 for slot, tail in enumerate(fed)], dtype=torch.long)
        self.arena.last[:slots].copy_(to_device(last, self.device))
        out = self._graphed(ids, tokens, last_only=True)[: len(tails)]
        self.rollback([tokens - len(tail) for tail in fed])
        return out

    def extend(self, tokens: list[list[int]], logits_of: Sequence[int] | None = None) -> torch.Tensor:
        """Feed `tokens[slot]` to each slot (none to slots with an empty list, or beyond the list): the logits of
        every fed token, row after row, or of each row's last `logits_of[slot]` tokens."""
        return self.extend_ids([len(t) for t in tokens], [t for row in tokens for t in row], logits_of)

    def extend_ids(
        self, counts: Sequence[int], ids: list[int] | torch.Tensor, logits_of: Sequence[int] | None = None
    ) -> torch.Tensor:
        """`extend` with the ids given flat, slot after slot (`counts[slot]` each), on the host or already on the
        device (tokens a model just chose: no wait for them)."""
        feed = Feed.placed(self.arena, counts, ids)
        self.arena.sync()
        hidden = self.forward.hidden(self.arena, feed, feed.kept_tokens(logits_of))
        return self.forward.output(hidden)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed `ids` ([slots], on the device: no host data, so the caller can queue the next forward before it reads
        the last one's tokens) to every slot: the next-token logits (float32) of every slot. Slots whose rows are done
        run on whatever they are fed and are ignored."""
        return self._graphed(ids, 1)

    def can_verify(self, tokens: int) -> bool:
        """Whether `verify` runs here: `tokens` a slot through rsd's kernels (CUDA, half precision)."""
        return tokens <= MAX_FEED and self.forward.verifies() and self.forward.packed_checked

    def verify(self, ids: torch.Tensor, tokens: int) -> torch.Tensor:
        """`decode` of `tokens` tokens a slot at once (`ids` [slots x tokens], slot after slot, on the device): the
        logits of every one, slot after slot. A verification of proposals, replayed as a CUDA graph on a GPU."""
        return self._graphed(ids, tokens)

    def park(self, slots: Sequence[int]) -> None:
        """Slots whose rows have left start their columns over (they run on garbage until the bucket shrinks)."""
        self.arena.park(slots)

    def _graphed(self, ids: torch.Tensor, tokens: int, last_only: bool = False) -> torch.Tensor:
        arena = self.arena
        arena.check_feed(tokens)
        arena.ids[: arena.rows * tokens].copy_(ids)
        if tokens == 1:
            logits = self._run_graph(1, partial(self.forward.decode, arena))
        else:
            logits = self._run_graph(tokens, partial(self.forward.verify, arena, tokens, last_only), last_only)
        arena.cursor[:, : arena.rows] += tokens
        arena.advanced(tokens)
        out = self.forward.finished(logits)
        # A graph's output is the runner's buffer, which the next replay of any of its graphs overwrites.
        return out.clone() if out.data_ptr() == logits.data_ptr() and self._outputs is not None else out

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

    # -- graphed forwards ------------------------------------------------------------------------------------------
    def _run_graph(
        self, tokens: int, forward: Callable[[torch.Tensor | None], torch.Tensor], last_only: bool = False
    ) -> torch.Tensor:
        """`forward` (a decode or a verification, reading device buffers only; its argument, the buffer its output is
        written to, or None), replayed as a CUDA graph captured once per (tokens a slot, rows, width) on a GPU; run as
        it is elsewhere."""
        model, arena = self.forward, self.arena
        if model.kernels and not model.decode_checked and tokens == 1:
            # The first decode forward with rsd's Triton kernels compiles its own (a prefill's are others): outside
            # any graph capture, so that a failure is theirs and decoding goes on without them. The forward is
            # idempotent (it rewrites the same column). A verification runs the prefill's kernels, checked by then.
            try:
                forward(None)
            except Exception as exc:
                model.without_kernels(exc)
            model.decode_checked = True
        if not self.use_graphs or tokens in self._uncapturable:
            return forward(None)
        if arena.generation != self._generation:  # the buffers were made again: graphs read the old ones
            self._drop_graphs()
            self._generation = arena.generation
        key = (tokens, arena.rows, arena.width, model.kernels, last_only)
        entry = self._graphs.get(key)
        if entry is None:
            start = time.perf_counter()
            outputs = self._output_buffer(arena.rows if tokens == 1 or last_only else arena.rows * tokens)
            try:
                entry = self._capture(lambda: forward(outputs))
            except Exception as exc:  # a layer that cannot be captured (a quantized kernel that syncs, say)
                kind = "decode" if tokens == 1 else f"{tokens}-token verification"
                warnings.warn(
                    f"CUDA graph capture failed ({type(exc).__name__}: {first_line(exc)}); this model runs its {kind} "
                    "forwards without graphs.",
                    stacklevel=3,
                )
                self._uncapturable.add(tokens)
                return forward(None)
            self._captures += 1
            self._capture_seconds += time.perf_counter() - start
            self._graphs.put(key, entry)
        graph, logits = entry
        graph.replay()
        return logits

    def _drop_graphs(self) -> None:
        """Every graph goes, and their pool with the last of them: the next capture starts a new one (a pool whose
        graphs are all gone cannot be captured into again, and its memory is freed once nothing of it is held)."""
        self._graphs.clear()
        self._pool, self._pool_bytes = None, 0

    def _output_buffer(self, rows: int) -> torch.Tensor:
        """The buffer graphs write their outputs to, with room for `rows` rows of output. Grown (doubled at least)
        when a shape needs more; the graphs that write to the old one keep it until they are dropped."""
        need = rows * self.forward.output_features
        if self._outputs is None or self._outputs.numel() < need:
            # At first the arena's rows (a decode of any call), then at least double: a few sizes in all.
            least = self.arena.capacity[0] * self.forward.output_features
            size = max(need, least if self._outputs is None else 2 * self._outputs.numel())
            self._outputs = torch.empty(size, dtype=self.forward.dtype, device=self.device)
        return self._outputs

    def _capture(self, forward: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """The graph of `forward` and its output, captured into the runner's memory pool (its growth counted)."""
        # A graphed forward is idempotent for given buffers (it rewrites the same columns with the same keys), so the
        # warm-up run that capturing needs can use the live call.
        device = self.device
        with torch.cuda.device(device):  # a model on cuda:1 captures there, whatever the current device
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                forward()
            torch.cuda.current_stream(device).wait_stream(stream)
            # Capturing empties the allocator's cache first; emptied here, the memory reserved then grows by what
            # the shared pool needs more for this graph's intermediates (in whole segments), most often nothing.
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            reserved = torch.cuda.memory_reserved(device)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = forward()
            self._pool_bytes += max(0, torch.cuda.memory_reserved(device) - reserved)
        return graph, logits


@dataclass(frozen=True)
class GraphStats:
    """A runner's graphs: captures made, the host seconds they took (each synchronises the device and runs the
    forward once more), the graphs held now, the bytes their shared memory pool and output buffer reserve, and the
    tokens a slot whose forwards run without graphs because their capture failed (1: decode; a warning said why)."""

    captures: int
    capture_seconds: float
    held: int
    held_bytes: int
    eager: tuple[int, ...] = ()


class GraphCache:
    """Captured graphs by shape key; past `most` of them the least recently used is dropped (never the one just
    added: a call needs it)."""

    def __init__(self, most: int = MAX_GRAPHS) -> None:
        self.most = most
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        """The entry under `key`, now the most recently used, or None."""
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: Hashable, entry: Any) -> None:
        self._entries.pop(key, None)
        self._entries[key] = entry
        while len(self._entries) > max(1, self.most):
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._entries)

    def keys(self) -> Iterator[Hashable]:
        return iter(self._entries)

    def __getitem__(self, key: Hashable) -> Any:
        return self._entries[key]

"""Decode forwards of Llama-family models over preallocated KV buffers, replayed as CUDA graphs on GPUs.

An eager transformers forward is about 1,600 PyTorch operations; on a GPU host that is 16-30 ms of Python and
kernel launches for 3-13 ms of GPU work (docs/benchmarks.md), so decoding one token at a time is bound by the
host, not the GPU. This module runs the decode forward of the transformers backend with static shapes instead,
so that it can be captured once per (rows, width) bucket as a CUDA graph and replayed with one launch:

- one KV arena per generator, [layers, 2 (keys, values), rows, kv_heads, width, head_dim], rows rounded up to a
  power of two and width to `WIDTH_BUCKET` columns. A call's prefill fills it: the rows' cached prefixes are
  copied in, right-aligned, and their new tails run through this module's own forward, several tokens a row
  (`begin`, `prefill`; not graphed, their shapes vary). Each decoded token then writes one column, the same
  column for every row;
- the write column, positions, input ids and the padding mask live in device buffers, so a replay needs no host
  data, and the only host round trip per token is reading the sampled ids (which the stop checks need anyway);
- grouped-query attention without copying keys: the query heads that share a key head are folded into the query
  length (one decode token per row), so the keys and values are read once per key head.
- on CUDA in half precision, a decode token attends through rsd's split Triton kernels (`split_attention.py`) and
  its layers' small operations run in three Triton kernels (`layer_kernels.py`; not with `compile_layers`, which
  fuses them its own way). Both are settable per decoder (`attention`, `layer_kernels`) for an A/B.

Supported: Llama, Mistral, Qwen2/2.5 and Qwen3 layouts with full attention and a rotary embedding that does not
depend on the context length (default, linear, llama3, yarn). Anything else decodes through transformers' own
forward (`decode="eager"`), which is also the default on the CPU, where there are no graphs to gain.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from rsd.backends.kv import RowCache, cache_layers
from rsd.backends.layer_kernels import add_rms_norm, layer_kernels_problem, rotate_into_arena, silu_times_up
from rsd.backends.prefill_attention import packed_attention, tile_tokens
from rsd.backends.split_attention import HALF_DTYPES, split_attention, split_attention_problem
from rsd.core import RSDError
from rsd.hf_loading import first_line

DECODE_MODES = ("auto", "eager", "static", "graphs")
DECODE_ENV = "RSD_DECODE"  # overrides what "auto" picks: eager, static or graphs
COMPILE_ENV = "RSD_COMPILE_DECODE"  # "1": torch.compile the static decode forward's layers (experimental)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
WIDTH_BUCKET = 256  # cache columns are allocated, and graphs captured, in multiples of this
ATTENTION_KINDS = ("split", "sdpa")  # how a decode token attends: rsd's split kernels (split_attention.py), SDPA
MAX_GRAPHS = 24  # captured graphs kept per generator (least recently used dropped first)
# A prefill's attention mask holds every query head of a key head per token: [rows, 1, groups x tokens, columns].
# 1 GiB covers RSD's prefills at batch 64 in one chunk (a re-encoded 768-token trajectory of the 7B target is 0.7
# GiB) and keeps a long prompt from asking for tens of GiB.
PREFILL_MASK_BYTES = 1 << 30
# The most tokens one forward of a packed prefill runs: a 7B model's MLP product for them is about 600 MB.
PACKED_PREFILL_TOKENS = 8192


def static_decode_problem(model: Any) -> str | None:
    """Why `model` cannot decode over static buffers, or None when it can."""
    model_type = getattr(model.config.get_text_config(), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    body = getattr(model, "model", None)
    if body is None or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} does not have the usual decoder layout (model.layers, model.norm, lm_head)"
    return arena_body_problem(body)


def arena_body_problem(body: Any) -> str | None:
    """Why a transformer body (a causal LM's `.model`, a PRM's body) cannot run in a KV arena, or None."""
    config = body.config.get_text_config()
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(body, part) for part in parts):
        return f"{type(body).__name__} does not have the usual decoder layout (layers, norm, rotary_emb)"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(kind != "full_attention" for kind in layer_types):
            return "it has sliding-window attention layers"
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "it has sliding-window attention"
    rope_type = str(getattr(body.rotary_emb, "rope_type", "default"))
    if "dynamic" in rope_type or rope_type == "longrope":
        return f"its rotary embedding ({rope_type}) changes with the context length"
    return None


def resolve_decode_mode(mode: str, model: Any, device: str) -> str:
    """The decode path a generator takes: "auto" is CUDA graphs on CUDA for a supported model, else eager."""
    if mode not in DECODE_MODES:
        raise RSDError(f"decode={mode!r} is not one of {', '.join(DECODE_MODES)}.")
    if mode == "auto":
        forced = os.environ.get(DECODE_ENV, "")
        if forced:
            if forced not in DECODE_MODES[1:]:
                raise RSDError(f"{DECODE_ENV}={forced!r} is not one of eager, static, graphs; unset it or fix it.")
            mode = forced
        else:
            cuda = device.startswith("cuda")
            return "graphs" if cuda and static_decode_problem(model) is None else "eager"
    if mode == "eager":
        return mode
    problem = static_decode_problem(model)
    if problem is not None:
        raise RSDError(f"decode={mode!r} cannot run {type(model).__name__}: {problem}; use decode='eager'.")
    if mode == "graphs" and not device.startswith("cuda"):
        raise RSDError(f"decode='graphs' needs a CUDA device, not {device}; use decode='static' or 'eager'.")
    return mode


def bucket_rows(rows: int) -> int:
    """The next power of two: a batch that loses rows reuses a few graphs instead of one per size."""
    return 1 << max(0, rows - 1).bit_length()


def bucket_width(columns: int) -> int:
    return -(-columns // WIDTH_BUCKET) * WIDTH_BUCKET


class StaticDecoder:
    """The KV arena of one model and its decode forward; one batch at a time.

    `begin` and `prefill` fill the arena with a batch (or `load` takes one prefilled by transformers: a
    `DynamicCache` and its 0/1 mask), `advance` decodes one token for every row, `keep` drops finished rows,
    `row_cache` copies one row's real columns out.
    """

    def __init__(self, model: Any, use_graphs: bool, compile_layers: bool = False, body: Any = None) -> None:
        """`body`: the transformer body when `model` is one (a PRM's, with no LM head: `prefill_hidden` only)."""
        config = model.config.get_text_config()
        self.model = model
        self.body = model.model if body is None else body
        self.use_graphs = use_graphs
        # Fused RMSNorm and a shorter rotation (below); False runs transformers' own modules (for an A/B).
        self.fused_kernels = True
        # Each layer's query, key and value projections as one matrix product, and the MLP's gate and up as one
        # (`fuse_projections`, below); False runs the model's projections one by one (for an A/B).
        self.fuse_projections = True
        self._projections = fuse_projections(self.body.layers)
        self.max_graphs = MAX_GRAPHS
        # The largest attention mask one prefill chunk may build (settable): longer tails run in more chunks.
        self.prefill_mask_bytes = PREFILL_MASK_BYTES
        self.layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        self.shape = HeadShape(heads, int(config.num_key_value_heads), head_dim)
        embedding = model.get_input_embeddings().weight
        self.device, self.dtype = embedding.device, embedding.dtype
        # How a decode token attends over the arena (`ATTENTION_KINDS`): split over the columns in rsd's Triton
        # kernels where they run (CUDA, half-precision weights), else SDPA. Settable, for an A/B.
        half_on_cuda = self.device.type == "cuda" and self.dtype in HALF_DTYPES
        split_here = half_on_cuda and not split_attention_problem(self.device, self.dtype, head_dim)
        self._attention = "split" if split_here else "sdpa"
        # A layer's small operations in rsd's Triton kernels (layer_kernels.py) where they run (CUDA, half
        # precision, a Llama/Qwen2 layout whose projections fused); False runs them as torch operations.
        self._layer_kernels = half_on_cuda and self.layer_kernels_problem() is None
        self._kernels_checked = False  # whether a decode forward has run with the kernels (`_run`)
        self._packed_checked = False  # whether a packed prefill has run (`_checked_packed_prefill`)
        # Tails run packed, without padding, through the Triton kernels where they run (`packed_prefill`); False
        # pads them to the longest and runs the torch operations and SDPA (for an A/B).
        self.pack_prefill = True
        self.packed_prefill_tokens = PACKED_PREFILL_TOKENS  # tokens per chunk of a packed prefill (settable)
        # The per-layer code around the attention: plain functions, or their torch.compile'd versions.
        self._layer_head: Any = layer_head
        self._layer_tail: Any = layer_tail
        self.compiled = False
        self._compiled_shapes: set[tuple[int, int, bool, bool, str, bool]] = set()
        self.capacity = (0, 0)  # (rows, width) of the arena
        self.kv = torch.zeros((0,), dtype=self.dtype, device=self.device)  # the arena, made by `_reserve`
        self.mask = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
        self.ids = torch.zeros((0, 1), dtype=torch.long, device=self.device)
        self.positions = torch.zeros((0, 1), dtype=torch.long, device=self.device)
        self.column = torch.zeros((1,), dtype=torch.long, device=self.device)  # the column the next token writes
        self.rows = 0  # rows of the current batch (a bucket)
        self.width = 0  # columns of the current batch (a bucket)
        self.next_column = 0  # host copy of `column`
        self.tail_width = 0  # columns `begin` left for the tails, before `next_column`
        self._graphs: OrderedDict[tuple[int, int, bool, bool, str, bool], tuple[Any, torch.Tensor]] = OrderedDict()
        if compile_layers:
            self.compile_layers()

    @property
    def attention(self) -> str:
        return self._attention

    @attention.setter
    def attention(self, kind: str) -> None:
        if kind not in ATTENTION_KINDS:
            raise RSDError(f"unknown decode attention {kind!r}: choose one of {', '.join(ATTENTION_KINDS)}")
        problem = split_attention_problem(self.device, self.dtype, self.shape.head_dim) if kind == "split" else None
        if problem:
            raise RSDError(f"decode attention 'split' cannot run here: {problem}; use 'sdpa'")
        self._attention = kind

    @property
    def layer_kernels(self) -> bool:
        return self._layer_kernels

    @layer_kernels.setter
    def layer_kernels(self, on: bool) -> None:
        problem = self.layer_kernels_problem() if on else None
        if problem:
            raise RSDError(f"the Triton layer kernels cannot run this model: {problem}; set layer_kernels = False")
        self._layer_kernels = on

    def layer_kernels_problem(self) -> str | None:
        """Why this model's decode layers cannot run through `layer_kernels`, or None."""
        if self._projections is None:
            return "its projections are not fused (quantized, adapted, hooked or offloaded layers)"
        return layer_kernels_problem(self.body, self.device, self.dtype, self.shape.head_dim)

    def compile_layers(self, backend: Any = "inductor") -> None:
        """Compile the code around each layer's attention with `torch.compile` (experimental). Every layer runs the
        same compiled code, its weights being inputs, and the rows are a dynamic size, so a model compiles each
        part once or twice. CUDA graphs then capture the compiled kernels. A compile that fails warns and leaves
        the plain code."""
        options = dict(backend=backend, dynamic=True, fullgraph=True)
        self._layer_head = torch.compile(layer_head, **options)
        self._layer_tail = torch.compile(layer_tail, **options)
        self.compiled = True
        self._compiled_shapes.clear()
        self._graphs.clear()

    def _without_triton_kernels(self, error: BaseException) -> None:
        warnings.warn(
            f"rsd's Triton decode kernels failed ({type(error).__name__}: {first_line(error)}); this model decodes "
            "with SDPA and torch operations from now on.",
            stacklevel=3,
        )
        self._attention, self._layer_kernels = "sdpa", False
        self._graphs.clear()

    def _uncompile(self, error: BaseException) -> None:
        # torch wraps the compiler's own error (BackendCompilerFailed.inner_exception): say that one.
        while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
            error = inner
        warnings.warn(
            f"torch.compile of the decode layers failed ({type(error).__name__}: {first_line(error)}); "
            "decoding without it.",
            stacklevel=3,
        )
        self._layer_head, self._layer_tail = layer_head, layer_tail
        self.compiled = False
        self._graphs.clear()

    # -- a batch ----------------------------------------------------------------------------------------------

    def load(self, cache: Any, mask: torch.Tensor, positions: Sequence[int], new_tokens: int) -> None:
        """Take over a prefilled batch: `cache` and `mask` cover its columns so far, `positions` is each row's
        position of the first token to feed, `new_tokens` how many tokens the longest row may still feed."""
        rows, used = mask.shape
        self.rows, self.width = bucket_rows(rows), bucket_width(used + max(1, new_tokens))
        self._reserve(self.rows, self.width)
        for layer, (keys, values) in enumerate(cache_layers(cache)):
            self.kv[layer, 0, :rows, :, :used].copy_(keys)
            self.kv[layer, 1, :rows, :, :used].copy_(values)
        self.mask[: self.rows].zero_()
        self.mask[:rows, :used].copy_(mask.bool())
        self.positions[: self.rows].zero_()
        self.positions[:rows, 0].copy_(torch.tensor(list(positions), dtype=torch.long))
        self.ids[: self.rows].zero_()
        self.column.fill_(used)
        self.next_column = used

    def load_blank(self, rows: int, filled: int, new_tokens: int) -> None:
        """A batch of `rows` rows whose first `filled` columns count as context (keys and values as they are): to
        time decode forwards without a model call's prefill (benchmarks/gpu_speed.py --kernels ab)."""
        self.rows, self.width = bucket_rows(rows), bucket_width(filled + max(1, new_tokens))
        self._reserve(self.rows, self.width)
        self.mask[: self.rows].zero_()
        self.mask[: self.rows, :filled] = True
        self.positions[: self.rows].fill_(filled)
        self.ids[: self.rows].zero_()
        self.column.fill_(filled)
        self.next_column = filled

    # -- a batch prefilled in the arena ---------------------------------------------------------------------------
    # An eager transformers prefill is about 1,600 operations, then its cache is copied into the arena: on a GPU
    # that host work, not the compute, sets the time of the short prefills RSD makes at every step (a step's tail
    # of 1-130 tokens). `begin` puts the cached prefixes straight into the arena and `prefill` runs the tails with
    # this module's own forward (about 400 operations), writing their keys and values where decoding reads them.

    def begin(self, prefixes: Sequence[torch.Tensor | None], tail_width: int, new_tokens: int) -> int:
        """Start a batch of `len(prefixes)` rows: each row's cached keys and values (`RowCache.kv`, or None)
        right-aligned to one column, then `tail_width` columns for the tails (`prefill`), then room for
        `new_tokens` decoded tokens. Returns the column the cached prefixes end at, where the tail columns start."""
        start = max((int(kv.shape[3]) for kv in prefixes if kv is not None), default=0)
        self.rows, self.width = bucket_rows(len(prefixes)), bucket_width(start + tail_width + max(1, new_tokens))
        self._reserve(self.rows, self.width)
        self.mask[: self.rows].zero_()
        for slot, kv in enumerate(prefixes):
            if kv is not None and kv.shape[3] > 0:
                self.kv[:, :, slot, :, start - kv.shape[3] : start] = kv
                self.mask[slot, start - kv.shape[3] : start] = True
        self.positions[: self.rows].zero_()
        self.ids[: self.rows].zero_()
        self.column.fill_(start + tail_width)
        self.next_column = start + tail_width
        self.tail_width = tail_width
        return start

    def run_tails(
        self, first_slot: int, tails: Sequence[Sequence[int]], reused: Sequence[int], pad_id: int, head: bool = True
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """`prefill` from token lists: row i (slot `first_slot + i`) runs `tails[i]` after its `reused` cached
        tokens. Returns the logits (or with `head=False` the final hidden states) at each row's last token, and
        each row's real arena columns (its prefix's, then its tail's)."""
        end, start = self.next_column, self.next_column - self.tail_width
        columns = [
            list(range(start - past, start)) + list(range(end - len(tail), end))
            for tail, past in zip(tails, reused, strict=True)
        ]
        if self.packed_prefill:
            hidden = self._checked_packed_prefill(first_slot, tails, reused)
            if hidden is not None:
                return (self.model.lm_head(hidden).float() if head else hidden), columns
        width = max(len(tail) for tail in tails)
        ids = torch.full((len(tails), width), pad_id, dtype=torch.long)
        positions = torch.zeros((len(tails), width), dtype=torch.long)
        real = torch.zeros((len(tails), width), dtype=torch.bool)
        for b, (tail, past) in enumerate(zip(tails, reused, strict=True)):
            ids[b, width - len(tail) :] = torch.tensor(list(tail))
            positions[b, width - len(tail) :] = torch.arange(past, past + len(tail))
            real[b, width - len(tail) :] = True
        inputs = [to_device(t, self.device) for t in (ids, positions, real)]
        run = self.prefill if head else self.prefill_hidden
        return run(first_slot, *inputs), columns

    @property
    def packed_prefill(self) -> bool:
        """Whether `run_tails` runs its tails packed (no padding) through rsd's Triton kernels (`prefill_packed`):
        where the decode layer kernels run, unless `pack_prefill` is off (for an A/B)."""
        return self.pack_prefill and self._layer_kernels and self.fused_kernels and self.fuse_projections

    def prefill_packed(self, first_slot: int, tails: Sequence[Sequence[int]], reused: Sequence[int]) -> torch.Tensor:
        """`prefill_hidden` with every row's tail packed after the previous row's, no padding: the matrix products
        and the layers' small operations run on the real tokens only, the attention in `packed_attention`. Long
        calls run in chunks of `packed_prefill_tokens` tokens, each seeing the columns the chunks before it wrote.
        Returns the final-normed hidden states at each row's last token, [rows, hidden]."""
        end = self.next_column
        plan = packed_plan(
            [len(tail) for tail in tails], reused, first_slot, (end - self.tail_width, end),
            self.packed_prefill_tokens, tile_tokens(self.shape.heads // self.shape.kv_heads),
        )  # fmt: skip
        ids = [token for tail in tails for token in tail]
        ids, positions, slots, columns = to_device(torch.tensor([ids, *plan.token_fields()]), self.device)
        self.mask[slots, columns] = True  # every tail column at once: causality keeps later tokens unseen
        last = torch.empty((len(tails), self.body.norm.weight.shape[0]), dtype=self.dtype, device=self.device)
        for chunk in plan.chunks:
            part = slice(chunk.first, chunk.end)
            x = self._packed_chunk(ids[part], positions[part], slots[part], columns[part], chunk.tiles)
            ending = host_to_device(chunk.last_tokens, self.device)
            last.index_copy_(0, host_to_device(chunk.rows_ending, self.device), x.index_select(0, ending))
        rows = slice(first_slot, first_slot + len(tails))
        self.positions[rows, 0] = host_to_device([past + len(t) for past, t in zip(reused, tails, strict=True)],
                                                 self.device)  # fmt: skip
        return last

    def _packed_chunk(
        self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, columns: torch.Tensor, tiles: list
    ) -> torch.Tensor:
        """One chunk of `prefill_packed`: every layer over its tokens, their keys and values written into the
        arena; the final-normed hidden states, [tokens, hidden]."""
        heads, kv_heads, _ = self.shape
        layers = self.body.layers
        tile_table = to_device(torch.tensor(tiles, dtype=torch.int32), self.device)
        hidden = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(hidden[None], positions[None])
        cos, sin = cos[0], signed_sin(sin[0])
        x = rms_norm(layers[0].input_layernorm, hidden)
        for index, layer in enumerate(layers):
            weights = self._projections[index]
            keys, values = self.kv[index, 0], self.kv[index, 1]
            qkv = F.linear(x, weights.qkv, weights.qkv_bias)
            query = rotate_into_arena(qkv, cos, sin, keys, values, columns, heads, kv_heads, slots)
            scale = getattr(layer.self_attn, "scaling", self.shape.head_dim**-0.5)
            attention = packed_attention(query, keys, values, self.mask, columns, tile_table, scale)
            hidden, x = self._layer_rest_by_kernels(index, weights, hidden, attention.view(len(ids), -1))
        return x

    def prefill(self, first_slot: int, ids: torch.Tensor, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Run the tails of the rows at slots `first_slot`, `first_slot + 1`, ... after `begin`: `ids`, `positions`
        and `real` (False on padding) are [rows, tokens], left-padded, and fill the last `tokens` tail columns.
        Returns the next-token logits (float32) at each row's last token."""
        hidden = self.prefill_hidden(first_slot, ids, positions, real)
        return self.model.lm_head(hidden).float()

    def prefill_hidden(
        self, first_slot: int, ids: torch.Tensor, positions: torch.Tensor, real: torch.Tensor
    ) -> torch.Tensor:
        """`prefill` up to the body's final norm: the hidden states at each row's last token, [rows, hidden].

        Long tails run in chunks of tokens, each attending to the columns the chunks before it wrote, so that the
        attention mask (its query heads folded, `tail_bias`) stays within `prefill_mask_bytes`."""
        rows, tokens = ids.shape
        slots = slice(first_slot, first_slot + rows)
        start = self.next_column - tokens
        groups = self.shape.heads // self.shape.kv_heads
        per_token = rows * groups * self.width * torch.finfo(self.dtype).bits // 8
        chunk = max(1, self.prefill_mask_bytes // per_token)
        for first in range(0, tokens, chunk):
            last = min(tokens, first + chunk)
            part = (ids[:, first:last], positions[:, first:last], real[:, first:last])
            hidden = self._prefill_chunk(slots, *part, (start + first, start + last))
        self.positions[slots, 0] = positions[:, -1] + 1
        return norm_of(self.body.norm, hidden[:, -1], self.fused_kernels)

    def _prefill_chunk(
        self, slots: slice, ids: torch.Tensor, positions: torch.Tensor, real: torch.Tensor, columns: tuple[int, int]
    ) -> torch.Tensor:
        """One chunk of `prefill`, written into `columns` [start, end); the last layer's hidden states."""
        start, end = columns
        self.mask[slots, start:end] = real
        groups = self.shape.heads // self.shape.kv_heads
        bias = tail_bias(self.mask[slots, : self.width], start, end, groups, self.dtype)
        hidden = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(hidden, positions)
        fused = self.fused_kernels
        sin = signed_sin(sin) if fused else sin
        rotary = (cos[:, None], sin[:, None])  # [rows, 1, tokens, head_dim]: broadcast over heads
        projections = self._projections if fused and self.fuse_projections else None
        for index, layer in enumerate(self.body.layers):
            weights = projections[index] if projections else None
            query, key, value = tail_layer_head(layer, weights, hidden, *rotary, self.shape, fused)
            self.kv[index, 0, slots, :, start:end] = key
            self.kv[index, 1, slots, :, start:end] = value
            keys, values = self.kv[index, 0, slots, :, : self.width], self.kv[index, 1, slots, :, : self.width]
            scale = getattr(layer.self_attn, "scaling", self.shape.head_dim**-0.5)
            attention = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scale)
            hidden = layer_tail(layer, weights, hidden, unfold_heads(attention, end - start), fused)
        return hidden

    def _checked_packed_prefill(
        self, first_slot: int, tails: Sequence[Sequence[int]], reused: Sequence[int]
    ) -> torch.Tensor | None:
        """`prefill_packed`, or None after turning rsd's Triton kernels off when they fail to compile here (the
        padded forward then rewrites the same columns). Compiling happens at the first call, outside any graph."""
        if self._packed_checked:
            return self.prefill_packed(first_slot, tails, reused)
        try:
            hidden = self.prefill_packed(first_slot, tails, reused)
        except Exception as exc:
            self._without_triton_kernels(exc)
            return None
        finally:
            self._packed_checked = True
        return hidden

    def replay(self) -> torch.Tensor:
        """The current token's forward once more, without moving on: it rewrites the same column (for timing)."""
        return self._run()

    def advance(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token to every row of the bucket (`ids`, [rows] on the device: no host data, so the caller can
        queue the next forward before it reads the last tokens); returns the next-token logits (float32) of every
        row of the bucket. Rows that are done run on whatever they are fed and are ignored."""
        self.ids[: self.rows, 0].copy_(ids)
        logits = self._run()
        self.positions[: self.rows] += 1
        self.column += 1
        self.next_column += 1
        return logits

    def keep(self, slots: Sequence[int]) -> tuple[list[int], torch.Tensor | None]:
        """Move the rows at `slots` to the front when that lets a smaller row bucket run. Returns their new slots
        and the index that moved them (None when nothing moved), for the caller's own per-row tensors."""
        rows = bucket_rows(len(slots))
        if rows >= self.rows:
            return list(slots), None
        index = host_to_device(slots, self.device)
        columns = self.next_column
        self.kv[:, :, : len(slots), :, :columns] = self.kv[:, :, :, :, :columns].index_select(2, index)
        self.mask[: len(slots), :columns] = self.mask[:, :columns].index_select(0, index)
        self.positions[: len(slots)] = self.positions.index_select(0, index)
        self.rows = rows
        return list(range(len(slots))), index

    def row_cache(self, slot: int, ids: list[int], columns: Sequence[int]) -> RowCache:
        """The real columns of one row, copied out (so the arena can take the next batch). `columns` are the row's
        real columns as the caller counted them, ascending: reading them from the mask would wait for the GPU."""
        if len(columns) != len(ids):
            raise AssertionError(f"static cache bookkeeping: {len(columns)} cached columns for {len(ids)} tokens")
        return RowCache(ids, copy_columns(self.kv[:, :, slot], columns))

    # -- buffers and graphs -------------------------------------------------------------------------------------

    def _reserve(self, rows: int, width: int) -> None:
        if rows <= self.capacity[0] and width <= self.capacity[1]:
            return
        rows, width = max(rows, self.capacity[0]), max(width, self.capacity[1])
        self._graphs.clear()  # they read the old buffers
        self.kv = torch.zeros((0,), dtype=self.dtype, device=self.device)  # freed before the larger one is made
        shape = (self.layers, 2, rows, self.shape.kv_heads, width, self.shape.head_dim)
        self.kv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.mask = torch.zeros((rows, width), dtype=torch.bool, device=self.device)
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
        self.capacity = (rows, width)

    def _run(self) -> torch.Tensor:
        if (self.layer_kernels or self.attention == "split") and not self._kernels_checked:
            # The first forward with rsd's Triton kernels compiles them: outside any graph capture, so that a
            # failure (no compiler toolchain, an unsupported card) is theirs and decoding can go on without them.
            try:
                self._forward(self.rows, self.width)
            except Exception as exc:
                self._without_triton_kernels(exc)
            self._kernels_checked = True
        shape = self._settings()
        if self.compiled and shape not in self._compiled_shapes:
            # Compile (or check the compiled code) outside any graph capture, once per shape and settings.
            try:
                self._forward(self.rows, self.width)
                self._compiled_shapes.add(shape)
            except Exception as exc:  # an unsupported operation, a missing compiler toolchain
                self._uncompile(exc)
        if not self.use_graphs:
            return self._forward(self.rows, self.width)
        # A graph holds the kernels of the settings it was captured with: one per shape and settings (an A/B
        # that switches them back and forth replays its own graphs).
        key = self._settings()
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(self.rows, self.width)
            except Exception as exc:  # a layer that cannot be captured (a quantized kernel that syncs, say)
                warnings.warn(
                    f"CUDA graph capture failed ({type(exc).__name__}: {exc}); this model decodes without graphs "
                    "from now on (decode='static').",
                    stacklevel=2,
                )
                self.use_graphs = False
                self._graphs.clear()
                return self._forward(self.rows, self.width)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, logits = entry
        graph.replay()
        return logits

    def _settings(self) -> tuple[int, int, bool, bool, str, bool]:
        """What a captured graph or a compiled shape holds: the bucket and the settings its kernels were made with."""
        return (self.rows, self.width, self.fused_kernels, self.fuse_projections, self.attention, self.layer_kernels)

    def _capture(self, rows: int, width: int) -> tuple[Any, torch.Tensor]:
        # A forward is idempotent for given buffers (it rewrites the same column with the same keys), so the
        # warm-up run that capturing needs can use the live batch.
        with torch.cuda.device(self.device):  # a model on cuda:1 captures there, whatever the current device
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(rows, width)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._forward(rows, width)
        return graph, logits

    def _forward(self, rows: int, width: int) -> torch.Tensor:
        """One decode token for `rows` rows over `width` cache columns; the next-token logits in float32."""
        mask = self.mask[:rows, :width]
        mask.index_fill_(1, self.column, True)
        bias = None
        if self.attention == "sdpa":  # the split kernels read the mask itself
            bias = torch.zeros(mask.shape, dtype=self.dtype, device=self.device)
            bias = bias.masked_fill(~mask, torch.finfo(self.dtype).min)[:, None, None, :]
        if self.layer_kernels and self.fused_kernels and self.fuse_projections and not self.compiled:
            return self._forward_by_layer_kernels(mask, bias)
        hidden = self.body.embed_tokens(self.ids[:rows])
        cos, sin = self.body.rotary_emb(hidden, self.positions[:rows])
        sin = signed_sin(sin) if self.fused_kernels else sin
        rotary = (cos[:, None], sin[:, None])  # [rows, 1, 1, head_dim]: broadcast over heads
        fused = self.fused_kernels
        projections = self._projections if fused and self.fuse_projections else None
        for index, layer in enumerate(self.body.layers):
            weights = projections[index] if projections else None
            query, key, value = self._layer_head(layer, weights, hidden, *rotary, self.shape, fused)
            attention = self._attend(index, query, key, value, mask, bias, layer.self_attn)
            hidden = self._layer_tail(layer, weights, hidden, attention, fused)
        return self.model.lm_head(norm_of(self.body.norm, hidden, self.fused_kernels))[:, -1].float()

    def _forward_by_layer_kernels(self, mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`_forward` with each layer's small operations in rsd's Triton kernels (layer_kernels.py): per layer, the
        two fused products and the two others, the rotation with the arena writes, the attention, two adds each with
        the norm after it (the second with the next layer's input norm), and the SiLU gate."""
        rows, width = mask.shape
        heads, kv_heads, head_dim = self.shape
        layers = self.body.layers
        hidden = self.body.embed_tokens(self.ids[:rows, 0])  # [rows, hidden]: one token a row
        cos, sin = self.body.rotary_emb(hidden[:, None], self.positions[:rows])
        cos, sin = cos[:, 0], signed_sin(sin[:, 0])
        x = rms_norm(layers[0].input_layernorm, hidden)
        for index, layer in enumerate(layers):
            weights = self._projections[index]
            keys, values = self.kv[index, 0, :rows, :, :width], self.kv[index, 1, :rows, :, :width]
            qkv = F.linear(x, weights.qkv, weights.qkv_bias)
            query = rotate_into_arena(qkv, cos, sin, keys, values, self.column, heads, kv_heads)
            attention = self._attend_arena(query, keys, values, mask, bias, layer.self_attn)
            hidden, x = self._layer_rest_by_kernels(index, weights, hidden, attention.reshape(rows, -1))
        return self.model.lm_head(x).float()

    def _layer_rest_by_kernels(
        self, index: int, weights: FusedProjections, hidden: torch.Tensor, attention: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index` after its attention ([tokens, heads x head_dim]), through the layer kernels: the output
        projection and the MLP, each added to the residual `hidden` (in place) with the norm after it, the second the
        next layer's input norm (the body's final norm after the last layer). Returns (residual, its norm)."""
        layers = self.body.layers
        layer = layers[index]
        norm = layer.post_attention_layernorm
        hidden, x = add_rms_norm(hidden, layer.self_attn.o_proj(attention), norm.weight, norm.variance_epsilon)
        update = layer.mlp.down_proj(silu_times_up(F.linear(x, weights.gate_up, weights.gate_up_bias)))
        norm = layers[index + 1].input_layernorm if index + 1 < len(layers) else self.body.norm
        return add_rms_norm(hidden, update, norm.weight, norm.variance_epsilon)

    def _attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
        bias: torch.Tensor | None,
        attn: Any,
    ) -> torch.Tensor:
        """Write the token's keys and values into the arena and attend over the columns `mask` shows (`bias` is
        the same as an additive mask, for SDPA). Never compiled: it writes into the arena in place."""
        rows, width = mask.shape
        keys = self.kv[layer, 0, :rows, :, :width]
        values = self.kv[layer, 1, :rows, :, :width]
        keys.index_copy_(2, self.column, key)
        values.index_copy_(2, self.column, value)
        return self._attend_arena(query, keys, values, mask, bias, attn)

    def _attend_arena(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        bias: torch.Tensor | None,
        attn: Any,
    ) -> torch.Tensor:
        """A decode token's attention over the arena's `keys` and `values`, the way `attention` says."""
        scale = getattr(attn, "scaling", self.shape.head_dim**-0.5)
        if self.attention == "split":
            return split_attention(query, keys, values, mask, scale)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scale)


# -- a packed prefill's layout ----------------------------------------------------------------------------------


@dataclass
class PackedChunk:
    """Tokens [first, end) of a packed prefill: one forward. `tiles` are `packed_attention`'s rows (token indices
    within the chunk); `last_tokens` (within the chunk) are the last tokens of the rows `rows_ending` (call rows)."""

    first: int
    end: int
    tiles: list[list[int]] = field(default_factory=list)
    last_tokens: list[int] = field(default_factory=list)
    rows_ending: list[int] = field(default_factory=list)


@dataclass
class PackedPlan:
    """Where every token of a packed prefill goes: its position, arena row and column, in the order the rows' tails
    are packed, and the chunks they run in."""

    positions: list[int]
    slots: list[int]
    columns: list[int]
    chunks: list[PackedChunk]

    def token_fields(self) -> list[list[int]]:
        return [self.positions, self.slots, self.columns]


def packed_plan(
    lengths: Sequence[int],
    reused: Sequence[int],
    first_slot: int,
    tail_columns: tuple[int, int],
    chunk_tokens: int,
    tile: int,
) -> PackedPlan:
    """The layout of a packed prefill: row i (arena row `first_slot + i`) runs `lengths[i]` tokens after its
    `reused` cached ones, which sit right-aligned before `tail_columns[0]`; its tail fills the last columns before
    `tail_columns[1]`. Chunks hold at most `chunk_tokens` tokens, tiles at most `tile` tokens of one row."""
    start, end = tail_columns
    positions, slots, columns = [], [], []
    chunks = [PackedChunk(0, 0)]
    for row, (length, past) in enumerate(zip(lengths, reused, strict=True)):
        if length < 1:
            raise ValueError(f"packed prefill: row {row} has no token to run")
        first_column = end - length
        lo = start - past if past else first_column  # the row's first real column
        positions.extend(range(past, past + length))
        slots.extend([first_slot + row] * length)
        columns.extend(range(first_column, end))
        done = 0
        while done < length:
            chunk = chunks[-1]
            if chunk.end - chunk.first == chunk_tokens:
                chunk = PackedChunk(chunk.end, chunk.end)
                chunks.append(chunk)
            count = min(tile, length - done, chunk_tokens - (chunk.end - chunk.first))
            last_column = first_column + done + count
            chunk.tiles.append([first_slot + row, chunk.end - chunk.first, count, lo, last_column])
            chunk.end += count
            done += count
        chunk.last_tokens.append(chunk.end - chunk.first - 1)
        chunk.rows_ending.append(row)
    return PackedPlan(positions, slots, columns, chunks)


def copy_columns(kv: torch.Tensor, columns: Sequence[int]) -> torch.Tensor:
    """`kv` [..., columns, head_dim] at `columns` (ascending), in memory of its own (the arena takes the next batch).

    A row's columns are a few runs (its prefix, then its tail and decoded tokens), so they are copied run by run
    from slices: nothing is sent to the device. A gather would first upload each row's index from pinned memory, a
    cost per row that adds up over the 512 rows a model copies out per batch-64 run (benchmarks/row_copies.py)."""
    runs = column_runs(columns)
    if not runs:
        return kv[..., :0, :].clone(memory_format=torch.contiguous_format)
    return torch.cat([kv[..., start:end, :] for start, end in runs], dim=-2)


def column_runs(columns: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending, distinct `columns` as [start, end) runs of consecutive columns, in order. A stretch is one run
    exactly when its last column minus its first equals its length minus one, so halving the stretches that are
    not finds the runs in O(runs x log columns) steps, where a loop would visit every one of a row's ~700 columns."""
    runs: list[tuple[int, int]] = []
    stack = [(0, len(columns) - 1)] if len(columns) else []
    while stack:
        first, last = stack.pop()
        if columns[last] - columns[first] == last - first:
            if runs and runs[-1][1] == columns[first]:
                runs[-1] = (runs[-1][0], columns[last] + 1)
            else:
                runs.append((columns[first], columns[last] + 1))
            continue
        middle = (first + last) // 2
        stack += [(middle + 1, last), (first, middle)]  # the left half pops first: runs come out in order
    return runs


def host_to_device(values: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """A long tensor on `device`, copied without waiting for the work queued there: from pinned memory on CUDA
    (a copy from pageable memory may synchronise the stream, which would stall a decode loop that keeps one
    forward in flight)."""
    return to_device(torch.tensor(list(values), dtype=torch.long), device)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` (on the host) copied to `device` without waiting for the work queued there (`host_to_device`)."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class HeadShape(NamedTuple):
    heads: int
    kv_heads: int
    head_dim: int


def norm_of(norm: Any, x: torch.Tensor, fused: bool) -> torch.Tensor:
    return rms_norm(norm, x) if fused else norm(x)


def layer_head(
    layer: Any,
    weights: FusedProjections | None,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    shape: HeadShape,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoder layer up to its attention, one decode token a row: the query, its heads grouped by key head
    ([rows, kv_heads, groups, head_dim]), and the token's key and value ([rows, kv_heads, 1, head_dim]), rotated.
    With `weights` and no per-head norm, one product and one rotation for the query and key heads together."""
    if weights is not None and not hasattr(layer.self_attn, "q_norm"):
        return fused_attention_inputs(norm_of(layer.input_layernorm, hidden, fused), weights, cos, sin, shape)
    return tail_layer_head(layer, weights, hidden, cos, sin, shape, fused)  # one token: groups x 1 query rows


def tail_layer_head(
    layer: Any,
    weights: FusedProjections | None,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    shape: HeadShape,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`layer_head` for several tokens per row ([rows, tokens, hidden]): the query with each key head's query heads
    folded into its length ([rows, kv_heads, groups x tokens, head_dim]), and the keys and values ([rows, kv_heads,
    tokens, head_dim]), rotated."""
    heads, kv_heads, head_dim = shape
    attn = layer.self_attn
    x = norm_of(layer.input_layernorm, hidden, fused)
    rows, tokens = x.shape[:2]
    if weights is not None:
        query, key, value = F.linear(x, weights.qkv, weights.qkv_bias).split(weights.qkv_sizes, dim=-1)
    else:
        query, key, value = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    query = query.view(rows, tokens, heads, head_dim)
    key, value = key.view(rows, tokens, kv_heads, head_dim), value.view(rows, tokens, kv_heads, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
        query, key = norm_of(attn.q_norm, query, fused), norm_of(attn.k_norm, key, fused)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if fused:
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
    else:
        query, key = query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin
    return query.reshape(rows, kv_heads, heads // kv_heads * tokens, head_dim), key, value


def unfold_heads(attention: torch.Tensor, tokens: int) -> torch.Tensor:
    """[rows, kv_heads, groups x tokens, head_dim] back to [rows, tokens, heads x head_dim], heads in the model's
    order (head h is key head h // groups)."""
    rows, kv_heads, folded, head_dim = attention.shape
    groups = folded // tokens
    return attention.view(rows, kv_heads, groups, tokens, head_dim).permute(0, 3, 1, 2, 4).reshape(rows, tokens, -1)


def tail_bias(mask: torch.Tensor, start: int, end: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask of a tail prefill over columns [start, end): token t of a row sees the row's
    real columns before the tail and its real tail tokens up to t, and always itself (so a padding token's softmax
    is never empty and the keys and values it writes stay finite). `mask` is [rows, columns], the tail's real
    columns already set. [rows, 1, groups x tokens, columns]: the query heads folded as in `tail_layer_head`."""
    rows, columns = mask.shape
    tokens = end - start
    allowed = mask[:, None, :].expand(rows, tokens, columns).clone()
    causal = torch.ones((tokens, tokens), dtype=torch.bool, device=mask.device).tril()
    allowed[:, :, start:end] &= causal
    allowed[:, :, start:end] |= torch.eye(tokens, dtype=torch.bool, device=mask.device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return bias[:, None, None].expand(rows, 1, groups, tokens, columns).reshape(rows, 1, groups * tokens, columns)


def fused_attention_inputs(
    x: torch.Tensor, weights: FusedProjections, cos: torch.Tensor, sin: torch.Tensor, shape: HeadShape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`layer_head` after the norm, with one matrix product for the three projections and one rotation for the
    query and key heads together (they are adjacent in the product's output)."""
    heads, kv_heads, head_dim = shape
    rows = x.shape[0]
    qkv = F.linear(x, weights.qkv, weights.qkv_bias)  # [rows, 1, (heads + 2 kv_heads) * head_dim]
    rotated = rotate(qkv[..., : (heads + kv_heads) * head_dim].view(rows, heads + kv_heads, 1, head_dim), cos, sin)
    query = rotated[:, :heads].reshape(rows, kv_heads, heads // kv_heads, head_dim)
    value = qkv[..., (heads + kv_heads) * head_dim :].view(rows, kv_heads, 1, head_dim)
    return query, rotated[:, heads:], value


def layer_tail(
    layer: Any, weights: FusedProjections | None, hidden: torch.Tensor, attention: torch.Tensor, fused: bool
) -> torch.Tensor:
    """The rest of a decoder layer: the attention's output projection and the MLP, each added to the residual.
    With `weights`, the MLP's gate and up projections are one matrix product."""
    hidden = hidden + layer.self_attn.o_proj(attention.reshape(*hidden.shape[:2], -1))
    x = norm_of(layer.post_attention_layernorm, hidden, fused)
    if weights is None:
        return hidden + layer.mlp(x)
    mlp = layer.mlp
    gate, up = F.linear(x, weights.gate_up, weights.gate_up_bias).chunk(2, dim=-1)
    return hidden + mlp.down_proj(mlp.act_fn(gate) * up)


# -- one matrix product where the model has several -------------------------------------------------------------
# At 16 rows a projection of the 1.5B draft reads a few megabytes: its kernel's launch and tail, not its bytes, set
# its time. The keys' and values' products (256 columns each) are the smallest of all. One product per group reads
# the same bytes in one kernel.


class FusedProjections(NamedTuple):
    qkv: torch.Tensor  # [q; k; v] weights, [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up: torch.Tensor  # [gate; up] weights, [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None


FUSABLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")  # down_proj(act_fn(gate_proj(x)) * up_proj(x))


def fuse_projections(layers: Sequence[Any]) -> list[FusedProjections] | None:
    """Each layer's q/k/v and gate/up weights concatenated into one matrix each, or None where any layer's are not
    plain `nn.Linear` weights on one device (a quantized or adapted layer, offloaded weights, a hook).

    The model's own projections are re-pointed at slices of the concatenated matrices, so the weights are not held
    twice, and its eager forward (the prefill) reads the very same memory. A second decoder of the same model finds
    the fusion done and reuses it."""
    if not all(fusable_layer(layer) for layer in layers):
        return None
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, so the model still works under autograd
        return [
            FusedProjections(
                *concatenated(layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                *concatenated(layer.mlp, ("gate_proj", "up_proj"))[:2],
            )
            for layer in layers
        ]


def fusable_layer(layer: Any) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(mlp).__name__ not in FUSABLE_MLPS or attn is None:
        return False
    projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    projections += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj")]
    if not all(type(module) is torch.nn.Linear and plain_module(module) for module in projections):
        return False
    weights = [module.weight for module in projections]
    if any(w.device.type == "meta" or (w.device, w.dtype) != (weights[0].device, weights[0].dtype) for w in weights):
        return False
    # Either every projection of a group has a bias or none has (Qwen2: q, k, v do; the MLP's do not).
    return all(len({m.bias is None for m in group}) == 1 for group in (projections[:3], projections[3:]))


def plain_module(module: Any) -> bool:
    """No hooks (accelerate's offloading, adapters, user hooks) that a direct matrix product would bypass."""
    return not (module._forward_hooks or module._forward_pre_hooks)


def concatenated(parent: Any, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """The weights (and biases) of `parent`'s projections `names` as one matrix, the projections re-pointed at its
    rows; the matrix the projections already share when an earlier call made it."""
    modules = [getattr(parent, name) for name in names]
    sizes = tuple(int(module.weight.shape[0]) for module in modules)
    weight = shared_matrix([module.weight for module in modules])
    if weight is None:
        weight = torch.cat([module.weight for module in modules])
        repoint(modules, "weight", weight.split(sizes))
    bias = None
    if modules[0].bias is not None:
        bias = shared_matrix([module.bias for module in modules])
        if bias is None:
            bias = torch.cat([module.bias for module in modules])
            repoint(modules, "bias", bias.split(sizes))
    return weight, bias, sizes


def shared_matrix(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The one matrix `parts` are consecutive rows of (an earlier fusion), or None."""
    first = parts[0]
    storage = first.untyped_storage()
    offset = first.storage_offset()
    for part in parts:
        if part.untyped_storage().data_ptr() != storage.data_ptr() or part.storage_offset() != offset:
            return None
        if not part.is_contiguous():
            return None
        offset += part.numel()
    rows = sum(int(part.shape[0]) for part in parts)
    return first.new_empty(0).set_(storage, first.storage_offset(), (rows, *first.shape[1:]))


def repoint(modules: Sequence[Any], name: str, slices: Sequence[torch.Tensor]) -> None:
    for module, part in zip(modules, slices, strict=True):
        old = getattr(module, name)
        setattr(module, name, torch.nn.Parameter(part, requires_grad=old.requires_grad))


# -- fewer kernels per layer ------------------------------------------------------------------------------------
# A decode forward of a 1.5B model at 16 rows is about a thousand small kernels, and their count, not the bytes
# they move, sets its time (docs/benchmarks.md). transformers' RMSNorm is eight kernels and its rotation five per
# tensor; these are one and three, with the same arithmetic up to the last bit of rounding.


def rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for the Llama-family RMSNorm as one fused kernel (where torch has one); other norms as they are."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if type(norm).__name__ not in FUSABLE_NORMS or weight is None or eps is None:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == x.roll(half) * signed_sin(sin)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """The rotary embedding, x * cos + rotate_half(x) * sin, in three kernels instead of five."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

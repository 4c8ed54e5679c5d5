"""One forward of a Llama, Mistral or Qwen body over the KV arena, for prefills, decode tokens and verifications.

A forward takes tokens, each with its arena row, column and position (`Feed`): a prefill is every row's new tail,
a verification a few tokens a row, a decode one token for every row. Each layer projects the tokens, writes their
keys and values at their columns and lets each token attend to its row's real columns up to its own (the arena's
mask, and causality), with no padding computed. Two ways to run it, chosen by what the device can do:

- rsd's Triton kernels (CUDA, half precision, fusable projections; `kernels/`): the rotation writes the keys and
  values (`rotate_into_arena`), a packed attention reads the arena per tile of a row's tokens
  (`packed_attention`), a decode token's attention is split over the columns (`split_attention`), and the residual
  adds, norms and SiLU gate are one kernel each; in a forward of up to 16 tokens (a decode, a short verification)
  of a small model (hidden size up to 2048) the products carry the norms, the SiLU gate and the residual adds
  themselves (`decode_matmul`), where the layer's projections are plain linear maps;
- torch operations everywhere else (the CPU, float32, other layouts of these families): the same arithmetic, the
  attention through SDPA row by row.

A decode forward reads its inputs from device buffers only (`Arena.cursor`, `Arena.ids`), so that the runner can
replay it as a CUDA graph. If the Triton kernels fail to compile on this machine, the forward warns once and goes
on with torch operations.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from rsd.engine.kernels.decode_matmul import MAX_ROWS, decode_linear, decode_products_problem, new_counters
from rsd.engine.kernels.layer_kernels import (
    add_rms_norm,
    layer_kernels_problem,
    rms_norm_rows,
    rotate_into_arena,
    silu_times_up,
)
from rsd.engine.kernels.packed_attention import packed_attention, tile_tokens
from rsd.engine.kernels.split_attention import HALF_DTYPES, split_attention
from rsd.engine.kv_cache import Arena, to_device
from rsd.engine.weights import FusedProjections, fuse_projections, plain_module
from rsd.hf_loading import attention_without_cudnn, first_line

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The most tokens one forward of a packed prefill runs: a 7B model's MLP product for them is about 600 MB.
PACKED_CHUNK_TOKENS = 8192
# Torch operations attend row by row over the arena's keys; the scores of one row's chunk of tokens stay under this.
TORCH_SCORES_BYTES = 1 << 28


def layout_problem(body: Any) -> str | None:
    """Why a transformer body (a causal LM's `.model`, a PRM's body) cannot run in the engine, or None."""
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


class HeadShape(NamedTuple):
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class Feed:
    """The tokens of one forward, row after row: each token's id (host ids, or already on the device), arena row,
    column and position, and per row (slot, index of its first token, tokens)."""

    ids: list[int] | torch.Tensor = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    columns: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    rows: list[tuple[int, int, int]] = field(default_factory=list)

    @classmethod
    def placed(cls, arena: Arena, counts: Sequence[int], ids: list[int] | torch.Tensor) -> Feed:
        """`counts[slot]` tokens fed at each slot's next columns (moving the arena's rows on past them); `ids` holds
        them all, slot after slot."""
        slots, columns, positions = arena.place(counts)
        feed = cls(ids, slots, columns, positions)
        first = 0
        for slot, count in enumerate(counts):
            if count:
                feed.rows.append((slot, first, count))
                first += count
        return feed

    def __len__(self) -> int:
        return len(self.slots)

    def device_ids(self, device: torch.device) -> torch.Tensor:
        if isinstance(self.ids, torch.Tensor):
            return self.ids.to(device)
        return to_device(torch.tensor(self.ids, dtype=torch.long), device)

    def kept_tokens(self, last: Sequence[int] | None) -> list[int]:
        """Indices of every token (`last` None), or of each fed row's last `last[slot]` tokens, row after row."""
        if last is None:
            return list(range(len(self)))
        return [
            t for slot, first, count in self.rows for t in range(first + count - min(count, last[slot]), first + count)
        ]


class ModelForward:
    """A body's layers (and LM head, for a causal LM) over an arena."""

    def __init__(self, model: Any, body: Any = None) -> None:
        """`model`: a causal LM (its `.model` is the body), or with `body` a bare body (a PRM's: hidden states)."""
        self.body = model.model if body is None else body
        self.lm_head = getattr(model, "lm_head", None) if body is None else None
        config = self.body.config.get_text_config()
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        self.shape = HeadShape(heads, int(config.num_key_value_heads), head_dim)
        self.layers = int(config.num_hidden_layers)
        embedding = self.body.get_input_embeddings().weight
        self.device, self.dtype = embedding.device, embedding.dtype
        self.projections = fuse_projections(self.body.layers)
        half_on_cuda = self.device.type == "cuda" and self.dtype in HALF_DTYPES
        # rsd's Triton kernels where they run: CUDA, half precision, a layout they handle, fused projections.
        self.kernels = half_on_cuda and self.kernels_problem() is None
        # Whether a forward of each kind ran with them (compiling its kernels) without failing. A decode token's
        # kernels are not a packed forward's (split attention, the rotation by row): each kind is checked apart.
        self.packed_checked = False
        self.decode_checked = False
        # A forward of up to MAX_ROWS tokens runs each layer's products with the norms, the SiLU gate and the residual
        # adds inside them (`decode_matmul`), where the model is small enough for that to pay and every projection
        # is a plain linear map.
        self.fused_products = (
            self.projections is not None
            and decode_products_problem(int(config.hidden_size)) is None
            and all(plain_products(layer) for layer in self.body.layers)
        )
        self.counters = new_counters(self.device)  # the split products' arrival counts (zeros between launches)

    def kernels_problem(self) -> str | None:
        if self.projections is None:
            return "its projections are not fused (quantized, adapted, hooked or offloaded layers)"
        return layer_kernels_problem(self.body, self.device, self.dtype, self.shape.head_dim)

    def new_arena(self) -> Arena:
        return Arena(self.layers, self.shape.kv_heads, self.shape.head_dim, self.dtype, self.device)

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        """A forward's result: a causal LM's logits (float32), a bare body's final-normed hidden states."""
        return self.finished(self.head(hidden))

    def head(self, hidden: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """A causal LM's logits in the model's dtype (a bare body's hidden states): what a graphed forward returns.
        With `into` (a runner's one output buffer, which all its graphs write to, so that their memory pools keep
        only what they share: their intermediates) the result is written at its front, a view of it."""
        if into is None:
            return self.lm_head(hidden) if self.lm_head is not None else hidden
        rows = hidden.shape[0]
        view = into[: rows * self.output_features].view(rows, self.output_features)
        if self.lm_head is None:
            return view.copy_(hidden)
        if self._plain_head():
            return torch.mm(hidden, self.lm_head.weight.t(), out=view)
        return view.copy_(self.lm_head(hidden))  # an adapted or hooked head: its own forward, then a copy

    def _plain_head(self) -> bool:
        """Whether the LM head is a plain linear map (no bias, no hooks): its product can write into a buffer."""
        head = self.lm_head
        return (
            type(head) is torch.nn.Linear
            and head.bias is None
            and not head._forward_hooks
            and not head._forward_pre_hooks
        )

    @property
    def output_features(self) -> int:
        """The width of `head`'s result: the vocabulary of the LM head, else the body's hidden size."""
        if self.lm_head is not None:
            return int(self.lm_head.weight.shape[0])
        return int(self.body.norm.weight.shape[0])

    def finished(self, head: torch.Tensor) -> torch.Tensor:
        """`head`'s result as callers take it: logits in float32 (a copy outside any graph), hidden states as they
        are."""
        return head.float() if self.lm_head is not None else head

    # -- the entry points ----------------------------------------------------------------------------------------
    def hidden(self, arena: Arena, feed: Feed, keep: list[int]) -> torch.Tensor:
        """Run `feed` (placed and synced in `arena`); the final-normed hidden states of the tokens `keep`."""
        if self.kernels and not self.packed_checked:
            try:
                return self._hidden(arena, feed, keep)
            except Exception as exc:  # no compiler toolchain, an unsupported card: warn, then torch operations
                self.without_kernels(exc)
                arena.sync()
            finally:
                self.packed_checked = True
        return self._hidden(arena, feed, keep)

    def decode(self, arena: Arena, into: torch.Tensor | None = None) -> torch.Tensor:
        """One token for every slot of `arena` (`arena.ids`, at each slot's next column and position): the
        next-token logits (`head`: the model's dtype, written `into` a buffer when one is given) of every slot. Reads
        device buffers only: the runner replays it as a graph."""
        rows, width = arena.rows, arena.width
        columns, positions = arena.cursor[0, :rows], arena.cursor[1, :rows]
        arena.mask[:rows].scatter_(1, columns[:, None], True)
        hidden = self.body.embed_tokens(arena.ids[:rows])
        cos, sin = self.rotary(hidden, positions)
        if self.kernels and self.fused_products and rows <= MAX_ROWS:
            x = self._layers_by_products(arena, hidden, cos, sin, columns, None, self._split_attention(arena))
        elif self.kernels:
            x = self._layers_by_kernels(arena, hidden, cos, sin, columns, None, self._split_attention(arena))
        else:
            x = self._layers_by_torch(arena, hidden, cos, sin, torch.arange(rows, device=self.device), columns,
                                      self._decode_attention_by_torch(arena, rows, width))  # fmt: skip
        return self.head(x, into)

    def verify(
        self, arena: Arena, tokens: int, last_only: bool = False, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`tokens` tokens for every slot of `arena` (`arena.ids`, slot after slot, at each slot's next columns and
        positions): the logits (`head`: the model's dtype; a bare body's hidden states) of every one, or with
        `last_only` of each slot's token `arena.last[slot]` (an index into the fed tokens). Reads device buffers
        only, like `decode`: the runner replays it as a graph. Through rsd's Triton kernels only (a row's tokens are
        tiles of the packed attention, built here on the device)."""
        rows = arena.rows
        index = torch.arange(rows * tokens, device=self.device)
        slots, offsets = index // tokens, index % tokens  # no host data: a graph replays it
        columns = arena.cursor[0, :rows][slots] + offsets
        positions = arena.cursor[1, :rows][slots] + offsets
        arena.mask.index_put_((slots, columns), torch.ones_like(slots, dtype=torch.bool))
        tile = tile_tokens(self.shape.groups)
        per_row = -(-tokens // tile)
        row = torch.arange(rows, device=self.device).repeat_interleave(per_row)
        start = torch.arange(per_row, device=self.device).repeat(rows) * tile
        count = (tokens - start).clamp(max=tile)
        ends = arena.cursor[0, :rows][row] + start + count  # each tile's last token's column + 1
        tiles = torch.stack([row, row * tokens + start, count, arena.first[:rows][row], ends], dim=1).to(torch.int32)
        hidden = self.body.embed_tokens(arena.ids[: rows * tokens])
        cos, sin = self.rotary(hidden, positions)
        attend = self._packed_attention(arena, columns, tiles)
        if self.fused_products and rows * tokens <= MAX_ROWS:
            x = self._layers_by_products(arena, hidden, cos, sin, columns, slots, attend)
        else:
            x = self._layers_by_kernels(arena, hidden, cos, sin, columns, slots, attend)
        if last_only:
            x = x.index_select(0, arena.last[:rows])
        return self.head(x, into)

    def verifies(self) -> bool:
        """Whether `verify` runs here: it needs rsd's kernels."""
        return self.kernels

    def without_kernels(self, error: BaseException) -> None:
        warnings.warn(
            f"rsd's Triton kernels failed ({type(error).__name__}: {first_line(error)}); this model runs with SDPA "
            "and torch operations from now on.",
            stacklevel=3,
        )
        self.kernels = False

    # -- a forward of several tokens a row ----------------------------------------------------------------------
    def _hidden(self, arena: Arena, feed: Feed, keep: list[int]) -> torch.Tensor:
        if not self.kernels:
            return self._hidden_by_torch(arena, feed, keep)
        tile = tile_tokens(self.shape.groups)
        fields = torch.tensor([feed.slots, feed.columns, feed.positions], dtype=torch.long)
        slots, columns, positions = to_device(fields, self.device)
        ids = feed.device_ids(self.device)
        out = torch.empty((len(keep), self.body.norm.weight.shape[0]), dtype=self.dtype, device=self.device)
        for first, end, tiles, kept in packed_chunks(feed, arena.lo, tile, keep):
            part = slice(first, end)
            hidden = self.body.embed_tokens(ids[part])
            cos, sin = self.rotary(hidden, positions[part])
            table = to_device(torch.tensor(tiles, dtype=torch.int32), self.device)
            attend = self._packed_attention(arena, columns[part], table)
            x = self._layers_by_kernels(arena, hidden, cos, sin, columns[part], slots[part], attend)
            if kept:
                rows, local = zip(*kept, strict=True)
                index = to_device(torch.tensor(local), self.device)
                out.index_copy_(0, to_device(torch.tensor(rows), self.device), x.index_select(0, index))
        return out

    def _hidden_by_torch(self, arena: Arena, feed: Feed, keep: list[int]) -> torch.Tensor:
        fields = torch.tensor([feed.slots, feed.columns, feed.positions], dtype=torch.long)
        slots, columns, positions = to_device(fields, self.device)
        ids = feed.device_ids(self.device)
        hidden = self.body.embed_tokens(ids)
        cos, sin = self.rotary(hidden, positions)
        attend = self._rows_attention_by_torch(arena, feed)
        with attention_without_cudnn(self.device):
            x = self._layers_by_torch(arena, hidden, cos, sin, slots, columns, attend)
        return x[to_device(torch.tensor(keep, dtype=torch.long), self.device)]

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the signed sin (`signed_sin`) of each token's position, [tokens, head_dim]."""
        cos, sin = self.body.rotary_emb(hidden[None], positions[None])
        return cos[0], signed_sin(sin[0])

    # -- the layers ------------------------------------------------------------------------------------------------
    def _layers_by_kernels(
        self,
        arena: Arena,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        columns: torch.Tensor,
        slots: torch.Tensor | None,
        attend: Any,
    ) -> torch.Tensor:
        """Every layer through rsd's kernels: per layer the two fused products and the two others, the rotation with
        the arena writes, the attention, and two adds each with the norm after it (the second the next layer's input
        norm, the body's final norm after the last). Returns the final-normed hidden states."""
        heads, kv_heads, _ = self.shape
        layers = self.body.layers
        x = rms_norm(layers[0].input_layernorm, hidden)
        for index, layer in enumerate(layers):
            weights = self.projections[index]
            keys, values = arena.kv[index, 0], arena.kv[index, 1]
            qkv = F.linear(x, weights.qkv, weights.qkv_bias)
            query = rotate_into_arena(qkv, cos, sin, keys, values, columns, heads, kv_heads, slots)
            attention = attend(index, query, layer.self_attn).reshape(len(hidden), -1)
            norm = layer.post_attention_layernorm
            hidden, x = add_rms_norm(hidden, layer.self_attn.o_proj(attention), norm.weight, norm.variance_epsilon)
            update = layer.mlp.down_proj(silu_times_up(F.linear(x, weights.gate_up, weights.gate_up_bias)))
            norm = layers[index + 1].input_layernorm if index + 1 < len(layers) else self.body.norm
            hidden, x = add_rms_norm(hidden, update, norm.weight, norm.variance_epsilon)
        return x

    def _layers_by_products(
        self,
        arena: Arena,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        columns: torch.Tensor,
        slots: torch.Tensor | None,
        attend: Any,
    ) -> torch.Tensor:
        """Every layer of a forward of up to `MAX_ROWS` tokens (a decode, a short verification) in six or seven
        kernels: the four products (`decode_linear`: the norms, the SiLU gate and the residual adds inside them), the
        rotation with the arena writes, and the attention. `hidden` (the embedded tokens) is the residual stream,
        updated in place. Returns the final-normed hidden states."""
        heads, kv_heads, _ = self.shape
        for index, layer in enumerate(self.body.layers):
            weights = self.projections[index]
            attn, mlp = layer.self_attn, layer.mlp
            norm = norm_of(layer.input_layernorm)
            qkv = decode_linear(hidden, weights.qkv, weights.qkv_bias, norm=norm, counters=self.counters)
            keys, values = arena.kv[index, 0], arena.kv[index, 1]
            query = rotate_into_arena(qkv, cos, sin, keys, values, columns, heads, kv_heads, slots)
            attention = attend(index, query, attn).reshape(len(hidden), -1)
            decode_linear(attention, attn.o_proj.weight, attn.o_proj.bias, residual=hidden, counters=self.counters)
            norm = norm_of(layer.post_attention_layernorm)
            gate_up = decode_linear(hidden, weights.gate_up, weights.gate_up_bias, norm=norm, counters=self.counters)
            down = mlp.down_proj
            decode_linear(gate_up, down.weight, down.bias, gated=True, residual=hidden, counters=self.counters)
        return rms_norm_rows(hidden, *norm_of(self.body.norm))

    def _layers_by_torch(
        self,
        arena: Arena,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        columns: torch.Tensor,
        attend: Any,
    ) -> torch.Tensor:
        """Every layer through torch operations; `attend(layer index, query [tokens, heads, head_dim], attention
        module)` -> [tokens, heads, head_dim]. Returns the final-normed hidden states."""
        heads, kv_heads, head_dim = self.shape
        tokens = len(hidden)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        for index, layer in enumerate(self.body.layers):
            attn = layer.self_attn
            x = rms_norm(layer.input_layernorm, hidden)
            weights = self.projections[index] if self.projections else None
            if weights is not None:
                query, key, value = F.linear(x, weights.qkv, weights.qkv_bias).split(weights.qkv_sizes, dim=-1)
            else:
                query, key, value = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            query = query.view(tokens, heads, head_dim)
            key, value = key.view(tokens, kv_heads, head_dim), value.view(tokens, kv_heads, head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
                query, key = rms_norm(attn.q_norm, query), rms_norm(attn.k_norm, key)
            query, key = rotate(query, cos, sin), rotate(key, cos, sin)
            arena.kv[index, 0].transpose(1, 2)[slots, columns] = key
            arena.kv[index, 1].transpose(1, 2)[slots, columns] = value
            hidden = hidden + attn.o_proj(attend(index, query, attn).reshape(tokens, -1))
            hidden = hidden + mlp_of(layer, rms_norm(layer.post_attention_layernorm, hidden), weights)
        return rms_norm(self.body.norm, hidden)

    # -- attention ---------------------------------------------------------------------------------------------------
    def _scale(self, attn: Any) -> float:
        return getattr(attn, "scaling", self.shape.head_dim**-0.5)

    def _packed_attention(self, arena: Arena, columns: torch.Tensor, tiles: torch.Tensor) -> Any:
        def attend(index: int, query: torch.Tensor, attn: Any) -> torch.Tensor:
            keys, values = arena.kv[index, 0], arena.kv[index, 1]
            return packed_attention(query, keys, values, arena.mask, columns, tiles, self._scale(attn))

        return attend

    def _split_attention(self, arena: Arena) -> Any:
        rows, width = arena.rows, arena.width
        heads, kv_heads, head_dim = self.shape

        def attend(index: int, query: torch.Tensor, attn: Any) -> torch.Tensor:
            keys, values = arena.kv[index, 0, :rows, :, :width], arena.kv[index, 1, :rows, :, :width]
            folded = query.view(rows, kv_heads, heads // kv_heads, head_dim)
            return split_attention(folded, keys, values, arena.mask[:rows, :width], self._scale(attn))

        return attend

    def _decode_attention_by_torch(self, arena: Arena, rows: int, width: int) -> Any:
        heads, kv_heads, head_dim = self.shape
        mask = arena.mask[:rows, None, None, :width]

        def attend(index: int, query: torch.Tensor, attn: Any) -> torch.Tensor:
            keys, values = arena.kv[index, 0, :rows, :, :width], arena.kv[index, 1, :rows, :, :width]
            folded = query.view(rows, kv_heads, heads // kv_heads, head_dim)
            with attention_without_cudnn(self.device):
                return F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=self._scale(attn))

        return attend

    def _rows_attention_by_torch(self, arena: Arena, feed: Feed) -> Any:
        """Row by row: a row's tokens (query heads folded per key head) over its columns up to its last token's, each
        seeing the row's real columns up to its own (the arena mask and causality)."""
        heads, kv_heads, head_dim = self.shape
        groups = heads // kv_heads
        plans = []
        for slot, first, count in feed.rows:
            end = feed.columns[first + count - 1] + 1
            own = to_device(torch.tensor(feed.columns[first : first + count], dtype=torch.long), self.device)
            seen = arena.mask[slot, :end][None, :] & (torch.arange(end, device=self.device)[None, :] <= own[:, None])
            chunk = max(1, TORCH_SCORES_BYTES // (4 * heads * max(end, 1)))
            for start in range(0, count, chunk):
                stop = min(count, start + chunk)
                visible = seen[start:stop][None].expand(groups, -1, -1).reshape(1, groups * (stop - start), end)
                plans.append((slot, first + start, stop - start, end, visible))

        def attend(index: int, query: torch.Tensor, attn: Any) -> torch.Tensor:
            out = torch.empty_like(query)
            for slot, first, count, end, visible in plans:
                q = query[first : first + count].view(count, kv_heads, groups, head_dim)
                q = q.permute(1, 2, 0, 3).reshape(kv_heads, groups * count, head_dim)
                keys, values = arena.kv[index, 0, slot, :, :end], arena.kv[index, 1, slot, :, :end]
                a = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=self._scale(attn))
                out[first : first + count] = (
                    a.view(kv_heads, groups, count, head_dim).permute(2, 0, 1, 3).reshape(count, heads, head_dim)
                )
            return out

        return attend


def packed_chunks(
    feed: Feed, lo: list[int], tile: int, keep: list[int]
) -> list[tuple[int, int, list[list[int]], list[tuple[int, int]]]]:
    """A packed forward in chunks of at most `PACKED_CHUNK_TOKENS` tokens: (first, end, tiles, kept) per chunk.
    A tile is up to `tile` consecutive tokens of one row, [arena row, first token within the chunk, tokens, the
    row's first real column, its last token's column + 1]; `kept` pairs an output row with a token of the chunk."""
    wanted = {token: i for i, token in enumerate(keep)}
    chunks: list[tuple[int, int, list[list[int]], list[tuple[int, int]]]] = []
    for first in range(0, len(feed), PACKED_CHUNK_TOKENS):
        end = min(len(feed), first + PACKED_CHUNK_TOKENS)
        tiles = []
        for slot, row_first, count in feed.rows:
            start, stop = max(first, row_first), min(end, row_first + count)
            for t in range(start, stop, tile):
                n = min(tile, stop - t)
                tiles.append([slot, t - first, n, lo[slot], feed.columns[t + n - 1] + 1])
        kept = [(wanted[t], t - first) for t in range(first, end) if t in wanted]
        chunks.append((first, end, tiles, kept))
    return chunks


def plain_products(layer: Any) -> bool:
    """Whether a layer's output and down projections are plain linear maps with row-major weights (no hooks): a
    decode forward's kernels can read their weights directly."""
    projections = (layer.self_attn.o_proj, layer.mlp.down_proj)
    return all(type(p) is torch.nn.Linear and plain_module(p) and p.weight.stride(-1) == 1 for p in projections)


def norm_of(norm: Any) -> tuple[torch.Tensor, float]:
    """An RMSNorm's weight and epsilon, as the kernels take them."""
    return norm.weight, norm.variance_epsilon


def mlp_of(layer: Any, x: torch.Tensor, weights: FusedProjections | None) -> torch.Tensor:
    """The layer's MLP; with `weights`, its gate and up projections as one matrix product."""
    mlp = layer.mlp
    if weights is None:
        return mlp(x)
    gate, up = F.linear(x, weights.gate_up, weights.gate_up_bias).chunk(2, dim=-1)
    return mlp.down_proj(mlp.act_fn(gate) * up)


# -- fewer kernels per layer ------------------------------------------------------------------------------------
# transformers' RMSNorm is eight kernels and its rotation five per tensor; these are one and three, with the same
# arithmetic up to the last bit of rounding.
FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for the Llama-family RMSNorm as one fused kernel (where torch has one); other norms as they are."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if type(norm).__name__ not in FUSABLE_NORMS or weight is None or eps is None:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == x.roll(half) * signed_sin(sin)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """The rotary embedding, x * cos + rotate_half(x) * sin, in three kernels instead of five."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)

"""A packed prefill's attention over the KV arena, in one Triton kernel.

RSD's prefills are short and ragged: at batch 64 the draft reads the target's rewritten step (64 tokens) on the
rows it rejected, about 19, and one token on the others; the PRM reads 65 tokens on some rows and 130 on others.
Padded to [rows, longest tail], the draft's prefill computed about 3 times its tokens, and its attention went
through SDPA with an additive mask built per forward ([rows, query heads x tokens, columns]) and query, key and
output copies around it: on an H200 the three models' arena prefills spent 545 ms of kernels per batch-64 run in
attention and elementwise copies against 663 ms in matrix products (`benchmarks/phase_profile.py --kernels`,
docs/benchmarks.md).

Here the tokens of every row are packed one after another, without padding (`rsd.engine.forward.packed_chunks`), so the
matrix products run on the real tokens only. This kernel takes the queries as the projections left them, [tokens,
heads, head_dim], and a table of tiles: each tile is up to `tile_tokens` consecutive tokens of one row, read
with the query heads of one key head folded in (a program reads each key and value block once for all of them). A
token at arena column c sees the row's real columns up to c: `mask` (its own tail columns already set) and
causality, read directly, with no mask tensor built. Each program walks only the columns between its row's first
real column and its last token's.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

QUERY_BLOCK = 128  # query rows (tokens x folded query heads) per program
BLOCK_COLUMNS = 64  # columns a program reads per iteration
# A tile, `TILE_FIELDS` int32s (the kernel reads them at offsets 0-4): arena row, first token, tokens, first real
# column, last token's column + 1.
TILE_FIELDS = 5


def tile_tokens(groups: int) -> int:
    """Tokens per tile: a program's `QUERY_BLOCK` query rows hold this many tokens of every query head of a key
    head (`groups` rounded up to a power of two)."""
    return max(1, QUERY_BLOCK // group_block(groups))


def group_block(groups: int) -> int:
    return 1 << (groups - 1).bit_length()


def packed_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    columns: torch.Tensor,
    tiles: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """softmax(scale * q @ keys^T over the columns a token sees) @ values, for every token of a packed prefill.

    `query` is [tokens, heads, head_dim] (head h belongs to key head h // groups), `keys` and `values` [rows,
    kv_heads, width, head_dim] (arena views, head dimension contiguous), `mask` [rows, width] (True on a row's real
    columns, its tail's included), `columns` [tokens] each token's arena column, `tiles` [n, `TILE_FIELDS`] int32
    (`rsd.engine.forward.packed_chunks`). Returns [tokens, heads, head_dim] in the query's dtype."""
    tokens, heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    if query.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("packed_attention: the head dimension must be contiguous")
    if tiles.dim() != 2 or tiles.shape[1] != TILE_FIELDS or not tiles.is_contiguous():
        raise ValueError(f"packed_attention: tiles must be a contiguous [n, {TILE_FIELDS}] table (packed_chunks)")
    out = torch.empty_like(query)
    visible = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    group_rows = group_block(groups)
    compiled_kernel()[(tiles.shape[0], kv_heads)](
        query, keys, values, visible, columns, tiles, out,
        *query.stride()[:2], *keys.stride()[:3], *values.stride()[:3], visible.stride(0), *out.stride()[:2],
        groups, scale,
        GROUPS=group_rows, TILE=QUERY_BLOCK // group_rows, HEAD_DIM=head_dim, BLOCK=BLOCK_COLUMNS,
        IEEE=query.dtype == torch.float32, num_warps=8,  # a [128, head_dim] float32 accumulator per program
    )  # fmt: skip
    return out


@functools.cache
def compiled_kernel() -> Any:
    """The kernel, defined on first use: Triton decides at definition whether it is interpreted."""
    import triton
    import triton.language as tl

    @triton.jit
    def packed_prefill_attention(
        q_ptr, k_ptr, v_ptr, mask_ptr, column_ptr, tile_ptr, out_ptr,
        q_token, q_head, k_row, k_head, k_col, v_row, v_head, v_col, mask_row, out_token, out_head,
        groups, scale,
        GROUPS: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        tile, kv_head = tl.program_id(0), tl.program_id(1)
        row = tl.load(tile_ptr + tile * 5)
        first = tl.load(tile_ptr + tile * 5 + 1)
        count = tl.load(tile_ptr + tile * 5 + 2)
        lo = tl.load(tile_ptr + tile * 5 + 3)
        hi = tl.load(tile_ptr + tile * 5 + 4)
        r = tl.arange(0, GROUPS * TILE)  # query rows: folded query head r // TILE, token r % TILE of the tile
        group, token = r // TILE, first + r % TILE
        real = (r % TILE < count) & (group < groups)
        head = kv_head * groups + group
        d = tl.arange(0, HEAD_DIM)
        query = tl.load(q_ptr + token[:, None] * q_token + head[:, None] * q_head + d[None, :],
                        mask=real[:, None], other=0.0)  # fmt: skip
        own = tl.load(column_ptr + token, mask=real, other=-1)  # each token's column: it sees up to there
        running_max = tl.full((GROUPS * TILE,), -1.0e30, tl.float32)
        running_sum = tl.zeros((GROUPS * TILE,), tl.float32)
        acc = tl.zeros((GROUPS * TILE, HEAD_DIM), tl.float32)
        for start in range(lo, hi, BLOCK):
            col = start + tl.arange(0, BLOCK)
            inside = col < hi
            shown = tl.load(mask_ptr + row * mask_row + col, mask=inside, other=0) != 0
            seen = shown[None, :] & (col[None, :] <= own[:, None])
            key = tl.load(k_ptr + row * k_row + kv_head * k_head + col[:, None] * k_col + d[None, :],
                          mask=inside[:, None], other=0.0)  # fmt: skip
            if IEEE:  # float32 tensors: full-precision products, not TF32's
                scores = tl.dot(query, tl.trans(key), input_precision="ieee") * scale
            else:
                scores = tl.dot(query, tl.trans(key)) * scale
            scores = tl.where(seen, scores, -1.0e30)
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            weights = tl.where(seen, tl.exp(scores - new_max[:, None]), 0.0)
            rescale = tl.exp(running_max - new_max)
            running_sum = running_sum * rescale + tl.sum(weights, 1)
            value = tl.load(v_ptr + row * v_row + kv_head * v_head + col[:, None] * v_col + d[None, :],
                            mask=inside[:, None], other=0.0)  # fmt: skip
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(weights, value, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(weights.to(value.dtype), value)
            running_max = new_max
        out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * out_token + head[:, None] * out_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=real[:, None])  # fmt: skip

    return packed_prefill_attention

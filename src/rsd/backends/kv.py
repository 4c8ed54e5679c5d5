"""Per-trajectory KV caches for the transformers backend: keep, trim, stack into one batch, split back.

Between calls each trajectory owns its keys and values as one tensor, every layer stacked: [layers, 2 (keys,
values), kv_heads, tokens, head_dim]. A call stacks the rows it serves into one `DynamicCache`, right-aligned
(padding columns on the left, masked out), so that one batched forward can append the new tails and decoded tokens
of every row at the same columns. When a row finishes, its real columns are copied back out. Both moves cost one
copy of the rows' caches. Stacking takes one operation per row (per-layer copies were thousands of launches per
call at 64 rows and 28 layers); a row leaving transformers' own `DynamicCache` still takes one per layer, while the
static decode path (`static_decode.py`) and the PRM take one per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache


@dataclass
class RowCache:
    """The keys and values one trajectory holds between calls."""

    ids: list[int]  # the tokens whose keys and values are held, in order
    kv: torch.Tensor  # [layers, 2, kv_heads, len(ids), head_dim]: keys ([:, 0]) and values ([:, 1]) of every layer

    def trimmed(self, length: int) -> RowCache:
        """The first `length` tokens: how a discarded proposal (or anything past a divergence) is dropped."""
        return RowCache(self.ids[:length], self.kv[:, :, :, :length])


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first tokens `a` and `b` share. Slices are compared (in C) and the stretch that holds the first
    difference is halved: ~log2(n) comparisons instead of a loop in Python over every token. Every model compares
    every row at every step."""
    n = min(len(a), len(b))
    if type(a) is not type(b):  # a list never equals a tuple
        a, b = list(a), list(b)
    if a[:n] == b[:n]:
        return n
    same, differs = 0, n  # a[:same] == b[:same]; the first difference lies in [same, differs)
    while differs - same > 1:
        middle = (same + differs) // 2
        if a[same:middle] == b[same:middle]:
            same = middle
        else:
            differs = middle
    return same


def stack_kv(rows: Sequence[torch.Tensor | None], width: int) -> torch.Tensor | None:
    """[layers, 2, rows, kv_heads, width, head_dim]: row i's tokens fill its last columns, zeros before them."""
    present = [kv for kv in rows if kv is not None and kv.shape[3] > 0]
    if width == 0 or not present:
        return None
    layers, _, heads, _, dim = present[0].shape
    batch = present[0].new_zeros((layers, 2, len(rows), heads, width, dim))
    for b, kv in enumerate(rows):
        if kv is not None and kv.shape[3] > 0:
            batch[:, :, b, :, width - kv.shape[3] :] = kv
    return batch


def dynamic_cache(batch: torch.Tensor | None) -> DynamicCache:
    """A `DynamicCache` over a stacked batch (empty for None)."""
    cache = DynamicCache()
    if batch is not None:
        for layer in range(batch.shape[0]):
            cache.update(batch[layer, 0], batch[layer, 1], layer)
    return cache


def stack_row_caches(rows: Sequence[RowCache | None], width: int) -> DynamicCache:
    """One batch cache of `width` columns; row i's tokens fill its last columns, the rest is masked padding."""
    return dynamic_cache(stack_kv([row.kv if row is not None else None for row in rows], width))


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers `DynamicCache`, across the versions this package supports."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def stacked_layers(cache: Any) -> torch.Tensor:
    """The whole batch cache as one tensor [layers, 2, rows, kv_heads, columns, head_dim] (one copy), so that each
    row comes out of it in one operation."""
    return torch.stack([torch.stack(pair) for pair in cache_layers(cache)])


def extract_row_cache(cache: DynamicCache, row: int, columns: torch.Tensor, ids: list[int]) -> RowCache:
    """Row `row`'s real `columns` of a batch cache (indexing copies, so the batch tensors can be freed)."""
    if len(columns) != len(ids):
        raise AssertionError(f"cache bookkeeping: {len(columns)} cached columns for {len(ids)} tokens")
    kv = torch.stack(
        [torch.stack((keys[row, :, columns], values[row, :, columns])) for keys, values in cache_layers(cache)]
    )
    return RowCache(ids, kv)


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep only `rows` of the batch cache (finished rows leave the batch so they cost nothing more)."""
    cache.batch_select_indices(rows)

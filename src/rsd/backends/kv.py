"""Per-trajectory KV caches for the transformers backend: keep, trim, stack into one batch, split back.

Between calls each trajectory owns its keys and values as plain tensors of batch size 1. A call stacks the rows
it serves into one `DynamicCache`, right-aligned (padding columns on the left, masked out), so that one batched
forward can append the new tails and decoded tokens of every row at the same columns. When a row finishes, its
real columns are copied back out. Both moves cost one copy of the rows' caches: linear, and simple.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class RowCache:
    """The keys and values one trajectory holds between calls."""

    ids: list[int]  # the tokens whose keys and values are held, in order
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values): [1, kv_heads, len(ids), dim]

    def trimmed(self, length: int) -> RowCache:
        """The first `length` tokens: how a discarded proposal (or anything past a divergence) is dropped."""
        return RowCache(self.ids[:length], [(k[:, :, :length], v[:, :, :length]) for k, v in self.layers])


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def stack_row_caches(rows: Sequence[RowCache | None], width: int) -> DynamicCache:
    """One batch cache of `width` columns; row i's tokens fill its last columns, the rest is masked padding."""
    cache = DynamicCache()
    present = [row for row in rows if row is not None and row.ids]
    if width == 0 or not present:
        return cache
    for layer, (k0, v0) in enumerate(present[0].layers):
        keys = k0.new_zeros((len(rows), k0.shape[1], width, k0.shape[3]))
        values = v0.new_zeros((len(rows), v0.shape[1], width, v0.shape[3]))
        for b, row in enumerate(rows):
            if row is not None and row.ids:
                k, v = row.layers[layer]
                keys[b, :, width - k.shape[2] :] = k[0]
                values[b, :, width - v.shape[2] :] = v[0]
        cache.update(keys, values, layer)
    return cache


def extract_row_cache(cache: DynamicCache, row: int, columns: torch.Tensor, ids: list[int]) -> RowCache:
    """Row `row`'s real `columns` of a batch cache (indexing copies, so the batch tensors can be freed)."""
    if len(columns) != len(ids):
        raise AssertionError(f"cache bookkeeping: {len(columns)} cached columns for {len(ids)} tokens")
    layers = [
        (layer.keys[row : row + 1, :, columns], layer.values[row : row + 1, :, columns]) for layer in cache.layers
    ]
    return RowCache(ids, layers)


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep only `rows` of the batch cache (finished rows leave the batch so they cost nothing more)."""
    cache.batch_select_indices(rows)

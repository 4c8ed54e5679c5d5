"""The keys and values a model holds: per trajectory between calls, and for one call's rows in one arena.

Between calls each trajectory owns its keys and values as one tensor, every layer stacked: `RowCache`, [layers, 2
(keys, values), kv_heads, tokens, head_dim], kept per trajectory key in a `PrefixCache`. A call's new ids share a
prefix with what the key holds (the next step of the same trajectory): only the rest runs, and anything past the
first difference is dropped, which is how a rejected proposal disappears. Generators and PRMs keep them alike.

During a call the rows live in an `Arena`, [layers, 2, rows, kv_heads, width, head_dim] preallocated: row r's
cached prefix sits right-aligned before column `start`, and everything the call feeds it follows, column after
column, so its real columns are one run [lo[r], next[r]). A row that feeds several tokens at once (a prefill, a
verification) writes them at its own next columns; rolling back n tokens moves `next[r]` back by n and the next
feed overwrites them, so the kept part is never copied. A row leaves with one slice copy (`row_cache`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

WIDTH_BUCKET = 256  # arena columns are allocated, and graphs captured, in multiples of this
MAX_FEED = 128  # the most tokens a slot feeds in one graphed forward (proposals to verify, a short prefill)


@dataclass
class RowCache:
    """The keys and values one trajectory holds between calls."""

    ids: list[int]  # the tokens whose keys and values are held, in order
    kv: torch.Tensor  # [layers, 2, kv_heads, len(ids), head_dim]: keys ([:, 0]) and values ([:, 1]) of every layer

    def trimmed(self, length: int) -> RowCache:
        """The first `length` tokens: how a discarded proposal (or anything past a divergence) is dropped."""
        return RowCache(self.ids[:length], self.kv[:, :, :, :length])


class PrefixCache:
    """Per trajectory key, the ids a model holds keys and values for."""

    def __init__(self) -> None:
        self.rows: dict[Hashable, RowCache] = {}

    def take(self, key: Hashable, ids: Sequence[int]) -> RowCache | None:
        """The key's cache cut to what it shares with `ids`, leaving at least the last id to run (its logits are
        what the caller wants); None when nothing is shared. The key holds nothing until `put` again."""
        cached = self.rows.pop(key, None)
        if cached is None:
            return None
        reused = min(common_prefix_length(cached.ids, ids), len(ids) - 1)
        return cached.trimmed(reused) if reused > 0 else None

    def put(self, key: Hashable, row: RowCache) -> None:
        self.rows[key] = row

    def release(self, keys: Sequence[Hashable]) -> None:
        for key in keys:
            self.rows.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.rows

    def __getitem__(self, key: Hashable) -> RowCache:
        return self.rows[key]


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


def bucket_rows(rows: int) -> int:
    """The next power of two: a batch that loses rows reuses a few graphs instead of one per size."""
    return 1 << max(0, rows - 1).bit_length()


def bucket_width(columns: int) -> int:
    return -(-columns // WIDTH_BUCKET) * WIDTH_BUCKET


class Arena:
    """One model's KV arena and where each row of the current call stands in it.

    Host lists `lo`, `next` and `position` say, per slot, its first real column, the column it writes next and the
    position of the token it feeds next; `cursor` mirrors `next` and `position` on the device, so that a CUDA graph
    of a decode forward reads them there. `mask` [rows, width] is True on each row's real columns, [lo, next)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = (layers, kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.capacity = (0, 0)  # (rows, width) allocated
        self.generation = 0  # counts reallocations of the buffers
        self.kv = torch.zeros((0,), dtype=dtype, device=device)
        self.mask = torch.zeros((0, 0), dtype=torch.bool, device=device)
        self.cursor = torch.zeros((2, 0), dtype=torch.long, device=device)  # [next columns; positions] per slot
        self.first = torch.zeros((0,), dtype=torch.long, device=device)  # each slot's first real column (`lo`)
        self.ids = torch.zeros((0,), dtype=torch.long, device=device)  # a graphed forward's input, slot after slot
        self.rows = 0  # slots of the current call (a bucket)
        self.width = 0  # columns of the current call (a bucket)
        self.lo: list[int] = []
        self.next: list[int] = []
        self.position: list[int] = []

    def open(self, prefixes: Sequence[torch.Tensor | None], room: int) -> None:
        """Start a call of `len(prefixes)` rows: each row's cached keys and values (`RowCache.kv`, or None)
        right-aligned to one column, then room for `room` more columns a row."""
        lengths = [0 if kv is None else int(kv.shape[3]) for kv in prefixes]
        start = max(lengths, default=0)
        self.rows, self.width = bucket_rows(len(prefixes)), bucket_width(start + max(1, room))
        self._reserve(self.rows, self.width)
        for slot, kv in enumerate(prefixes):
            if kv is not None and kv.shape[3] > 0:
                self.kv[:, :, slot, :, start - kv.shape[3] : start] = kv
        padding = self.rows - len(prefixes)  # idle slots of the bucket: one column each, never read
        self.lo = [start - length for length in lengths] + [start] * padding
        self.next = [start] * self.rows
        self.position = lengths + [0] * padding
        self.sync()

    def place(self, counts: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """Columns for `counts[slot]` new tokens of each slot, at its next columns: (slots, columns, positions) per
        token, slot by slot. Moves each slot on past them (`sync` puts that on the device)."""
        slots, columns, positions = [], [], []
        for slot, count in enumerate(counts):
            if count < 1:
                continue
            slots += [slot] * count
            columns += range(self.next[slot], self.next[slot] + count)
            positions += range(self.position[slot], self.position[slot] + count)
            self.next[slot] += count
            self.position[slot] += count
        if self.next and max(self.next) > self.width:
            raise AssertionError(f"arena bookkeeping: a row reaches column {max(self.next)} of {self.width}")
        return slots, columns, positions

    def advanced(self, tokens: int = 1) -> None:
        """Every slot fed `tokens` tokens (a graphed forward): the host's lists follow the device's cursor."""
        self.next = [n + tokens for n in self.next]
        self.position = [p + tokens for p in self.position]

    def check_feed(self, tokens: int) -> None:
        """A graphed forward writes `tokens` columns of every slot from its next one: they must lie within the call's
        columns (a column past them, inside a wider earlier call's buffers, would be written but never seen)."""
        last = max(self.next[: self.rows]) + tokens - 1
        if last >= self.width:
            raise AssertionError(
                f"arena bookkeeping: a row writes column {last} of {self.width}; open the call with more room"
            )

    def rollback(self, counts: Sequence[int]) -> None:
        """Forget the last `counts[slot]` tokens each slot fed; their columns are written again by the next feed."""
        for slot, count in enumerate(counts):
            self.next[slot] -= count
            self.position[slot] -= count
        self.sync()

    def park(self, slots: Sequence[int]) -> None:
        """Slots whose rows have left run on whatever they are fed until the bucket shrinks: their columns start
        over, so that forwards fed to them never outgrow the arena."""
        for slot in slots:
            self.next[slot], self.position[slot] = self.lo[slot], 0
        self.sync()

    def sync(self) -> None:
        """The device's cursor and mask from the host's lists: each row sees exactly [lo, next)."""
        host = torch.tensor([self.next, self.position, self.lo], dtype=torch.long)
        nexts, positions, lo = to_device(host, self.device)
        self.cursor[0, : self.rows], self.cursor[1, : self.rows] = nexts, positions
        self.first[: self.rows] = lo
        columns = torch.arange(self.width, device=self.device)
        self.mask[: self.rows, : self.width] = (columns >= lo[:, None]) & (columns < nexts[:, None])

    def keep(self, slots: Sequence[int]) -> torch.Tensor | None:
        """Move the rows at `slots` to the front when that lets a smaller row bucket run. Returns the index that
        moved them (None when nothing moved), for the caller's own per-slot tensors."""
        rows = bucket_rows(len(slots))
        if rows >= self.rows:
            return None
        index = to_device(torch.tensor(list(slots), dtype=torch.long), self.device)
        used = max(self.next[s] for s in slots)
        self.kv[:, :, : len(slots), :, :used] = self.kv[:, :, :, :, :used].index_select(2, index)
        padding = rows - len(slots)
        self.lo = [self.lo[s] for s in slots] + [0] * padding
        self.next = [self.next[s] for s in slots] + [1] * padding
        self.position = [self.position[s] for s in slots] + [0] * padding
        self.rows = rows
        self.sync()
        return index

    def row_cache(self, slot: int, ids: list[int]) -> RowCache:
        """The keys and values of a row's first `len(ids)` real columns, copied out (so that the arena can take the
        next call). A row may hold more (a token fed by a forward queued before the row's end was known)."""
        lo, end = self.lo[slot], self.next[slot]
        if end - lo < len(ids):
            raise AssertionError(f"arena bookkeeping: {end - lo} cached columns for {len(ids)} tokens")
        return RowCache(ids, self.kv[:, :, slot, :, lo : lo + len(ids)].clone())

    def _reserve(self, rows: int, width: int) -> None:
        if rows <= self.capacity[0] and width <= self.capacity[1]:
            return
        rows, width = max(rows, self.capacity[0]), max(width, self.capacity[1])
        layers, kv_heads, head_dim = self.shape
        self.kv = torch.zeros((0,), dtype=self.dtype, device=self.device)  # freed before the larger one is made
        self.kv = torch.zeros((layers, 2, rows, kv_heads, width, head_dim), dtype=self.dtype, device=self.device)
        self.mask = torch.zeros((rows, width), dtype=torch.bool, device=self.device)
        self.cursor = torch.zeros((2, rows), dtype=torch.long, device=self.device)
        self.first = torch.zeros((rows,), dtype=torch.long, device=self.device)
        self.ids = torch.zeros((rows * MAX_FEED,), dtype=torch.long, device=self.device)
        self.last = torch.zeros((rows,), dtype=torch.long, device=self.device)  # a graphed open's last tokens
        self.capacity = (rows, width)
        self.generation += 1  # graphs captured over the old buffers are stale


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` (on the host) copied to `device` without waiting for the work queued there: from pinned memory on
    CUDA (a copy from pageable memory may synchronise the stream, which would stall a decode loop that keeps one
    forward in flight)."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# -- transformers' own cache, for models the engine's forward does not run --------------------------------------


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


def dynamic_cache(batch: torch.Tensor | None) -> Any:
    """A transformers `DynamicCache` over a stacked batch (empty for None)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if batch is not None:
        for layer in range(batch.shape[0]):
            cache.update(batch[layer, 0], batch[layer, 1], layer)
    return cache


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers `DynamicCache`, across the versions this package supports."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def stacked_layers(cache: Any) -> torch.Tensor:
    """The whole batch cache as one tensor [layers, 2, rows, kv_heads, columns, head_dim] (one copy), so that each
    row comes out of it in one operation."""
    return torch.stack([torch.stack(pair) for pair in cache_layers(cache)])

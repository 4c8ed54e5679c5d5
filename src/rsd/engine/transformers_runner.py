"""The runner interface of `rsd.engine.runner` over transformers' own forward, for every other causal LM.

A call's rows share one `DynamicCache`: cached prefixes right-aligned (zeros before them, masked out), and every
feed appends columns for all rows, each row's tokens right-aligned in them (left padding, masked out). Rolled-back
tokens are masked out too: a row's real columns are whatever its mask shows, holes included, and it leaves with
exactly those. Decoder-only models with full attention are exact; sliding-window layers count their window in
cache columns, holes included, so they are exact only while contexts stay within the window.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from rsd.engine.kv_cache import RowCache, cache_layers, dynamic_cache, stack_kv, to_device
from rsd.hf_loading import attention_without_cudnn


class TransformersRunner:
    """One call's rows in a transformers cache, with the interface of `ModelRunner`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = model.device
        parameters = inspect.signature(model.forward).parameters
        # transformers renamed `past_key_values` to `cache` in 5.2x; pass whichever this version takes.
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in parameters
        pad = getattr(model.config.get_text_config(), "pad_token_id", None)
        self._pad_id = pad if isinstance(pad, int) and 0 <= pad < model.get_input_embeddings().weight.shape[0] else 0
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.columns: list[list[int]] = []  # each row's real columns, in order
        self.positions: list[int] = []  # each row's next position

    @property
    def slots(self) -> int:
        return len(self.columns)

    def open(
        self,
        prefixes: Sequence[torch.Tensor | None],
        tails: list[list[int]],
        room: int,
        logits_of: Sequence[int] | None = None,
    ) -> torch.Tensor:
        lengths = [0 if kv is None else int(kv.shape[3]) for kv in prefixes]
        width = max(lengths, default=0)
        self.cache = dynamic_cache(stack_kv(prefixes, width))
        self.mask = torch.zeros((len(prefixes), width), dtype=torch.long, device=self.device)
        for row, length in enumerate(lengths):
            self.mask[row, width - length :] = 1
        self.columns = [list(range(width - length, width)) for length in lengths]
        self.positions = list(lengths)
        return self.extend(tails, [1] * len(tails) if logits_of is None else logits_of)

    def extend(self, tokens: list[list[int]], logits_of: Sequence[int] | None = None) -> torch.Tensor:
        """Feed `tokens[row]` to each row (right-aligned in new columns shared by all rows): the logits of every fed
        token, row after row, or of each row's last `logits_of[row]` tokens."""
        tokens = list(tokens) + [[]] * (self.slots - len(tokens))
        count = max(len(t) for t in tokens)
        ids = torch.full((self.slots, count), self._pad_id, dtype=torch.long)
        positions = torch.zeros((self.slots, count), dtype=torch.long)
        new = torch.zeros((self.slots, count), dtype=torch.long)
        start = self.mask.shape[1]
        for row, fed in enumerate(tokens):
            first = count - len(fed)
            if fed:
                ids[row, first:] = torch.tensor(fed)
                positions[row, first:] = torch.arange(self.positions[row], self.positions[row] + len(fed))
                new[row, first:] = 1
            self.columns[row] += range(start + first, start + count)
            self.positions[row] += len(fed)
        self.mask = torch.cat([self.mask, new.to(self.device)], dim=1)
        wanted = [min(len(fed), logits_of[row]) if fed and logits_of else len(fed) for row, fed in enumerate(tokens)]
        logits = self._forward(ids, positions, max(wanted))
        return torch.cat([logits[row, logits.shape[1] - n :] for row, n in enumerate(wanted) if n])

    def extend_ids(
        self, counts: Sequence[int], ids: list[int] | torch.Tensor, logits_of: Sequence[int] | None = None
    ) -> torch.Tensor:
        """`extend` with the ids given flat, slot after slot (`counts[slot]` each)."""
        flat = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        tokens, first = [], 0
        for count in counts:
            tokens.append(flat[first : first + count])
            first += count
        return self.extend(tokens, logits_of)

    def feed_last(self, tails: list[list[int]]) -> torch.Tensor:
        """Feed row i its `tails[i]`: the logits of each row's last token."""
        return self.extend(tails, [1] * len(tails))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        start = self.mask.shape[1]
        positions = torch.tensor(self.positions, dtype=torch.long)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.slots, 1))], dim=1)
        for row in range(self.slots):
            self.columns[row].append(start)
            self.positions[row] += 1
        return self._forward(ids[: self.slots, None], positions, 1)[:, -1]

    def can_verify(self, tokens: int) -> bool:
        """Never: verifications run through `extend` here."""
        return False

    def park(self, slots: Sequence[int]) -> None:
        """Nothing to do: rows that leave are dropped from the batch (`keep`)."""

    def rollback(self, counts: Sequence[int]) -> None:
        for row, count in enumerate(counts):
            if count > 0:
                dropped = self.columns[row][-count:]
                del self.columns[row][-count:]
                self.positions[row] -= count
                self.mask[row, dropped] = 0

    def keep(self, slots: Sequence[int]) -> torch.Tensor | None:
        if len(slots) == self.slots:
            return None
        index = to_device(torch.tensor(list(slots), dtype=torch.long), self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.columns = [self.columns[s] for s in slots]
        self.positions = [self.positions[s] for s in slots]
        return index

    def row_cache(self, slot: int, ids: list[int]) -> RowCache:
        columns = self.columns[slot]
        if len(columns) < len(ids):
            raise AssertionError(f"cache bookkeeping: {len(columns)} cached columns for {len(ids)} tokens")
        index = torch.tensor(columns[: len(ids)], device=self.device)
        kv = torch.stack([torch.stack((k[slot, :, index], v[slot, :, index])) for k, v in cache_layers(self.cache)])
        return RowCache(ids, kv)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, keep: int) -> torch.Tensor:
        """The next-token logits (float32) of the last `keep` columns of every row."""
        kwargs: dict[str, Any] = {self._cache_arg: self.cache}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        with attention_without_cudnn(self.device):
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=self.mask,
                position_ids=positions.to(self.device),
                use_cache=True,
                **kwargs,
            )
        return out.logits[:, -keep:, :].float()

"""Choosing each next token: greedy or top-p with a uniform draw fixed by (seed, trajectory, position), so that a
sampled step does not depend on which rows share its batch; and, for the static decode path, the same choice made
on the device (`DeviceChoice`), so that the next forward can be queued before the host reads the tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from typing import Any

import torch

from rsd.core import StepParams


class DeviceChoice:
    """The next token of every slot of the arena, chosen on the device: the argmax, or a top-p sample with the
    position's own uniform draw (`position_uniform`). The host reads the tokens through a pinned buffer after the
    next forward is queued."""

    def __init__(self, rows: list[Any], params: StepParams, bucket: int, device: str) -> None:
        """`rows`: the batch's rows in slot order, each with its `request`."""
        self.params = params
        self.cuda = torch.device(device).type == "cuda"
        self.slots: list[Any] = [*rows, *[None] * (bucket - len(rows))]
        self.host = torch.empty(bucket, dtype=torch.long, pin_memory=self.cuda)
        self.sent = 0
        self.ready: Any = None

    def choose(self, logits: torch.Tensor, drawn: int) -> torch.Tensor:
        """[bucket] next tokens from `logits` (one row per slot, or the first rows only), for each row's token
        number `drawn` of this call."""
        if self.params.temperature <= 0:
            chosen = logits.argmax(dim=-1)
        else:
            draws = [
                position_uniform(self.params.seed, row.request.key, len(row.request.prefix_ids) + drawn)
                if row is not None
                else 0.0
                for row in self.slots[: logits.shape[0]]
            ]
            uniforms = torch.tensor(draws, dtype=torch.float32)
            uniforms = uniforms.pin_memory() if self.cuda else uniforms
            uniforms = uniforms.to(logits.device, non_blocking=True)
            chosen = sample_top_p(logits / self.params.temperature, self.params.top_p, uniforms)
        return torch.nn.functional.pad(chosen, (0, len(self.slots) - chosen.shape[0]))

    def send_to_host(self, chosen: torch.Tensor) -> None:
        self.sent = chosen.shape[0]
        self.host[: self.sent].copy_(chosen, non_blocking=self.cuda)
        if self.cuda:
            self.ready = torch.cuda.Event()
            self.ready.record()

    def receive(self) -> list[int]:
        """The tokens last sent, once they have arrived (the forward queued after them may still run)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host[: self.sent].tolist()

    def move(self, slots: list[int], index: torch.Tensor, bucket: int, chosen: torch.Tensor) -> torch.Tensor:
        """Follow the arena's rows to their new slots (`StaticDecoder.keep`); returns `chosen` moved the same way."""

        def moved(tensor: torch.Tensor) -> torch.Tensor:
            kept = tensor.index_select(0, index)
            return torch.cat([kept, kept.new_zeros((bucket - len(slots), *kept.shape[1:]))])

        self.slots = [*[self.slots[s] for s in slots], *[None] * (bucket - len(slots))]
        return moved(chosen)


def position_uniform(seed: int, key: Hashable, position: int) -> float:
    """A uniform draw fixed by (seed, key, position): reproducible, and blind to which rows share the batch.

    `repr(key)` rather than `hash(key)`, which Python salts per process for strings.
    """
    digest = hashlib.sha256(f"{seed}\x1f{key!r}\x1f{position}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand((), generator=generator, dtype=torch.float64).item()


def sample_top_p(logits: torch.Tensor, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling from the top-p nucleus of each row, one given uniform in [0, 1) per row."""
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest head whose mass reaches top_p: a token stays if the mass before it is below top_p.
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs * (before < top_p)
    cdf = sorted_probs.cumsum(dim=-1)
    target = (uniforms * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)
    return order.gather(-1, pick).squeeze(-1)

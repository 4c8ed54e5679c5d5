"""Choosing each next token: greedy, or top-p with a uniform draw fixed by (seed, trajectory, position).

A token's draw depends only on the run's seed, its trajectory's key and its position, never on which rows share the
batch or which model reads the logits. That makes sampling reproducible, and it makes verification exact: a model's
own choice at a position is a function of its logits there (`choose`), so a proposed token stays exactly when it is
the token the model would have chosen itself, and the tokens a verified step keeps are the ones the model writes
alone, greedy or sampled (`accepted_length`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from rsd.core import StepParams

Draw = tuple[Hashable, int]  # (trajectory key, position of the token drawn)


def choose(logits: torch.Tensor, params: StepParams, draws: Sequence[Draw | None]) -> torch.Tensor:
    """The token each row of `logits` chooses: the argmax, or (temperature > 0) a top-p sample with the position's
    own uniform, `draws[i]` saying whose and which (None: any, the row is idle)."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    uniforms = torch.tensor(
        [position_uniform(params.seed, *draw) if draw is not None else 0.0 for draw in draws[: logits.shape[0]]],
        dtype=torch.float32,
    )
    if logits.device.type == "cuda":
        uniforms = uniforms.pin_memory()
    uniforms = uniforms.to(logits.device, non_blocking=True)
    return sample_top_p(logits / params.temperature, params.top_p, uniforms)


def accepted_length(proposal: Sequence[int], choices: Sequence[int]) -> int:
    """How many first tokens of `proposal` the model keeps: those equal to its own choice at their position."""
    n = 0
    while n < len(proposal) and proposal[n] == choices[n]:
        n += 1
    return n


class DeviceChoice:
    """The next token of every slot, chosen on the device; the host reads them through a pinned buffer after the next
    forward is queued (so the host's checks of one token overlap the device's next forward)."""

    def __init__(self, params: StepParams, slots: int, device: Any) -> None:
        self.params = params
        self.cuda = torch.device(device).type == "cuda"
        self.host = torch.empty(slots, dtype=torch.long, pin_memory=self.cuda)
        self.slots = slots
        self.sent = 0
        self.ready: Any = None

    def choose(self, logits: torch.Tensor, draws: Sequence[Draw | None]) -> torch.Tensor:
        """[slots] next tokens from `logits` (one row per slot, or the first rows only)."""
        chosen = choose(logits, self.params, draws)
        return torch.nn.functional.pad(chosen, (0, self.slots - chosen.shape[0]))

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

    def move(self, index: torch.Tensor, slots: int, chosen: torch.Tensor) -> torch.Tensor:
        """Follow the rows to their new slots (`ModelRunner.keep`'s index): `chosen` moved the same way."""
        self.slots = slots
        kept = chosen.index_select(0, index)
        return torch.cat([kept, kept.new_zeros((slots - len(index),))])


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

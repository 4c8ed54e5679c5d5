"""The life of a step in process: a call's rows prefilled from their cached prefixes, then decoded together until
each ends at the delimiter, an EOS token or its token cap, then back to their caches.

    open  -> one forward runs every row's uncached tail (packed), after its cached prefix
    loop  -> choose a token per row on the device; queue the next forward; read the tokens; stop checks;
             finished rows leave with their keys and values; fewer rows move to a smaller bucket
    leave -> a row's cache holds its prefix and every token but the last (which heads the next step's tail)

`StepModel` is one causal LM as the engine sees it: its runner (`runner.py`), the prefixes each trajectory holds
(`kv_cache.PrefixCache`) and its step rule (`StopRule`). `write_steps` is the loop above; token-level speculation
(`rsd.speculative`) drives the same pieces with a draft and a target together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rsd.core import RSDError, StepOutput, StepParams, StepRequest, StopReason
from rsd.engine.kv_cache import PrefixCache
from rsd.engine.runner import make_runner
from rsd.engine.sampler import DeviceChoice, Draw

# Extra tokens decoded around a delimiter: covers a leading space a SentencePiece decode strips, a special token.
DELIMITER_WINDOW_SLACK = 2


@dataclass
class CallRequest:
    """A request as a call holds it: its position in the call, the request, its prefix and token cap."""

    index: int  # position of the request in the call
    request: StepRequest

    @property
    def prefix(self) -> Sequence[int]:
        return self.request.prefix_ids

    @property
    def cap(self) -> int:
        return self.request.max_tokens


@dataclass
class Row(CallRequest):
    """One request while a call serves it."""

    reused: int = 0  # prefix tokens whose keys and values came from the cache
    tokens: list[int] = field(default_factory=list)  # written so far
    context_sum: int = 0  # over the tokens run for this row, the positions each attended to
    forwards: int = 0  # forwards this row took part in
    stop: StopReason | None = None

    @property
    def length(self) -> int:
        """Prefix plus written tokens: the position of the next token to choose."""
        return len(self.prefix) + len(self.tokens)

    def cached_ids(self) -> list[int]:
        """The ids whose keys and values the row holds when it leaves: every token but the last, which was chosen,
        not run (the next step's tail starts with it)."""
        return [*self.prefix, *self.tokens[:-1]]

    def count_run(self, first: int, tokens: int) -> None:
        """`tokens` tokens run from position `first` on: each attends to every position up to its own."""
        self.context_sum += tokens * first + tokens * (tokens + 1) // 2


class StopRule:
    """Where a step ends: at an EOS token (kept), once its text holds the delimiter (kept), or at its token cap."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.completers: dict[tuple[int, str], bool] = {}  # (token, delimiter): can the token complete it

    def __call__(self, tokens: Sequence[int], cap: int, delimiter: str) -> StopReason | None:
        if tokens[-1] in self.eos_token_ids:
            return StopReason.EOS
        if delimiter and self.completes_delimiter(tokens, delimiter):
            return StopReason.DELIMITER
        if len(tokens) >= cap:
            return StopReason.LENGTH
        return None

    def first_stop(self, tokens: Sequence[int], written: int, cap: int, delimiter: str) -> tuple[int, StopReason]:
        """Where tokens `written` onward end the step: (tokens that stay, the reason), or (len(tokens), None)."""
        for n in range(written + 1, len(tokens) + 1):
            stop = self(tokens[:n], cap, delimiter)
            if stop is not None:
                return n, stop
        return len(tokens), None  # type: ignore[return-value]

    def completes_delimiter(self, tokens: Sequence[int], delimiter: str) -> bool:
        if not self.may_complete(tokens[-1], delimiter):
            return False
        # Every token adds at least one byte, so a delimiter that the newest token completes lies within its last
        # len(bytes) tokens; an earlier occurrence would have ended the step already.
        window = len(delimiter.encode("utf-8")) + DELIMITER_WINDOW_SLACK
        return delimiter in self.text(tokens[-window:])

    def may_complete(self, token: int, delimiter: str) -> bool:
        """Whether `token` can be the one that completes `delimiter`: its own text holds the delimiter's last
        character, or a piece of a character that spans tokens. Most tokens cannot, and skip the decode of a
        window, the main host cost of a stop check. A delimiter that ends in a space is always checked: a
        SentencePiece decode drops a token's leading space."""
        known = self.completers.get((token, delimiter))
        if known is None:
            last = delimiter[-1]
            text = self.text([token])
            known = last == " " or last in text or "\ufffd" in text
            self.completers[(token, delimiter)] = known
        return known

    def text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True, clean_up_tokenization_spaces=False)


class StepModel:
    """A causal LM in the engine: its runner, the keys and values each trajectory holds, and its step rule."""

    def __init__(self, model: Any, tokenizer: Any, eos_token_ids: set[int], role: str) -> None:
        self.model = model
        self.role = role
        self.runner = make_runner(model)
        self.prefixes = PrefixCache()
        self.stop_rule = StopRule(tokenizer, eos_token_ids)
        self.vocab_rows = int(model.get_input_embeddings().weight.shape[0])

    def open(self, rows: list[Row], room: int, appended: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Start a call: each row's cache taken back (cut to its common prefix), its uncached tail run. Returns the
        logits at each row's last prefix token; the runner then holds every prefix token. With `appended`, row i also
        runs `appended[i]` after its prefix in the same forward, and the logits of its last prefix token and of each
        appended token come back, row after row."""
        appended = appended or [[] for _ in rows]
        cached = [self.prefixes.take(row.request.key, row.prefix) for row in rows]
        tails = []
        for row, cache, extra in zip(rows, cached, appended, strict=True):
            row.reused = len(cache.ids) if cache is not None else 0
            tail = [*row.prefix[row.reused :], *extra]
            self.check_token_ids(row, tail)
            row.count_run(row.reused, len(tail))
            row.forwards += 1
            tails.append(tail)
        logits_of = [1 + len(extra) for extra in appended]
        return self.runner.open([c.kv if c is not None else None for c in cached], tails, room, logits_of)

    def leave(self, row: Row, slot: int, ids: list[int]) -> None:
        """The row's keys and values for `ids` back to its trajectory's cache."""
        self.prefixes.put(row.request.key, self.runner.row_cache(slot, ids))

    def output(self, row: Row) -> StepOutput:
        return StepOutput(
            token_ids=row.tokens,
            text=self.stop_rule.text(row.tokens),
            stop=row.stop or StopReason.LENGTH,
            prefill_tokens=len(row.prefix) - row.reused,
            decode_tokens=len(row.tokens),
            context_sum=row.context_sum,
            forwards=row.forwards,
        )

    def check_token_ids(self, row: Row, ids: Sequence[int]) -> None:
        # An id past the embedding table is a device-side assert on CUDA; say what is wrong instead.
        bad = [t for t in ids if not 0 <= t < self.vocab_rows]
        if bad:
            raise RSDError(
                f"request {row.request.key!r}: token id {bad[0]} is outside the {self.role} model's vocabulary "
                f"({self.vocab_rows} rows); the prefix was tokenized for another model."
            )


def check_requests(requests: Sequence[StepRequest]) -> None:
    keys = [request.key for request in requests]
    if len(set(keys)) != len(keys):
        raise ValueError("generate_steps: each request of one call needs its own key (they own KV caches)")
    for request in requests:
        if len(request.prefix_ids) == 0:
            raise RSDError(f"request {request.key!r} has an empty prefix; give it at least one prompt token.")


def write_steps(model: StepModel, requests: Sequence[StepRequest], params: StepParams) -> list[StepOutput]:
    """One step per request, in order, all rows decoded together."""
    check_requests(requests)
    outputs: list[StepOutput | None] = [None] * len(requests)
    rows = []
    for i, request in enumerate(requests):
        if request.max_tokens < 1:  # no budget left: nothing runs, the cache stays
            outputs[i] = StepOutput([], "", StopReason.LENGTH, prefill_tokens=0, decode_tokens=0)
        else:
            rows.append(Row(i, request))
    if rows:
        with torch.inference_mode():
            logits = model.open(rows, room=max(row.cap for row in rows))
            decode(model, rows, logits, params, outputs)
    return outputs  # type: ignore[return-value]


def decode(
    model: StepModel, rows: list[Row], logits: torch.Tensor, params: StepParams, outputs: list[StepOutput | None]
) -> None:
    """Choose and feed one token per row per forward until every row stops. Tokens are chosen on the device and the
    next forward is queued before the host reads them, so the host's stop checks overlap the device's next forward;
    a call whose rows all end at a delimiter or EOS pays one forward that nobody reads."""
    runner = model.runner
    choice = DeviceChoice(params, runner.slots, runner.device)
    live = list(zip(rows, range(len(rows)), strict=True))
    chosen = choice.choose(logits, draws(live, runner.slots))
    while True:
        choice.send_to_host(chosen)
        queued = any(len(row.tokens) + 1 < row.cap for row, _ in live)
        if queued:  # the next forward, queued before the host has the tokens it feeds
            following = choice.choose(runner.decode(chosen), draws(live, runner.slots, ahead=1))
        tokens = choice.receive()
        still = []
        for row, slot in live:
            row.tokens.append(tokens[slot])
            row.stop = model.stop_rule(row.tokens, row.cap, params.delimiter)
            if row.stop is None:
                row.context_sum += row.length  # the token fed next attends to every position up to its own
                row.forwards += 1
                still.append(row)
            else:
                model.leave(row, slot, row.cached_ids())
                outputs[row.index] = model.output(row)
        if not still:
            return
        index = runner.keep([slot for row, slot in live if row.stop is None])
        if index is not None:
            slots = list(range(len(still)))
            if queued:
                following = choice.move(index, runner.slots, following)
            else:
                chosen = choice.move(index, runner.slots, chosen)
        else:
            slots = [slot for row, slot in live if row.stop is None]
        live = list(zip(still, slots, strict=True))
        if not queued:  # the host's checks first, then the next forward
            following = choice.choose(runner.decode(chosen), draws(live, runner.slots))
        chosen = following


def draws(live: list[tuple[Row, int]], slots: int, ahead: int = 0) -> list[Draw | None]:
    """Per slot, whose token is drawn and at which position (`ahead` tokens past the row's next one)."""
    out: list[Draw | None] = [None] * slots
    for row, slot in live:
        out[slot] = (row.request.key, row.length + ahead)
    return out

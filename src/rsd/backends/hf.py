"""Step generation with an in-process transformers model, reusing each trajectory's KV cache across steps.

One `generate_steps` call is one batch: every request's new tail runs in a padded forward (explicit 2-D mask
with holes, explicit positions; rows of very different tail lengths go in separate forwards, `packing.py`), then
all rows decode one token per forward until each ends at the delimiter, an EOS token or its token cap. Per
trajectory key the generator keeps the ids whose keys and values it holds; a request reuses the longest common
prefix and drops the rest, which is how a rejected proposal is rolled back.

Supported: decoder-only models with full attention over a `DynamicCache` (Qwen2/2.5/3, Llama, Mistral without a
sliding window, ...). Sliding-window layers count their window in cache columns, padding holes included, so
they are exact only while contexts stay within the window.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rsd.backends.kv import (
    RowCache,
    common_prefix_length,
    dynamic_cache,
    extract_row_cache,
    select_rows,
    stack_row_caches,
    stacked_layers,
)
from rsd.backends.packing import forward_cost_tokens, group_by_length, launches_overlap
from rsd.backends.sampling import DeviceChoice, position_uniform, sample_top_p
from rsd.backends.static_decode import COMPILE_ENV, StaticDecoder, resolve_decode_mode
from rsd.core import ModelCost, RSDError, StepOutput, StepParams, StepRequest, StopReason
from rsd.hf_loading import (
    attention_without_cudnn,
    check_model_source,
    first_line,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    vocabulary_fingerprint,
)

# Extra tokens decoded around a delimiter: covers a leading space a SentencePiece decode strips, a special token.
DELIMITER_WINDOW_SLACK = 2


@dataclass
class _Row:
    """One request while a call serves it."""

    index: int  # position of the request in the call
    request: StepRequest
    reused: int = 0  # prefix tokens whose keys and values came from the cache
    tokens: list[int] = field(default_factory=list)  # generated so far; the last one is not yet in the cache
    context_sum: int = 0
    stop: StopReason | None = None
    columns: list[int] = field(default_factory=list)  # the arena columns its prefix fills (static decoding)

    @property
    def tail(self) -> list[int]:
        return list(self.request.prefix_ids[self.reused :])

    @property
    def length(self) -> int:
        """Prefix plus generated tokens: the absolute position of the next token to sample."""
        return len(self.request.prefix_ids) + len(self.tokens)


@dataclass
class _Batch:
    """The rows still decoding and their shared cache; `mask` marks each row's real columns."""

    rows: list[_Row]
    cache: Any  # transformers DynamicCache
    mask: torch.Tensor  # [rows, columns] of 0/1


class HFStepGenerator:
    """A transformers causal LM as a `StepGenerator` (see `rsd.core`)."""

    def __init__(
        self,
        model: str,
        role: str = "draft",
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        decode: str = "auto",
    ) -> None:
        """`decode` picks how tokens after a call's prefill run (`rsd.backends.static_decode`): "graphs" (CUDA
        graphs over static KV buffers), "static" (the same buffers, no graphs), "eager" (transformers' forward
        and `DynamicCache`), or "auto": graphs on CUDA for the Llama/Qwen layouts, eager otherwise."""
        source = check_model_source(model, role)
        device = resolve_device(device)
        tokenizer = load_tokenizer(source, role, trust_remote_code)
        lm = load_causal_lm(source, role, resolve_dtype(dtype, device), device, trust_remote_code)
        self._attach(lm, tokenizer, name=model, role=role, decode=decode)

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, name: str | None = None, role: str = "draft", decode: str = "auto"
    ) -> HFStepGenerator:
        """Wrap an already loaded model and tokenizer (the model stays on its device and dtype)."""
        self = cls.__new__(cls)
        name = name or model.config.name_or_path or type(model).__name__
        self._attach(model, tokenizer, name=name, role=role, decode=decode)
        return self

    def _attach(self, model: Any, tokenizer: Any, name: str, role: str, decode: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.role = role
        self.device = str(model.device)
        self.eos_token_ids = collect_eos_token_ids(model, tokenizer)
        self.cost = model_cost(model)
        self._vocab_rows = model.get_input_embeddings().weight.shape[0]
        # The longest sequence the model was built for: a trajectory that reaches it ends ("context").
        self.context_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = pad if pad is not None and pad < self._vocab_rows else 0
        forward_args = inspect.signature(model.forward).parameters
        # transformers renamed `past_key_values` to `cache` in 5.2x; pass whichever this version takes.
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in forward_args
        self._caches: dict[Hashable, RowCache] = {}
        self._fingerprint: tuple[int, str] | None = None
        self._completers: dict[tuple[int, str], bool] = {}  # (token, delimiter): can the token complete it
        # Tokens of compute one more prefill forward is worth (rsd.backends.packing); settable.
        self.prefill_forward_tokens = forward_cost_tokens(self.cost.parameters, self.device)
        # Whether static decoding queues each forward before the host reads the tokens before it (settable, for
        # an A/B): the host's stop checks then run while the GPU computes.
        self.overlap_decode = True
        # Whether static decoding's prefill runs the decoder's own forward straight into its arena (settable, for
        # an A/B): else transformers' forward over a stacked cache, then copied in.
        self.arena_prefill = True
        self.decode_mode = resolve_decode_mode(decode, model, self.device)
        self._static = None
        if self.decode_mode != "eager":
            compile_layers = os.environ.get(COMPILE_ENV, "") == "1"
            self._static = StaticDecoder(model, self.decode_mode == "graphs", compile_layers=compile_layers)

    # -- the StepGenerator interface ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding table: the token ids this model can read."""
        return int(self.model.get_input_embeddings().weight.shape[0])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def vocabulary_fingerprint(self) -> str:
        # Hashing a 150k-token vocabulary takes about a second; every decoder built over this generator asks.
        # Keyed on the tokenizer's size, so tokens added after wrapping are still seen.
        size = len(self.tokenizer)
        if self._fingerprint is None or self._fingerprint[0] != size:
            self._fingerprint = (size, vocabulary_fingerprint(self.tokenizer))
        return self._fingerprint[1]

    def release(self, keys: Sequence[Hashable]) -> None:
        for key in keys:
            self._caches.pop(key, None)

    @property
    def static_decoder(self) -> StaticDecoder | None:
        """The decode forward over static buffers (None on the eager path), for its settings and A/Bs."""
        return self._static

    def generate_steps(self, requests: Sequence[StepRequest], params: StepParams) -> list[StepOutput]:
        self._check_requests(requests)
        outputs: list[StepOutput | None] = [None] * len(requests)
        rows = []
        for i, request in enumerate(requests):
            if request.max_tokens < 1:  # no budget left: nothing runs, the cache stays
                outputs[i] = StepOutput([], "", StopReason.LENGTH, prefill_tokens=0, decode_tokens=0)
            else:
                rows.append(_Row(i, request))
        if rows:
            with torch.inference_mode(), attention_without_cudnn(self.device):
                if self._static is None:
                    self._decode(*self._prefill(rows), params, outputs)
                elif self.arena_prefill:
                    self._decode_static(*self._prefill_arena(rows), params, outputs)
                else:
                    self._decode_static(*self._prefill_loaded(rows), params, outputs)
        return outputs  # type: ignore[return-value]

    # -- one call --------------------------------------------------------------------------------------------

    def _prefill(self, rows: list[_Row]) -> tuple[_Batch, torch.Tensor]:
        """Run every row's uncached tail, in one forward per group of similar tail lengths (`packing`); returns
        one batch over all rows and their next-token logits."""
        cached = [self._take_cache(row) for row in rows]
        tails = [len(row.tail) for row in rows]
        groups = group_by_length(tails, self.prefill_forward_tokens, overlapped=launches_overlap(self.device))
        if len(groups) == 1:
            return self._prefill_group(rows, cached)
        parts = [self._prefill_group([rows[i] for i in group], [cached[i] for i in group]) for group in groups]
        return merge_batches([batch for batch, _ in parts]), torch.cat([logits for _, logits in parts])

    def _prefill_arena(self, rows: list[_Row]) -> tuple[list[_Row], torch.Tensor]:
        """`_prefill` on the static path: the cached prefixes go straight into the decoder's arena and each group of
        similar tails runs through the decoder's own forward there. Returns the rows in their arena slots' order
        and their next-token logits."""
        static = self._static
        assert static is not None
        cached = [self._take_cache(row) for row in rows]
        tails = [len(row.tail) for row in rows]
        if static.packed_prefill:  # no padding to save: one packed forward
            groups = [list(range(len(rows)))]
        else:
            groups = group_by_length(tails, self.prefill_forward_tokens, overlapped=launches_overlap(self.device))
        order = [i for group in groups for i in group]
        rows = [rows[i] for i in order]
        new_tokens = max(row.request.max_tokens for row in rows) - 1  # the last token is sampled, never fed
        prefixes = [cached[i].kv if cached[i] is not None else None for i in order]
        static.begin(prefixes, max(tails), new_tokens)
        logits, first = [], 0
        for group in groups:
            part = rows[first : first + len(group)]
            tails, reused = [row.tail for row in part], [row.reused for row in part]
            part_logits, columns = static.run_tails(first, tails, reused, self._pad_id)
            for row, row_columns in zip(part, columns, strict=True):
                row.columns = row_columns
                row.context_sum += sum(range(row.reused + 1, len(row.request.prefix_ids) + 1))
            logits.append(part_logits)
            first += len(part)
        return rows, torch.cat(logits)

    def _prefill_loaded(self, rows: list[_Row]) -> tuple[list[_Row], torch.Tensor]:
        """`_prefill` through transformers' forward, its cache then copied into the static decoder's arena."""
        static = self._static
        assert static is not None
        batch, logits = self._prefill(rows)
        for row, columns in zip(batch.rows, real_columns(batch.mask), strict=True):
            row.columns = columns
        new_tokens = max(row.request.max_tokens for row in batch.rows) - 1  # the last token is sampled, never fed
        static.load(batch.cache, batch.mask, [len(row.request.prefix_ids) for row in batch.rows], new_tokens)
        return batch.rows, logits

    def _prefill_group(self, rows: list[_Row], cached: list[RowCache | None]) -> tuple[_Batch, torch.Tensor]:
        """One padded forward: cached prefixes right-aligned to the longest, tails left-padded to the longest."""
        width = max(row.reused for row in rows)
        tail_width = max(len(row.tail) for row in rows)
        input_ids = torch.full((len(rows), tail_width), self._pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), tail_width), dtype=torch.long)
        mask = torch.zeros((len(rows), width + tail_width), dtype=torch.long)
        for b, row in enumerate(rows):
            tail, start = row.tail, tail_width - len(row.tail)
            input_ids[b, start:] = torch.tensor(tail)
            positions[b, start:] = torch.arange(row.reused, row.reused + len(tail))
            mask[b, width - row.reused : width] = 1
            mask[b, width + start :] = 1
            row.context_sum += sum(range(row.reused + 1, row.reused + len(tail) + 1))
        batch = _Batch(rows, stack_row_caches(cached, width), mask.to(self.device))
        logits = self._forward(input_ids, positions, batch)
        return batch, logits

    def _decode(
        self, batch: _Batch, logits: torch.Tensor, params: StepParams, outputs: list[StepOutput | None]
    ) -> None:
        """Pick one token per row per forward; finished rows leave the batch and keep their cache."""
        while True:
            for row, token in zip(batch.rows, self._next_tokens(logits, batch.rows, params), strict=True):
                row.tokens.append(token)
                row.stop = self._stop_reason(row, params)
            done = [b for b, row in enumerate(batch.rows) if row.stop is not None]
            for b in done:
                outputs[batch.rows[b].index] = self._finish(batch, b)
            if len(done) == len(batch.rows):
                return
            if done:
                batch = self._without(batch, done)
            logits = self._feed_last_tokens(batch)

    def _decode_static(
        self, rows: list[_Row], logits: torch.Tensor, params: StepParams, outputs: list[StepOutput | None]
    ) -> None:
        """`_decode` over the static KV buffers: rows stay at their slot, finished ones are left to run idle
        until few enough remain for a smaller row bucket. Tokens are chosen on the device and the next forward is
        queued before the host reads them, so the host's stop checks overlap the GPU's next forward; a call whose
        rows all end at a delimiter or EOS pays one forward that nobody reads."""
        static = self._static
        assert static is not None
        first_decode_column = static.next_column
        choice = DeviceChoice(rows, params, static.rows, self.device)
        live = list(zip(rows, range(len(rows)), strict=True))
        chosen = choice.choose(logits, 0)
        drawn = 0  # tokens each live row has drawn so far
        while True:
            choice.send_to_host(chosen)
            queued = self.overlap_decode and any(len(row.tokens) + 1 < row.request.max_tokens for row, _ in live)
            if queued:
                following = choice.choose(static.advance(chosen), drawn + 1)  # queued, not waited for
            tokens = choice.receive()
            still = []
            for row, slot in live:
                row.tokens.append(tokens[slot])
                row.stop = self._stop_reason(row, params)
                if row.stop is None:
                    still.append((row, slot))
                else:
                    self._leave_arena(row, slot, first_decode_column, outputs)
            if not still:
                return
            for row, _ in still:
                row.context_sum += row.length
            slots, moved = static.keep([slot for _, slot in still])
            if moved is not None and queued:
                following = choice.move([slot for _, slot in still], moved, static.rows, following)
            elif moved is not None:
                chosen = choice.move([slot for _, slot in still], moved, static.rows, chosen)
            if not queued:  # the host's checks first, then the next forward
                following = choice.choose(static.advance(chosen), drawn + 1)
            live = list(zip([row for row, _ in still], slots, strict=True))
            chosen, drawn = following, drawn + 1

    def _leave_arena(self, row: _Row, slot: int, first_decode_column: int, outputs: list[StepOutput | None]) -> None:
        """Copy a finished row's cache out of the arena: its prefix's columns and one per token it fed."""
        assert self._static is not None
        ids = cached_ids(row)
        fed = range(first_decode_column, first_decode_column + len(row.tokens) - 1)
        self._caches[row.request.key] = self._static.row_cache(slot, ids, row.columns + list(fed))
        outputs[row.index] = self._output(row)

    def _feed_last_tokens(self, batch: _Batch) -> torch.Tensor:
        input_ids = torch.tensor([[row.tokens[-1]] for row in batch.rows])
        positions = torch.tensor([[row.length - 1] for row in batch.rows])
        ones = batch.mask.new_ones((len(batch.rows), 1))
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        for row in batch.rows:
            row.context_sum += row.length
        return self._forward(input_ids, positions, batch)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """Next-token logits (float32) at the last column; the LM head runs at that column only."""
        kwargs: dict[str, Any] = {self._cache_arg: batch.cache}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=batch.mask,
            position_ids=positions.to(self.device),
            use_cache=True,
            **kwargs,
        )
        return out.logits[:, -1, :].float()

    def _next_tokens(self, logits: torch.Tensor, rows: list[_Row], params: StepParams) -> list[int]:
        if params.temperature <= 0:
            return logits.argmax(dim=-1).tolist()
        draws = [position_uniform(params.seed, row.request.key, row.length) for row in rows]
        uniforms = torch.tensor(draws, dtype=torch.float32, device=logits.device)
        return sample_top_p(logits / params.temperature, params.top_p, uniforms).tolist()

    def _stop_reason(self, row: _Row, params: StepParams) -> StopReason | None:
        if row.tokens[-1] in self.eos_token_ids:
            return StopReason.EOS
        if params.delimiter and self._completes_delimiter(row.tokens, params.delimiter):
            return StopReason.DELIMITER
        if len(row.tokens) >= row.request.max_tokens:
            return StopReason.LENGTH
        return None

    def _completes_delimiter(self, tokens: list[int], delimiter: str) -> bool:
        if not self._may_complete(tokens[-1], delimiter):
            return False
        # Every token adds at least one byte, so a delimiter that the newest token completes lies within its last
        # len(bytes) tokens; an earlier occurrence would have ended the step already.
        window = len(delimiter.encode("utf-8")) + DELIMITER_WINDOW_SLACK
        return delimiter in self._decode_text(tokens[-window:])

    def _may_complete(self, token: int, delimiter: str) -> bool:
        """Whether `token` can be the one that completes `delimiter`: its own text holds the delimiter's last
        character, or a piece of a character that spans tokens. Most tokens cannot, and skip the decode of a
        window, the main host cost of a stop check. A delimiter that ends in a space is always checked: a
        SentencePiece decode drops a token's leading space."""
        known = self._completers.get((token, delimiter))
        if known is None:
            last = delimiter[-1]
            text = self._decode_text([token])
            known = last == " " or last in text or "\ufffd" in text
            self._completers[(token, delimiter)] = known
        return known

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # -- caches ----------------------------------------------------------------------------------------------

    def _take_cache(self, row: _Row) -> RowCache | None:
        """Pop the row's cache, trimmed to what its prefix shares with it (at least one token must run)."""
        entry = self._caches.pop(row.request.key, None)
        prefix = row.request.prefix_ids
        if entry is not None:
            row.reused = min(common_prefix_length(entry.ids, prefix), len(prefix) - 1)
        self._check_token_ids(row)
        return entry.trimmed(row.reused) if entry is not None and row.reused > 0 else None

    def _finish(self, batch: _Batch, b: int) -> StepOutput:
        row = batch.rows[b]
        columns = batch.mask[b].nonzero().squeeze(-1)
        self._caches[row.request.key] = extract_row_cache(batch.cache, b, columns, cached_ids(row))
        return self._output(row)

    def _output(self, row: _Row) -> StepOutput:
        return StepOutput(
            token_ids=row.tokens,
            text=self._decode_text(row.tokens),
            stop=row.stop or StopReason.LENGTH,
            prefill_tokens=len(row.request.prefix_ids) - row.reused,
            decode_tokens=len(row.tokens),
            context_sum=row.context_sum,
        )

    @staticmethod
    def _without(batch: _Batch, done: list[int]) -> _Batch:
        finished = set(done)
        keep = [b for b in range(len(batch.rows)) if b not in finished]
        index = torch.tensor(keep, device=batch.mask.device)
        select_rows(batch.cache, index)
        return _Batch([batch.rows[b] for b in keep], batch.cache, batch.mask[index])

    # -- checks ----------------------------------------------------------------------------------------------

    def _check_requests(self, requests: Sequence[StepRequest]) -> None:
        keys = [request.key for request in requests]
        if len(set(keys)) != len(keys):
            raise ValueError("generate_steps: each request of one call needs its own key (they own KV caches)")
        for request in requests:
            if len(request.prefix_ids) == 0:
                raise RSDError(f"request {request.key!r} has an empty prefix; give it at least one prompt token.")

    def _check_token_ids(self, row: _Row, ids: Sequence[int] | None = None) -> None:
        # An id past the embedding table is a device-side assert on CUDA; say what is wrong instead.
        bad = [t for t in (row.tail if ids is None else ids) if not 0 <= t < self._vocab_rows]
        if bad:
            raise RSDError(
                f"request {row.request.key!r}: token id {bad[0]} is outside the {self.role} model's vocabulary "
                f"({self._vocab_rows} rows); the prefix was tokenized for another model."
            )


def real_columns(mask: torch.Tensor) -> list[list[int]]:
    """Per row of a 0/1 mask, the columns that hold its tokens (one host copy of the mask)."""
    return [row.nonzero().squeeze(-1).tolist() for row in mask.bool().cpu()]


def merge_batches(parts: list[_Batch]) -> _Batch:
    """The rows of several prefilled batches as one, each part right-aligned to the widest (every row's real
    columns end at the last column, so decoding appends at the same column for all)."""
    columns = max(part.mask.shape[1] for part in parts)
    rows = [row for part in parts for row in part.rows]
    stacked = [stacked_layers(part.cache) for part in parts]
    layers, _, _, heads, _, dim = stacked[0].shape
    kv = stacked[0].new_zeros((layers, 2, len(rows), heads, columns, dim))
    mask = parts[0].mask.new_zeros((len(rows), columns))
    start = 0
    for part, part_kv in zip(parts, stacked, strict=True):
        end, width = start + len(part.rows), part.mask.shape[1]
        kv[:, :, start:end, :, columns - width :] = part_kv
        mask[start:end, columns - width :] = part.mask
        start = end
    return _Batch(rows, dynamic_cache(kv), mask)


def cached_ids(row: _Row) -> list[int]:
    """The ids whose keys and values a finished row holds. The last token was sampled, not run: the next step's
    prefix starts its tail with it."""
    return list(row.request.prefix_ids) + row.tokens[:-1]


# -- loading and model facts ---------------------------------------------------------------------------------


def load_causal_lm(source: str, role: str, dtype: torch.dtype, device: str, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise RSDError(
            f"could not load the {role} model from {source}: {first_line(exc)}; pass a folder or hub id of a "
            "causal language model checkpoint (config.json and weights)."
        ) from exc
    try:
        return model.to(device).eval()
    except torch.OutOfMemoryError as exc:
        raise RSDError(
            f"the {role} model {source} does not fit on {device}; use a smaller model, --dtype bfloat16, "
            "or another device."
        ) from exc


def collect_eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the generation config, the model config and the tokenizer (chat models list several)."""
    sources = (getattr(model, "generation_config", None), model.config.get_text_config(), tokenizer)
    ids: set[int] = set()
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        values = value if isinstance(value, list | tuple) else [value]
        ids.update(int(v) for v in values if v is not None)
    return ids


def model_cost(model: Any) -> ModelCost:
    config = model.config.get_text_config()
    embedding = model.get_input_embeddings().weight
    parameters = sum(p.numel() for p in model.parameters()) - embedding.numel()
    output = model.get_output_embeddings()
    if output is not None and output.weight is embedding:
        parameters += embedding.numel()  # tied: the table still multiplies every token as the LM head
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelCost(parameters=parameters, layers=config.num_hidden_layers, attention_width=heads * head_dim)

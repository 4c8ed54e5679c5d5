"""PRMs in process with transformers: the heads we implement ourselves and incremental scoring on a KV cache.

A PRM here is three parts: an input builder (`formats.py`, the ids whose last position carries the reward), a
transformer body that returns hidden states (loaded with transformers' own classes, never with code from a model
repository), and a head that turns the hidden state at that position into a reward in [0, 1].

Scoring is incremental. Per request key we keep the ids whose keys and values are cached; a new request's ids
share a prefix with them (the next step of the same trajectory), so only the tail runs. A prefix that no longer
matches (a rejected draft step replaced by the target's) is cut off the cache first.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rsd.core import DEFAULT_DELIMITER, ModelCost, RewardOutput, RewardRequest, RSDError
from rsd.engine.forward import layout_problem
from rsd.engine.kv_cache import PrefixCache, RowCache, dynamic_cache, stack_kv, stacked_layers
from rsd.engine.runner import DECODE_ENV, ModelRunner, check_decode_env
from rsd.hf_loading import (
    attention_without_cudnn,
    check_model_source,
    first_line,
    load_tokenizer,
    read_config,
    resolve_device,
    resolve_dtype,
)
from rsd.rewards.formats import (
    CAUSAL_LM_FORMATS,
    TRL_STEP_SEPARATOR,
    InputBuilder,
    check_prm_format,
    detect_prm_format,
    make_input_builder,
)

Head = Callable[[Tensor], Tensor]  # hidden states [n, hidden] -> rewards [n], float32 in [0, 1]


@dataclass
class Row:
    """One request of a forward pass: the cached prefix it reuses and the tail it runs."""

    key: Hashable
    ids: list[int]
    past: Tensor | None  # the cached keys and values, already cut to `past_len` tokens
    past_len: int
    truncated: bool = False  # its input did not fit the PRM's context: the earliest steps were left out

    @property
    def tail(self) -> list[int]:
        return self.ids[self.past_len :]


class HFRewardModel:
    """A causal PRM scoring the last step of each request on top of a per-key KV cache.

    Requests of one call run in batches of up to `max_batch_size` rows. Llama and Qwen bodies run in rsd's engine
    (`rsd.engine.runner.ModelRunner`: the cached prefixes placed in its arena, the tails packed in one forward);
    other bodies run transformers' forward over a padded batch (cached prefixes left-padded to a common length,
    tails right-padded, an explicit attention mask and position ids).
    """

    def __init__(
        self,
        name: str,
        prm_format: str,
        body: nn.Module,
        head: Head,
        builder: InputBuilder,
        cost: ModelCost,
        max_batch_size: int = 16,
    ):
        self.name = name
        self.prm_format = prm_format
        self.body = body
        self.head = head
        self.builder = builder
        self.cost = cost
        self.max_batch_size = max_batch_size
        self.device = next(body.parameters()).device
        self.context_length = getattr(body.config, "max_position_embeddings", None)
        self.prefixes = PrefixCache()
        # transformers 5.2x renamed `past_key_values` to `cache`; older versions know only the former.
        self.cache_kwarg = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
        check_decode_env()
        self.engine_problem = layout_problem(body) if os.environ.get(DECODE_ENV) != "eager" else "RSD_DECODE=eager"
        self.runner = ModelRunner(body, body=body) if self.engine_problem is None else None

    def score_steps(self, requests: Sequence[RewardRequest]) -> list[RewardOutput]:
        outputs: list[RewardOutput | None] = [None] * len(requests)
        for wave in self.waves([r.key for r in requests]):
            rows = [self.row(requests[i]) for i in wave]
            size = max(1, self.max_batch_size)
            for first in range(0, len(rows), size):
                for j, out in enumerate(self.run(rows[first : first + size]), start=first):
                    outputs[wave[j]] = out
        return outputs  # type: ignore[return-value]

    def release(self, keys: Sequence[Hashable]) -> None:
        self.prefixes.release(keys)

    @staticmethod
    def waves(keys: list[Hashable]) -> list[list[int]]:
        """Request indices in waves of distinct keys (a repeated key waits for the next wave, so it sees the cache
        its predecessor left)."""
        pending = list(range(len(keys)))
        waves = []
        while pending:
            seen: set[Hashable] = set()
            wave, later = [], []
            for i in pending:
                if keys[i] in seen:
                    later.append(i)
                else:
                    seen.add(keys[i])
                    wave.append(i)
            waves.append(wave)
            pending = later
        return waves

    def row(self, request: RewardRequest) -> Row:
        ids, truncated = self.fitted_ids(request)
        cached = self.prefixes.take(request.key, ids)
        if cached is None:
            return Row(request.key, ids, None, 0, truncated)
        return Row(request.key, ids, cached.kv, len(cached.ids), truncated)

    def fitted_ids(self, request: RewardRequest) -> tuple[list[int], bool]:
        """The PRM's input ids, within its context: the question and the latest steps that fit (the step scored
        always among them); where even the question and that step do not fit, the input's last tokens."""
        steps = list(request.steps)
        ids = self.builder.build_ids(request.question, steps)
        limit = self.context_length
        if not limit or len(ids) <= limit:
            return ids, False
        low, high = 1, len(steps) - 1  # leave out the first `dropped` steps: the fewest that fit
        while low <= high:
            dropped = (low + high) // 2
            if len(self.builder.build_ids(request.question, steps[dropped:])) <= limit:
                high = dropped - 1
            else:
                low = dropped + 1
        if low <= len(steps) - 1:
            return self.builder.build_ids(request.question, steps[low:]), True
        return self.builder.build_ids(request.question, steps[-1:])[-limit:], True

    @torch.inference_mode()
    def run(self, rows: list[Row]) -> list[RewardOutput]:
        if self.runner is not None:
            return self.run_in_engine(rows)
        past_width = max(r.past_len for r in rows)
        tail_width = max(len(r.tail) for r in rows)
        input_ids, attention_mask, position_ids = self.batch_inputs(rows, past_width, tail_width)
        cache = dynamic_cache(stack_kv([row.past for row in rows], past_width))
        with attention_without_cudnn(self.device):
            out = self.body(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{self.cache_kwarg: cache},
            )
        last = torch.tensor([len(r.tail) - 1 for r in rows], device=self.device)
        hidden = out.last_hidden_state[torch.arange(len(rows), device=self.device), last]
        scores = self.head(hidden).float()
        batch_kv = stacked_layers(cache)  # updated in place by the forward pass; one copy, one slice per row
        for i, row in enumerate(rows):
            start, end = past_width - row.past_len, past_width + len(row.tail)
            # Clone, so the row's cache owns its memory instead of pinning the whole padded batch.
            self.prefixes.put(row.key, RowCache(row.ids, batch_kv[:, :, i, :, start:end].clone()))
        return self.outputs(rows, scores)

    def run_in_engine(self, rows: list[Row]) -> list[RewardOutput]:
        """`run` in the engine: the cached prefixes placed in the arena, the tails packed in one forward, each row's
        keys and values copied back out."""
        runner = self.runner
        assert runner is not None
        hidden = runner.open([row.past for row in rows], [row.tail for row in rows], room=0)
        scores = self.head(hidden).float()
        for slot, row in enumerate(rows):
            self.prefixes.put(row.key, runner.row_cache(slot, row.ids))
        return self.outputs(rows, scores)

    @staticmethod
    def outputs(rows: list[Row], scores: torch.Tensor) -> list[RewardOutput]:
        """Each row's reward from the head's `scores`. Read last: reading them waits for the GPU, and the rows'
        cache copies are queued before it, so the host issues them while the forward still runs."""
        return [reward_output(row, reward) for row, reward in zip(rows, scores.tolist(), strict=True)]

    def batch_inputs(self, rows: list[Row], past_width: int, tail_width: int) -> tuple[Tensor, Tensor, Tensor]:
        n = len(rows)
        input_ids = torch.zeros((n, tail_width), dtype=torch.long)
        attention_mask = torch.zeros((n, past_width + tail_width), dtype=torch.long)
        position_ids = torch.zeros((n, tail_width), dtype=torch.long)
        for i, row in enumerate(rows):
            tail = row.tail
            input_ids[i, : len(tail)] = torch.tensor(tail)
            attention_mask[i, past_width - row.past_len : past_width + len(tail)] = 1
            # Padding gets positions that continue the row's own; they are masked out anyway.
            position_ids[i] = torch.arange(row.past_len, row.past_len + tail_width)
        return input_ids.to(self.device), attention_mask.to(self.device), position_ids.to(self.device)


def reward_output(row: Row, reward: float) -> RewardOutput:
    tokens = len(row.tail)
    # Token j of the tail attends to past_len + j + 1 positions (itself included).
    context_sum = tokens * row.past_len + tokens * (tokens + 1) // 2
    return RewardOutput(reward=reward, prefill_tokens=tokens, context_sum=context_sum, truncated=row.truncated)


# ---- heads ----------------------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """Skywork: a scalar per token, `v_head.summary` = Linear(H, 1); reward = sigmoid(value)."""

    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        self.summary = nn.Linear(weight.shape[1], 1)
        self.summary.load_state_dict({"weight": weight, "bias": bias})

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.sigmoid(self.summary(hidden.float())[:, 0])


class QwenPRMHead(nn.Module):
    """Qwen2.5-Math-PRM: `score` = Linear(H, H) -> ReLU -> Linear(H, 2); reward = softmax(logits)[1]."""

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__()
        hidden = tensors["score.0.weight"].shape[1]
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.score.load_state_dict({name.removeprefix("score."): t for name, t in tensors.items()})

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.softmax(self.score(hidden.float()), dim=-1)[:, 1]


class LabelTokenHead(nn.Module):
    """Math-Shepherd, RLHFlow: the LM logits of `+` and `-` only; reward = P(+) of the softmax over the two."""

    def __init__(self, lm_head: nn.Module, plus_id: int, minus_id: int):
        super().__init__()
        rows = [plus_id, minus_id]
        self.weight = nn.Parameter(lm_head.weight.detach()[rows].float().clone(), requires_grad=False)
        bias = getattr(lm_head, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach()[rows].float().clone(), requires_grad=False)

    def forward(self, hidden: Tensor) -> Tensor:
        logits = nn.functional.linear(hidden.float(), self.weight, self.bias)
        return torch.softmax(logits, dim=-1)[:, 0]


class TokenClassifierHead(nn.Module):
    """TRL token-classification PRMs: 2 labels, reward = softmax[1] (label 1 = correct); 1 label: sigmoid."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.float()
        self.num_labels = classifier.weight.shape[0]
        if self.num_labels not in (1, 2):
            raise RSDError(
                f"the token-classification PRM has {self.num_labels} labels; rsd reads 2 (incorrect, "
                "correct) or 1 (a score through a sigmoid). Check --prm-format."
            )

    def forward(self, hidden: Tensor) -> Tensor:
        logits = self.classifier(hidden.float())
        if self.num_labels == 1:
            return torch.sigmoid(logits[:, 0])
        return torch.softmax(logits, dim=-1)[:, 1]


# ---- loading --------------------------------------------------------------------------------------------------


def load_prm(
    model: str,
    prm_format: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    delimiter: str = DEFAULT_DELIMITER,
    step_separator: str = TRL_STEP_SEPARATOR,
    max_batch_size: int = 16,
) -> HFRewardModel:
    """Load a PRM checkpoint (local folder or hub id) as a RewardModel.

    `prm_format` forces the format; by default it is read from config.json. `delimiter` is the run's step delimiter
    (the Skywork input marks steps with it); `step_separator` is what a token-classification PRM was trained with.
    The Skywork and Qwen heads are built here and their bodies loaded as plain transformers Qwen2 models, whatever
    `trust_remote_code` says; that flag only reaches the tokenizer and the plain-LM / token-classification formats.
    """
    source = check_model_source(model, "prm")
    config = read_config(source)
    fmt = check_prm_format(prm_format) if prm_format else detect_prm_format(config)
    if not prm_format and fmt in CAUSAL_LM_FORMATS.values():
        warn_unless_named_a_prm(source, config, fmt)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    tokenizer = load_tokenizer(source, "prm", trust_remote_code)
    builder = make_input_builder(fmt, tokenizer, delimiter=delimiter, step_separator=step_separator)
    if fmt in ("skywork", "qwen-prm"):
        body = load_transformers(source, "AutoModel", torch_dtype, trust_remote_code=False)
        head = custom_head(fmt, source)
    elif fmt in ("math-shepherd", "rlhflow"):
        lm = load_transformers(source, "AutoModelForCausalLM", torch_dtype, trust_remote_code)
        body, head = lm.base_model, LabelTokenHead(lm.get_output_embeddings(), *builder.label_ids)  # type: ignore[attr-defined]
    else:
        classifier = load_transformers(source, "AutoModelForTokenClassification", torch_dtype, trust_remote_code)
        check_causal(classifier.config)
        body, head = classifier.base_model, TokenClassifierHead(classification_layer(classifier))
    body.to(device).eval()
    head.to(device).eval()
    cost = model_cost(body, head)
    return HFRewardModel(source, fmt, body, head, builder, cost, max_batch_size=max_batch_size)


PRM_NAME_HINTS = ("prm", "reward", "shepherd", "rlhflow")


def warn_unless_named_a_prm(source: str, config: dict, fmt: str) -> None:
    """A Llama or Mistral causal LM is read as an RLHFlow or Math-Shepherd PRM from its config alone, so any such
    model passes, a draft or target given as the PRM by mistake included. Warn unless its name says PRM."""
    names = f"{source} {config.get('_name_or_path', '')}".lower()
    if any(hint in names for hint in PRM_NAME_HINTS):
        return
    warnings.warn(
        f"{source} is a plain {config.get('model_type')} causal LM, read as a {fmt} PRM: each step's reward is the "
        f"probability it gives the '+' label token. If it was not trained as that PRM, its rewards mean nothing. "
        f"Pass --prm-format {fmt} to confirm it, or give a PRM checkpoint.",
        stacklevel=3,
    )


def load_transformers(source: str, auto_class: str, torch_dtype: Any, trust_remote_code: bool) -> nn.Module:
    """A transformers model, refusing a checkpoint that lacks weights the model needs (they would be random)."""
    import transformers

    cls = getattr(transformers, auto_class)
    verbosity = transformers.logging.get_verbosity()
    # Its load report lists the head tensors the body does not use (v_head, score, lm_head) as a warning; the
    # missing weights, the one thing that matters, are checked below.
    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        model, info = cls.from_pretrained(
            source,
            config=config,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise RSDError(
            f"could not load the PRM from {source}: {first_line(exc)}; pass a folder or hub id of a "
            "PRM checkpoint (config.json, weights, tokenizer), or check --prm-format."
        ) from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise RSDError(
            f"the PRM checkpoint {source} has no weights for {missing[0]} (and {len(missing) - 1} more) "
            f"of {type(model).__name__}; check that it is a PRM of the format you chose (--prm-format)."
        )
    return model


HEAD_TENSORS = {
    "skywork": ["v_head.summary.weight", "v_head.summary.bias"],
    "qwen-prm": ["score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"],
}


def custom_head(prm_format: str, source: str) -> nn.Module:
    tensors = read_tensors(source, HEAD_TENSORS[prm_format], prm_format)
    tensors = {name: t.float() for name, t in tensors.items()}
    if prm_format == "skywork":
        return ValueHead(tensors["v_head.summary.weight"], tensors["v_head.summary.bias"])
    return QwenPRMHead(tensors)


def read_tensors(source: str, names: list[str], prm_format: str) -> dict[str, Tensor]:
    """Named tensors from a checkpoint's safetensors files (sharded or not), else from pytorch_model.bin."""
    tensors = read_safetensors(source, names)
    if len(tensors) < len(names):
        tensors.update(read_bin_tensors(source, [n for n in names if n not in tensors]))
    missing = [n for n in names if n not in tensors]
    if missing:
        raise RSDError(
            f"{source} has no tensor {missing[0]}, which a {prm_format} PRM carries; "
            "check that the checkpoint is one, or pass the right --prm-format."
        )
    return tensors


def read_safetensors(source: str, names: list[str]) -> dict[str, Tensor]:
    from safetensors import safe_open

    index_file = checkpoint_file(source, "model.safetensors.index.json")
    if index_file is not None:
        weight_map = json.loads(Path(index_file).read_text())["weight_map"]
        files = {name: weight_map[name] for name in names if name in weight_map}
    else:
        files = dict.fromkeys(names, "model.safetensors")
    tensors = {}
    for name, filename in files.items():
        path = checkpoint_file(source, filename)
        if path is None:
            continue
        with safe_open(path, framework="pt") as f:
            if name in f.keys():  # noqa: SIM118 (a safe_open handle has no __contains__)
                tensors[name] = f.get_tensor(name)
    return tensors


def read_bin_tensors(source: str, names: list[str]) -> dict[str, Tensor]:
    path = checkpoint_file(source, "pytorch_model.bin")
    if path is None:
        return {}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {n: state[n] for n in names if n in state}


def checkpoint_file(source: str, filename: str) -> str | None:
    """A file of a local checkpoint folder or of a hub repository (from the cache transformers fills)."""
    local = Path(source).expanduser()
    if local.is_dir():
        path = local / filename
        return str(path) if path.is_file() else None
    from transformers.utils import cached_file

    return cached_file(source, filename, _raise_exceptions_for_missing_entries=False)


def check_causal(config: Any) -> None:
    """Incremental scoring needs a causal body; encoder token classifiers (BERT-like) see the whole input."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = config.model_type
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise RSDError(
            f"the token-classification PRM is a {model_type} model, not a causal decoder; rsd scores "
            "steps on a growing KV cache and supports decoder-only PRMs (Qwen2, Llama, ...)."
        )


def classification_layer(model: nn.Module) -> nn.Module:
    layer = getattr(model, "score", None) or getattr(model, "classifier", None)
    if not isinstance(layer, nn.Linear):
        raise RSDError(
            f"{type(model).__name__} has no linear `score` or `classifier` layer to read rewards from; "
            "check --prm-format."
        )
    return layer


def model_cost(body: nn.Module, head: nn.Module) -> ModelCost:
    """Parameters every token multiplies (the input embedding table excluded, the head included)."""
    config = body.config
    embedding = body.get_input_embeddings()
    embedding_params = sum(p.numel() for p in embedding.parameters()) if embedding is not None else 0
    parameters = sum(p.numel() for p in body.parameters()) - embedding_params
    parameters += sum(p.numel() for p in head.parameters())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelCost(parameters=parameters, layers=config.num_hidden_layers, attention_width=heads * head_dim)

"""A Hugging Face causal LM in process as a `StepGenerator`: loaded with transformers, run by rsd's engine.

One `generate_steps` call is one batch of rows in the model's arena (`rsd.engine.steps`): every row's uncached
tail runs in one forward, then all rows decode together until each ends at the delimiter, an EOS token or its
token cap. Per trajectory key the model keeps the ids whose keys and values it holds; a request reuses the longest
common prefix and drops the rest, which is how a rejected proposal is rolled back.

Llama, Mistral and Qwen layouts run rsd's own forward (on a GPU: CUDA graphs and Triton kernels); every other
decoder-only model runs transformers' forward over the same interface (`rsd.engine.transformers_runner`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from rsd.core import ModelCost, RSDError, StepOutput, StepParams, StepRequest
from rsd.engine.steps import StepModel, write_steps
from rsd.hf_loading import (
    check_model_source,
    first_line,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    vocabulary_fingerprint,
)


class HFStepGenerator:
    """A transformers causal LM as a `StepGenerator` (see `rsd.core`)."""

    def __init__(
        self,
        model: str,
        role: str = "draft",
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        source = check_model_source(model, role)
        device = resolve_device(device)
        tokenizer = load_tokenizer(source, role, trust_remote_code)
        lm = load_causal_lm(source, role, resolve_dtype(dtype, device), device, trust_remote_code)
        self._attach(lm, tokenizer, name=model, role=role)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, name: str | None = None, role: str = "draft") -> HFStepGenerator:
        """Wrap an already loaded model and tokenizer (the model stays on its device and dtype)."""
        self = cls.__new__(cls)
        self._attach(model, tokenizer, name=name or model.config.name_or_path or type(model).__name__, role=role)
        return self

    def _attach(self, model: Any, tokenizer: Any, name: str, role: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.role = role
        self.device = str(model.device)
        self.eos_token_ids = collect_eos_token_ids(model, tokenizer)
        self.cost = model_cost(model)
        # The longest sequence the model was built for: a trajectory that reaches it ends ("context").
        self.context_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.engine = StepModel(model, tokenizer, self.eos_token_ids, role)
        self._fingerprint: tuple[int, str] | None = None

    # -- the StepGenerator interface ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding table: the token ids this model can read."""
        return self.engine.vocab_rows

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def vocabulary_fingerprint(self) -> str:
        # Hashing a 150k-token vocabulary takes about a second; every decoder built over this generator asks.
        # Keyed on the tokenizer's size, so tokens added after wrapping are still seen.
        size = len(self.tokenizer)
        if self._fingerprint is None or self._fingerprint[0] != size:
            self._fingerprint = (size, vocabulary_fingerprint(self.tokenizer))
        return self._fingerprint[1]

    def generate_steps(self, requests: Sequence[StepRequest], params: StepParams) -> list[StepOutput]:
        return write_steps(self.engine, requests, params)

    def release(self, keys: Sequence[Hashable]) -> None:
        self.engine.prefixes.release(keys)


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

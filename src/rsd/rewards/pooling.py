"""PRMs behind vLLM servers, each format on the route that lets the server reuse its prefix cache where it can.

The input ids come from `rsd.rewards.formats` (the one place that knows each format) and end at the position
whose output carries the reward of the last step; the server only runs the model. Three routes:

  format                 served as                                      request                      reward
  qwen-prm               Qwen2ForProcessRewardModel, STEP pooling       POST /pooling token_classify  last row [1]
  skywork                Qwen2ForSequenceClassification, 1 label        POST /classify (last token)   probs[0]
  token-classification   *ForTokenClassification, 2 labels, task        POST /classify (last token)   probs[1]
                         classify (--pooler-config '{"task": "classify"}')
  math-shepherd, rlhflow the plain causal LM, generating                POST /v1/completions, 1 token P(+) over {+, -}

- The server applies the head's activation (softmax over 2 labels, sigmoid over 1) exactly once; rsd asks for it
  (`use_activation: true`) and never applies another. A value outside [0, 1] is an error, not a reward.
- Skywork and token-classification PRMs are scored at our own reward position, the input's last token (LAST
  pooling): a delimiter token inside the question is never mistaken for a step end, and since vLLM reads its prefix
  cache for LAST pooling, a step costs the new tokens only. A Skywork checkpoint (`Qwen2ForPrmModel`, `v_head`) has
  no vLLM class: `python -m rsd.rewards.pooling convert-skywork SRC DST` writes the same weights as a one-label
  `Qwen2ForSequenceClassification`, which vLLM serves natively (a sigmoid over the value at the last token).
- vLLM gives STEP and ALL pooling no prefix cache (it needs every token's output): the Qwen PRM re-reads the whole
  trajectory at every step. That is vLLM's limit, and the cost rsd reports for it.
- vLLM 0.32's /classify answers carry no cached-token count (generating servers started with
  --enable-prompt-tokens-details do): for the Skywork and token-classification routes, `prefill_tokens` counts the
  whole input, though the server computed only what its prefix cache lacked.
- Math-Shepherd and RLHFlow are plain causal LMs: the reward is the next-token distribution after the input,
  which a generating server returns through `logprob_token_ids` (vLLM 0.32+), prefix cache included. (vLLM's
  `--runner pooling` turns a causal LM into an embedding model without its LM head, so `returned_token_ids` would
  index hidden units, not the + and - logits.)
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sys
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import httpx

from rsd.backends.openai import (
    ServerOptions,
    ServerPool,
    checkpoint_cost,
    describe,
    load_served_tokenizer,
    run_sync,
    tokenizer_folder,
)
from rsd.core import DEFAULT_DELIMITER, ModelCost, RewardOutput, RewardRequest, RSDError
from rsd.rewards.formats import (
    TRL_STEP_SEPARATOR,
    check_prm_format,
    detect_prm_format,
    make_input_builder,
)

ROUTES = {
    "qwen-prm": "step",
    "skywork": "last",
    "token-classification": "last",
    "math-shepherd": "next-token",
    "rlhflow": "next-token",
}
# Written into a converted Skywork config: its class name alone does not say which input format it was trained on.
FORMAT_MARK = "rsd_prm_format"


class ServedRewardModel:
    """A PRM behind vLLM servers (replicas allowed) as a `RewardModel`, with an asynchronous `ascore`."""

    def __init__(
        self,
        urls: str | Sequence[str],
        prm_format: str | None = None,
        tokenizer: str | Any | None = None,
        delimiter: str = DEFAULT_DELIMITER,
        served_model: str | None = None,
        options: ServerOptions | None = None,
        cost: ModelCost | None = None,
        step_separator: str = TRL_STEP_SEPARATOR,
        route: str | None = None,
    ) -> None:
        """`route="all"` scores a skywork or token-classification PRM through `/pooling` with ALL pooling (every
        token's output, the whole input re-run each time: how older clients did it) instead of `/classify`; its
        server runs with `--pooler-config '{"task": "token_classify"}'`."""
        self.pool = ServerPool(urls, "prm", options)
        self.info = self.pool.discover(served_model)
        self.name = self.info.name
        self.tokenizer = load_served_tokenizer(tokenizer, self.info, "prm")
        folder = tokenizer_folder(tokenizer, self.info)
        self.prm_format = check_prm_format(prm_format) if prm_format else served_prm_format(folder)
        self.route = ROUTES[self.prm_format]
        if route is not None:
            if route != "all" or self.route != "last":
                raise RSDError(f"route {route!r}: only 'all', and only for skywork or token-classification PRMs.")
            self.route = route
        self.builder = make_input_builder(self.prm_format, self.tokenizer, delimiter, step_separator)
        self.cost = cost or checkpoint_cost(folder)
        run_sync(self._check_server())

    # -- the RewardModel interface --------------------------------------------------------------------------
    def score_steps(self, requests: Sequence[RewardRequest]) -> list[RewardOutput]:
        async def all_rewards() -> list[RewardOutput]:
            return list(await asyncio.gather(*(self.ascore(r) for r in requests)))

        return run_sync(all_rewards())

    def release(self, keys: Sequence[Hashable]) -> None:
        self.pool.forget(keys)

    async def aclose(self) -> None:
        await self.pool.aclose()

    # -- one reward -----------------------------------------------------------------------------------------
    async def ascore(self, request: RewardRequest) -> RewardOutput:
        ids = self.builder.build_ids(request.question, request.steps)
        body = await self.pool.post(*self._request(ids), key=request.key)
        reward = self._reward(body, ids)
        if not 0.0 <= reward <= 1.0 or math.isnan(reward):
            raise RSDError(
                f"the PRM server returned {reward} for a step, not a probability; start it without "
                "`use_activation: false` in --pooler-config, and check --prm-format."
            )
        usage = body.get("usage") or {}
        prompt = int(usage.get("prompt_tokens") or len(ids))
        cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
        computed = prompt - cached
        return RewardOutput(reward, prefill_tokens=computed, context_sum=computed * (2 * cached + computed + 1) // 2)

    def _request(self, ids: list[int]) -> tuple[str, dict]:
        if self.route in ("step", "all"):
            payload = {"model": self.name, "input": ids, "task": "token_classify", "use_activation": True}
            return "/pooling", payload
        if self.route == "last":
            return "/classify", {"model": self.name, "input": ids, "use_activation": True}
        plus, minus = self.builder.label_ids
        payload = {
            "model": self.name,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 2,
            "logprob_token_ids": [plus, minus],
            "return_tokens_as_token_ids": True,
        }
        return "/v1/completions", payload

    def _reward(self, body: dict, ids: list[int]) -> float:
        if self.route == "step":
            rows = body["data"][0]["data"]
            expected = ids.count(self.builder.tag_id)
            if not rows or len(rows) != expected or len(rows[-1]) != 2:
                raise RSDError(
                    f"the PRM server returned {len(rows)} step rows for {expected} <extra_0> tags; start it with "
                    f'--pooler-config \'{{"pooling_type": "STEP", "step_tag_id": {self.builder.tag_id}}}\'.'
                )
            return float(rows[-1][1])
        if self.route in ("last", "all"):
            # /classify: the probabilities at the last token; /pooling with ALL: one row per token, ours is last.
            data = body["data"][0]
            probs = data["probs"] if self.route == "last" else data["data"][-1]
            return float(probs[0] if self.prm_format == "skywork" else probs[1])
        return plus_probability(body, self.builder.label_ids)

    # -- start-up probe -----------------------------------------------------------------------------------------
    async def _check_server(self) -> None:
        """Score one tiny trajectory on every replica: a server of the wrong kind fails here, with the fix."""
        ids = self.builder.build_ids("1 + 1 = ?", ["1 + 1 = 2."])
        path, payload = self._request(ids)
        for server in self.pool.servers:
            try:
                response = await self.pool.client().post(server.root + path, json=payload)
            except httpx.HTTPError as exc:
                raise RSDError(f"the PRM server {server.root} did not answer {path} ({describe(exc)}).") from exc
            if response.status_code >= 400:
                raise RSDError(
                    f"the PRM server {server.root} cannot score {self.prm_format} rewards ({path}: HTTP "
                    f"{response.status_code}: {response.text[:200]}); start it as docs/serving.md shows for "
                    f"that format: {SERVE_HINTS[self.prm_format]}"
                )
            self._reward(response.json(), ids)


SERVE_HINTS = {
    "qwen-prm": 'vllm serve PRM --runner pooling --pooler-config \'{"pooling_type": "STEP", "step_tag_id": ID}\'',
    "skywork": "convert it (python -m rsd.rewards.pooling convert-skywork SRC DST), then vllm serve DST",
    "token-classification": 'vllm serve PRM --pooler-config \'{"task": "classify"}\'',
    "math-shepherd": "vllm serve PRM (a plain generating server)",
    "rlhflow": "vllm serve PRM (a plain generating server)",
}


def plus_probability(body: dict, label_ids: tuple[int, int]) -> float:
    """P(+) over {+, -} from the logprobs of the one generated position."""
    top = body["choices"][0]["logprobs"]["top_logprobs"][0]
    plus, minus = (top.get(f"token_id:{t}") for t in label_ids)
    if plus is None or minus is None:
        raise RSDError(
            "the PRM server did not return the logprobs of + and -; it needs `logprob_token_ids` (vLLM 0.32 or "
            "later) and --max-logprobs of at least 2."
        )
    return 1.0 / (1.0 + math.exp(minus - plus))


def served_prm_format(folder: str | None) -> str:
    """The format of a served PRM from its local config.json (the mark a converted Skywork carries comes first)."""
    if folder is None:
        raise RSDError("cannot tell the served PRM's format without its checkpoint here; pass --prm-format.")
    config = json.loads((Path(folder).expanduser() / "config.json").read_text())
    return config.get(FORMAT_MARK) or detect_prm_format(config)


# -- serving a Skywork PRM on vLLM ------------------------------------------------------------------------------
def convert_skywork(source: str | Path, destination: str | Path) -> Path:
    """Write a Skywork PRM (`Qwen2ForPrmModel`: Qwen2 body + `v_head.summary`) as a one-label
    `Qwen2ForSequenceClassification`, which vLLM serves natively and scores at the last token: `v_head.summary.
    {weight,bias}` become `score.{weight,bias}`; the body, the tokenizer and every other file are copied unchanged.

    The copy is for vLLM (which loads `score.bias`); in process, keep loading the original (transformers' class
    has no bias in its head)."""
    from safetensors.torch import load_file, save_file

    source, destination = Path(source).expanduser(), Path(destination).expanduser()
    config = json.loads((source / "config.json").read_text())
    if "Qwen2ForPrmModel" not in (config.get("architectures") or []):
        raise RSDError(f"{source} is not a Skywork PRM (architectures {config.get('architectures')}).")
    weight_files = sorted(source.glob("*.safetensors"))
    if not weight_files:
        raise RSDError(f"{source} has no .safetensors weights; save the Skywork PRM with safetensors first.")
    destination.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name not in ("config.json",):
            shutil.copy2(file, destination / file.name)
    renamed_index: dict[str, str] = {}
    for file in weight_files:
        tensors = load_file(file)
        out = {skywork_head_name(name): t for name, t in tensors.items()}
        out = {name: t for name, t in out.items() if not name.startswith("lm_head.")}
        save_file(out, destination / file.name, metadata={"format": "pt"})
        renamed_index.update(dict.fromkeys(out, file.name))
    index = destination / "model.safetensors.index.json"
    if index.exists():
        index.write_text(json.dumps({"metadata": {}, "weight_map": renamed_index}, indent=2))
    config |= {
        "architectures": ["Qwen2ForSequenceClassification"],
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        FORMAT_MARK: "skywork",
    }
    config.pop("auto_map", None)  # the custom code stays behind: vLLM and transformers know this class
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    return destination


def skywork_head_name(name: str) -> str:
    return "score." + name.removeprefix("v_head.summary.") if name.startswith("v_head.summary.") else name


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "convert-skywork":
        print("usage: python -m rsd.rewards.pooling convert-skywork SKYWORK_PRM_DIR OUTPUT_DIR", file=sys.stderr)
        return 2
    try:
        out = convert_skywork(args[1], args[2])
    except RSDError as exc:
        print(f"rsd: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}; serve it with: vllm serve {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

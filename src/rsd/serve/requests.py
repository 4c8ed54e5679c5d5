"""From a checked request body to the trajectories it asks for: the prompt, the question the PRM reads, and the
request's own budgets, sampling and weighting function within the server's limits."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field, replace

from pydantic import BaseModel, ValidationError

from rsd.core import Prompted, RSDError, RunConfig
from rsd.eval.prompts import PromptTemplate, apply_chat_template
from rsd.policies import Policy, make_policy
from rsd.serve.schemas import ChatCompletionRequest, CompletionRequest


class APIError(Exception):
    """An answer in the OpenAI error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
        kinds |= {413: "invalid_request_error", 503: "server_overloaded", 504: "timeout_error"}
        return kinds.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServerLimits:
    """What the server was started with: the defaults and caps of every request."""

    served_model_name: str
    config: RunConfig  # default budgets and sampling; max_new_tokens and max_steps are also the caps
    policy_name: str
    delta: float
    alpha: float
    p: float
    template: PromptTemplate  # its system message is the chat default
    max_n: int
    tokenizer: object = field(repr=False)  # the chat template's (the target's)


def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """The request as `schema`; malformed JSON or a field of the wrong type is a 400 naming the problem."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc}).", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object.", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        problem = first["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {problem}." if param else f"{problem}.", param=param) from None


def chat_question_and_prompt(request: ChatCompletionRequest, limits: ServerLimits) -> tuple[str, str]:
    """The last user message (what the PRM reads) and the whole conversation through the chat template; the
    server's template's system message goes first unless the request brings its own."""
    users = [m for m in request.messages if m.role == "user"]
    if not users:
        raise APIError(400, "messages has no user message; the last one is the question.", param="messages")
    question = users[-1].text()
    own_system = any(m.role in ("system", "developer") for m in request.messages)
    template = limits.template.messages or ()
    turns = [] if own_system else [{"role": r, "content": c} for r, c in template if r == "system"]
    for m in request.messages:
        turns.append({"role": "system" if m.role == "developer" else m.role, "content": m.text()})
    try:
        prompt = apply_chat_template(limits.tokenizer, turns, limits.template.name)
    except RSDError as exc:
        raise APIError(400, f"{exc} Use /v1/completions with the prompt as text.", param="messages") from None
    return question, prompt


def request_config(request: ChatCompletionRequest | CompletionRequest, limits: ServerLimits) -> RunConfig:
    """The request's budgets and sampling: `max_tokens` up to the server's --max-new-tokens (above it, a 400),
    `rsd.max_steps` capped at the server's --max-steps. The seed stays the server's: a request's own seed goes in
    its trajectories' keys (`problems_of`), so that requests sampling alike share one batched model call."""
    base = limits.config
    budget = request.token_budget()
    if budget is not None and budget > base.max_new_tokens:
        param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
        raise APIError(
            400, f"{param} is {budget}, above this server's limit of {base.max_new_tokens} tokens.", param=param
        )
    max_steps = base.max_steps if request.rsd.max_steps is None else min(request.rsd.max_steps, base.max_steps)
    return replace(
        base,
        max_new_tokens=budget or base.max_new_tokens,
        max_steps=max_steps,
        temperature=base.temperature if request.temperature is None else request.temperature,
        top_p=base.top_p if request.top_p is None else request.top_p,
    )


def request_policy(request: ChatCompletionRequest | CompletionRequest, limits: ServerLimits) -> Policy | None:
    """The request's weighting function, when its `rsd` object names a policy or a delta (None: the server's)."""
    options = request.rsd
    if options.policy is None and options.delta is None:
        return None
    name = options.policy or limits.policy_name
    delta = limits.delta if options.delta is None else options.delta
    try:
        return make_policy(name, delta=delta, alpha=limits.alpha, p=limits.p)
    except RSDError as exc:
        raise APIError(400, str(exc), param="rsd") from None


def check_common(request: ChatCompletionRequest | CompletionRequest, limits: ServerLimits) -> None:
    if request.model is not None and request.model != limits.served_model_name:
        raise APIError(
            404,
            f"model {request.model!r} is not served here; this server serves {limits.served_model_name!r}.",
            param="model",
            code="model_not_found",
        )
    if request.n > limits.max_n:
        raise APIError(400, f"n is {request.n}; this server gives at most {limits.max_n} choices.", param="n")


def problems_of(request: ChatCompletionRequest | CompletionRequest, limits: ServerLimits) -> list[Prompted]:
    """One problem per choice, keyed by the request's seed (random unless given) and the choice index: sampling and
    the weighting function's draws follow from (server seed, key, position), whatever else is in flight."""
    from rsd.serve.engine import TrajectoryKey

    check_common(request, limits)
    if isinstance(request, ChatCompletionRequest):
        question, prompt = chat_question_and_prompt(request, limits)
    else:
        question = prompt = request.prompt_text()
    if not question.strip():
        param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
        raise APIError(400, "the question is empty; send some text.", param=param)
    config, policy = request_config(request, limits), request_policy(request, limits)
    seed = secrets.randbits(63) if request.seed is None else request.seed
    return [Prompted(TrajectoryKey(f"{seed}-{i}"), question, prompt, config, policy) for i in range(request.n)]

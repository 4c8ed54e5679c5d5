"""The request bodies `rsd serve` accepts: the OpenAI fields it honours, checked by pydantic.

Fields the OpenAI API defines but RSD does not use (`logprobs`, `presence_penalty`, `user`, ...) are ignored, as the
OpenAI API ignores what it does not know; a field of the wrong type is a 400 naming it. Numbers are strict (a string
is never read as a number), except that an integer stands for a float, as JSON writes `1` for `1.0`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from rsd.policies import POLICY_NAMES


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def _one_of(message: str):
    """A wrap validator for a field of several shapes: one error naming the field and what it may hold, not one
    per shape tried."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(message) from None

    return validate


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class RSDOptions(_Body):
    """RSD's own settings for one request (the `rsd` object of the body; `extra_body={"rsd": {...}}` in `openai`)."""

    delta: float | None = None  # threshold of threshold/logistic: 0 keeps every draft step, above 1 none
    policy: Literal[POLICY_NAMES] | None = None  # type: ignore[valid-type]
    max_steps: StrictInt | None = Field(default=None, ge=1)

    _delta_finite = field_validator("delta")(_finite)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """What both endpoints share."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = Field(default=1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    rsd: RSDOptions = Field(default_factory=RSDOptions)

    _finite_numbers = field_validator("temperature", "top_p")(_finite)
    _stop_shape = field_validator("stop", mode="wrap")(_one_of("must be a string or a list of strings"))

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None

    _content_shape = field_validator("content", mode="wrap")(
        _one_of('must be a string or a list of {"type": "text", "text": ...} parts')
    )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr]

    _prompt_shape = field_validator("prompt", mode="wrap")(_one_of("must be a string (or a list of one string)"))

    def prompt_text(self) -> str:
        """The one prompt of the request (a list holds exactly one; several prompts are several requests)."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("give one prompt (a string); send several prompts as several requests")
        return value

    def token_budget(self) -> int | None:
        return self.max_tokens

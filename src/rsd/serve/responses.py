"""What a request gets back: the OpenAI response and stream chunk shapes, each with RSD's own record beside them.

A choice's text is the text of its committed steps, cut at the first of the request's stop strings (as OpenAI
does: the stop string itself is not returned, and the finish reason is "stop"). Every choice also carries an `rsd`
object: its steps (`source`, `text`, `reward`, `kept`, ...), its statistics, and RSD's own finish reason, the same
fields as `rsd generate --json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rsd.core import Step

# RSD's finish reasons, as OpenAI's: an answer that ended by itself or at a stop string "stop", any cut "length".
STOPPED = {"eos", "stop"}


def openai_finish_reason(reason: str) -> str:
    return "stop" if reason in STOPPED else "length"


class StopScanner:
    """Cuts a growing text at the first stop string, holding back an end that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of `text` that may be sent now."""
        if self.stopped:
            return ""
        text = self.held + text
        cuts = [i for stop in self.stops if (i := text.find(stop)) >= 0]
        if cuts:
            self.stopped, self.held = True, ""
            return text[: min(cuts)]
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        self.held = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        """At the end: what was held back is not the start of a stop string after all."""
        rest, self.held = self.held, ""
        return rest


@dataclass
class Choice:
    """One trajectory of a request as the client sees it."""

    index: int
    scanner: StopScanner
    steps: list[Step] = field(default_factory=list)
    text: str = ""
    reason: str | None = None  # RSD's finish reason ("eos", "max_new_tokens", "stop", "timeout", ...)
    stats: dict | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.steps)

    def add_step(self, step: Step) -> str:
        """Record a committed step; the text it adds to the answer (empty once a stop string was met)."""
        if self.scanner.stopped or self.done:
            return ""
        self.steps.append(step)
        piece = self.scanner.feed(step.text)
        self.text += piece
        return piece

    def finish(self, reason: str, stats: dict, error: str | None) -> str:
        """Record the end; the held-back text it releases."""
        self.reason = "stop" if self.scanner.stopped else reason
        self.stats, self.error = stats, error
        rest = self.scanner.flush()
        self.text += rest
        return rest

    def rsd_record(self) -> dict:
        return {"steps": [s.to_dict() for s in self.steps], "stats": self.stats, "finish_reason": self.reason}


@dataclass(frozen=True)
class Reply:
    """The fields every object of one answer shares."""

    id: str
    kind: str  # "chat" or "text"
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def usage(self, prompt_tokens: int, choices: Sequence[Choice]) -> dict:
        completion = sum(c.completion_tokens for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    def response(self, prompt_tokens: int, choices: Sequence[Choice]) -> dict:
        out = self.head("chat.completion" if self.kind == "chat" else "text_completion")
        out["choices"] = [self._choice(c) for c in choices]
        out["usage"] = self.usage(prompt_tokens, choices)
        out["rsd"] = choices[0].rsd_record()  # the first choice's; each choice carries its own
        return out

    def _choice(self, choice: Choice) -> dict:
        body = {"index": choice.index}
        if self.kind == "chat":
            body["message"] = {"role": "assistant", "content": choice.text}
        else:
            body["text"] = choice.text
        return body | {"finish_reason": openai_finish_reason(choice.reason), "rsd": choice.rsd_record()}

    # -- streaming ------------------------------------------------------------------------------------------------
    def chunk(self, index: int, text: str, first: bool = False, finish: str | None = None, rsd: dict | None = None):
        if self.kind == "chat":
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text}
        choice["finish_reason"] = finish
        if rsd is not None:
            choice["rsd"] = rsd
        return sse(self.head(self.chunk_object) | {"choices": [choice]})

    def usage_chunk(self, prompt_tokens: int, choices: Sequence[Choice]) -> str:
        return sse(self.head(self.chunk_object) | {"choices": [], "usage": self.usage(prompt_tokens, choices)})

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"

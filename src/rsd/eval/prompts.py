"""Prompt templates: how a question becomes the text the models continue.

Named templates:
- `qwen25-math-cot`: the Qwen2.5-Math chain-of-thought prompt of the RSD paper: the system turn "Please reason
  step by step, and put your final answer within \\boxed{}.", the question as the user turn, through the
  tokenizer's chat template with the assistant turn opened.
- `chat`: the question as the only (user) turn, through the chat template; for models with their own system
  prompt conventions.
- `none`: the question verbatim, for base models.

Anything else names a template file: a `.json` file holds a list of chat messages (`{"role", "content"}`)
rendered through the chat template, any other file is raw text; both put the question where `{question}`
stands. Only `{question}` is replaced, so LaTeX braces such as `\\boxed{}` need no escaping.
Multiple-choice problems already carry their lettered choices in the question text (see `datasets.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rsd.core import RSDError

QWEN25_MATH_COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
PLACEHOLDER = "{question}"

# name -> the chat messages of that template (None: the question verbatim, no chat template).
_NAMED: dict[str, list[dict[str, str]] | None] = {
    "qwen25-math-cot": [
        {"role": "system", "content": QWEN25_MATH_COT_SYSTEM},
        {"role": "user", "content": PLACEHOLDER},
    ],
    "chat": [{"role": "user", "content": PLACEHOLDER}],
    "none": None,
}
TEMPLATES: tuple[str, ...] = tuple(_NAMED)
DEFAULT_TEMPLATE = "qwen25-math-cot"


@dataclass(frozen=True)
class PromptTemplate:
    """A loaded template: chat messages to render through a chat template, or raw text."""

    name: str
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs
    text: str | None = None  # a raw text template; None with messages None means the question verbatim

    def render(self, question: str, tokenizer=None) -> str:
        if self.messages is None:
            return question if self.text is None else self.text.replace(PLACEHOLDER, question)
        messages = [{"role": r, "content": c.replace(PLACEHOLDER, question)} for r, c in self.messages]
        return apply_chat_template(tokenizer, messages, self.name)


def apply_chat_template(tokenizer, messages: list[dict[str, str]], template_name: str) -> str:
    """The prompt text of `messages` with the assistant turn opened; RSDError for a tokenizer without one."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RSDError(
            f"template {template_name!r} needs the tokenizer's chat template, and this tokenizer has none; "
            f"pass --template none for a base model (or a template file)."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_template(template: str) -> PromptTemplate:
    """A named template (one of TEMPLATES) or a template file."""
    if template in _NAMED:
        messages = _NAMED[template]
        pairs = None if messages is None else tuple((m["role"], m["content"]) for m in messages)
        return PromptTemplate(name=template, messages=pairs)
    path = Path(template).expanduser()
    if not path.is_file():
        raise RSDError(
            f"unknown template {template!r}: use one of {', '.join(TEMPLATES)} or the path of a template file "
            f"(text with {PLACEHOLDER}, or a JSON list of chat messages)."
        )
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RSDError(
            f"template file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            f"save it as UTF-8."
        ) from None
    except OSError as exc:
        raise RSDError(f"cannot read template file {path} ({exc.strerror}); pass a file you can read.") from None
    if PLACEHOLDER not in content:
        raise RSDError(f"template file {path} has no {PLACEHOLDER} placeholder; add one where the question goes.")
    if path.suffix == ".json":
        return PromptTemplate(name=str(path), messages=_chat_messages(content, path))
    return PromptTemplate(name=str(path), text=content)


def _chat_messages(content: str, path: Path) -> tuple[tuple[str, str], ...]:
    example = '[{"role": "system", "content": "..."}, {"role": "user", "content": "{question}"}]'
    try:
        messages = json.loads(content)
    except json.JSONDecodeError as exc:
        raise RSDError(f"template file {path} is not valid JSON ({exc.msg}, line {exc.lineno}).") from exc
    valid = isinstance(messages, list) and messages
    valid = valid and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not valid:
        raise RSDError(f"template file {path} must hold a list of chat messages, like {example}.")
    return tuple((m["role"], m["content"]) for m in messages)


def build_prompt(template: str, question: str, tokenizer) -> str:
    """The prompt for `question` under `template` (a name in TEMPLATES or a template file)."""
    return load_template(template).render(question, tokenizer)

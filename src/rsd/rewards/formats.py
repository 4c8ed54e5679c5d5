"""How each PRM wants its input, as token ids; the one place that knows each format.

Every builder turns `(question, steps)` into the token ids of the PRM's input *up to and including* the position
whose model output carries the reward of the last step. The PRMs are causal, so nothing after that position can
change the reward, and the input for the next step extends these ids: the adapter reuses their KV cache.
Steps come without their trailing delimiter (`RewardRequest.steps`). No torch here: this module is cheap to import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from rsd.core import DEFAULT_DELIMITER, RSDError

PRM_FORMATS = ("skywork", "qwen-prm", "math-shepherd", "rlhflow", "token-classification")

QWEN_PRM_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_PRM_STEP_TAG = "<extra_0>"
MATH_SHEPHERD_STEP_TAG = "ки"
TRL_STEP_SEPARATOR = "\n"  # TRL's PRMConfig.step_separator default

# Checkpoints whose class names say what they are.
ARCHITECTURE_FORMATS = {"Qwen2ForPrmModel": "skywork", "Qwen2ForProcessRewardModel": "qwen-prm"}
# Plain causal LMs carry no mark of being a PRM; the two families users bring differ in their base model:
# Math-Shepherd is a Mistral, the RLHFlow PRMs are Llama 3.1.
CAUSAL_LM_FORMATS = {"mistral": "math-shepherd", "llama": "rlhflow"}


class InputBuilder(Protocol):
    def build_ids(self, question: str, steps: Sequence[str]) -> list[int]:
        """Input ids; the output at the last of them gives the reward of `steps[-1]`."""


def check_prm_format(prm_format: str) -> str:
    if prm_format not in PRM_FORMATS:
        raise RSDError(f"unknown --prm-format {prm_format!r}; use one of {', '.join(PRM_FORMATS)}.")
    return prm_format


def detect_prm_format(config: dict) -> str:
    """The format of a PRM checkpoint from its config.json (`architectures`, and `model_type` for plain LMs)."""
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    for arch in architectures:
        if arch in ARCHITECTURE_FORMATS:
            return ARCHITECTURE_FORMATS[arch]
        if arch.endswith("ForTokenClassification"):
            return "token-classification"
        if arch.endswith("ForCausalLM") and model_type in CAUSAL_LM_FORMATS:
            return CAUSAL_LM_FORMATS[model_type]
    raise RSDError(
        f"cannot tell the PRM format from its config (architectures {architectures}, model_type {model_type}); "
        f"pass --prm-format with one of {', '.join(PRM_FORMATS)}."
    )


def make_input_builder(
    prm_format: str,
    tokenizer: Any,
    delimiter: str = DEFAULT_DELIMITER,
    step_separator: str = TRL_STEP_SEPARATOR,
) -> InputBuilder:
    """`delimiter` is the run's step delimiter (Skywork marks steps with it); `step_separator` is the one a
    token-classification PRM was trained with."""
    check_prm_format(prm_format)
    if prm_format == "skywork":
        return SkyworkInput(tokenizer, delimiter)
    if prm_format == "qwen-prm":
        return QwenPRMInput(tokenizer)
    if prm_format == "math-shepherd":
        return MathShepherdInput(tokenizer)
    if prm_format == "rlhflow":
        return RLHFlowInput(tokenizer)
    return TokenClassificationInput(tokenizer, step_separator)


def encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special)) if text else []


class PieceEncoder:
    """`encode` for texts tokenized on their own, remembered: a trajectory re-sends all its steps at every call, and
    a step that is already tokenized should not cost again. Keeps the `size` most recent texts."""

    def __init__(self, tokenizer: Any, size: int = 8192):
        self.tokenizer = tokenizer
        self.size = size
        self.memo: dict[str, tuple[int, ...]] = {}

    def __call__(self, text: str) -> tuple[int, ...]:
        ids = self.memo.pop(text, None)
        if ids is None:
            ids = tuple(encode(self.tokenizer, text))
            if len(self.memo) >= self.size:
                del self.memo[next(iter(self.memo))]  # the least recently used: hits are re-inserted at the end
        self.memo[text] = ids
        return ids


def require_steps(steps: Sequence[str]) -> None:
    if not steps:
        raise ValueError("a reward request needs at least one step")


def plus_minus_ids(tokenizer: Any) -> tuple[int, int]:
    """The ids of `+` and `-` as the reference code of Math-Shepherd and RLHFlow gets them:
    `tokenizer.encode("+ -")[1:]` (dropping the BOS), so in Llama 3 the minus is the token " -"."""
    ids = encode(tokenizer, "+ -")
    if len(ids) != 2:
        raise RSDError(
            f"the PRM tokenizer splits '+ -' into {len(ids)} tokens, not 2 (+ and -); "
            "it is not the tokenizer of a Math-Shepherd or RLHFlow PRM: check --prm-format."
        )
    return ids[0], ids[1]


def special_token_id(tokenizer: Any, token: str, prm_format: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise RSDError(
            f"the PRM tokenizer has no {token} token, which the {prm_format} format needs; check --prm-format."
        )
    return token_id


class SkyworkInput:
    """Skywork-o1-Open-PRM, as its reference `prepare_input` builds it: ids of `bos + problem + "\\n"`, then the
    response split on the delimiter, each piece tokenized on its own, the delimiter's last token id after every
    piece. That appended id is the reward position."""

    def __init__(self, tokenizer: Any, delimiter: str):
        if tokenizer.bos_token is None:
            raise RSDError(
                "the Skywork PRM tokenizer has no bos_token (its own sets <|im_start|>); "
                "check the checkpoint's tokenizer files or --prm-format."
            )
        if not delimiter:
            raise RSDError("the Skywork PRM marks steps with the step delimiter, which is empty; set a delimiter.")
        self.tokenizer = tokenizer
        self.encode_piece = PieceEncoder(tokenizer)
        self.delimiter = delimiter
        self.reward_token_id = encode(tokenizer, delimiter)[-1]

    def build_ids(self, question: str, steps: Sequence[str]) -> list[int]:
        require_steps(steps)
        ids = list(self.encode_piece(f"{self.tokenizer.bos_token}{question}\n"))
        # The reference splits the joined response on the delimiter; a step holding the delimiter (an EOS- or
        # length-ended one) becomes several pieces, each followed by a reward token, exactly as there.
        for piece in self.delimiter.join(steps).split(self.delimiter):
            ids.extend(self.encode_piece(piece))
            ids.append(self.reward_token_id)
        return ids


class QwenPRMInput:
    """Qwen2.5-Math-PRM: its chat template with the fixed system prompt, the question as the user turn and the
    assistant turn `"<extra_0>".join(steps) + "<extra_0>"`; rewards sit at the `<extra_0>` tokens. The input stops
    at the last `<extra_0>`: the turn's `<|im_end|>` cannot change a causal score.

    A trajectory sends all its steps at every call. Tokenizers split special tokens out before anything else, so
    the text after each `<extra_0>` tokenizes on its own: the head (template, question, first step) and each later
    step are tokenized once and remembered. A tokenizer for which that split does not hold (checked once, on
    probes) gets the whole text tokenized at every call instead."""

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise RSDError("the Qwen PRM tokenizer has no chat template; check the checkpoint or --prm-format.")
        self.tokenizer = tokenizer
        self.tag_id = special_token_id(tokenizer, QWEN_PRM_STEP_TAG, "qwen-prm")
        self.encode_piece = PieceEncoder(tokenizer)
        self.heads: dict[tuple[str, str], str] = {}  # (question, first step) -> the rendered text up to its tag
        self.incremental = splits_at_special_token(tokenizer, QWEN_PRM_STEP_TAG, self.tag_id)

    def build_ids(self, question: str, steps: Sequence[str]) -> list[int]:
        require_steps(steps)
        if not self.incremental:
            return encode(self.tokenizer, self.render(question, steps))
        ids = list(self.encode_piece(self.head(question, steps[0])))
        for step in steps[1:]:
            ids.extend(self.encode_piece(step))
            ids.append(self.tag_id)
        return ids

    def render(self, question: str, steps: Sequence[str]) -> str:
        messages = [
            {"role": "system", "content": QWEN_PRM_SYSTEM_PROMPT},
            {"role": "user", "content": question},
            {"role": "assistant", "content": QWEN_PRM_STEP_TAG.join(steps) + QWEN_PRM_STEP_TAG},
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return text[: text.rfind(QWEN_PRM_STEP_TAG) + len(QWEN_PRM_STEP_TAG)]

    def head(self, question: str, first_step: str) -> str:
        key = (question, first_step)
        text = self.heads.pop(key, None) or self.render(question, [first_step])
        if len(self.heads) >= self.encode_piece.size:
            del self.heads[next(iter(self.heads))]
        self.heads[key] = text
        return text


def splits_at_special_token(tokenizer: Any, token: str, token_id: int) -> bool:
    """Whether text after `token` tokenizes as if on its own (a SentencePiece tokenizer that marks only the first
    word of an input, for one, does not)."""
    probes = ["Step 2: x = 3", " so y = 4", "\n\nThen 5", "  12"]
    head = f"Q: 1 + 1?\nStep 1{token}"
    head_ids = encode(tokenizer, head)
    return head_ids[-1:] == [token_id] and all(
        encode(tokenizer, head + probe + token) == head_ids + encode(tokenizer, probe) + [token_id] for probe in probes
    )


class MathShepherdInput:
    """Math-Shepherd: `f"{question} {output}"`, each step followed by `" ки"`, steps joined by `"\\n"`, the
    tokenizer's own special tokens (its BOS) added. Reward: P(+) over the LM logits of {+, -} at the last `ки`."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.label_ids = plus_minus_ids(tokenizer)
        self.tag_id = encode(tokenizer, MATH_SHEPHERD_STEP_TAG)[-1]

    def build_ids(self, question: str, steps: Sequence[str]) -> list[int]:
        require_steps(steps)
        output = "\n".join(f"{step} {MATH_SHEPHERD_STEP_TAG}" for step in steps)
        ids = encode(self.tokenizer, f"{question} {output}", special=True)
        if ids[-1] != self.tag_id:
            raise RSDError(
                "the PRM tokenizer does not end ' ки' with the ки token; "
                "it is not a Math-Shepherd tokenizer: check --prm-format."
            )
        return ids


class RLHFlowInput:
    """RLHFlow PRMs: a chat where step k is user turn k (the first is `question + " " + step1`) followed by the
    assistant turn `"+"`. Reward of the last step: P(+) over the LM logits of {+, -} at the position that predicts
    the last assistant `+`, so the input stops just before that `+`."""

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise RSDError("the RLHFlow PRM tokenizer has no chat template; check the checkpoint or --prm-format.")
        self.tokenizer = tokenizer
        self.label_ids = plus_minus_ids(tokenizer)

    def build_ids(self, question: str, steps: Sequence[str]) -> list[int]:
        require_steps(steps)
        conversation = []
        for k, step in enumerate(steps):
            conversation.append({"role": "user", "content": f"{question} {step}" if k == 0 else step})
            conversation.append({"role": "assistant", "content": "+"})
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        ids = encode(self.tokenizer, text)  # the template writes its own BOS, as apply_chat_template(tokenize=True)
        plus_id = self.label_ids[0]
        # The last assistant turn is the last '+' token: templates close a turn with special tokens only.
        last_plus = max((i for i, t in enumerate(ids) if t == plus_id), default=None)
        if last_plus is None or last_plus == 0:
            raise RSDError(
                "the PRM chat template does not write the assistant '+' as its own token; "
                "it is not an RLHFlow PRM: check --prm-format."
            )
        return ids[:last_plus]


class TokenClassificationInput:
    """A `*ForTokenClassification` PRM trained with TRL's PRMTrainer, whose `tokenize_row` builds:
    [BOS if the tokenizer has one] + prompt ids + for each step: step ids + separator ids, with the step's label on
    the separator's last token (label 1 = correct). The raw question is the prompt; nothing separates it from the
    first step, as there. `separator` must be the `step_separator` the PRM was trained with ("\\n" by default)."""

    def __init__(self, tokenizer: Any, separator: str = TRL_STEP_SEPARATOR):
        if not separator:
            raise RSDError("a token-classification PRM needs a non-empty step separator.")
        self.tokenizer = tokenizer
        self.encode_piece = PieceEncoder(tokenizer)
        self.separator_ids = encode(tokenizer, separator)

    def build_ids(self, question: str, steps: Sequence[str]) -> list[int]:
        require_steps(steps)
        bos = self.tokenizer.bos_token_id
        ids = ([bos] if bos is not None else []) + list(self.encode_piece(question))
        for step in steps:
            ids.extend(self.encode_piece(step))
            ids.extend(self.separator_ids)
        return ids

"""Tiny random PRM checkpoints in the layouts users bring, for tests: real config `architectures`, real weight names,
real special tokens; random weights. Nothing here downloads.

Layouts (see notes/prm-formats.md):
- skywork: Qwen2 body `model.*` + `v_head.summary.{weight,bias}`, architectures Qwen2ForPrmModel, bos <|im_start|>;
- qwen-prm: Qwen2 body + `score.0` / `score.2`, architectures Qwen2ForProcessRewardModel, an `auto_map` to hub
  code that is not there (loading must not need it), weights sharded with an index like the 7B checkpoint;
- math-shepherd: MistralForCausalLM, a tokenizer that adds BOS, with the `ки` step tag;
- rlhflow: LlamaForCausalLM, a Llama-3-style chat template and a tokenizer that adds <|begin_of_text|>;
- token-classification: Qwen2ForTokenClassification with 2 labels (what TRL's PRMTrainer trains).
Every model has head_dim 64, so vLLM's CPU build can serve them too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tiny import CORPUS, QWEN_CHAT_TEMPLATE, SPECIAL_TOKENS, make_tokenizer

LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Arithmetic with spaced signs, so that " -" and " +" become tokens as in real vocabularies ("+ -" -> "+", " -").
SIGNS_CORPUS = ["Then 9 - 3 + 1 = 7 and 5 + 2 - 4 = 3.", "Check: + good, - bad; 8 - 1 + 0 = 7."]


def make_prm_tokenizer(
    bos_token: str | None = None,
    extra_special: tuple[str, ...] = (),
    extra_tokens: tuple[str, ...] = (),
    chat_template: str = QWEN_CHAT_TEMPLATE,
):
    """A byte-level BPE tokenizer like tiny.make_tokenizer's, trained with signs too; with `bos_token`, its
    encode() adds that BOS (as Llama and Mistral tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS + list(extra_special) + ([bos_token] if bos_token else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((CORPUS + SIGNS_CORPUS) * 20, trainer=trainer)
    if bos_token:
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A $B", special_tokens=[(bos_token, bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=bos_token,
        additional_special_tokens=[t for t in specials if t not in ("<|endoftext|>", bos_token)],
    )
    if extra_tokens:
        fast.add_tokens(list(extra_tokens))
    fast.chat_template = chat_template
    return fast


def qwen2_config(tokenizer, **overrides):
    from transformers import Qwen2Config

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=256,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    settings.update(overrides)
    return Qwen2Config(**settings)


def spread(tensor, scale: float):
    """Random heads on normalized hidden states give rewards near 0.5; spread them so tests can tell them apart."""
    import torch

    with torch.no_grad():
        tensor.normal_(0.0, scale)
    return tensor


def save_body_and_head(out_dir: Path, config, body, head: dict, tokenizer, shards: int = 1) -> Path:
    """Save `model.*` body tensors and head tensors in safetensors (optionally as 2 shards with an index)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    body_tensors = {f"model.{k}": v.contiguous() for k, v in body.state_dict().items()}
    head = {k: v.contiguous() for k, v in head.items()}
    if shards == 1:
        save_file({**body_tensors, **head}, out_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        parts = [body_tensors, head]
        names = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
        weight_map = {}
        for part, name in zip(parts, names, strict=True):
            save_file(part, out_dir / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        total = sum(t.numel() * t.element_size() for part in parts for t in part.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_skywork_prm(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Model

    tokenizer = make_tokenizer()
    tokenizer.bos_token = "<|im_start|>"
    torch.manual_seed(seed)
    config = qwen2_config(tokenizer, tie_word_embeddings=True)
    config.architectures = ["Qwen2ForPrmModel"]
    body = Qwen2Model(config).eval()
    hidden = config.hidden_size
    head = {
        "v_head.summary.weight": spread(torch.empty(1, hidden), 2.0 / math.sqrt(hidden)),
        "v_head.summary.bias": spread(torch.empty(1), 0.1),
    }
    return save_body_and_head(out_dir, config, body, head, tokenizer)


def make_qwen_prm(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Model

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = qwen2_config(tokenizer, num_labels=2)
    config.architectures = ["Qwen2ForProcessRewardModel"]
    config.auto_map = {
        "AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
        "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel",
    }
    body = Qwen2Model(config).eval()
    hidden = config.hidden_size
    head = {
        "score.0.weight": spread(torch.empty(hidden, hidden), 1.0 / math.sqrt(hidden)),
        "score.0.bias": spread(torch.empty(hidden), 0.1),
        "score.2.weight": spread(torch.empty(2, hidden), 3.0 / math.sqrt(hidden)),
        "score.2.bias": spread(torch.empty(2), 0.1),
    }
    return save_body_and_head(out_dir, config, body, head, tokenizer, shards=2)


def save_causal_lm(out_dir: Path, model, tokenizer) -> Path:
    import torch

    with torch.no_grad():
        # Logits of + and - a few units apart: rewards spread over (0, 1) rather than saturated at 0 or 1.
        model.lm_head.weight.mul_(5.0)
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


# The settings a Mistral or Llama test model takes from the tiny Qwen2 configuration: the same sizes and ids.
SHARED_SETTINGS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def shared_settings(tokenizer) -> dict:
    base = qwen2_config(tokenizer).to_dict()
    return {key: base[key] for key in SHARED_SETTINGS}


def make_math_shepherd_prm(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = make_prm_tokenizer(bos_token="<s>", extra_tokens=("ки",))
    torch.manual_seed(seed)
    config = MistralConfig(**shared_settings(tokenizer), sliding_window=4096, tie_word_embeddings=False)
    return save_causal_lm(out_dir, MistralForCausalLM(config), tokenizer)


def make_rlhflow_prm(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_prm_tokenizer(
        bos_token="<|begin_of_text|>",
        extra_special=tuple(t for t in LLAMA3_SPECIAL_TOKENS if t != "<|begin_of_text|>"),
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(**shared_settings(tokenizer), tie_word_embeddings=False)
    return save_causal_lm(out_dir, LlamaForCausalLM(config), tokenizer)


def make_token_classification_prm(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2ForTokenClassification

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2ForTokenClassification(qwen2_config(tokenizer, num_labels=2)).eval()
    spread(model.score.weight.data, 3.0 / math.sqrt(model.config.hidden_size))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def make_plain_qwen2_lm(out_dir: Path, seed: int = 0) -> Path:
    """A Qwen2ForCausalLM with a tokenizer that has + and -: a plain LM whose PRM format cannot be detected."""
    import torch
    from transformers import Qwen2ForCausalLM

    tokenizer = make_prm_tokenizer()
    torch.manual_seed(seed)
    return save_causal_lm(out_dir, Qwen2ForCausalLM(qwen2_config(tokenizer)), tokenizer)


BUILDERS = {
    "skywork": make_skywork_prm,
    "qwen-prm": make_qwen_prm,
    "math-shepherd": make_math_shepherd_prm,
    "rlhflow": make_rlhflow_prm,
    "token-classification": make_token_classification_prm,
}

"""Tiny models in real layouts for tests: a byte-level BPE tokenizer trained in a second, random Qwen2 models saved
as checkpoints, and random in-memory models of the Qwen2, Llama and Qwen3 layouts.

Nothing here downloads.
"""

from __future__ import annotations

from pathlib import Path

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]

CORPUS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Step 1: 3 + 4 = 7.\n\nStep 2: So the answer is \\boxed{7}.",
    "Let x be the number of pens. Then 2x + 5 = 17, so x = 6.\n\nThe answer is \\boxed{6}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "A train travels 60 miles per hour for 2 hours. 60 * 2 = 120.\n\n\\boxed{120}",
    "What is 12 - 5? We compute 12 - 5 = 7.\n\nThus the result is 7.\n\n",
]


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer with Qwen's special tokens and a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<extra_0>"],
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def make_qwen2_lm(
    out_dir: Path,
    tokenizer,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 1,
    kv_heads: int = 1,
    intermediate: int = 128,
    seed: int = 0,
) -> Path:
    """A random Qwen2ForCausalLM saved with its tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,
        intermediate_size=intermediate,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        # Random init gives near-uniform logits; a larger scale makes greedy choices clear-cut and stable.
        model.lm_head.weight.mul_(20.0)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_layout_lm(kind: str, tokenizer, **overrides):
    """A random in-memory model of one layout ("qwen2", "llama", "qwen3"): 4 query heads over 2 key heads, head_dim
    16, sharpened (a scaled LM head and query/key projections) so that positions and masks decide its choices.
    `overrides` replace fields of its configuration."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_class, model_class = classes[kind]
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = model_class(config_class(**{**fields, **overrides})).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model

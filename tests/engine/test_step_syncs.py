"""An engine step reads the device on the host at most once: every call that would make the host wait for the
device (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, and `int()`, `float()`, `bool()` or indexing with a tensor)
is counted under a `TorchFunctionMode` while the engine steps through greedy, sampled (seeded and not, with
temperature, top-k, top-p, min-p), penalised (presence, frequency, repetition, logit bias, min_tokens) and
logprobs requests (sampled and prompt logprobs, chunked prefill), on each CPU attention backend. On CPU every
tensor is a host tensor, so the count is strict: host-side helpers may not call these on tensors either.

The detector is tested too: one `.item()` slipped into the step is caught."""

from __future__ import annotations

import pytest
from torch.overrides import TorchFunctionMode

from pdserve.engine.sampling import SamplingParams
from tests.helpers import prompts

SYNCS = frozenset({"item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__"})


class CountSyncs(TorchFunctionMode):
    """Counts tensor calls that copy device values to the host (each one a device sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _requests() -> list[SamplingParams]:
    base = {"max_tokens": 6, "ignore_eos": True}
    return [
        SamplingParams(temperature=0, **base),
        SamplingParams(temperature=0.8, seed=11, **base),
        SamplingParams(temperature=1.0, top_k=5, top_p=0.9, min_p=0.05, **base),  # unseeded
        SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3,
                       logit_bias={7: 5.0, 9: -5.0}, min_tokens=3, stop_token_ids=[2], **base),
        SamplingParams(temperature=0.7, seed=3, logprobs=3, prompt_logprobs=2, **base),
        SamplingParams(temperature=0, logprobs=0, **base),
    ]


def _step_syncs(engine) -> tuple[list[list[str]], list]:
    """The sync calls of each step until the engine is idle, and every output."""
    per_step, outputs = [], []
    while engine.has_unfinished():
        with CountSyncs() as mode:
            outputs += engine.step()
        per_step.append(mode.calls)
    return per_step, outputs


@pytest.mark.parametrize("backend,dtype", [("torch", "float32"), ("cpu_kernel", "float32"),
                                           ("cpu_kernel", "bfloat16")])  # bf16: the fused ops too
def test_a_step_syncs_at_most_once(make_engine, tiny_model_dir, backend, dtype):
    # chunked prefill mixed with decoding, so prompt logprobs and sampling share steps
    engine = make_engine(tiny_model_dir, engine={"attention_backend": backend}, model={"dtype": dtype},
                         scheduler={"max_prefill_chunk": 16, "max_num_batched_tokens": 24})
    params = _requests()
    for i, (prompt, p) in enumerate(zip(prompts(lens=[40, 17, 5, 33, 21, 9]), params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    per_step, outputs = _step_syncs(engine)
    finished = {o.request_id: o for o in outputs if o.finished}
    assert sorted(finished) == [f"r{i}" for i in range(6)]
    assert all(len(o.output_token_ids) == 6 for o in finished.values())
    r4 = [o for o in outputs if o.request_id == "r4"]  # sampled and prompt logprobs, fetched with the tokens
    assert len(r4[0].prompt_logprobs) == 21 - 1 and all(len(lp.top) == 2 for lp in r4[0].prompt_logprobs)
    assert all(len(o.logprobs) == 1 and len(o.logprobs[0].top) == 3 for o in r4)
    assert all(o.logprobs[0].token_id == o.new_token_ids[0] for o in r4)
    assert len(per_step) > 6  # prefill chunks, mixed steps, pure decode steps
    assert max(len(calls) for calls in per_step) <= 1, per_step
    # every step that produced a token read the device exactly once (the detector sees the one transfer)
    assert sum(len(calls) == 1 for calls in per_step) >= 6


def test_the_detector_catches_an_item_in_the_step(make_engine, tiny_model_dir, monkeypatch):
    engine = make_engine(tiny_model_dir, engine={"attention_backend": "torch"})
    logits = engine.model.logits

    def logits_with_an_item(hidden):
        out = logits(hidden)
        out[0, 0].item()  # what a careless edit would add
        return out

    monkeypatch.setattr(engine.model, "logits", logits_with_an_item)
    engine.add_request("r", prompts()[0], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    per_step, _ = _step_syncs(engine)
    assert per_step and all(sorted(calls) == ["item", "tolist"] for calls in per_step)

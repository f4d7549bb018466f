"""Session fixtures: tiny random-weight models saved as HF directories, the default model
(converted once into the shared cache), engine factories that check at teardown that every KV
block came back, and one Ray cluster for the whole session.

Heavy imports (torch, transformers, Ray) happen inside the fixtures, so the torch-free unit
tests (`tests/unit`) run without them. Markers: `slow` (the real default model), `ray` (added
here to every test that uses the session's Ray cluster), `gpu` (needs a CUDA device: deselected,
and said so, where there is none)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not _has_cuda():
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.issue_config_time_warning(pytest.PytestWarning(
            f"{len(gpu)} gpu tests deselected: no CUDA device here"), stacklevel=2)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def tiny_text_model_dir(tmp_path_factory) -> Path:
    """A tiny random model with a tokenizer and a chat template (for the HTTP API)."""
    from pdserve.engine.tiny_models import save_tiny_text_model

    return save_tiny_text_model(tmp_path_factory.mktemp("tiny-text"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from pdserve.engine.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="session")
def hf_reference(tiny_hf):
    from tests.helpers import GREEDY, hf_greedy, prompts

    return [hf_greedy(tiny_hf, p, GREEDY.max_tokens) for p in prompts()]


@pytest.fixture
def make_engine():
    """Build engines from a config; at teardown each must hold no request and no block."""
    from pdserve.engine.config import PdserveConfig
    from pdserve.engine.llm_engine import LLMEngine
    from tests.helpers import EXACT, check_no_leak

    engines: list[LLMEngine] = []

    def make(path, **sections) -> LLMEngine:
        sections["cache"] = {"num_kv_blocks": 512, **sections.get("cache", {})}
        sections["model"] = {"model": str(path) if path else None, **EXACT, **sections.get("model", {})}
        engine = LLMEngine(PdserveConfig().replace(**sections))
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        check_no_leak(e)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model, converted (once, shared with workers and the CLI) into the cache."""
    from pdserve.engine.config import PdserveConfig
    from pdserve.engine.model_source import resolve_model

    return resolve_model(None, PdserveConfig().model.cache_dir).path


@pytest.fixture(scope="session")
def smollm_hf(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole test session."""
    import ray

    ray.init(num_cpus=8, namespace="pdserve", include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()

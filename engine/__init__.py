"""pdserve's model-execution engine, the bottom layer: the config tree, model loading, the
Llama-family decoder over a paged KV cache, the block manager and scheduler (pure policy),
the sampler, the engine step, and the typed messages every actor boundary carries. It imports
no other part of pdserve."""

from __future__ import annotations


def pdserve_version() -> str:
    """The installed distribution's version (what workers compare before exchanging KV)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdserve")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"

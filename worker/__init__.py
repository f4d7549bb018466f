"""What both worker kinds share: the Ray actor base (`base.Worker`), the engine loop thread that
owns an `LLMEngine` (`engine_loop`), and the worker's own metrics. `prefill_worker` and
`decode_worker` import this; they never import each other."""

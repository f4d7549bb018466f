"""pdserve's model-execution engine: a paged-KV Llama-family runtime shared by
prefill and decode workers."""

__version__ = "0.1.0"

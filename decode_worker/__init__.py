"""Decode workers (Ray actors, `worker.DecodeWorker`): KV room reserved when a request opens, the KV
received into the paged pool, iteration-level continuous batching with priorities and preemption,
tokens streamed back to the router."""

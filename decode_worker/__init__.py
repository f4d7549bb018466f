"""Decode workers (Ray actors): KV received into the paged pool, iteration-level
continuous batching with priority queues and preemption, tokens streamed back.
Built by the scheduling and distributed-system issues; empty until then."""

"""Prefill workers (Ray actors, `worker.PrefillWorker`): ragged-batched prefill of queued prompts,
the first token sampled, the KV pushed layer by layer into the room a decode worker reserved."""

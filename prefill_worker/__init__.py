"""Prefill workers (Ray actors): ragged-batched prefill of queued prompts with
`engine.LLMEngine`, first token sampled, KV shipped to a decode worker.
Built by the distributed-system issue; empty until then."""

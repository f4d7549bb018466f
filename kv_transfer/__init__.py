"""KV transfer between prefill and decode workers (gRPC, NCCL/gloo), built on
`engine.kv_cache.PagedKVCache.export`/`import_`. Built by the KV-transfer issue;
empty until then."""

"""The router: the OpenAI-compatible HTTP front door (a Ray actor) that sends each
request to a prefill worker, then a decode worker, and streams tokens back.
Built by the distributed-system issue; empty until then."""

"""The router: the OpenAI-compatible HTTP front door (a Ray actor, `actor`) that sends each request
to a decode worker and, disaggregated, a prefill worker, relays the tokens back, and keeps the
worker pools (`workers`). It imports the worker kinds only to spawn them."""

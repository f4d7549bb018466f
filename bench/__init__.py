"""Benchmarks, the load generator and the chaos suite (`pdserve bench ...`, `pdserve chaos`). They may
import any part of pdserve, never the composition root or the tests (what they need, such as tiny
models, ships in the package)."""

"""pdserve: distributed, disaggregated LLM serving.

This package is the composition root: the `pdserve` command (`pdserve.cli`, with `serve` and
`scale` in `pdserve.serve`) is the only place that imports every part, and no part imports it.
The parts are subpackages mapped onto the repository's top-level folders (`pdserve.engine` is
`engine/`, ...); docs/architecture.md has the layering and a request's life hop by hop."""

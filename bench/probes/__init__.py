"""Probes: one-off A/B experiments and diagnostics whose conclusions are recorded in docs/benchmarks-history.md (and
`bench.probes.equivalence`, the refactor check). Run as `python -m bench.probes.<name>` from the repository root."""

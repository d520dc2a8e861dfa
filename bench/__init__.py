"""Benchmarks of optimum-owl (docs/benchmarks.md). Run each from the repository root as a module:
`python -m bench.<name> --help`; finished experiments are in `bench.probes`, shared helpers in `bench._common`."""

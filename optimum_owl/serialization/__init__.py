"""Saving pruned models: `save_pruned` (model, tokenizer, report and config in one rename), `save_dense` (plain
safetensors with the zeros in place) and `save_compressed_tensors` (compressed-tensors' sparse-bitmask layout). The
formats themselves, and inspecting saved folders (`verify_checkpoint`, `size_summary`), live in
`optimum_owl.formats`."""

from __future__ import annotations

from .save import estimate_saved_bytes, plain_model, save_compressed_tensors, save_dense, save_pruned

__all__ = ["estimate_saved_bytes", "plain_model", "save_compressed_tensors", "save_dense", "save_pruned"]

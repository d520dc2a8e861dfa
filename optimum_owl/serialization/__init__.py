"""Pruned models on disk: saving (`save_pruned`), the plain dense export (`save_dense`), and inspecting compact
checkpoints (`verify_checkpoint`, `size_summary`). The compact format itself is written and read by the transformers
plugin (`optimum_owl.integration.transformers`) with THE codec (`optimum_owl.bitmask`)."""

from __future__ import annotations

from .compact import checkpoint_files, plain_model, save_dense, size_summary, verify_checkpoint
from .save import save_pruned

__all__ = ["checkpoint_files", "plain_model", "save_dense", "save_pruned", "size_summary", "verify_checkpoint"]

"""Sharing pruned models on the Hugging Face Hub: model cards with a sparsity plot, and one-commit pushes."""

from __future__ import annotations

from ..errors import HubUploadError
from .card import license_of, onnx_card_section, render_model_card
from .plot import PLOT_NAME, plot_block_sparsity
from .push import push_folder, push_to_hub, save_for_hub, upload_folder_one_commit, write_card

__all__ = [
    "PLOT_NAME",
    "HubUploadError",
    "license_of",
    "onnx_card_section",
    "plot_block_sparsity",
    "push_folder",
    "push_to_hub",
    "render_model_card",
    "save_for_hub",
    "upload_folder_one_commit",
    "write_card",
]

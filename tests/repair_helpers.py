"""Tiny pruned models and text for the repair tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_owl.algorithms.masks import apply_keep_mask_, keep_mask_nm, keep_mask_per_row
from optimum_owl.pruning.modeling import get_blocks_and_units


def tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def prune_(model, sparsity: float = 0.5, mlp_nm: tuple[int, int] | None = None):
    """Zero the lowest |W| per row (attention) and N:M (MLP when `mlp_nm`, else per row)."""
    _, _, units = get_blocks_and_units(model)
    for block in units:
        for unit in block:
            w = unit.weight()
            if mlp_nm is not None and ".mlp." in unit.name:
                keep = keep_mask_nm(w.abs(), *mlp_nm)
            else:
                keep = keep_mask_per_row(w.abs(), sparsity)
            apply_keep_mask_(w, keep)
    return model


def random_windows(n: int = 16, seqlen: int = 16, vocab: int = 128, seed: int = 0) -> torch.LongTensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)

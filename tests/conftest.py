"""Shared fixtures: tiny random models of several architectures, built offline from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OWL_TEST_THREADS", "1")))
# `optimum-owl generate` decodes with model.generate in tests (compiling takes seconds per model);
# tests/test_lean_decode.py compiles, the CLI's default included
os.environ.setdefault("OPTIMUM_OWL_COMPILE", "0")

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
needs_assets = pytest.mark.skipif(not ASSETS.is_dir(), reason=f"shared assets not found at {ASSETS}")

VOCAB = 96
ARCH_KWARGS = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "opt": dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32),
    "gpt2": dict(n_embd=32, n_head=4),
    "mixtral": dict(hidden_size=32, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=4, num_experts_per_tok=2),
    "bert": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4),
}
ARCHS = list(ARCH_KWARGS)


def tiny_model(arch: str = "llama", layers: int = 3, seed: int = 0, vocab: int = VOCAB):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kwargs = dict(ARCH_KWARGS[arch])
    if arch == "gpt2":
        kwargs.update(n_layer=layers, n_positions=128)
    else:
        kwargs.update(num_hidden_layers=layers, max_position_embeddings=128)
    config = AutoConfig.for_model(arch, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)
    torch.manual_seed(seed)
    cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    return cls.from_config(config).eval()


def calib_ids(n: int = 8, seqlen: int = 16, seed: int = 1, vocab: int = VOCAB) -> torch.LongTensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seqlen), generator=g)


@pytest.fixture
def llama():
    return tiny_model("llama")

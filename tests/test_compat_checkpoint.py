"""A compact checkpoint written by optimum-owl 0.1.0 (main at 6987944, before the redesign) keeps loading bit for bit.

`tests/data/compact_llama_v0.1.0` was written by `model.save_pretrained` after pruning a tiny random Llama (2
blocks, Wanda, OWL, 60%); `expected.json` holds the SHA-256 of the dense state dict the writer had in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

import optimum_owl  # noqa: F401  (registers quant_method="owl")

DATA = Path(__file__).parent / "data" / "compact_llama_v0.1.0"


def _digest(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def test_old_compact_checkpoint_is_compressed_on_disk():
    with safe_open(str(DATA / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert any(k.endswith("_bitmask") for k in keys)


def test_old_compact_checkpoint_loads_bit_for_bit():
    from transformers import AutoModelForCausalLM

    expected = json.loads((DATA / "expected.json").read_text())["sha256_state_dict"]
    model = AutoModelForCausalLM.from_pretrained(DATA)
    assert _digest(model.state_dict()) == expected

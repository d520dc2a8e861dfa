"""The lean decode's attention for one new token over a static KV cache (`decode.py`).

transformers' SDPA attention, traced by `torch.compile`, repeats each key/value head for its group of query heads
(`repeat_kv`: a copy of the whole static cache per block and token) and then runs the flash-attention kernel on
one query row: on SmolLM2-135M (9 query heads on 3 key/value heads, 30 blocks) that was most of the compiled token's
time outside the weights. `decode_attention` computes the same attention on the cache as it is: the query heads of a
group side by side against their key/value head (as transformers' eager decoding does with `pack_gqa`), scores and
softmax in float32, as plain tensor ops that inductor fuses. Anything else (several query tokens: the prompt;
soft-capping, attention sinks, position biases) goes to transformers' SDPA attention unchanged.

It is registered with transformers as the attention implementation "owl_decode" (masks as for "sdpa") and switched on
only while `optimum_owl.inference.generate` decodes (`decode_attention_for`), for models set to "sdpa" or "eager".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

NAME = "owl_decode"
REPLACES = ("sdpa", "eager")  # the implementations whose decode step this one computes (others are left alone)
_registered: list[bool] = []


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: `query` `[batch, heads, q, dim]`, `key` / `value` `[batch, kv heads, length,
    dim]`, `attention_mask` boolean (True: attend) or additive, broadcastable to `[batch, 1, q, length]`; returns
    `([batch, q, heads, dim], None)` as the SDPA implementation does."""
    special = any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias"))
    if query.shape[2] != 1 or special or dropout:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    q = query.reshape(batch, kv_heads, group, dim).float()  # head h attends with key/value head h // group
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * (dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        mask = attention_mask[..., -1:, :]  # the one query row: [batch or 1, 1 or heads, 1, length]
        if mask.shape[1] == heads and heads != 1:
            mask = mask.reshape(mask.shape[0], kv_heads, group, length)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value.float()).to(query.dtype)  # [batch, kv heads, group, dim]
    return out.reshape(batch, 1, heads, dim), None


def register() -> None:
    """Register "owl_decode" with transformers' attention and attention-mask interfaces (once)."""
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered.append(True)


@contextlib.contextmanager
def decode_attention_for(model: nn.Module) -> Iterator[bool]:
    """While inside, `model` attends with "owl_decode" if it was set to "sdpa" or "eager" (yields whether it was)."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous not in REPLACES:
        yield False
        return
    register()
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = previous

"""Held-out scoring for the searches (`layerwise="owl-auto"`, `"auto"`): next-token losses of the full model and
the paired test that decides whether a candidate beats uniform sparsity (optimum_owl.pruning.search.search, docs/quality.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..runner import module_device

# A finalist replaces uniform sparsity only when its held-out loss is lower by more than this many standard errors of
# the mean paired (chunk by chunk) difference: about 97.7% one-sided confidence, so a gain within the noise of the
# held-out tokens does not carry over to other text.
MIN_GAIN_SE = 2.0
# Paired samples of the exact check: chunks of this many consecutive predicted tokens of a held-out window.
CHUNK_TOKENS = 32


@torch.no_grad()
def token_losses(model: nn.Module, ids: torch.LongTensor, batch_size: int) -> torch.Tensor:
    """Next-token cross-entropy (nats) of the full model at every position of every window of `ids` (float64,
    [n, seqlen − 1])."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = module_device(emb) if emb is not None else module_device(model)
    out: list[torch.Tensor] = []
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        targets = batch[:, 1:].to(logits.device)
        for row in range(batch.shape[0]):  # one window at a time keeps the fp32 logits small
            loss = F.cross_entropy(logits[row, :-1].float(), targets[row], reduction="none")
            out.append(loss.to("cpu", torch.float64))
    return torch.stack(out)


def chunk_losses(model: nn.Module, ids: torch.LongTensor, batch_size: int) -> torch.Tensor:
    """Mean next-token loss of each chunk of about `CHUNK_TOKENS` consecutive predicted tokens of each window (float64,
    1-D): the paired samples of the exact check. Chunks of a window differ in length by at most one token."""
    losses = token_losses(model, ids, batch_size)
    per_window = max(1, round(losses.shape[1] / CHUNK_TOKENS))
    return torch.cat([c.mean(dim=1, keepdim=True) for c in losses.tensor_split(per_window, dim=1)], dim=1).reshape(-1)


def window_losses(model: nn.Module, ids: torch.LongTensor, batch_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) of the full model on each window of `ids` (float64, [n])."""
    return token_losses(model, ids, batch_size).mean(dim=1)


def holdout_loss(model: nn.Module, ids: torch.LongTensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats per token) of the full model on the windows `ids` (all of one length)."""
    return float(token_losses(model, ids, batch_size).mean())


def gain_z(candidate: torch.Tensor, uniform: torch.Tensor) -> float:
    """Mean paired gain of `candidate` over `uniform` (lower loss is better) in standard errors of that mean
    (+inf for a gain with no spread, 0.0 when there is one sample or no gain)."""
    diff = (uniform - candidate).reshape(-1)
    gain = float(diff.mean())
    if diff.numel() < 2:
        return math.inf if gain > 0 else 0.0
    se = float(diff.std()) / math.sqrt(diff.numel())
    if se == 0.0:
        return math.inf if gain > 0 else 0.0
    return gain / se


def beats_uniform(candidate: torch.Tensor, uniform: torch.Tensor, z: float = MIN_GAIN_SE) -> bool:
    """Whether paired losses `candidate` are lower than `uniform`'s by more than `z` standard errors of the mean
    paired difference (plain "lower on average" when there is one sample)."""
    diff = (uniform - candidate).reshape(-1)
    gain = float(diff.mean())
    se = float(diff.std()) / math.sqrt(diff.numel()) if diff.numel() > 1 else 0.0
    return gain > 0.0 and gain > z * se

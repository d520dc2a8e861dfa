"""Perplexity with the standard protocol of the Wanda/OWL/SparseGPT papers.

The texts are joined with `"\n\n"`, tokenised once, cut into `numel // seqlen` non-overlapping windows, and
perplexity is `exp(mean window NLL)` (every window has `seqlen − 1` predicted tokens, so the mean over windows
equals the mean over tokens).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .pruning.data import read_texts
from .pruning.modeling import context_length

logger = logging.getLogger(__name__)


# A string with no whitespace ending like a text file is a path; if it does not exist that is an error, not text.
_TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".json")


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except OSError:  # e.g. a long text is not a valid file name
        return False


def load_texts(source: Any, text_column: str = "text") -> list[str]:
    """Texts from a string, a list of strings, a `.txt`/`.jsonl`/`.json` path, or a `datasets.Dataset`.

    A path (`os.PathLike`, or a string without whitespace ending in .txt/.jsonl/.json) that does not exist raises
    `FileNotFoundError`; it is never evaluated as text.
    """
    looks_like_path = isinstance(source, os.PathLike) or (
        isinstance(source, str) and not any(c.isspace() for c in source) and (
            source.endswith(_TEXT_FILE_SUFFIXES) or _is_file(source))
    )
    if looks_like_path:
        return read_texts(source, text_column, documents=False)
    if isinstance(source, str):
        return [source]
    if hasattr(source, "column_names"):
        return list(source[text_column])
    return [str(t) for t in source]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text_or_dataset: Any,
    seqlen: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    add_bos: bool = False,
    text_column: str = "text",
) -> float:
    """Perplexity of a causal LM on `text_or_dataset` (see the module docstring for the protocol).

    Args:
        model: a causal LM returning `.logits`.
        tokenizer: its tokenizer.
        text_or_dataset: a string, list of strings (joined with `"\\n\\n"`), `.txt`/`.jsonl` path or `datasets.Dataset`.
        seqlen (`int`): window length.
        batch_size (`int`): windows per forward.
        max_windows (`int`, *optional*): evaluate only the first windows (quick checks).
        add_bos (`bool`): put the tokenizer's BOS before the text (once, at the start).

    Returns:
        `float` perplexity.

    Example:

    ```python
    >>> from optimum_owl.evaluation import perplexity
    >>> ppl = perplexity(model, tokenizer, "../shared/assets/text/wikitext2_test.jsonl", seqlen=512)  # doctest: +SKIP
    ```
    """
    ids = encode_joined(tokenizer, load_texts(text_or_dataset, text_column), add_bos=add_bos)
    return perplexity_of_ids(model, ids, seqlen, batch_size, max_windows)


def encode_joined(tokenizer: Any, texts: list[str], add_bos: bool = False) -> torch.LongTensor:
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if add_bos and getattr(tokenizer, "bos_token_id", None) is not None:
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    return ids


@torch.no_grad()
def perplexity_of_ids(
    model: nn.Module, ids: torch.LongTensor, seqlen: int, batch_size: int = 1, max_windows: int | None = None
) -> float:
    """Perplexity over non-overlapping windows of a 1-D token-id tensor."""
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows={max_windows}: evaluate at least one window (or None for all).")
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen}: a window needs at least 2 tokens (one to predict); use seqlen >= 2.")
    max_pos = context_length(model)
    if max_pos is not None and seqlen > max_pos:
        raise ValueError(
            f"seqlen={seqlen} exceeds the model's max_position_embeddings={max_pos}; lower seqlen (e.g. {max_pos})."
        )
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"Evaluation text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}.")
    windows = ids[: n * seqlen].view(n, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, tokens = 0.0, 0
    try:
        for batch in tqdm(windows.split(batch_size), desc="perplexity", leave=False):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll_sum += float(loss)
            tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll_sum / tokens)

"""Perplexity with the standard protocol of the Wanda/OWL/SparseGPT papers.

The texts are joined with `"\n\n"`, tokenised once, cut into `numel // seqlen` non-overlapping windows, and
perplexity is `exp(mean window NLL)` (every window has `seqlen − 1` predicted tokens, so the mean over windows
equals the mean over tokens).
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .pruning.data import read_texts
from .pruning.modeling import context_length

logger = logging.getLogger(__name__)


# The end of a file name: "wiki.parquet", "test.jsonl", "notes.txt" (not "Hello." nor "3.14").
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9_]{0,9}$")


def _exists(name: str) -> bool:
    try:
        return Path(name).expanduser().exists()
    except (OSError, ValueError):  # e.g. a long text is not a valid file name
        return False


def looks_like_path(source: str) -> bool:
    """Whether a string passed as evaluation text is a path: it names an existing file or folder, or it has no
    whitespace and a path separator (`data/wiki_test`), a leading `~`, or a file suffix (`wiki.parquet`)."""
    if _exists(source):
        return True
    if not source or any(c.isspace() for c in source):
        return False
    return "/" in source or os.sep in source or source.startswith("~") or bool(_FILE_SUFFIX.search(source))


def load_texts(source: Any, text_column: str = "text") -> list[str]:
    """Texts from a path (`.txt`/`.jsonl`/`.json`; `str` or `os.PathLike`), a list of strings, a
    `datasets.Dataset`, or a string of text.

    A string is read as a path when `looks_like_path` says so; a path that does not exist raises `FileNotFoundError`
    naming it (it is never evaluated as text). Pass text that looks like a path in a list (`["a/b"]`), or as
    `perplexity(..., text=...)`.
    """
    if isinstance(source, os.PathLike) or (isinstance(source, str) and looks_like_path(source)):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"Evaluation text file {os.fspath(source)} does not exist. Check the path; to evaluate a string as "
                "text, pass it in a list ([text]) or as `text=`."
            )
        return read_texts(path, text_column, documents=False)
    if isinstance(source, str):
        return [source]
    if hasattr(source, "column_names"):
        return list(source[text_column])
    return [str(t) for t in source]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text_or_dataset: Any = None,
    seqlen: int = 2048,
    batch_size: int = 1,
    max_windows: int | None = None,
    add_bos: bool = False,
    text_column: str = "text",
    *,
    text: str | list[str] | None = None,
) -> float:
    """Perplexity of a causal LM on `text_or_dataset` (see the module docstring for the protocol).

    Args:
        model: a causal LM returning `.logits`.
        tokenizer: its tokenizer.
        text_or_dataset: a `.txt`/`.jsonl`/`.json` path, a list of strings (joined with `"\\n\\n"`), a
            `datasets.Dataset`, or a string of text. A string that looks like a path (`load_texts`) is a path, and
            a missing one raises `FileNotFoundError`.
        seqlen (`int`): window length.
        batch_size (`int`): windows per forward.
        max_windows (`int`, *optional*): evaluate only the first windows (quick checks).
        add_bos (`bool`): put the tokenizer's BOS before the text (once, at the start).
        text (`str` or `list[str]`, *optional*): the text itself, never read as a path (instead of
            `text_or_dataset`).

    Returns:
        `float` perplexity.

    Example:

    ```python
    >>> from optimum_owl.evaluation import perplexity
    >>> ppl = perplexity(model, tokenizer, "../shared/assets/text/wikitext2_test.jsonl", seqlen=512)  # doctest: +SKIP
    ```
    """
    if (text is None) == (text_or_dataset is None):
        raise ValueError("perplexity: pass the evaluation text either as `text_or_dataset` (a path, a list of strings "
                         "or a dataset) or as `text=` (the text itself), exactly one of them.")
    texts = load_texts(text_or_dataset, text_column) if text is None else [text] if isinstance(text, str) else list(text)
    ids = encode_joined(tokenizer, texts, add_bos=add_bos)
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

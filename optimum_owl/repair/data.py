"""Training windows for repair: texts, files, datasets or token ids packed into `LongTensor [n, seqlen]`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import RepairDataError


class TokenWindows(torch.utils.data.Dataset):
    """Fixed-length token windows served as `{"input_ids", "labels"}` for causal-LM training."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.windows[i]
        return {"input_ids": w, "labels": w.clone()}


def build_windows(
    data: Any,
    tokenizer: Any,
    seqlen: int,
    text_column: str = "text",
    max_windows: int | None = None,
    field_name: str = "train_data",
) -> torch.Tensor:
    """Pack `data` into a `LongTensor [n, seqlen]`.

    `data` may be a 2-D integer tensor of token ids (used as is, rows are windows), a string, a list of strings,
    a `.txt` / `.jsonl` path, or a `datasets.Dataset` with a `text_column`. Texts are joined with `"\\n\\n"`,
    tokenised once and cut into non-overlapping windows. Raises `RepairDataError` naming `field_name`.
    """
    from ..evaluation import encode_joined, load_texts

    if data is None:
        raise RepairDataError(f"`{field_name}` is required: pass texts, a .txt/.jsonl path, a datasets.Dataset or token ids.")
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.is_floating_point():
            raise RepairDataError(f"`{field_name}` as a tensor must be 2-D integer token ids [n, seqlen], got {tuple(data.shape)} {data.dtype}.")
        if data.shape[0] == 0 or data.shape[1] < 2:
            raise RepairDataError(f"`{field_name}` is empty: got a token tensor of shape {tuple(data.shape)}.")
        windows = data.long()
    else:
        if isinstance(data, (str, os.PathLike)) and str(data).endswith((".jsonl", ".txt", ".json")) and not Path(data).exists():
            raise FileNotFoundError(f"`{field_name}`: file {str(data)!r} does not exist.")
        if hasattr(data, "column_names") and text_column not in data.column_names:
            raise RepairDataError(
                f"`{field_name}` has no column {text_column!r} (columns: {data.column_names}); set `text_column`."
            )
        try:
            texts = load_texts(data, text_column)
        except KeyError as err:
            raise RepairDataError(f"`{field_name}`: a .jsonl row has no {text_column!r} field; set `text_column`.") from err
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            raise RepairDataError(f"`{field_name}` is empty: it holds no non-blank text.")
        if tokenizer is None:
            raise RepairDataError(f"`tokenizer` is required to tokenize the text of `{field_name}`.")
        ids = encode_joined(tokenizer, texts)
        n = ids.numel() // seqlen
        if n < 1:
            raise RepairDataError(
                f"`{field_name}` has {ids.numel()} tokens, fewer than one window of `seqlen`={seqlen}; "
                "add text or lower `seqlen`."
            )
        windows = ids[: n * seqlen].view(n, seqlen)
    if max_windows is not None:
        windows = windows[:max_windows]
    return windows

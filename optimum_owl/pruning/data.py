"""Calibration data: any accepted source -> a LongTensor `[num_samples, seqlen]` of token ids, seeded.

Sampling follows the reference protocol (Wanda/OWL `get_c4`): with `random.Random(seed)`, draw a random document
until one is longer than `seqlen` tokens and take a random window of `seqlen` tokens from it. When no document is
long enough (short texts, generated stories), the documents are joined (EOS between them, when the tokenizer has
one) into one stream and windows are drawn from the stream instead. `draw_windows` continues the same draw for
windows that share no text with the calibration windows (the searches score their candidates on them).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationDataError
from ..utils import public_path
from .sources import check_model_source

logger = logging.getLogger(__name__)

# Give up searching for a long-enough document after this many draws (then fall back to the joined stream).
MAX_DRAWS_FACTOR = 20


def describe_source(dataset: Any) -> str:
    """Short description of a calibration source for reports."""
    if dataset is None:
        return "none"
    if isinstance(dataset, (str, os.PathLike)):
        return str(public_path(dataset))  # reports are published: no local folder layout
    if isinstance(dataset, torch.Tensor):
        return f"tensor{list(dataset.shape)}"
    name = type(dataset).__name__
    try:
        return f"{name}[{len(dataset)}]"
    except TypeError:
        return name


def load_tokenizer(tokenizer: Any) -> Any:
    """Accept a tokenizer object or a path / Hub id (loaded with `AutoTokenizer`)."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    check_model_source(str(tokenizer), "Tokenizer", filename="tokenizer_config.json")  # one error, no Hub retries

    return AutoTokenizer.from_pretrained(str(tokenizer))


def get_calibration_data(
    dataset: Any,
    tokenizer: Any = None,
    num_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    text_column: str = "text",
    warnings: list[str] | None = None,
) -> torch.LongTensor:
    """Turn `dataset` into `num_samples` seeded windows of `seqlen` token ids.

    Args:
        dataset: one of
            - a LongTensor of input ids `[n, L]` (rows used as documents; exactly `[num_samples, seqlen]` is used as is),
            - a list of 1-D/2-D LongTensors, or of dicts with `input_ids`,
            - a list of strings (needs `tokenizer`),
            - a `datasets.Dataset` with a `text_column` (or `input_ids`) column,
            - a path to a local `.txt` (one document, or documents separated by blank lines) or `.jsonl` file
              (one JSON object per line with `text_column`),
            - any other string: a dataset name for `datasets.load_dataset(name, split="train")` (needs the Hub).
        tokenizer: tokenizer object or path, required for text.
        num_samples (`int`): windows to draw.
        seqlen (`int`): tokens per window.
        seed (`int`): sampling seed.
        text_column (`str`): column holding text.
        warnings (`list`, *optional*): warnings about the data (e.g. overlapping windows) are appended here too
            (the pruner puts them in the report).

    Returns:
        `torch.LongTensor` of shape `[num_samples, seqlen]`.
    """
    return draw_windows(dataset, tokenizer, num_samples, seqlen, seed, text_column, warnings)[0]


def draw_windows(
    dataset: Any,
    tokenizer: Any = None,
    num_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    text_column: str = "text",
    warnings: list[str] | None = None,
    extra: int = 0,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`get_calibration_data`'s windows, and up to `extra` more windows that share no text with them.

    The extra windows continue the same seeded draw after the calibration windows, so the calibration windows are
    exactly `get_calibration_data`'s. They come from documents no calibration window was taken from, one per document
    (from the joined stream: ranges that overlap no calibration window nor each other). Fewer than `extra` (possibly
    none) come back when the source has too little other text, and none when `dataset` is a tensor of exactly
    `[num_samples, seqlen]` (used as is). The searches (`layerwise="auto"`, `"owl-auto"`) score their candidates on
    them.

    Returns:
        `(calibration [num_samples, seqlen], extra [m, seqlen])` with `0 <= m <= extra`.
    """
    if dataset is None:
        raise CalibrationDataError(
            "No calibration data: pass `dataset=` (token-id tensor, list of texts, datasets.Dataset, or a .txt/.jsonl "
            "path), or set `OWLPrunerConfig(dataset=...)`."
        )
    if isinstance(dataset, torch.Tensor):
        if dataset.dtype not in (torch.int64, torch.int32) or dataset.dim() not in (1, 2):
            raise CalibrationDataError(
                f"A tensor `dataset` must hold integer token ids shaped [n, seqlen], got {dataset.dtype} {list(dataset.shape)}."
            )
        ids = dataset.long().reshape(-1, dataset.shape[-1])
        if ids.shape == (num_samples, seqlen):
            return ids.clone(), ids.new_zeros((0, seqlen))
        docs: list[list[int]] = [row.tolist() for row in ids]
        return _sample(docs, num_samples, seqlen, seed, None, warnings, extra)
    tokenizer = load_tokenizer(tokenizer)
    docs_or_texts = _materialise(dataset, text_column)
    if not docs_or_texts:
        raise CalibrationDataError(f"The calibration source {describe_source(dataset)} is empty.")
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if isinstance(docs_or_texts[0], str):
        if tokenizer is None:
            raise CalibrationDataError(
                "Calibration data is text but no tokenizer was given: pass `tokenizer=` (an object or a path)."
            )
        return _sample_from_texts(docs_or_texts, tokenizer, num_samples, seqlen, seed, eos, warnings, extra)
    return _sample(docs_or_texts, num_samples, seqlen, seed, eos, warnings, extra)


def _materialise(dataset: Any, text_column: str) -> list[Any]:
    """Source -> list of strings or list of token-id lists."""
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset)
        if path.exists():
            return read_texts(path, text_column, documents=True)
        if str(dataset).endswith((".txt", ".jsonl", ".json")):
            raise CalibrationDataError(f"Calibration file {dataset} does not exist.")
        try:
            import datasets
        except ImportError as err:
            raise ImportError(
                f"`dataset={dataset!r}` is not a local file; loading it by name needs `pip install datasets`."
            ) from err
        try:
            dataset = datasets.load_dataset(str(dataset), split="train")
        except Exception as err:  # noqa: BLE001 - datasets raises many types (ConnectionError, FileNotFoundError, ...)
            raise CalibrationDataError(
                f"Cannot load calibration dataset {str(dataset)!r} with datasets.load_dataset "
                f"({type(err).__name__}: {' '.join(str(err).split())}). Pass a local .txt/.jsonl/.json file, or a "
                "dataset name that loads (offline: one already in the datasets cache)."
            ) from err
    if hasattr(dataset, "column_names") and hasattr(dataset, "__getitem__"):  # datasets.Dataset
        columns = dataset.column_names
        if text_column in columns:
            return [t for t in dataset[text_column] if t]
        if "input_ids" in columns:
            return [list(map(int, ids)) for ids in dataset["input_ids"]]
        raise CalibrationDataError(
            f"The dataset has no column {text_column!r} (columns: {columns}); set `text_column=` to the text column."
        )
    if isinstance(dataset, Sequence) or hasattr(dataset, "__iter__"):
        out: list[Any] = []
        for item in dataset:
            if isinstance(item, str):
                if item:
                    out.append(item)
            elif isinstance(item, dict):
                if "input_ids" in item:
                    out.append(_ids_list(item["input_ids"]))
                elif text_column in item:
                    out.append(item[text_column])
                else:
                    raise CalibrationDataError(
                        f"Calibration dicts need an `input_ids` or {text_column!r} key, got keys {sorted(item)}."
                    )
            elif isinstance(item, torch.Tensor):
                out.append(_ids_list(item))
            else:
                raise CalibrationDataError(
                    f"Unsupported calibration item of type {type(item).__name__}; use strings, token-id tensors or "
                    "dicts with `input_ids`."
                )
        kinds = {isinstance(x, str) for x in out}
        if len(kinds) > 1:
            raise CalibrationDataError("Calibration data mixes text and token ids; pass one kind.")
        return out
    raise CalibrationDataError(f"Unsupported calibration source of type {type(dataset).__name__}.")


def _ids_list(ids: Any) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise CalibrationDataError(f"Token-id tensors in a list must be 1-D or [1, L], got {list(ids.shape)}.")
        return ids.tolist()
    return [int(i) for i in ids]


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CalibrationDataError(f"{where} is not valid JSON: {err}") from None


def _row_text(row: Any, where: str, text_column: str) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise CalibrationDataError(f"{where} is a JSON {type(row).__name__}, not an object with {text_column!r}.")
    if text_column not in row:
        raise CalibrationDataError(f"{where} has no {text_column!r} key (keys: {sorted(row)}); set the text column.")
    value = row[text_column]
    if value is not None and not isinstance(value, str):
        raise CalibrationDataError(f"{where}: {text_column!r} is {type(value).__name__}, not a string.")
    return value or ""


def read_texts(path: str | os.PathLike, text_column: str = "text", *, documents: bool) -> list[str]:
    """THE reader of local text files, for calibration (`documents=True`) and evaluation (`documents=False`).

    `.jsonl`: the `text_column` of every row (one JSON object per line), in order. `.json`: an array of strings or of
    such objects. Empty texts are dropped for calibration and kept for evaluation (which joins the rows in order).
    Any other file is UTF-8 text: for calibration it is split on blank lines into documents (a file with a single
    paragraph is one document; an empty file gives none); for evaluation it is one text.

    Raises `FileNotFoundError` for a missing path, and `CalibrationDataError` naming the file (and line) for a
    folder, bad JSON, a row that is not an object with a string `text_column`, or bytes that are not UTF-8.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_dir():
        raise CalibrationDataError(f"{path} is a folder; pass a .txt, .jsonl or .json file.")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationDataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    if path.suffix in (".jsonl", ".json"):
        if path.suffix == ".jsonl":
            rows = []
            for line_no, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                row = _parse_json(line, f"{path}:{line_no}")
                if not isinstance(row, dict):
                    raise CalibrationDataError(
                        f"{path}:{line_no} is a JSON {type(row).__name__}, not an object with {text_column!r}."
                    )
                rows.append((f"{path}:{line_no}", row))
        else:
            data = _parse_json(raw, str(path))
            if not isinstance(data, list):
                raise CalibrationDataError(
                    f"{path} holds a JSON {type(data).__name__}; expected an array of strings or of objects with "
                    f"{text_column!r} (or use .jsonl, one object per line)."
                )
            rows = [(f"{path} item {i}", row) for i, row in enumerate(data)]
        texts = [_row_text(row, where, text_column) for where, row in rows]
        return [t for t in texts if t] if documents else texts
    if not documents:
        return [raw]
    parts = [p for p in raw.split("\n\n") if p.strip()]
    # A plain text file with few paragraphs is one document; many paragraphs are many documents.
    return parts if len(parts) > 1 else [raw] if raw.strip() else []


def _tensors(windows: list[list[int]], extra: list[list[int]], seqlen: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    held = torch.tensor(extra, dtype=torch.long) if extra else torch.zeros((0, seqlen), dtype=torch.long)
    return torch.tensor(windows, dtype=torch.long), held


def _sample_from_texts(
    texts: list[str], tokenizer: Any, num_samples: int, seqlen: int, seed: int, eos: int | None,
    warnings: list[str] | None = None, extra: int = 0,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Reference sampling over texts, tokenising lazily (only drawn documents).

    Like the reference `get_c4`, each document is tokenised with the tokenizer's default call, so a tokenizer that
    adds BOS (Llama, stories260K) puts it at the start of every document and windows match the reference exactly.
    The fallback stream (no document long enough) joins documents tokenised without special tokens, EOS between.
    """
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}

    def tokens(i: int) -> list[int]:
        if i not in cache:
            cache[i] = tokenizer(texts[i])["input_ids"]
        return cache[i]

    drawn = _draw_long_documents(len(texts), tokens, num_samples, seqlen, rng, extra)
    if drawn is not None:
        return _tensors(*drawn, seqlen)
    docs = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return _sample(docs, num_samples, seqlen, seed, eos, warnings, extra)


def _draw_long_documents(
    count: int, tokens, num_samples: int, seqlen: int, rng: random.Random, extra: int = 0
) -> tuple[list[list[int]], list[list[int]]] | None:
    """`num_samples` windows from random documents longer than `seqlen` (None when too few are found), then up to
    `extra` more, one per document, from documents none of the first windows came from."""
    used: set[int] = set()

    def draw(skip: set[int] | frozenset[int]) -> list[int] | None:  # one random document (not in `skip`) longer than seqlen: a window
        i = rng.randint(0, count - 1)
        if i in skip:
            return None
        doc = tokens(i)
        if len(doc) <= seqlen:
            return None
        start = rng.randint(0, len(doc) - seqlen - 1)
        used.add(i)
        return doc[start : start + seqlen]

    windows: list[list[int]] = []
    draws = 0
    while len(windows) < num_samples:
        draws += 1
        if draws > MAX_DRAWS_FACTOR * num_samples + 100:
            return None
        window = draw(frozenset())  # as the reference: a document may give several calibration windows
        if window is not None:
            windows.append(window)
    held: list[list[int]] = []
    for _ in range(MAX_DRAWS_FACTOR * extra + 100 if extra else 0):
        if len(held) >= extra:
            break
        window = draw(used)  # one window per document, none of the calibration windows': no text shared
        if window is not None:
            held.append(window)
    return windows, held


def _joined_stream_warning(docs: list[list[int]], starts: list[int], tokens: int, seqlen: int, eos: bool) -> str:
    """Why the windows come from the joined stream (how many rows were too short) and how many of them overlap."""
    short, ordered = sum(len(doc) <= seqlen for doc in docs), sorted(starts)
    close = [b - a < seqlen for a, b in zip(ordered, ordered[1:])]  # neighbours (in stream order) that overlap
    overlapping = sum(left or right for left, right in zip([False, *close], [*close, False]))
    msg = (
        f"{short} of {len(docs)} calibration rows are no longer than seqlen={seqlen} tokens (the longest has "
        f"{max(map(len, docs), default=0)}), too few long rows to draw {len(starts)} windows from: the rows were "
        f"joined into one stream of {tokens} tokens{' (EOS between rows)' if eos else ''} and the windows cross row "
        "boundaries"
    )
    if overlapping:
        msg += (
            f"; {overlapping} of the {len(starts)} windows overlap another (random starts in {tokens} tokens for "
            f"{len(starts)} x {seqlen}), so they share tokens"
        )
    return msg + ". Longer documents (or a lower seqlen) would calibrate better."


def sample_windows(
    docs: list[list[int]], num_samples: int, seqlen: int, seed: int, eos_id: int | None = None,
    warnings: list[str] | None = None,
) -> torch.LongTensor:
    """Seeded windows from token-id documents (long documents first, else one joined stream)."""
    return _sample(docs, num_samples, seqlen, seed, eos_id, warnings)[0]


def _sample(
    docs: list[list[int]], num_samples: int, seqlen: int, seed: int, eos_id: int | None,
    warnings: list[str] | None, extra: int = 0,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    rng = random.Random(seed)
    drawn = _draw_long_documents(len(docs), lambda i: docs[i], num_samples, seqlen, rng, extra)
    if drawn is not None:
        return _tensors(*drawn, seqlen)
    stream: list[int] = []
    for doc in docs:
        stream.extend(doc)
        if eos_id is not None:
            stream.append(eos_id)
    if len(stream) < seqlen:
        raise CalibrationDataError(
            f"Calibration data is too short: {len(stream)} tokens in all, but one window needs seqlen={seqlen}. "
            "Provide more text or lower `seqlen`."
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, len(stream) - seqlen) for _ in range(num_samples)]
    msg = _joined_stream_warning(docs, starts, len(stream), seqlen, eos_id is not None)
    logger.warning(msg)
    if warnings is not None:
        warnings.append(msg)
    taken = list(starts)
    held: list[int] = []
    for _ in range(MAX_DRAWS_FACTOR * extra + 100 if extra else 0):
        if len(held) >= extra:
            break
        s = rng.randint(0, len(stream) - seqlen)
        if all(s + seqlen <= t or s >= t + seqlen for t in taken):
            held.append(s)
            taken.append(s)
    return _tensors([stream[s : s + seqlen] for s in starts], [stream[s : s + seqlen] for s in held], seqlen)

"""Perplexity with the standard protocol of the Wanda/OWL/SparseGPT papers, and zero-shot accuracy through
lm-evaluation-harness (`zero_shot`, optional: `pip install 'optimum-owl[eval]'`).

The texts are joined with `"\n\n"`, tokenised once, cut into `numel // seqlen` non-overlapping windows, and
perplexity is `exp(mean window NLL)` (every window has `seqlen − 1` predicted tokens, so the mean over windows
equals the mean over tokens).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
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


# ------------------------------------------------------------------------------------------- zero-shot accuracy
# The seven zero-shot tasks of the Wanda and OWL papers (lm-evaluation-harness names); `tasks="paper"` expands to them.
# Their data comes from the Hugging Face Hub (or the datasets cache when offline).
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
EVAL_EXTRA = "pip install 'optimum-owl[eval]'"
_DATA_HINT = ("tasks from the Hub need network access, or HF_DATASETS_OFFLINE=1 with their data already in the datasets "
              "cache (HF_DATASETS_CACHE); a local task is a folder of lm-eval task YAML files passed as include_path "
              "(CLI: --include-path), whose `data_files` paths are relative to the working directory")


def expand_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """Task names from a comma-separated string or a list; `"paper"` expands to `PAPER_TASKS`; duplicates dropped."""
    items = tasks.split(",") if isinstance(tasks, str) else [t for item in tasks for t in str(item).split(",")]
    names: list[str] = []
    for item in (t.strip() for t in items):
        for name in (PAPER_TASKS if item == "paper" else (item,) if item else ()):
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError(f"tasks: no task named in {tasks!r}; pass lm-eval task names such as 'arc_easy,hellaswag', "
                         "or 'paper' for the seven tasks of the OWL/Wanda papers.")
    return names


def _task_manager(names: list[str], include_path: list[str]) -> Any:
    from lm_eval.tasks import TaskManager

    if include_path:  # local tasks only: skip indexing lm-eval's thousands of built-in task files
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=include_path or None)


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | list[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    include_path: str | os.PathLike | list[str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """Zero-shot (or few-shot) accuracy of a loaded model with lm-evaluation-harness 0.4 (`HFLM(pretrained=model)`).

    Works on any model object: a dense or pruned model, one loaded from a compact or compressed-tensors checkpoint,
    or a sparsified one (`optimum_owl.sparsify`, `load_sparse`: its sparse kernels run the forwards).

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        tasks: lm-eval task names (a list or a comma-separated string); `"paper"` is `PAPER_TASKS`.
        num_fewshot: examples in each prompt (the tasks' own default, 0 for the paper tasks, when None).
        limit: evaluate only the first `limit` documents of each task (a fraction when below 1): quick checks only.
        batch_size: requests per forward.
        include_path: folder(s) of local lm-eval task YAML files (tasks without Hub access).

    Returns:
        `{"harness": "lm-eval X", "tasks": {task: {"acc": ..., "acc_stderr": ..., "acc_norm": ..., ...}},
        "samples": {task: documents evaluated}, "num_fewshot", "limit", "seconds"}`.

    Raises:
        ImportError: lm-eval is not installed (`pip install 'optimum-owl[eval]'`).
        ValueError: an unknown task name. OSError: a task's data cannot be loaded (no network, no cache).
    """
    names = expand_tasks(tasks)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError(f"zero-shot evaluation needs lm-evaluation-harness 0.4 ({err}): {EVAL_EXTRA}") from None
    from importlib.metadata import version

    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    missing = [os.fspath(p) for p in paths if not Path(p).expanduser().is_dir()]
    if missing:
        raise FileNotFoundError(f"include_path {missing} is not a folder; pass folders holding lm-eval task YAML files.")
    if limit is not None and not limit > 0:
        raise ValueError(f"limit must be positive (documents per task, or a fraction below 1), got {limit}.")
    manager = _task_manager(names, [str(Path(p).expanduser()) for p in paths])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        out = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=False)
    except KeyError as err:  # lm-eval's "not a registered task/group/tag name"
        raise ValueError(f"tasks {names}: {err.args[0] if err.args else err}; list lm-eval's tasks with "
                         "`lm-eval ls tasks`, or pass a local task folder as include_path.") from None
    except OSError as err:  # datasets: ConnectionError, offline without a cache, missing local files
        raise OSError(f"zero-shot tasks {names}: their data could not be loaded ({' '.join(str(err).split())}); "
                      f"{_DATA_HINT}.") from err
    finally:
        model.train(was_training)
    results: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        row = {key.split(",")[0]: float(value) for key, value in metrics.items()
               if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)}
        results[task] = dict(sorted(row.items()))
    samples = {task: int(n.get("effective", 0)) for task, n in (out or {}).get("n-samples", {}).items()}
    return {"harness": f"lm-eval {version('lm_eval')}", "tasks": results, "samples": samples,
            "num_fewshot": num_fewshot, "limit": limit, "seconds": round(time.perf_counter() - start, 3)}


def record_zero_shot(folder: str | os.PathLike, results: dict[str, Any], dense: dict[str, Any] | None = None) -> Path:
    """Add `zero_shot` results (and, as `dense`, the same tasks on the dense model) to the `owl_report.json` of a
    saved model folder, under `evaluation["zero_shot"]`, where the model card's evaluation table reads them.

    Raises `FileNotFoundError` when the folder has no `owl_report.json` (a checkpoint not written by optimum-owl).
    """
    from .pruning.report import REPORT_NAME, PruneReport

    path = Path(folder) / REPORT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {REPORT_NAME} to record the results in; save them yourself (they are "
                                "the returned dict).")
    report = PruneReport.load(path)
    report.evaluation = {**report.evaluation, "zero_shot": {**results, **({"dense": dense} if dense else {})}}
    return report.save(path)

"""Pushing a pruned model to the Hugging Face Hub in one commit: checkpoint, `owl_report.json`, `owl_config.json`,
a generated model card with its sparsity plot, and optionally an ONNX export under `onnx/`.

The token comes from where huggingface_hub looks for it (the `token=` argument, `HF_TOKEN`, or the token saved by
`hf auth login`); it is only handed to `HfApi` and never logged or written to a file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import HubUploadError
from ..utils import atomic_write_text
from .card import render_model_card
from .plot import PLOT_NAME, plot_block_sparsity
from .weights import folder_zero_share

logger = logging.getLogger(__name__)

REPORT_NAME = "owl_report.json"
CONFIG_NAME = "owl_config.json"
ONNX_METADATA = "owl_onnx.json"


def write_card(
    folder: str | os.PathLike,
    report: Any = None,
    config: Any = None,
    onnx_subdir: str | None = None,
    **card_kwargs: Any,
) -> Path:
    """Write `README.md` (and `owl_sparsity.png` when the report has blocks) into `folder`.

    Args:
        folder (`str` or `os.PathLike`): a saved pruned model.
        report (`PruneReport`, *optional*): read from `folder/owl_report.json` when omitted and present.
        config (`OWLPrunerConfig` or `dict`, *optional*): read from `folder/owl_config.json` when omitted and present.
        onnx_subdir (`str`, *optional*): sub-folder holding an ONNX export (its `owl_onnx.json` feeds the card).
        **card_kwargs: passed to `render_model_card` (`base_model`, `license`, `eval_results`, `command`, ...).
            Without a report, `weight_sparsity` is measured on the folder's weights (`weights.folder_zero_share`);
            `repair` is read from `repair_report.json` when present.

    Returns:
        `Path`: the README.md file.
    """
    from ..pruning.report import PruneReport
    from ..repair.train import REPAIR_REPORT_NAME

    folder = Path(folder)
    if report is None and (folder / REPORT_NAME).exists():
        report = PruneReport.load(folder / REPORT_NAME)
    if config is None and (folder / CONFIG_NAME).exists():
        config = json.loads((folder / CONFIG_NAME).read_text())
    if "repair" not in card_kwargs and (folder / REPAIR_REPORT_NAME).exists():
        card_kwargs["repair"] = json.loads((folder / REPAIR_REPORT_NAME).read_text())
    onnx_meta = None
    if onnx_subdir and (folder / onnx_subdir / ONNX_METADATA).exists():
        onnx_meta = json.loads((folder / onnx_subdir / ONNX_METADATA).read_text())
    elif (folder / ONNX_METADATA).exists():  # the folder is an ONNX export itself
        onnx_meta = json.loads((folder / ONNX_METADATA).read_text())
        onnx_subdir = "."
    plot_file = None
    if report is not None and report.blocks:
        plot_block_sparsity(report, folder / PLOT_NAME)
        plot_file = PLOT_NAME
    if report is None and onnx_meta is not None:
        card_kwargs.setdefault("weight_sparsity", onnx_meta.get("weight_sparsity"))
    if report is None and card_kwargs.get("weight_sparsity") is None:  # "pruned or not" comes from the weights
        card_kwargs["weight_sparsity"] = folder_zero_share(folder)
    card = render_model_card(
        report, config, onnx=onnx_meta, onnx_path=onnx_subdir or "onnx", plot_file=plot_file, **card_kwargs
    )
    path = folder / "README.md"
    atomic_write_text(path, str(card))
    return path


def save_for_hub(
    model: Any,
    folder: str | os.PathLike,
    report: Any = None,
    config: Any = None,
    tokenizer: Any = None,
    onnx_dir: str | os.PathLike | None = None,
    **card_kwargs: Any,
) -> Path:
    """Write everything a Hub repo of a pruned model holds into an existing empty `folder`.

    `model.save_pretrained(folder)` writes the checkpoint (in optimum-owl's compact format when that is active),
    then `owl_report.json`, `owl_config.json`, the tokenizer, the ONNX export under `onnx/` and the model card.

    Returns:
        `Path`: `folder`.
    """
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    if report is not None:
        report.save(folder / REPORT_NAME)
    if config is not None:
        if not hasattr(config, "save_pretrained"):  # a plain dict: validated (and versioned) like a config
            from ..config import OWLPrunerConfig

            config = OWLPrunerConfig.from_dict(dict(config))
        config.save_pretrained(folder)
    onnx_subdir = None
    if onnx_dir is not None:
        _check_onnx_dir(onnx_dir)
        shutil.copytree(onnx_dir, folder / "onnx")
        onnx_subdir = "onnx"
    card_kwargs.setdefault("weight_sparsity", _model_sparsity(model) if report is None else None)
    write_card(folder, report, config, onnx_subdir=onnx_subdir, **card_kwargs)
    return folder


def _model_sparsity(model: Any) -> float:
    from ..export.onnx import weight_sparsity

    zeros, numel = weight_sparsity(model)
    return zeros / numel if numel else 0.0


def _check_onnx_dir(onnx_dir: str | os.PathLike) -> None:
    if not (Path(onnx_dir) / ONNX_METADATA).exists():
        raise FileNotFoundError(
            f"`onnx_dir` {onnx_dir} holds no {ONNX_METADATA}; create it with `export_onnx` / `optimum-owl export onnx`."
        )


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def upload_files(folder: Path) -> list[Path]:
    """The files `upload_folder_one_commit` uploads from `folder`: every file but hidden ones, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def upload_folder_one_commit(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> Any:
    """Create the repo if needed and upload every file of `folder` in a single commit.

    Returns:
        `huggingface_hub.CommitInfo` (`.oid`, `.commit_url`, `.pr_url`).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = repo.repo_id
    if revision and not create_pr and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    files = upload_files(folder)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
    info = api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or "Upload OWL-pruned model with optimum-owl",
        create_pr=create_pr,
        revision=revision,
    )
    logger.info("pushed %d files to %s in commit %s", len(files), repo_id, info.oid)
    return info


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    onnx_dir: str | os.PathLike | None = None,
    regenerate_card: bool = True,
    dry_run: bool = False,
    **card_kwargs: Any,
) -> Any:
    """Push a saved pruned-model folder (e.g. from `optimum-owl prune`) or an ONNX export folder in one commit.

    The folder is not modified: the upload is staged in a temporary folder of hard links to which the model card
    (and the ONNX export under `onnx/`) is added.

    Args:
        folder (`str` or `os.PathLike`): the saved model (with `owl_report.json` / `owl_config.json` when pruned).
        repo_id (`str`): target repo, `name` or `org/name`.
        private (`bool`, *optional*): create the repo private.
        create_pr (`bool`, *optional*, defaults to `False`): open a pull request instead of committing to the branch.
        revision (`str`, *optional*): branch to commit to (created from `main` if missing).
        token (`str`, *optional*): Hub token; huggingface_hub's usual lookup when omitted.
        commit_message (`str`, *optional*): commit title.
        onnx_dir (`str`, *optional*): an ONNX export to ship under `onnx/` in the same commit.
        regenerate_card (`bool`, *optional*, defaults to `True`): write a fresh README.md (else keep the folder's).
        dry_run (`bool`, *optional*, defaults to `False`): stage everything (card included) but upload nothing and
            make no network request: return what would be uploaded.
        **card_kwargs: `base_model`, `license`, `eval_results`, `command`, ... for `render_model_card`.

    Returns:
        `huggingface_hub.CommitInfo`; with `dry_run`, `[(path in the repo, bytes), ...]` of every file that would be
        uploaded, in upload order.

    Raises:
        `HubUploadError`: the upload failed; nothing local was changed, and the message says what to retry.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"`folder` {folder} is not a directory; save the pruned model there first.")
    with tempfile.TemporaryDirectory(prefix="owl-push-") as staging:
        stage = Path(staging)
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                _link_or_copy(path, stage / path.relative_to(folder))
        onnx_subdir = None
        if onnx_dir is not None:
            _check_onnx_dir(onnx_dir)
            for path in Path(onnx_dir).rglob("*"):
                if path.is_file():
                    _link_or_copy(path, stage / "onnx" / path.relative_to(onnx_dir))
            onnx_subdir = "onnx"
        elif (folder / "onnx" / ONNX_METADATA).exists():
            onnx_subdir = "onnx"
        if regenerate_card or not (stage / "README.md").exists():
            (stage / "README.md").unlink(missing_ok=True)  # a hard link: never write through it
            (stage / PLOT_NAME).unlink(missing_ok=True)
            if dry_run:
                card_kwargs["lookup_license"] = False
            write_card(stage, onnx_subdir=onnx_subdir, repo_id=repo_id, **card_kwargs)
        if dry_run:
            return [(p.relative_to(stage).as_posix(), p.stat().st_size) for p in upload_files(stage)]
        try:
            return upload_folder_one_commit(
                stage,
                repo_id,
                private=private,
                create_pr=create_pr,
                revision=revision,
                token=token,
                commit_message=commit_message,
            )
        except Exception as err:
            raise HubUploadError(_retry_message(repo_id, folder, err, create_pr, revision, private)) from err


def push_to_hub(
    model: Any,
    repo_id: str,
    report: Any = None,
    config: Any = None,
    tokenizer: Any = None,
    *,
    private: bool | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    onnx_dir: str | os.PathLike | None = None,
    local_dir: str | os.PathLike | None = None,
    **card_kwargs: Any,
) -> Any:
    """Push a pruned model to the Hub in one commit, with its report, config and a generated model card.

    The files are first written to `local_dir` (a new temporary folder when omitted). After a successful upload a
    temporary folder is removed; after a failed one it is kept and `HubUploadError` says how to retry
    (`optimum-owl push <folder> --repo-id <repo>`), so nothing has to be recomputed.

    Args:
        model (`PreTrainedModel`): the pruned model.
        repo_id (`str`): target repo, `name` or `org/name`.
        report (`PruneReport`, *optional*): the pruning report (per-block table, plot).
        config (`OWLPrunerConfig`, *optional*): the exact config (`report.config` when omitted).
        tokenizer (*optional*): uploaded with the model when given.
        private (`bool`, *optional*): create the repo private.
        create_pr (`bool`, *optional*, defaults to `False`): open a pull request.
        revision (`str`, *optional*): branch to commit to (created from `main` if missing).
        token (`str`, *optional*): Hub token; huggingface_hub's usual lookup when omitted. Never logged or saved.
        commit_message (`str`, *optional*): commit title.
        onnx_dir (`str`, *optional*): an ONNX export (from `export_onnx`) to ship under `onnx/`.
        local_dir (`str`, *optional*): where to write the files (must not exist); kept after the push.
        **card_kwargs: `base_model`, `license`, `eval_results`, `command`, `model_name` for the card.

    Returns:
        `huggingface_hub.CommitInfo` (`.oid`, `.commit_url`, `.pr_url`).

    Example:

    ```python
    >>> from optimum_owl.hub import push_to_hub
    >>> push_to_hub(model, "me/llama-owl-70", report, config, tokenizer=tok, private=True)  # doctest: +SKIP
    ```
    """
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError("`repo_id` must be a non-empty string such as 'username/model-owl'.")
    if local_dir is not None:
        folder = Path(local_dir)
        if folder.exists():
            raise FileExistsError(f"`local_dir` {folder} already exists; choose a new folder or omit it.")
        folder.mkdir(parents=True)
        keep = True
    else:
        folder = Path(tempfile.mkdtemp(prefix="owl-push-"))
        keep = False
    try:
        save_for_hub(model, folder, report, config, tokenizer, onnx_dir=onnx_dir, repo_id=repo_id, **card_kwargs)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        info = upload_folder_one_commit(
            folder,
            repo_id,
            private=private,
            create_pr=create_pr,
            revision=revision,
            token=token,
            commit_message=commit_message,
        )
    except Exception as err:
        raise HubUploadError(_retry_message(repo_id, folder, err, create_pr, revision, private)) from err
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return info


def _retry_message(repo_id: str, folder: Path, err: Exception, create_pr: bool, revision: str | None, private) -> str:
    flags = " --create-pr" if create_pr else ""
    flags += f" --revision {revision}" if revision else ""
    flags += " --private" if private else ""
    return (
        f"Upload to {repo_id} failed ({type(err).__name__}: {err}). The files are kept in {folder}; retry with "
        f"`optimum-owl push {folder} --repo-id {repo_id}{flags}` (or `optimum_owl.hub.push_folder`)."
    )

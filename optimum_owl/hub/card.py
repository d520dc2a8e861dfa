"""Model card of a pruned model: Hub YAML metadata plus a Markdown body (method, per-block table, plot, evaluation,
reproduction, loading, and optionally the ONNX export)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from ..pruning.modeling import PRUNED_ZERO_SHARE
from ..utils import public_command, public_config, public_path, redact_secrets
from .plot import PLOT_NAME
from .sections import (
    SEARCHES,
    applied,
    chosen_config,
    knob_text,
    method_section,
    repair_section,
    with_knob_flags,
    zero_shot_rows,
)

logger = logging.getLogger(__name__)

BASE_TAGS = ["pruned", "sparse", "owl", "optimum-owl"]
# Short calibration-source names mapped to their Hub dataset ids (for the `datasets:` metadata).
KNOWN_DATASETS = {"c4": "allenai/c4", "wikitext2": "Salesforce/wikitext", "wikitext": "Salesforce/wikitext"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(name: Any) -> bool:
    """True when `name` looks like a Hub repo id (`org/name` or `name`) and is not an existing local path or a file."""
    if not isinstance(name, str) or not _HUB_ID.match(name) or os.path.exists(name):
        return False
    return not name.endswith((".json", ".jsonl", ".txt", ".csv", ".parquet"))


def _hub_dataset(source: Any) -> str | None:
    if not isinstance(source, str):
        return None
    if source.lower() in KNOWN_DATASETS:
        return KNOWN_DATASETS[source.lower()]
    return source if "/" in source and is_hub_id(source) else None


def license_of(base_model: str | None, token: str | bool | None = None) -> str | None:
    """The `license` in the model card of `base_model` (a local folder with README.md, or a Hub id), if any.

    A Hub id costs one `model_info` request (no retries). Network or parsing problems give `None` (logged at debug
    level): the license is then simply not carried over.
    """
    if not base_model:
        return None
    local = Path(base_model)
    try:
        if local.is_dir():
            from huggingface_hub import ModelCard

            readme = local / "README.md"
            return getattr(ModelCard.load(readme).data, "license", None) if readme.exists() else None
        if is_hub_id(base_model):
            from huggingface_hub import HfApi

            info = HfApi(token=token).model_info(base_model, timeout=10)
            card_data = info.card_data
            return getattr(card_data, "license", None) if card_data is not None else None
    except Exception as err:  # the base card is optional; never fail the push on it
        logger.debug("no license read from %s: %s", base_model, type(err).__name__)
    return None


def _config_dict(config: Any, report: Any) -> dict[str, Any]:
    """The config as published: local absolute paths reduced to their last component (reports written by older
    versions may still hold them)."""
    if config is None:
        cfg = dict(report.config) if report is not None else {}
    else:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return public_config(cfg)


def _eval_rows(report: Any, eval_results: Any) -> list[dict[str, Any]]:
    """Normalise evaluation inputs to rows `{dataset, metric, value, dense_value?, details?}`."""
    rows: list[dict[str, Any]] = []
    ev = getattr(report, "evaluation", None) or {}
    if ev.get("pruned_ppl") is not None:
        rows.append(
            {
                "dataset": Path(str(ev.get("text", "eval text"))).name,
                "metric": "perplexity",
                "value": ev["pruned_ppl"],
                "dense_value": ev.get("dense_ppl"),
                "details": (f"windows of {ev.get('seqlen')} tokens" if ev.get("seqlen") else "")
                + (f", first {ev['max_windows']} windows" if ev.get("max_windows") else "") or None,
            }
        )
    rows += zero_shot_rows(ev.get("zero_shot") or {})
    if isinstance(eval_results, dict):
        eval_results = [{"dataset": "evaluation", "metric": k, "value": v} for k, v in eval_results.items()]
    for row in eval_results or []:
        if not {"dataset", "metric", "value"} <= set(row):
            raise ValueError(
                f"each `eval_results` entry needs keys 'dataset', 'metric' and 'value' (optional 'dense_value', "
                f"'dataset_id', 'details'); got {sorted(row)}."
            )
        rows.append(dict(row))
    return rows


def prune_command(cfg: dict[str, Any], model: str, source: Any) -> str:
    """The `optimum-owl prune` command line equivalent to a config dict (shell-quoted); the flags come from the CLI's
    own field list (`config_flags.config_flags`), so every knob with a flag is reproduced."""
    import dataclasses
    import shlex

    from ..config import OWLPrunerConfig
    from ..config_flags import OPTIONAL_FIELDS, config_default, config_flags

    parts = ["optimum-owl", "prune", model]
    if source is not None:
        parts += ["--calibration", str(source)]
    parts += config_flags(cfg) + ["-o", "pruned-model"]
    text = " ".join(shlex.quote(p) for p in parts)
    no_flag = [f.name for f in dataclasses.fields(OWLPrunerConfig) if f.init and f.name not in OPTIONAL_FIELDS]
    differs = [k for k in no_flag if k in cfg and k not in ("dataset", "tokenizer") and cfg[k] != config_default(k)]
    if differs:
        text += "\n# not settable from the CLI, use the Python API for: " + ", ".join(f"{k}={cfg[k]!r}" for k in differs)
    return text


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_model_card(
    report: Any = None,
    config: Any = None,
    *,
    model_name: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    eval_results: Any = None,
    command: str | None = None,
    onnx: dict[str, Any] | None = None,
    onnx_path: str = "onnx",
    plot_file: str | None = PLOT_NAME,
    repo_id: str | None = None,
    weight_sparsity: float | None = None,
    repair: dict[str, Any] | None = None,
    lookup_license: bool = True,
):
    """Build the model card of a pruned model.

    Args:
        report (`PruneReport`, *optional*): the pruning run; without one (or at sparsity 0) the card states that
            the model is not pruned.
        config (`OWLPrunerConfig` or `dict`, *optional*): the exact config; `report.config` when omitted.
        model_name (`str`, *optional*): title; derived from `repo_id` or the base model otherwise.
        base_model (`str`, *optional*): Hub id of the dense model; `report.model["name_or_path"]` when it is one.
        license (`str`, *optional*): license id; otherwise read from the base model's card when possible.
        eval_results (*optional*): list of `{"dataset", "metric", "value", "dense_value"?, "dataset_id"?,
            "details"?}` or a `{metric: value}` dict; `report.evaluation` (dense/pruned perplexity) is added too.
        command (`str`, *optional*): the command line that produced the checkpoint; published with absolute paths
            reduced to their last component (`utils.public_command`) and secrets redacted.
        onnx (`dict`, *optional*): `owl_onnx.json` metadata of an ONNX export shipped under `onnx_path`.
        onnx_path (`str`, *optional*, defaults to `"onnx"`): folder of the ONNX export inside the repo.
        plot_file (`str`, *optional*): file name of the PNG plot to embed (`None` for no plot).
        repo_id (`str`, *optional*): the target repo, used in the loading snippets.
        weight_sparsity (`float`, *optional*): the share of zero prunable weights measured on the weights, used when
            there is no report: above `PRUNED_ZERO_SHARE` the card says the model is pruned and that its pruning
            record is missing.
        repair (`dict`, *optional*): `repair_report.json` of a repair run after pruning (adds a "Repair" section).
        lookup_license (`bool`, *optional*, defaults to `True`): read the license from the base model's card (one
            Hub request for a Hub id); `False` never touches the network.

    Returns:
        `huggingface_hub.ModelCard`: the card (`str(card)` is the README.md text).

    Example:

    ```python
    >>> card = render_model_card(report, config, base_model="meta-llama/Llama-2-7b-hf")  # doctest: +SKIP
    >>> card.save("README.md")  # doctest: +SKIP
    ```
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    cfg = _config_dict(config, report)
    model_info = dict(getattr(report, "model", None) or {})
    local_name_or_path = model_info.get("name_or_path")
    name_or_path = public_path(local_name_or_path)
    if base_model is None and is_hub_id(name_or_path):
        base_model = name_or_path
    if license is None and local_name_or_path and Path(local_name_or_path).is_dir():
        license = license_of(local_name_or_path)
    if license is None and base_model and lookup_license:
        license = license_of(base_model)
    sparsity = report.sparsity if report is not None else (weight_sparsity or 0.0)
    pruned = sparsity > (0.0 if report is not None else PRUNED_ZERO_SHARE)  # without a record: from the weights
    title = model_name or (repo_id.split("/")[-1] if repo_id else None) or (
        f"{base_model.split('/')[-1]}-owl" if base_model else "OWL-pruned model"
    )
    calib = dict(getattr(report, "calibration", None) or {})
    source = public_path(calib.get("source") or cfg.get("dataset"))
    datasets = [d for d in {_hub_dataset(source)} if d]
    tags = list(BASE_TAGS)
    if cfg.get("method"):
        tags.append(str(cfg["method"]))
    if onnx is not None:
        tags.append("onnx")
    rows = _eval_rows(report, eval_results)
    eval_meta = [
        EvalResult(
            task_type="text-generation",
            dataset_type=row.get("dataset_id") or row["dataset"],
            dataset_name=row["dataset"],
            metric_type=row["metric"],
            metric_value=row["value"],
        )
        for row in rows
    ]
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        tags=tags,
        datasets=datasets or None,
        model_name=title if eval_meta else None,
        eval_results=eval_meta or None,
    )
    body = [f"# {title}", ""]
    base_text = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else f"`{name_or_path or 'a dense model'}`"
    if pruned and not cfg:
        body += [
            f"This is {base_text} pruned to **{sparsity:.2%} sparsity** (fraction of zero weights in the linear layers "
            "of the transformer blocks, measured on the weights). Its pruning record (`owl_report.json`, "
            "`owl_config.json`) is missing, so the method and settings that produced it are unknown.",
        ]
    elif pruned:
        family, knob = applied(cfg, report)
        body += [
            f"This is {base_text} pruned to **{sparsity:.2%} sparsity** (fraction of zero weights in the linear layers "
            f"of the transformer blocks) with optimum-owl: "
            f"{cfg.get('method', '?')} scores, `{family}` layer-wise allocation"
            + (f" ({knob_text(knob)})" if knob else "")
            + (f", chosen by `layerwise=\"{cfg['layerwise']}\"`" if cfg.get("layerwise") in SEARCHES else "")
            + f", pattern `{cfg.get('pattern', 'unstructured')}`.",
        ]
        if report is not None:
            body.append(f"{report.total_zeros:,} of {report.total_params:,} prunable weights are zero.")
    else:
        body += [
            f"**This model is not pruned**: {sparsity:.2%} of its prunable weights are zero. It is {base_text} "
            "exported or uploaded with optimum-owl without a pruning run.",
        ]
    body.append("")
    if cfg:
        body += method_section(cfg, report, source)
    if report is not None and report.blocks:
        body += ["## Per-block sparsity", "", report.block_table(), ""]
        if plot_file:
            ratios = any(b.outlier_ratio is not None for b in report.blocks)
            body += [f"![Per-block sparsity{' and outlier ratio' if ratios else ''}]({plot_file})", ""]
    if rows:
        body += ["## Evaluation", "", "| dataset | metric | pruned | dense | details |", "|---|---|---:|---:|---|"]
        for row in rows:
            body.append(
                f"| {row['dataset']} | {row['metric']} | {_fmt(row['value'])} | {_fmt(row.get('dense_value'))} | "
                f"{row.get('details') or ''} |"
            )
        body.append("")
    body += repair_section(repair, bool(rows) and report is not None and bool(report.evaluation))
    load_src = base_model or name_or_path or "<dense model>"
    body += ["## Reproduce", ""]
    if not cfg:
        body += ["The pruning record (`owl_report.json`, `owl_config.json`) is missing, so the settings that produced "
                 "these weights are unknown; optimum-owl writes it beside every pruned (and repaired) model.", ""]
    else:
        body += ["The exact configuration (`owl_config.json` in this repo):", "", "```json"]
        body += [json.dumps(cfg, indent=2, sort_keys=True), "```", ""]
    if command:
        body += ["Command:", "", "```bash", redact_secrets(public_command(command)), "```", ""]
    elif cfg:
        body += ["Equivalent command:", "", "```bash", prune_command(cfg, load_src, source), "```", ""]
    chosen = chosen_config(cfg, report)
    if chosen is not None:
        body += [f"That reruns the `{cfg.get('layerwise')}` search; the setting it chose, applied directly:", "", "```bash",
                 with_knob_flags(prune_command(chosen, load_src, source), *applied(cfg, report)), "```", ""]
    cfg_args = ", ".join(f"{k}={v!r}" for k, v in sorted((chosen or cfg).items()) if k not in ("quant_method", "dataset"))
    body += [] if not cfg else [
        "In Python" + (" (the chosen setting):" if chosen is not None else ":"),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from optimum_owl import OWLPruner, OWLPrunerConfig",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{load_src}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{load_src}")',
        f"config = OWLPrunerConfig({cfg_args})",
        f"report = OWLPruner(config).prune(model, dataset={source!r}, tokenizer=tokenizer)",
        "```",
        "",
    ]
    target = repo_id or "<this repo>"
    body += [
        "## Load",
        "",
        "```python",
        "import optimum_owl  # registers the optimum-owl checkpoint format with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{target}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{target}")',
        "```",
        "",
        "The pruned weights are stored as regular (dense or optimum-owl compressed) tensors; the zeros are kept when "
        "loading. To keep the sparsity while fine-tuning, re-apply the masks after each optimizer step.",
        "",
    ]
    body += sparse_inference_card_section()
    if onnx is not None:
        body += onnx_card_section(onnx, onnx_path=onnx_path, repo_id=repo_id)
    if report is not None and report.warnings:
        body += ["## Warnings from the run", ""] + [f"- {w}" for w in report.warnings] + [""]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
    return ModelCard(text)


def sparse_inference_card_section() -> list[str]:
    """Model-card lines on sparse CPU inference: how to use it and what optimum-owl measured, on which CPU."""
    from ..inference import MEASURED, MEASURED_INT8

    int8 = MEASURED_INT8 or "not benchmarked by optimum-owl yet"
    return [
        "## Sparse inference on CPU",
        "",
        "`optimum_owl.sparsify(model)` (or `optimum_owl.inference.load_sparse(folder)` for a downloaded copy) keeps "
        "only the compact form of the pruned weights in memory and decodes with optimum-owl's AVX2 / AVX-512 kernel; "
        "`optimum-owl generate <folder> --prompt ... --compare-dense` measures it on your CPU.",
        "",
        f"Measured by optimum-owl, with float values ({MEASURED}); with int8 values (`values=\"int8\"`, the LM head "
        f"int8 too; `generate --values int8` measures it): {int8}. This model itself was not measured: speed depends "
        "on the CPU, the thread count and the sparsity. Details: optimum-owl's docs/inference.md.",
        "",
    ]


def onnx_card_section(meta: dict[str, Any], onnx_path: str = "onnx", repo_id: str | None = None) -> list[str]:
    """Markdown lines describing an ONNX export from its `owl_onnx.json` metadata."""
    sizes = meta.get("sizes", {})
    storage = meta.get("storage", {})
    lines = [
        "## ONNX export",
        "",
        f"`{'' if onnx_path in ('', '.') else onnx_path + '/'}model.onnx` is a single decoder graph with a KV cache (prefill with an empty past, then one "
        f"token per decode step), {meta.get('dtype')}, opset {meta.get('opset')}, exported with "
        f"{meta.get('exporter')}.",
        "",
        f"- weight storage: `{storage.get('storage')}` ({storage.get('num_converted', 0)} tensors stored compactly, "
        f"{storage.get('tied_copies_removed', 0)} tied copies removed)",
        f"- file size: {sizes.get('onnx_bytes', 0):,} bytes = {sizes.get('ratio_to_dense', 1.0):.3f}× the dense export "
        f"({sizes.get('dense_onnx_bytes', 0):,} bytes)",
    ]
    if not meta.get("pruned", True):
        lines.append("- **the exported model is not pruned**: it has no zero weights, so the export is dense")
    if storage.get("storage") == "bitmask":
        lines.append(
            "- the pruned weights are a packed bit mask plus the non-zero values, rebuilt by standard ONNX operators "
            "that onnxruntime constant-folds when the session is created"
        )
    val = meta.get("validation")
    if val:
        lines += [
            f"- checked with onnxruntime {val.get('onnxruntime')}: prefill logits relative error "
            f"{val['prefill_rel_error']:.2e}, decode step {val['decode_rel_error']:.2e}; greedy generation of "
            f"{val['greedy_tokens']} tokens {'identical to' if val['greedy_equal'] else 'DIFFERS from'} PyTorch; "
            f"session creation {val['session_creation_s']:.3f} s",
        ]
    target = repo_id or "<this repo>"
    at_root = onnx_path in ("", ".")
    download = f'snapshot_download("{target}")' if at_root else f'snapshot_download("{target}", allow_patterns=["{onnx_path}/*"])'
    lines += [
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from optimum_owl.export import OnnxCausalLM",
        "",
        f"folder = {download}",
        "lm = OnnxCausalLM(folder)" if at_root else f'lm = OnnxCausalLM(f"{{folder}}/{onnx_path}")',
        "ids = lm.generate(prompt_ids, max_new_tokens=32)  # prompt_ids: int64 array [batch, seq]",
        "```",
        "",
    ]
    return lines

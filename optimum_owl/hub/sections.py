"""Model-card sections that depend on what the pruning run applied: the allocation family and its setting (the one a
search chose, not the configured defaults), the command that reruns exactly that setting, a later repair, and the
zero-shot accuracy recorded by `optimum-owl eval --tasks`."""

from __future__ import annotations

from typing import Any

SEARCHES = ("owl-auto", "auto")
PAPERS = {
    "owl": "OWL (Outlier Weighed Layerwise sparsity, Yin et al. 2023, [arXiv:2310.05175](https://arxiv.org/abs/2310.05175))",
    "dlp": "DLP (Chen et al. 2025, [arXiv:2505.23807](https://arxiv.org/abs/2505.23807))",
    "alphapruning": "AlphaPruning (Lu et al., NeurIPS 2024)",
    "atp": "ATP (Huang et al., ICML 2025)",
}
# How each family spreads the target S over the blocks (docs/algorithm.md).
EXPLAINED = {
    "uniform": "Every transformer block is pruned to the same sparsity S (uniform allocation).",
    "owl": "gives every transformer block its own sparsity. A block's *outlier ratio* D_i is the fraction of its "
    "Wanda scores |W_ij|·‖X_j‖₂ that exceed M times the block's mean score; blocks with more outliers are pruned "
    "less: s_i = S + 2λ·(mean(r̃) − r̃_i), with r̃ the min-max normalised ratios, so the mean stays at the target S "
    "and the spread is 2λ.",
    "dlp": "gives every transformer block its own sparsity from its mean Wanda score |W|·‖X‖₂: blocks with larger "
    "mean scores are pruned more, the block sparsities spanning 2α around the target S (mean kept at S).",
    "alphapruning": "gives every transformer block its own sparsity from the heavy-tail exponent α of its weight "
    "matrices' eigenvalue spectra (no calibration data needed): better-trained blocks (smaller α) are pruned less, "
    "block sparsities S·(1 ± ε) rescaled to the mean S.",
    "atp": "lets the sparsity rise linearly with depth, by β from one block to the next: s_l = S − β(L−1)/2 + lβ "
    "(mean kept at S).",
}
KNOB_SYMBOLS = {"owl_m": "M", "owl_lambda": "λ", "dlp_alpha": "α", "alphapruning_epsilon": "ε", "atp_beta": "β",
                "attention_shift": "attention shift"}


def applied(cfg: dict[str, Any], report: Any) -> tuple[str, dict[str, Any]]:
    """(family, knob) of the allocation applied: the report's record (for a search: the chosen setting), else the
    configured family with its knob fields."""
    allocation = dict(getattr(report, "allocation", None) or {})
    if allocation.get("family"):
        return str(allocation["family"]), dict(allocation.get("knob") or {})
    family = str(cfg.get("layerwise") or "uniform")
    if family == "owl":
        return family, {"owl_m": cfg.get("owl_m"), "owl_lambda": cfg.get("owl_lambda")}
    knobs = {"dlp": "dlp_alpha", "alphapruning": "alphapruning_epsilon", "atp": "atp_beta"}
    return family, ({knobs[family]: cfg.get(knobs[family])} if family in knobs else {})


def knob_text(knob: dict[str, Any]) -> str:
    """'M = 5, λ = 0.08', 'β = 0.005', '' (uniform)."""
    return ", ".join(f"{KNOB_SYMBOLS.get(k, k)} = {v:g}" if isinstance(v, (int, float)) else f"{KNOB_SYMBOLS.get(k, k)} = {v}"
                     for k, v in knob.items())


def setting_text(family: str, knob: dict[str, Any]) -> str:
    """'ATP, β = 0.005', 'OWL, M = 5, λ = 0.08', 'uniform'."""
    name = family if family == "uniform" else PAPERS.get(family, family).split(" (")[0]
    return ", ".join([name] + ([knob_text(knob)] if knob else []))


def method_section(cfg: dict[str, Any], report: Any, source: Any) -> list[str]:
    """'## Method': the family that was applied and its setting; after `layerwise="auto"`/"owl-auto", which setting
    the search chose among how many candidates."""
    family, knob = applied(cfg, report)
    explained = EXPLAINED.get(family, f"allocates the block sparsities with the `{family}` family.")
    text = explained if family == "uniform" or family not in PAPERS else f"{PAPERS[family]} {explained}"
    lines = ["## Method", "", text + " Each block is then pruned to its sparsity by the chosen criterion, one block at "
             "a time" + (", on calibration data." if source else ".")]
    layerwise = cfg.get("layerwise")
    candidates = list(getattr(report, "candidates", None) or [])
    if layerwise in SEARCHES:
        tried = f" among {len(candidates)} candidates" if candidates else ""
        lines += ["", f"The allocation was chosen by `layerwise=\"{layerwise}\"`{tried}, on held-out loss: "
                  f"**{setting_text(family, knob)}**."]
    if cfg:
        lines += ["", f"Settings: target sparsity S = {cfg.get('sparsity')}, allocation {setting_text(family, knob)}, "
                  f"criterion `{cfg.get('method')}`"
                  + (f", {cfg.get('num_samples')} calibration windows of {cfg.get('seqlen')} tokens from `{source}`, "
                     f"seed {cfg.get('seed')}" if source else "") + "."]
    return lines + [""]


def chosen_config(cfg: dict[str, Any], report: Any) -> dict[str, Any] | None:
    """After a search: the config that applies the chosen setting directly (`layerwise` = the chosen family, its
    knob fields set, the search's own fields left out); `None` for a run without a search."""
    if cfg.get("layerwise") not in SEARCHES:
        return None
    family, knob = applied(cfg, report)
    out = {k: v for k, v in cfg.items() if not k.startswith("auto_")}
    out["layerwise"] = family
    out.update(knob)
    return out


def with_knob_flags(command: str, family: str, knob: dict[str, Any]) -> str:
    """`command` (an `optimum-owl prune` line from `card.prune_command`) with the chosen knob's flags spelled out
    after `--layerwise FAMILY` even where they equal the config's defaults (`--layerwise atp --atp-beta 0.005`)."""
    anchor = f"--layerwise {family}"
    first, _, rest = command.partition("\n")
    missing = [f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
               for k, v in knob.items() if f"--{k.replace('_', '-')} " not in first]
    if anchor not in first or not missing:
        return command
    first = first.replace(anchor, " ".join([anchor, *missing]), 1)
    return first + ("\n" + rest if rest else "")


def repair_section(record: dict[str, Any] | None, evaluated_before: bool) -> list[str]:
    """'## Repair' from `repair_report.json`: the model was fine-tuned after pruning with its zeros kept."""
    if not record:
        return []
    cfg = dict(record.get("config") or {})
    lines = ["## Repair", "", f"After pruning, the model was fine-tuned with `{record.get('method')}` (optimum-owl "
             f"repair): {record.get('steps')} optimizer steps over {record.get('train_windows')} training windows of "
             f"{cfg.get('seqlen')} tokens ({record.get('train_tokens', 0):,} tokens), {record.get('seconds', 0.0):.0f} s; "
             + ("each matrix kept its sparsity (SEFT moves zeros, below; " if record.get("method") == "seft" else
                f"every pruned weight stayed zero (zeros preserved: {record.get('zeros_preserved')}, ") + "sparsity "
             f"{record.get('sparsity_after', 0.0):.4f})."]
    lines += _recovery_lines(record, cfg)
    if record.get("eval_ppl_after") is not None:
        lines.append(f"Perplexity on its held-out text ({record.get('eval_windows')} windows): "
                     f"{record['eval_ppl_before']:.4g} before repair, **{record['eval_ppl_after']:.4g} after**.")
    if evaluated_before:
        lines.append("The evaluation above was measured before the repair.")
    return lines + ["", "`repair_report.json` in this repo holds the full record.", ""]


def _recovery_lines(record: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """How the repair recovered: its loss (distillation from which teacher), the tokens it trained on, the data
    selection and SEFT's mask updates (records written before these existed say nothing more)."""
    objective = record.get("objective", "lm")
    loss = {"lm": "the next-token loss", "kd": "distillation from the dense model",
            "kd+lm": "distillation from the dense model plus the next-token loss"}.get(objective, objective)
    lines = []
    if "tokens_seen" in record:
        teacher = f" (teacher `{record.get('teacher')}`, temperature {cfg.get('temperature')}" + (
            f", its top {cfg['kd_top_k']} logits" if cfg.get("kd_top_k") else "") + ")" if objective != "lm" else ""
        hidden = " and SquareHead hidden-state matching" if cfg.get("hidden_loss") else ""
        lines.append(f"Recovery objective: {loss}{teacher}{hidden}; {record['tokens_seen']:,} training tokens.")
    if record.get("selected_windows") is not None:
        lines.append(f"Training windows: the {len(record['selected_windows'])} of {record.get('candidate_windows')} "
                     f"candidates where the pruned model lost most against the teacher ({cfg.get('select_metric')}).")
    if record.get("method") == "seft":
        lines.append(f"Sparse fine-tuning (SEFT) moved {record.get('seft_swaps', 0):,} weights between pruned and "
                     f"kept over {len(record.get('seft_history') or [])} drop-and-grow updates; every matrix kept its "
                     f"number of non-zeros (checked: {record.get('nnz_preserved')}).")
    return lines


def zero_shot_rows(zero_shot: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluation rows of lm-evaluation-harness results recorded by `evaluation.record_zero_shot`: one per task and
    accuracy metric, with the dense model's value when it was evaluated too."""
    dense = (zero_shot.get("dense") or {}).get("tasks", {})
    shots = zero_shot.get("num_fewshot")
    details = (f"{shots or 0}-shot, {zero_shot.get('harness', 'lm-eval')}"
               + (f", first {zero_shot['limit']} documents" if zero_shot.get("limit") else ""))
    return [{"dataset": task, "metric": metric, "value": value, "dense_value": dense.get(task, {}).get(metric),
             "details": details}
            for task, row in zero_shot.get("tasks", {}).items()
            for metric, value in row.items() if metric in ("acc", "acc_norm")]

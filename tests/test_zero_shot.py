"""Zero-shot accuracy through lm-evaluation-harness (issue 29): `evaluation.zero_shot`, `optimum-owl eval --tasks`,
the report and the card. The local task `tests/data/owl_mc` (YAML + jsonl) needs no Hub; its accuracy is checked
against log-likelihoods computed here by hand with the bundled stories260K model. lm-eval tests skip without it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from optimum_owl.evaluation import PAPER_TASKS, expand_tasks, zero_shot

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "tests" / "data" / "owl_mc"
STORIES = ROOT / "optimum_owl" / "assets" / "stories260K"

try:
    import lm_eval  # noqa: F401

    HAS_LM_EVAL = True
except ImportError:
    HAS_LM_EVAL = False
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-evaluation-harness not installed "
                                   "(pip install 'optimum-owl[eval]')")


@pytest.fixture
def in_task_dir(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's `data_files` are relative to the working directory (lm-eval's rule)


def _stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(STORIES).eval(), AutoTokenizer.from_pretrained(STORIES)


@torch.no_grad()
def _hand_accuracy(model, tokenizer) -> dict[str, float]:
    """acc / acc_norm of owl_mc from log-likelihoods computed directly: context tokens, then the tokens the
    continuation " choice" adds; acc_norm divides by the choice's length in characters (lm-eval's definitions)."""
    docs = [json.loads(line) for line in (TASK_DIR / "owl_mc.jsonl").read_text().splitlines()]
    hits = {"acc": 0, "acc_norm": 0}
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer.encode(doc["question"])
            whole = tokenizer.encode(doc["question"] + " " + choice)
            assert whole[: len(context)] == context
            logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)
            scores.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        hits["acc"] += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
        norm = [s / len(c) for s, c in zip(scores, doc["choices"])]
        hits["acc_norm"] += max(range(len(norm)), key=norm.__getitem__) == doc["answer"]
    return {k: v / len(docs) for k, v in hits.items()}


def test_tasks_expand_paper_and_refuse_nothing():
    assert expand_tasks("paper") == list(PAPER_TASKS)
    assert expand_tasks("arc_easy, paper,boolq") == ["arc_easy", *[t for t in PAPER_TASKS if t != "arc_easy"]]
    with pytest.raises(ValueError, match="paper"):
        expand_tasks(" , ")


def test_missing_lm_eval_names_the_extra(monkeypatch, capsys):
    from optimum_owl.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"optimum-owl\[eval\]"):
        zero_shot(torch.nn.Linear(2, 2), None, "owl_mc")
    assert main(["eval", str(STORIES), "--tasks", "owl_mc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'optimum-owl[eval]'" in err


@needs_lm_eval
def test_accuracy_matches_hand_computed_loglikelihoods(in_task_dir):
    model, tokenizer = _stories()
    expected = _hand_accuracy(model, tokenizer)
    assert 0 < expected["acc"] < 1 or 0 < expected["acc_norm"] < 1  # the task discriminates on this model
    out = zero_shot(model, tokenizer, "owl_mc", include_path=TASK_DIR, batch_size=3)
    assert out["samples"] == {"owl_mc": 8} and out["harness"].startswith("lm-eval 0.4")
    assert out["tasks"]["owl_mc"]["acc"] == pytest.approx(expected["acc"])
    assert out["tasks"]["owl_mc"]["acc_norm"] == pytest.approx(expected["acc_norm"])
    limited = zero_shot(model, tokenizer, ["owl_mc"], include_path=[TASK_DIR], limit=2)
    assert limited["samples"] == {"owl_mc": 2} and limited["limit"] == 2
    with pytest.raises(ValueError, match="no_such_task"):
        zero_shot(model, tokenizer, "no_such_task", include_path=TASK_DIR)


@needs_lm_eval
def test_sparse_kernels_and_compressed_tensors_checkpoint_through_the_cli(tmp_path, in_task_dir, capsys):
    """A pruned stories260K saved as compressed-tensors, evaluated with `--sparse` (load_sparse: the kernels run
    lm-eval's forwards): the accuracy is the hand-computed one of the pruned weights, and it lands in
    owl_report.json and the model card's evaluation table."""
    from optimum_owl import OWLPruner, OWLPrunerConfig
    from optimum_owl.cli import main
    from optimum_owl.hub.card import render_model_card
    from optimum_owl.pruning.report import PruneReport
    from optimum_owl.serialization import save_pruned

    model, tokenizer = _stories()
    config = OWLPrunerConfig(sparsity=0.5, method="magnitude", layerwise="uniform")
    report = OWLPruner(config).prune(model)
    expected = _hand_accuracy(model, tokenizer)
    out = tmp_path / "ct"
    save_pruned(model, out, report=report, config=config, tokenizer=tokenizer, save_format="compressed-tensors")
    assert main(["eval", str(out), "--tasks", "owl_mc", "--include-path", str(TASK_DIR), "--sparse",
                 "--baseline", str(STORIES), "--output-json", str(tmp_path / "zs.json")]) == 0
    printed = capsys.readouterr().out
    assert f"acc {expected['acc']:.4f}" in printed and "recorded in" in printed
    recorded = PruneReport.load(out).evaluation["zero_shot"]
    assert recorded["tasks"]["owl_mc"]["acc"] == pytest.approx(expected["acc"])
    assert recorded["dense"]["tasks"]["owl_mc"]["acc"] == pytest.approx(_hand_accuracy(*_stories())["acc"])
    assert json.loads((tmp_path / "zs.json").read_text())["tasks"] == recorded["tasks"]
    card = str(render_model_card(PruneReport.load(out), lookup_license=False))
    assert f"| owl_mc | acc | {expected['acc']:.4g} |" in card and "0-shot, lm-eval 0.4" in card

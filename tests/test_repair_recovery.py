"""Recovery after pruning (issue 28): distillation from the dense model, SEFT drop-and-grow, data selection by
degradation, the teacher cache, bf16 where native, and resuming an interrupted repair. Tiny models only."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")

from transformers import TrainerCallback  # noqa: E402

from optimum_owl.algorithms.masks import is_valid_nm  # noqa: E402
from optimum_owl.repair import (  # noqa: E402
    RepairConfig,
    RepairConfigError,
    SEFTCallback,
    kd_loss,
    repair,
    squarehead_loss,
    zero_masks,
)
from optimum_owl.repair.distill import DistillTrainer, TeacherCache, select_top, window_scores  # noqa: E402
from optimum_owl.repair.recovery import native_bf16, nnz_counts  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repair_helpers import prune_, random_windows, tiny_llama  # noqa: E402

FAST = dict(r=4, seqlen=16, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=3)


def _pair(nm=(2, 4)):
    teacher = tiny_llama()
    return prune_(copy.deepcopy(teacher), 0.5, nm), teacher


def _same_zero_sets(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mlp_nm_ok(model) -> bool:
    return all(is_valid_nm(mod.weight, 2, 4) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and ".mlp." in name)


# ------------------------------------------------------------------------------------------------ losses
def test_kd_loss_equals_hand_computed_kl():
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]])
    t = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    temp = 2.0

    def softmax(row):
        e = [math.exp(v / temp) for v in row]
        return [x / sum(e) for x in e]

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    rows = list(zip(s[0].tolist(), t[0].tolist()))
    expected = temp ** 2 * sum(kl(softmax(tr), softmax(sr)) for sr, tr in rows) / len(rows)
    assert float(kd_loss(s, t, temp)) == pytest.approx(expected, rel=1e-6)
    # top-2: the teacher renormalised over its two largest logits, the student over the whole vocabulary
    expected_top = 0.0
    for sr, tr in rows:
        top = sorted(range(3), key=lambda i: -tr[i])[:2]
        pt = softmax([tr[i] for i in top])
        ps = softmax(sr)
        expected_top += sum(p * math.log(p / ps[i]) for p, i in zip(pt, top))
    expected_top *= temp ** 2 / len(rows)
    assert float(kd_loss(s, t, temp, top_k=2)) == pytest.approx(expected_top, rel=1e-6)
    assert float(kd_loss(s, t, temp, top_k=3)) == pytest.approx(expected, rel=1e-6)
    assert float(kd_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-7)


def test_squarehead_loss_is_normalised_mse_per_block():
    t = (torch.zeros(1, 2, 2), torch.tensor([[[1.0, 1.0], [1.0, 1.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 2.0]]]))
    s = (torch.ones(1, 2, 2) * 9, torch.tensor([[[0.0, 1.0], [1.0, 1.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 0.0]]]))
    # block 1: mse 1/4, mean t² 1 -> 0.25 ; block 2: mse 4/4 = 1, mean t² 8/4 = 2 -> 0.5 ; embeddings skipped
    assert float(squarehead_loss(s, t)) == pytest.approx((0.25 + 0.5) / 2)


# ------------------------------------------------------------------------------------------------ zeros kept
@pytest.mark.parametrize("method,extra", [
    ("masked_lora", dict(objective="kd", temperature=2.0)),
    ("masked_lora", dict(objective="kd+lm", kd_top_k=8, hidden_loss="squarehead")),
    ("full_ft", dict(objective="kd", kd_top_k=8, teacher_cache=True, weight_decay=0.1)),
    ("full_ft", dict(objective="lm", select="degradation", max_tokens=16 * 16)),
    ("masked_lora", dict(objective="kd", select="degradation", max_tokens=16 * 16, kd_top_k=8)),
], ids=["lora-kd", "lora-kdlm-squarehead", "ft-kd-cached", "ft-lm-select", "lora-kd-select"])
def test_zero_sets_identical_for_every_recovery_method(method, extra):
    student, teacher = _pair()
    before = zero_masks(student)
    out, report = repair(student, train_data=random_windows(32, 16),
                         config=RepairConfig(method=method, teacher=teacher, **{**FAST, **extra}))
    assert _same_zero_sets(zero_masks(out), before) and _mlp_nm_ok(out)
    assert report.zeros_preserved and report.nnz_preserved and report.objective == extra["objective"]
    assert report.teacher_mode == ("cache" if extra.get("teacher_cache") or extra.get("select") and
                                   extra.get("kd_top_k") else "live")
    if "select" in extra:
        assert len(report.selected_windows) == 16 and report.candidate_windows == 32 and report.train_windows == 16


def test_seft_keeps_every_matrix_nnz_and_nm_groups_while_moving_zeros():
    student, teacher = _pair()
    nnz, before = nnz_counts(student), zero_masks(student)
    out, report = repair(student, train_data=random_windows(32, 16), config=RepairConfig(
        method="seft", teacher=teacher, objective="kd", seft_interval=1, seft_fraction=0.3, seft_end=0.9,
        **{**FAST, "learning_rate": 1e-3}))
    assert nnz_counts(out) == nnz and _mlp_nm_ok(out)
    assert report.nnz_preserved and report.zeros_preserved is None
    assert report.seft_swaps > 0 and not _same_zero_sets(zero_masks(out), before)
    # the callback alone, with the sensitivity score
    cb = SEFTCallback(interval=1, fraction=0.5, drop="sensitivity")
    student2, _ = _pair()
    nnz2 = nnz_counts(student2)
    repair(student2, train_data=random_windows(32, 16), config=RepairConfig(method="full_ft", **FAST), callbacks=[cb])
    assert nnz_counts(student2) == nnz2 and cb.history and all(h["swapped"] > 0 for h in cb.history)


# ------------------------------------------------------------------------------------------------ selection
class _Fixed(torch.nn.Module):
    """A fake LM: uniform logits, except that a window starting with token 0 is confidently predicted wrong,
    by `badness` times the window's second token (so each window's gap is known)."""

    def __init__(self, badness: float) -> None:
        super().__init__()
        self.badness = badness
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, 8)
        scale = self.badness * input_ids[:, 1].float() * (input_ids[:, 0] == 0).float()
        wrong = (input_ids.roll(-1, dims=1) + 1) % 8
        logits.scatter_(-1, wrong.unsqueeze(-1), scale.view(-1, 1, 1).expand(-1, input_ids.shape[1], 1))
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("metric", ["loss_gap", "kl"])
def test_selection_picks_the_windows_with_the_largest_gap(metric):
    windows = torch.tensor([[1, 5, 2, 3], [0, 1, 2, 3], [0, 7, 1, 2], [2, 2, 2, 2], [0, 3, 4, 5], [0, 6, 1, 1]])
    scores, _ = window_scores(_Fixed(1.0), _Fixed(0.0), windows, metric, batch_size=4)
    # gaps grow with the second token among windows starting with 0, and are 0 elsewhere
    assert scores[0] == pytest.approx(0, abs=1e-6) and scores[3] == pytest.approx(0, abs=1e-6)
    assert select_top(scores, 2).tolist() == [2, 5]
    assert select_top(scores, 3).tolist() == [2, 4, 5]


def test_repair_selects_what_window_scores_ranks_first():
    student, teacher = _pair()
    windows = random_windows(24, 16)
    scores, _ = window_scores(student, teacher, windows)
    expected = sorted(torch.argsort(scores, descending=True)[:8].tolist())
    _, report = repair(copy.deepcopy(student), train_data=windows, config=RepairConfig(
        teacher=teacher, select="degradation", max_tokens=8 * 16, **FAST))
    assert report.selected_windows == expected and report.select_seconds > 0


# ------------------------------------------------------------------------------------------------ teacher cache
def test_cached_teacher_gives_the_same_loss_as_the_live_teacher(tmp_path):
    student, teacher = _pair()
    windows = random_windows(8, 16)
    cfg = RepairConfig(objective="kd+lm", teacher=teacher, kd_top_k=6, temperature=1.5, **FAST)
    cache = TeacherCache(tmp_path / "cache", windows, teacher, k=6, shard=3)
    assert not cache.valid()
    cache.fill(teacher, windows, batch_size=4)
    assert cache.valid() and len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    inputs = {"input_ids": windows[2:6], "labels": windows[2:6].clone(), "window_index": torch.arange(2, 6)}
    live = DistillTrainer.compute_loss(SimpleNamespace(repair_config=cfg, teacher=teacher, cache=None), student,
                                       dict(inputs))
    cached = DistillTrainer.compute_loss(SimpleNamespace(repair_config=cfg, teacher=None, cache=cache), student,
                                         dict(inputs))
    assert float(cached.detach()) == pytest.approx(float(live.detach()), rel=1e-6) and float(live.detach()) > 0
    # another teacher or other windows never read these files
    other = TeacherCache(tmp_path / "cache", windows, prune_(copy.deepcopy(teacher), 0.5), k=6, shard=3)
    assert not other.valid()
    # end to end: the same run with the cache and with the live teacher ends with the same weights
    runs = []
    for mode in (True, False):
        out, report = repair(copy.deepcopy(student), train_data=windows, config=RepairConfig(
            method="full_ft", objective="kd", teacher=teacher, kd_top_k=6, teacher_cache=mode, **FAST))
        runs.append((out.state_dict(), report.teacher_mode))
    assert [m for _, m in runs] == ["cache", "live"]
    for k, v in runs[0][0].items():
        torch.testing.assert_close(v, runs[1][0][k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ resume
class _Stop(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):  # step 4 done and checkpointed
        if state.global_step == 4:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["seft", "masked_lora"])
def test_resumed_repair_ends_with_the_same_masks(tmp_path, method):
    student, teacher = _pair()
    windows = random_windows(32, 16)
    base = dict(FAST, method=method, teacher=teacher, objective="kd", max_steps=8, save_steps=2, seft_interval=2,
                learning_rate=1e-3)
    full, _ = repair(copy.deepcopy(student), train_data=windows,
                     config=RepairConfig(output_dir=str(tmp_path / "a"), **base))
    interrupted = copy.deepcopy(student)
    with pytest.raises(KeyboardInterrupt):
        repair(interrupted, train_data=windows, config=RepairConfig(output_dir=str(tmp_path / "b"), **base),
               callbacks=[_Stop()])
    assert (tmp_path / "b" / "checkpoint-4").is_dir()
    resumed, report = repair(interrupted, train_data=windows, config=RepairConfig(
        output_dir=str(tmp_path / "b"), resume_from_checkpoint=True, **base))
    assert report.steps == 8
    assert _same_zero_sets(zero_masks(resumed), zero_masks(full))
    if method == "seft":
        assert not _same_zero_sets(zero_masks(resumed), zero_masks(student))


# ------------------------------------------------------------------------------------------------ config, budget, bf16
@pytest.mark.parametrize("kwargs,field", [
    (dict(objective="kd"), "teacher"),
    (dict(objective="distill"), "objective"),
    (dict(hidden_loss="mse"), "hidden_loss"),
    (dict(select="degradation", teacher="x"), "max_tokens"),
    (dict(select="random", teacher="x"), "select"),
    (dict(temperature=0, teacher="x", objective="kd"), "temperature"),
    (dict(kd_top_k=0), "kd_top_k"),
    (dict(teacher_cache=True, teacher="x", objective="kd"), "teacher_cache"),
    (dict(method="seft", merge=False), "merge"),
    (dict(seft_fraction=1.5), "seft_fraction"),
    (dict(seft_drop="random"), "seft_drop"),
    (dict(bf16="yes"), "bf16"),
    (dict(save_steps=2), "output_dir"),
    (dict(teacher=3, objective="kd"), "teacher"),
])
def test_bad_recovery_fields_are_named(kwargs, field):
    with pytest.raises(RepairConfigError, match=f"`{field}`"):
        RepairConfig(**kwargs)


def test_max_tokens_budget_one_epoch_and_record():
    student, teacher = _pair()
    cfg = RepairConfig(teacher=teacher, objective="kd", max_tokens=10 * 16, **{**FAST, "max_steps": None})
    _, report = repair(student, train_data=random_windows(32, 16), config=cfg)
    assert report.train_windows == 10 and report.steps == 3 and report.tokens_seen == 3 * 4 * 16
    assert report.config["teacher"] == "<LlamaForCausalLM>" and report.to_json()


def test_bf16_auto_follows_the_hardware():
    student, teacher = _pair()
    out, report = repair(student, train_data=random_windows(16, 16),
                         config=RepairConfig(method="full_ft", bf16="auto", teacher=teacher, objective="kd", **FAST))
    assert report.bf16 == native_bf16() and report.zeros_preserved
    assert all(p.dtype == torch.float32 for p in out.parameters())  # fp32 master weights


def test_docs_recovery_recipe_runs():
    """The recipe block of docs/repair.md, run on the tiny pair (sizes scaled down, data as token ids)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "repair.md").read_text()
    block = next(b for b in text.split("```python")[1:] if "# recovery recipe" in b).split("```")[0]
    for old, new in (('"c4_train.jsonl"', "train_windows"), ("max_tokens=262_144", "max_tokens=8 * 16"),
                     ("seqlen=256", "seqlen=16"), ("per_device_train_batch_size=8", "per_device_train_batch_size=4")):
        assert old in block, old
        block = block.replace(old, new)
    student, teacher = _pair()
    before = zero_masks(student)
    namespace = {"dense_model": teacher, "pruned_model": student, "tokenizer": None,
                 "train_windows": random_windows(24, 16)}
    exec(compile(block, "docs/repair.md", "exec"), namespace)
    report = namespace["report"]
    assert report.objective == "kd" and report.tokens_seen == 2 * 4 * 16 and report.teacher_mode == "cache"
    assert _same_zero_sets(zero_masks(namespace["model"]), before)


ASSETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets"
STORIES = ASSETS / "models" / "stories260K"


@pytest.mark.assets
@pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/assets/models/stories260K")
def test_cli_recovery_flags_and_card(tmp_path, capsys):
    import argparse
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_owl.commands import repair as repair_cmd
    from optimum_owl.hub.sections import repair_section

    model = prune_(AutoModelForCausalLM.from_pretrained(STORIES), 0.5)
    model.save_pretrained(tmp_path / "pruned")
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(tmp_path / "pruned")
    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"Once upon a time {i} children played in park number {i * 7}." for i in range(300)))
    parser = argparse.ArgumentParser()
    repair_cmd.register(parser.add_subparsers())
    args = parser.parse_args([
        "repair", str(tmp_path / "pruned"), "--train-data", str(text), "--output-dir", str(tmp_path / "out"),
        "--seqlen", "32", "--batch-size", "2", "--method", "seft", "--lr", "1e-3", "--objective", "kd+lm",
        "--teacher", str(STORIES), "--kd-top-k", "16", "--select", "degradation", "--max-tokens", "256",
        "--temperature", "2", "--seft-interval", "1", "--bf16", "auto",
    ])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["objective"] == "kd+lm" and summary["tokens_seen"] == 256 and summary["nnz_preserved"]
    record = json.loads((tmp_path / "out" / "repair_report.json").read_text())
    assert record["teacher_mode"] == "cache" and len(record["selected_windows"]) == 8 and record["seft_swaps"] > 0
    card = "\n".join(repair_section(record, False))
    assert "distillation from the dense model" in card and "256 training tokens" in card
    assert "8 of" in card and "SEFT" in card and "each matrix kept its sparsity" in card
    bad = parser.parse_args(["repair", str(tmp_path / "pruned"), "--train-data", str(text), "-o", str(tmp_path / "x"),
                             "--objective", "kd"])
    with pytest.raises(RepairConfigError, match="`teacher`"):
        bad.func(bad)

"""Sparse repair: masked LoRA keeps every pruned zero; callbacks keep / log / grow sparsity; bad input is refused."""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from optimum_owl.algorithms.masks import is_valid_nm  # noqa: E402
from optimum_owl.repair import (  # noqa: E402
    GradualPruningCallback,
    MaskedLoraLinear,
    RepairConfig,
    RepairConfigError,
    RepairDataError,
    RepairModelError,
    RepairWarning,
    SparsityLoggingCallback,
    SparsityPreservingCallback,
    add_sparsity_logging,
    attach_masked_lora,
    block_sparsity,
    cubic_sparsity,
    load_masked_adapter,
    merge_masked_lora,
    repair,
    save_masked_adapter,
    save_repaired,
    zero_masks,
    zeros_lost,
)
from optimum_owl.repair.masked_lora import _MaskedLoRAFn  # noqa: E402
from optimum_owl.repair.train import TokenWindows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repair_helpers import prune_, random_windows, tiny_llama  # noqa: E402

FAST = dict(r=4, seqlen=16, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=3)


def _mlp_nm_ok(model, n=2, m=4) -> bool:
    return all(
        is_valid_nm(mod.weight, n, m)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and ".mlp." in name
    )


def _randomise_adapters(peft_model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ------------------------------------------------------------------------------------------------ masked LoRA math
def test_fused_masked_lora_matches_autograd_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64)
    w[w.abs() < 0.6] = 0
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64)
    fn = lambda x, a, b: _MaskedLoRAFn.apply(x, w, bias, a, b, w == 0, 1.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b))
    ref = torch.nn.functional.linear(x, w + 1.5 * (b @ a) * (w != 0), bias)
    assert torch.allclose(fn(x, a, b), ref)


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_repair_keeps_every_zero_and_nm(nm):
    model = prune_(tiny_llama(), 0.5, nm)
    before = zero_masks(model)
    _, total_before = block_sparsity(model)
    out, report = repair(model, train_data=random_windows(32, 16), config=RepairConfig(**FAST))
    assert type(out).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, MaskedLoraLinear) for m in out.modules())
    assert zeros_lost(out, before) == {}
    # every zero set identical (a kept weight landing exactly on 0 would be allowed but must not happen here)
    after = zero_masks(out)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert report.sparsity_before == report.sparsity_after == pytest.approx(total_before)
    assert report.zeros_preserved and report.steps == 6
    assert report.merged_max_abs_logit_diff is not None and report.merged_max_abs_logit_diff < 1e-5
    if nm is not None:
        assert _mlp_nm_ok(out)
    # the adapter really changed the weights that survived
    ref = prune_(tiny_llama(), 0.5, nm)
    q_ref = ref.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(out.model.layers[0].self_attn.q_proj.weight, q_ref)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["fused", "two-matmul"])
def test_merged_logits_equal_unmerged_adapter_logits(dropout):
    model = prune_(tiny_llama(), 0.5, (2, 4))
    peft_model = attach_masked_lora(model, RepairConfig(r=4, lora_dropout=dropout))
    _randomise_adapters(peft_model)
    ids = random_windows(2, 16, seed=3)
    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
    assert (unmerged - plain).abs().max() > 1e-2  # the adapter matters
    merged = merge_masked_lora(peft_model)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert torch.allclose(merged_logits, unmerged, atol=1e-5, rtol=0)
    assert _mlp_nm_ok(merged)


def test_plain_lora_would_densify_and_merge_refuses_it():
    from peft import LoraConfig, get_peft_model

    model = prune_(tiny_llama(), 0.5)
    plain = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(RepairModelError, match="plain LoRA"):
        merge_masked_lora(plain)


# ------------------------------------------------------------------------------------------------ adapters on disk
def test_adapter_round_trip_restores_masking(tmp_path):
    model = prune_(tiny_llama(), 0.5, (2, 4))
    pristine = copy.deepcopy(model)
    peft_model = attach_masked_lora(model, RepairConfig(r=4))
    _randomise_adapters(peft_model, seed=1)
    ids = random_windows(2, 16, seed=4)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    save_masked_adapter(peft_model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in files and "owl_masked_lora.json" in files
    assert not any("mask" in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(FileExistsError):
        save_masked_adapter(peft_model, tmp_path / "adapter")

    loaded = load_masked_adapter(pristine, tmp_path / "adapter")
    layers = [m for m in loaded.modules() if isinstance(m, MaskedLoraLinear)]
    assert len(layers) == 14 and all(m.owl_pruned_mask.any() for m in layers)
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
    merged = merge_masked_lora(loaded)
    assert _mlp_nm_ok(merged)

    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_dir"):
        load_masked_adapter(tiny_llama(), tmp_path / "plain")


def test_save_repaired_is_a_pruned_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = prune_(tiny_llama(), 0.5, (2, 4))
    out, report = repair(model, train_data=random_windows(16, 16), config=RepairConfig(**FAST))
    save_repaired(out, tmp_path / "ckpt", report=report)
    assert json.loads((tmp_path / "ckpt" / "repair_report.json").read_text())["zeros_preserved"] is True
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    for k, v in zero_masks(out).items():
        assert torch.equal(zero_masks(back)[k], v)


# ------------------------------------------------------------------------------------------------ callbacks
def _train(model, callbacks, tmp_path, steps=6, accum=1, wd=0.1, bf16=False, lr=1e-2):
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4, learning_rate=lr,
        weight_decay=wd, gradient_accumulation_steps=accum, logging_steps=2, report_to="none",
        save_strategy="no", disable_tqdm=True, bf16=bf16, seed=0, use_cpu=bf16 and not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenWindows(random_windows(32, 16)), callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.mark.parametrize("accum,bf16", [(1, False), (2, False), (2, True)], ids=["plain", "accum2", "accum2-bf16"])
def test_preserving_callback_keeps_sparsity_under_adamw_weight_decay(tmp_path, accum, bf16):
    model = prune_(tiny_llama(), 0.5, (2, 4)).train()
    before = zero_masks(model)
    _train(model, [SparsityPreservingCallback()], tmp_path, accum=accum, bf16=bf16)
    assert zeros_lost(model, before) == {}
    assert _mlp_nm_ok(model)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, prune_(tiny_llama(), 0.5, (2, 4)).model.layers[0].self_attn.q_proj.weight)


def test_without_callback_training_densifies(tmp_path):
    # control for the test above: AdamW + weight decay really do move the pruned weights
    model = prune_(tiny_llama(), 0.5).train()
    before = zero_masks(model)
    _train(model, [], tmp_path)
    assert zeros_lost(model, before)


def test_logging_callback_reaches_log_history_and_loggers(tmp_path):
    seen = {}

    class Spy(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.update(logs or {})

    model = prune_(tiny_llama(), 0.5).train()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=2,
                             report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenWindows(random_windows(16, 16)),
                      callbacks=[Spy(), SparsityPreservingCallback()])
    add_sparsity_logging(trainer, SparsityLoggingCallback())
    trainer.train()
    assert seen["sparsity/total"] == pytest.approx(0.5, abs=1e-6)
    assert seen["sparsity/block_0"] == pytest.approx(0.5, abs=1e-6) and "sparsity/block_1" in seen
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("sparsity/block_1" in h for h in logged)


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.8, 0, 100) == 0.0
    assert cubic_sparsity(100, 0.8, 0, 100) == 0.8
    assert cubic_sparsity(50, 0.8, 0, 100) == pytest.approx(0.8 * (1 - 0.5**3))
    values = [cubic_sparsity(t, 0.8, 10, 90, 0.1) for t in range(0, 120, 5)]
    assert values == sorted(values) and values[0] == 0.1 and values[-1] == 0.8


def test_gradual_pruning_reaches_target_with_owl(tmp_path):
    model = tiny_llama(layers=3).train()
    cb = GradualPruningCallback(final_sparsity=0.6, start_step=0, end_step=8, frequency=2, owl_lambda=0.1)
    _train(model, [cb], tmp_path, steps=10, wd=0.1)
    targets = [h["target"] for h in cb.history]
    achieved = [h["achieved"] for h in cb.history]
    assert [h["step"] for h in cb.history] == [2, 4, 6, 8]
    assert targets == sorted(targets) and targets[-1] == 0.6
    assert achieved == sorted(achieved)
    blocks, total = block_sparsity(model)
    assert total == pytest.approx(0.6, abs=0.02)  # per-row floors round each row down
    assert total == pytest.approx(achieved[-1], abs=1e-9)  # nothing grew back in the last 2 steps
    assert max(blocks) - min(blocks) > 0.01  # OWL gave blocks different sparsities
    assert cb.history[-1]["outlier_ratios"]


# ------------------------------------------------------------------------------------------------ bad input
def test_no_zeros_warns_and_explains():
    model = tiny_llama()
    with pytest.warns(RepairWarning, match="no zeros"):
        out, report = repair(model, train_data=random_windows(16, 16), config=RepairConfig(**FAST))
    assert report.sparsity_before == 0.0


def test_quantized_base_is_refused():
    model = prune_(tiny_llama(), 0.5)
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(RepairModelError, match="quant_method='gptq'"):
        attach_masked_lora(model, RepairConfig(r=4))
    model = prune_(tiny_llama(), 0.5)
    model.model.layers[0].mlp.down_proj.register_buffer("qweight", torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(RepairModelError, match="quantized"):
        repair(model, train_data=random_windows(16, 16), config=RepairConfig(**FAST))


def test_owl_pruned_model_marked_quantized_is_accepted():
    model = prune_(tiny_llama(), 0.5)
    model.config.quantization_config = {"quant_method": "owl", "sparsity": 0.5}
    attach_masked_lora(model, RepairConfig(r=4))


def test_targets_matching_nothing_name_the_field():
    with pytest.raises(RepairConfigError, match="target_modules"):
        attach_masked_lora(prune_(tiny_llama(), 0.5), RepairConfig(target_modules=["*nonexistent_proj"]))
    with pytest.raises(RepairConfigError, match="target_modules"):
        RepairConfig(target_modules="q_proj")
    peft_model = attach_masked_lora(prune_(tiny_llama(), 0.5), RepairConfig(r=2, target_modules=["*q_proj", "*v_proj"]))
    assert sum(isinstance(m, MaskedLoraLinear) for m in peft_model.modules()) == 4


@pytest.mark.parametrize(
    "data,match",
    [([], "train_data"), (["   ", ""], "train_data"), (torch.zeros(0, 16, dtype=torch.long), "train_data"),
     (None, "train_data"), (["a b"], "seqlen")],
)
def test_empty_or_short_dataset_names_the_field(data, match):
    class ToyTok:
        def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
            return {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])}

    with pytest.raises(RepairDataError, match=match):
        repair(prune_(tiny_llama(), 0.5), ToyTok(), train_data=data, config=RepairConfig(**FAST))


def test_missing_file_and_bad_config_fields():
    with pytest.raises(FileNotFoundError, match="train_data"):
        repair(prune_(tiny_llama(), 0.5), object(), train_data="/nonexistent/train.jsonl", config=RepairConfig(**FAST))
    for field, value in [("r", 0), ("method", "dora"), ("lora_dropout", 1.0), ("seqlen", 1), ("learning_rate", 0)]:
        with pytest.raises(RepairConfigError, match=field):
            RepairConfig(**{field: value})


class _Boom(TrainerCallback):
    def __init__(self, exc):
        self.exc = exc

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise self.exc


@pytest.mark.parametrize("method", ["masked_lora", "full_ft"])
def test_interrupted_training_leaves_the_pruned_model_as_it_was(method):
    model = prune_(tiny_llama(), 0.5, (2, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(KeyboardInterrupt):
        repair(model, train_data=random_windows(32, 16), config=RepairConfig(method=method, **FAST),
               callbacks=[_Boom(KeyboardInterrupt())])
    assert [n for n, _ in model.named_modules()] == names
    assert not any(isinstance(m, MaskedLoraLinear) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_full_ft_repair_keeps_zeros():
    model = prune_(tiny_llama(), 0.5, (2, 4))
    before = zero_masks(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RepairWarning)
        out, report = repair(model, train_data=random_windows(32, 16),
                             config=RepairConfig(method="full_ft", weight_decay=0.1, gradient_accumulation_steps=2, **FAST))
    assert out is model and zeros_lost(model, before) == {} and _mlp_nm_ok(model)
    assert report.num_targets == 14 and report.zeros_preserved


# ------------------------------------------------------------------------------------------------ CLI
ASSETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets"
STORIES = ASSETS / "models" / "stories260K"


@pytest.mark.assets
@pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/assets/models/stories260K")
def test_cli_repair_on_stories260k(tmp_path, capsys):
    import argparse

    from transformers import AutoModelForCausalLM

    from optimum_owl.commands import repair as repair_cmd

    model = prune_(AutoModelForCausalLM.from_pretrained(STORIES), 0.5)
    model.save_pretrained(tmp_path / "pruned")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(STORIES).save_pretrained(tmp_path / "pruned")
    text = tmp_path / "train.txt"
    text.write_text("Once upon a time there was a little girl named Lily. She liked to play in the park. " * 40)
    parser = argparse.ArgumentParser()
    repair_cmd.register(parser.add_subparsers())
    args = parser.parse_args([
        "repair", str(tmp_path / "pruned"), "--train-data", str(text), "--output-dir", str(tmp_path / "out"),
        "--max-steps", "3", "--seqlen", "32", "--batch-size", "2", "--r", "4", "--eval-data", str(text),
    ])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["zeros_preserved"] and summary["sparsity_before"] == summary["sparsity_after"]
    assert summary["eval_ppl_after"] < summary["eval_ppl_before"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert zeros_lost(back, zero_masks(model)) == {}
    assert (tmp_path / "out" / "repair_report.json").is_file()


def test_gpt2_conv1d_masked_lora_keeps_zeros():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = prune_(GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval(), 0.5)
    before = zero_masks(model)
    peft_model = attach_masked_lora(model, RepairConfig(r=4, lora_dropout=0.1))
    assert sum(isinstance(m, MaskedLoraLinear) for m in peft_model.modules()) == 8
    _randomise_adapters(peft_model, seed=2)
    peft_model.eval()
    ids = random_windows(2, 16, seed=5)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
    merged = merge_masked_lora(peft_model)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, unmerged, atol=1e-5, rtol=0)
    assert zeros_lost(merged, before) == {}

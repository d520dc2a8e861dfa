"""`from_pretrained(..., quantization_config=OWLPrunerConfig(...))`: prune on load, registration, offload rules,
and what happens without `import optimum_owl`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import optimum_owl  # noqa: F401
from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.formats import OWLHfQuantizer, mark_pruned
from optimum_owl.integration import transformers as owl_tf
from optimum_owl.integration.transformers import OWLPruningQuantizer
from optimum_owl.pruning.modeling import get_blocks_and_units

from .conftest import ASSETS, calib_ids, needs_assets, tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dense_dir(tmp_path):
    model = tiny_model("llama", layers=2)
    model.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def unit_sparsity(model) -> float:
    _, _, units = get_blocks_and_units(model)
    zeros = total = 0
    for block in units:
        for unit in block:
            zeros += int((unit.weight() == 0).sum())
            total += unit.weight().numel()
    return zeros / total


def test_registered_with_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["owl"] is OWLPruningQuantizer and issubclass(OWLPruningQuantizer, OWLHfQuantizer)
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["owl"] is OWLPrunerConfig
    owl_tf.register()  # idempotent: a second registration must not raise
    assert owl_tf.is_registered()


def test_prune_on_load_matches_in_memory_pruning(dense_dir, tmp_path):
    config = OWLPrunerConfig(sparsity=0.6, method="wanda", layerwise="owl", owl_lambda=0.05, num_samples=4, seqlen=16,
                             batch_size=2, dataset=calib_ids(4, 16))
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config)
    assert model.owl_report.sparsity == pytest.approx(0.6, abs=0.03)
    assert unit_sparsity(model) == pytest.approx(model.owl_report.sparsity)

    reference = AutoModelForCausalLM.from_pretrained(dense_dir)
    OWLPruner(config).prune(reference, dataset=calib_ids(4, 16))
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key

    model.save_pretrained(tmp_path / "pruned")
    qc = json.loads((tmp_path / "pruned" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "owl" and qc["sparsity"] == 0.6 and qc["method"] == "wanda"
    assert "dataset" not in qc and "tokenizer" not in qc
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert reloaded.hf_quantizer.pre_quantized and not hasattr(reloaded, "owl_report")
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


def test_prune_on_load_skipped_for_pruned_checkpoint(dense_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        dense_dir, quantization_config=OWLPrunerConfig(sparsity=0.5, method="magnitude", layerwise="uniform")
    )
    model.save_pretrained(tmp_path / "p")
    again = AutoModelForCausalLM.from_pretrained(
        tmp_path / "p", quantization_config=OWLPrunerConfig(sparsity=0.8, method="magnitude", layerwise="uniform")
    )
    assert again.hf_quantizer.pre_quantized  # the checkpoint's config wins; nothing is pruned twice
    assert unit_sparsity(again) == pytest.approx(0.5, abs=0.01)


@needs_assets
def test_prune_on_load_text_data_uses_the_models_tokenizer(tmp_path):
    texts = [json.loads(line)["text"] for line in (ASSETS / "text" / "c4_train_first1000.jsonl").open()][:20]
    config = OWLPrunerConfig(sparsity=0.5, method="wanda", layerwise="uniform", num_samples=4, seqlen=32, dataset=texts)
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "models" / "stories260K", quantization_config=config)
    assert model.owl_report.calibration["num_samples"] == 4
    assert unit_sparsity(model) == pytest.approx(0.5, abs=0.01)
    model.save_pretrained(tmp_path)
    assert "dataset" not in json.loads((tmp_path / "config.json").read_text())["quantization_config"]


def test_compact_checkpoint_loads_with_disk_offload(dense_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        dense_dir, quantization_config=OWLPrunerConfig(sparsity=0.7, method="magnitude", layerwise="uniform")
    )
    model.save_pretrained(tmp_path / "p")
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p", device_map="auto", max_memory={"cpu": "30KB"},
                                                     offload_folder=str(tmp_path / "off"))
    assert "disk" in set(offloaded.hf_device_map.values())
    ids = calib_ids(1, 8)
    assert torch.equal(model(ids).logits, offloaded(ids).logits)
    offloaded.save_pretrained(tmp_path / "resaved")  # offloaded (meta) weights are read back and compressed
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_mark_pruned_rules():
    model = tiny_model("llama", layers=2)
    mark_pruned(model)  # no config: a default OWLPrunerConfig is recorded
    assert isinstance(model.config.quantization_config, OWLPrunerConfig)
    quantizer = model.hf_quantizer
    mark_pruned(model, OWLPrunerConfig(sparsity=0.3))  # idempotent: same quantizer, new config
    assert model.hf_quantizer is quantizer and model.config.quantization_config.sparsity == 0.3
    assert mark_pruned(torch.nn.Linear(2, 2)) is not None  # not a transformers model: nothing attached

    class Other:
        class quantization_config:  # noqa: N801
            quant_method = "gptq"

    model.hf_quantizer = Other()
    with pytest.raises(ValueError, match="gptq"):
        mark_pruned(model)


def _run(code: str, *, import_owl: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    prefix = "import optimum_owl\n" if import_owl else ""
    return subprocess.run([sys.executable, "-c", prefix + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_lazy_registration_and_loading_without_import(dense_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        dense_dir, quantization_config=OWLPrunerConfig(sparsity=0.7, method="magnitude", layerwise="uniform")
    )
    model.save_pretrained(tmp_path / "p")
    code = f"""
        import sys
        lazy = "transformers.quantizers.auto" not in sys.modules
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "p")!r})
        print("LAZY", lazy, "QUANTIZER", type(m.hf_quantizer).__name__)
    """
    ok = _run(code, import_owl=True)
    assert ok.returncode == 0, ok.stderr
    assert "LAZY True QUANTIZER OWLPruningQuantizer" in ok.stdout
    # Without `import optimum_owl`, transformers warns about the unknown quant method and refuses the compressed
    # weights (their stored shapes differ), so a compact checkpoint can never load as a silently wrong model.
    bad = _run(code, import_owl=False)
    assert bad.returncode != 0
    assert "Unknown quantization type, got owl" in bad.stderr
    assert "size mismatch" in bad.stderr or "ignore_mismatched_sizes" in bad.stderr


def test_prune_on_load_marks_once_and_attaches_the_report_once(dense_dir, monkeypatch):
    """The plugin runs the core once, then attaches the report and marks the model once (issue 10)."""
    from optimum_owl.pruning import engine

    marks, runs = [], []
    real_mark, real_prune = owl_tf.mark_pruned, engine.prune_model
    monkeypatch.setattr(owl_tf, "mark_pruned", lambda model, config=None: marks.append(1) or real_mark(model, config))
    monkeypatch.setattr(engine, "prune_model", lambda *a, **k: runs.append(1) or real_prune(*a, **k))
    config = OWLPrunerConfig(sparsity=0.5, method="magnitude", layerwise="uniform")
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config)
    assert (runs, marks) == ([1], [1])
    assert model.owl_report.sparsity == pytest.approx(0.5, abs=0.01)

"""Resumable runs: `checkpoint_dir` saves the state after each finished block; a rerun continues with identical masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from optimum_owl import OWLConfigError, OWLPruner, OWLPrunerConfig
from optimum_owl.errors import ResumeMismatchError
from optimum_owl.pruning.modeling import get_blocks_and_units
from optimum_owl.pruning.offload import BlockOffloader
from optimum_owl.pruning.resume import STATE_FILE

NUM_LAYERS = 4
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "cpu",
    "model.layers.2": "disk",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}
ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))


def _config(**kw) -> OWLPrunerConfig:
    base = dict(sparsity=0.5, method="wanda", layerwise="owl", owl_m=3.0, owl_lambda=0.08, num_samples=8, seqlen=16, batch_size=4)
    base.update(kw)
    return OWLPrunerConfig(**base)


def _masks(model) -> dict[str, torch.Tensor]:
    _, blocks, units = get_blocks_and_units(model)
    offloader = BlockOffloader(model)
    out = {}
    for i, block in enumerate(blocks):
        with offloader(i, block):
            for u in units[i]:
                out[u.name] = u.weight().detach().cpu().clone()
    return out


def _load(path: Path, offload: Path | None = None):
    if offload is None:
        return AutoModelForCausalLM.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, device_map=DEVICE_MAP, offload_folder=str(offload))


def _count_calls(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Record which blocks get pruned; raise `Interrupted` before pruning block `fail_at`."""
    calls: list[int] = []
    from optimum_owl.pruning import passes

    original = passes.prune_block

    def spy(state, index, stats, plan):
        if fail_at is not None and index == fail_at:
            raise Interrupted(f"interrupted at block {index}")
        calls.append(index)
        return original(state, index, stats, plan)

    monkeypatch.setattr(passes, "prune_block", spy)
    return calls


@pytest.mark.parametrize(
    "method,layerwise,offloaded",
    [("wanda", "owl", False), ("wanda", "owl", True), ("sparsegpt", "owl", False), ("magnitude", "uniform", True),
     ("wanda", "dlp", False), ("sparsegpt", "alphapruning", False), ("wanda", "atp", False), ("magnitude", "atp", False)],
)
def test_interrupt_and_resume_gives_identical_masks(checkpoint, calib, tmp_path, monkeypatch, method, layerwise, offloaded):
    cfg = dict(method=method, layerwise=layerwise, dlp_alpha=0.2, alphapruning_epsilon=0.3, atp_beta=0.05)
    ref = _load(checkpoint)
    ref_report = OWLPruner(_config(**cfg)).prune(ref, dataset=calib)
    expected = _masks(ref)

    ckpt = tmp_path / "run"
    with monkeypatch.context() as m:
        calls = _count_calls(m, fail_at=2)
        with pytest.raises(Interrupted):
            OWLPruner(_config(checkpoint_dir=str(ckpt), **cfg)).prune(
                _load(checkpoint, tmp_path / "off1" if offloaded else None), dataset=calib
            )
    assert calls == [0, 1]
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["finished"] == 2
    if method != "magnitude":
        assert (ckpt / "inputs_00002.pt").exists() and not (ckpt / "inputs_00001.pt").exists()

    model = _load(checkpoint, tmp_path / "off2" if offloaded else None)
    with monkeypatch.context() as m:
        calls = _count_calls(m)
        report = OWLPruner(_config(checkpoint_dir=str(ckpt), **cfg)).prune(model, dataset=calib)
    assert calls == [2, 3]  # finished blocks are restored, not recomputed
    got = _masks(model)
    for name, w in expected.items():
        assert torch.equal(got[name] != 0, w != 0), name
        if method == "sparsegpt":
            assert torch.equal(got[name], w), name
    assert [b.achieved_sparsity for b in report.blocks] == [b.achieved_sparsity for b in ref_report.blocks]
    assert [b.outlier_ratio for b in report.blocks] == [b.outlier_ratio for b in ref_report.blocks]
    assert [b.metric for b in report.blocks] == [b.metric for b in ref_report.blocks]
    assert report.block_sparsities == ref_report.block_sparsities
    if layerwise != "uniform":
        assert len(set(report.block_sparsities)) > 1  # the family's own allocation, not uniform
    assert json.loads((ckpt / STATE_FILE).read_text())["finished"] == NUM_LAYERS


@pytest.mark.parametrize("layerwise", ["owl", "dlp"])
def test_outlier_pass_is_not_repeated(checkpoint, calib, tmp_path, monkeypatch, layerwise):
    ckpt = tmp_path / "run"
    with monkeypatch.context() as m:
        _count_calls(m, fail_at=0)
        with pytest.raises(Interrupted):
            OWLPruner(_config(checkpoint_dir=str(ckpt), layerwise=layerwise)).prune(_load(checkpoint), dataset=calib)
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["outlier_ratios"] is not None and state["mean_scores"] is not None

    def no_forward(*a, **k):
        raise AssertionError("the outlier pass ran again")

    with monkeypatch.context() as m:
        m.setattr("optimum_owl.pruning.passes.block_summary", no_forward)  # what the outlier pass computes per block
        report = OWLPruner(_config(checkpoint_dir=str(ckpt), layerwise=layerwise)).prune(_load(checkpoint), dataset=calib)
    ref = OWLPruner(_config(layerwise=layerwise)).prune(_load(checkpoint), dataset=calib)
    assert [b.outlier_ratio for b in report.blocks] == [b.outlier_ratio for b in ref.blocks]
    assert [b.metric for b in report.blocks] == [b.metric for b in ref.blocks]
    assert report.block_sparsities == ref.block_sparsities


def test_state_without_mean_scores_reruns_the_outlier_pass_for_dlp(checkpoint, calib, tmp_path, monkeypatch):
    """A state file written before mean scores were saved (OWL run format): DLP cannot plan from it, so the outlier
    pass runs again (it is deterministic; the saved plans must still match)."""
    from optimum_owl.pruning.resume import _state_digest

    ckpt = tmp_path / "run"
    with monkeypatch.context() as m:
        _count_calls(m, fail_at=2)
        with pytest.raises(Interrupted):
            OWLPruner(_config(checkpoint_dir=str(ckpt), layerwise="dlp")).prune(_load(checkpoint), dataset=calib)
    state = json.loads((ckpt / STATE_FILE).read_text())
    del state["mean_scores"]  # as written before this field existed
    state["state_sha256"] = _state_digest(state)
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    model = _load(checkpoint)
    with monkeypatch.context() as m:
        calls = _count_calls(m)
        report = OWLPruner(_config(checkpoint_dir=str(ckpt), layerwise="dlp")).prune(model, dataset=calib)
    assert calls == [2, 3]
    ref_model = _load(checkpoint)
    ref = OWLPruner(_config(layerwise="dlp")).prune(ref_model, dataset=calib)
    assert report.block_sparsities == ref.block_sparsities
    a, b = _masks(model), _masks(ref_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_completed_checkpoint_restores_everything(checkpoint, calib, tmp_path, monkeypatch):
    ckpt = tmp_path / "run"
    first = _load(checkpoint)
    OWLPruner(_config(checkpoint_dir=str(ckpt))).prune(first, dataset=calib)
    model = _load(checkpoint)
    with monkeypatch.context() as m:
        calls = _count_calls(m)
        OWLPruner(_config(checkpoint_dir=str(ckpt))).prune(model, dataset=calib)
    assert calls == []
    a, b = _masks(first), _masks(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mismatched_run_is_refused(checkpoint, calib, tmp_path, monkeypatch):
    ckpt = tmp_path / "run"
    with monkeypatch.context() as m:
        _count_calls(m, fail_at=1)
        with pytest.raises(Interrupted):
            OWLPruner(_config(checkpoint_dir=str(ckpt))).prune(_load(checkpoint), dataset=calib)
    with pytest.raises(ResumeMismatchError, match="checkpoint_dir"):  # other config
        OWLPruner(_config(checkpoint_dir=str(ckpt), sparsity=0.6)).prune(_load(checkpoint), dataset=calib)
    with pytest.raises(ResumeMismatchError, match=str(ckpt)):  # other calibration data
        OWLPruner(_config(checkpoint_dir=str(ckpt))).prune(_load(checkpoint), dataset=calib.flip(0))
    # settings that do not change the result may differ
    OWLPruner(_config(checkpoint_dir=str(ckpt), offload_activations=True, device="cpu")).prune(_load(checkpoint), dataset=calib)


def test_checkpoint_config_validation(tmp_path):
    with pytest.raises(OWLConfigError, match="checkpoint_dir"):
        OWLPrunerConfig(checkpoint_dir=str(tmp_path), propagation="dense")
    for search in ("owl-auto", "auto"):
        with pytest.raises(OWLConfigError, match="checkpoint_dir.*fixed layerwise"):
            OWLPrunerConfig(checkpoint_dir=str(tmp_path), layerwise=search)
    for fixed in ("uniform", "owl", "dlp", "alphapruning", "atp"):
        assert OWLPrunerConfig(checkpoint_dir=str(tmp_path), layerwise=fixed).checkpoint_dir == str(tmp_path)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OWLConfigError, match="checkpoint_dir"):
        OWLPruner(_config(checkpoint_dir=str(f), method="magnitude", layerwise="uniform")).prune(
            LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=32))
        )


@pytest.mark.slow
def test_killed_process_resumes(checkpoint, calib, tmp_path):
    """A hard kill (os._exit right after block 1's checkpoint, no cleanup) and a rerun in a new process."""
    ckpt = tmp_path / "run"
    calib_file = tmp_path / "calib.pt"
    torch.save(calib, calib_file)
    out = tmp_path / "masks.pt"
    script = textwrap.dedent(
        f"""
        import os, sys, torch
        from transformers import AutoModelForCausalLM
        from optimum_owl import OWLPruner, OWLPrunerConfig
        from optimum_owl.pruning import resume
        if sys.argv[1] == "kill":
            original = resume.ResumeState.block_done
            def block_done(self, index, units, next_inputs):
                original(self, index, units, next_inputs)
                if index == 1:
                    os._exit(17)
            resume.ResumeState.block_done = block_done
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})
        cfg = OWLPrunerConfig(sparsity=0.5, owl_m=3.0, num_samples=8, seqlen=16, batch_size=4,
                              checkpoint_dir={str(ckpt)!r})
        OWLPruner(cfg).prune(model, dataset=torch.load({str(calib_file)!r}))
        torch.save({{n: p.detach() != 0 for n, p in model.named_parameters() if "layers" in n and p.dim() == 2}},
                   {str(out)!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script, "kill"], env=env, capture_output=True, text=True)
    assert killed.returncode == 17, killed.stderr[-2000:]
    assert json.loads((ckpt / STATE_FILE).read_text())["finished"] == 2
    assert not out.exists()
    resumed = subprocess.run([sys.executable, "-c", script, "resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref = _load(checkpoint)
    OWLPruner(_config()).prune(ref, dataset=calib)
    got = torch.load(out)
    for name, keep in got.items():
        assert torch.equal(keep, ref.get_parameter(name) != 0), name

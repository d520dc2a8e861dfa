"""Model cards, the sparsity plot, and one-commit pushes against a real local HTTP Hub (tests/_fake_hub.py)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_owl.algorithms.masks import keep_mask_per_row
from optimum_owl.config import OWLPrunerConfig
from optimum_owl.pruning.modeling import get_blocks_and_units
from optimum_owl.pruning.report import BlockReport, PruneReport

from ._fake_hub import FakeHub

SECRET = "hf_owl_test_secret_token_0123456789"


def tiny_pruned_llama(sparsities=(0.6, 0.8), seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    _, _, units = get_blocks_and_units(model)
    blocks = []
    total = zeros = 0
    with torch.no_grad():
        for i, (block_units, s) in enumerate(zip(units, sparsities)):
            bz = bn = 0
            for u in block_units:
                w = u.weight()
                w.mul_(keep_mask_per_row(w.abs(), s))
                bz += int((w == 0).sum())
                bn += w.numel()
            blocks.append(BlockReport(i, f"model.layers.{i}", 0.01 * (i + 1), s, bz / bn, bn))
            total += bn
            zeros += bz
    config = OWLPrunerConfig(sparsity=0.7, num_samples=4, seqlen=32, dataset="c4")
    report = PruneReport(
        config=config.to_dict(), model={"class": "LlamaForCausalLM", "name_or_path": "tester/base-llama"},
        blocks=blocks, total_params=total, total_zeros=zeros,
        calibration={"num_samples": 4, "seqlen": 32, "source": "c4"},
    )
    return model, report, config


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_TOKEN", SECRET)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        import transformers.utils.hub as tf_hub

        monkeypatch.setattr(tf_hub, "_hf_api", None, raising=False)
        yield server


def _base_repo(hub: FakeHub, license: str = "mit") -> None:
    """A public base-model repo whose card declares a license (the push should carry it over)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("tester/base-llama", exist_ok=True)
    api.upload_file(
        path_or_fileobj=f"---\nlicense: {license}\n---\n# base\n".encode(),
        path_in_repo="README.md",
        repo_id="tester/base-llama",
    )


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="optimum-owl")
    sub = parser.add_subparsers(dest="command")
    for name in ("optimum_owl.commands.push", "optimum_owl.commands.export"):
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


# ------------------------------------------------------------------------------------------------ card + plot
def test_model_card_metadata_and_body(tmp_path):
    from huggingface_hub import ModelCard

    from optimum_owl.hub import render_model_card

    _, report, config = tiny_pruned_llama()
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\nbase model\n")
    report.model["name_or_path"] = str(base)
    card = render_model_card(
        report, config, base_model="tester/base-llama", license=None, repo_id="tester/tiny-owl",
        command="optimum-owl prune tester/base-llama --sparsity 0.7 -o out",
        eval_results=[{"dataset": "wikitext2", "metric": "perplexity", "value": 31.5, "dense_value": 25.25}],
    )
    text = str(card)
    parsed = ModelCard(text)
    meta = parsed.data.to_dict()
    assert meta["base_model"] == "tester/base-llama"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"pruned", "sparse", "owl", "wanda"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"  # carried from the base model's card (local folder here)
    assert meta["datasets"] == ["allenai/c4"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 31.5
    # body: table rows with the exact numbers, plot, eval, config, command, load snippet
    for b in report.blocks:
        assert f"| {b.index} | {b.outlier_ratio:.4%} | {b.target_sparsity:.4f} | {b.achieved_sparsity:.4f} |" in text
    assert "](owl_sparsity.png)" in text
    assert "| wikitext2 | perplexity | 31.5 | 25.25 |" in text
    assert json.dumps(config.to_dict(), indent=2, sort_keys=True) in text
    assert "optimum-owl prune tester/base-llama --sparsity 0.7 -o out" in text
    no_cmd = str(render_model_card(report, config, base_model="tester/base-llama", license="mit"))
    assert "optimum-owl prune tester/base-llama --calibration c4 --sparsity 0.7 --method wanda" in no_cmd
    assert 'AutoModelForCausalLM.from_pretrained("tester/tiny-owl")' in text
    assert f"{report.sparsity:.2%} sparsity" in text


def _card_command(card) -> list[str]:
    import shlex

    text = str(card)
    block = text.split("Equivalent command:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return shlex.split(block.split("\n# ", 1)[0])


def test_card_command_reproduces_every_family_and_search_knob_through_the_cli():
    from optimum_owl.cli import build_parser
    from optimum_owl.config_flags import config_from_args
    from optimum_owl.hub import render_model_card

    config = OWLPrunerConfig(
        sparsity=0.65, layerwise="auto", owl_m=7.0, dlp_alpha=0.2, alphapruning_epsilon=0.3, atp_beta=0.01,
        attention_shift=-0.05, auto_attention_shifts=[-0.05, 0.025], auto_families=["atp", "dlp"], auto_dlp_alphas=[0.1, 0.3], auto_atp_betas=[0.01, 0.02],
        auto_owl_ms=[4.0], auto_owl_lambdas=[0.1, 0.2], auto_alphapruning_epsilons=[0.25], auto_holdout=0.25,
        auto_finalists=2, refine="dsnot", dsnot_cycles=7, dsnot_threshold=0.01, wanda_group="layer",
        sparsegpt_blocksize=64, sparsegpt_damp=0.02, ignore=["*q_proj", "re:.*k_proj"], num_samples=16, seqlen=256,
        batch_size=4, seed=3, text_column="body",
    )
    argv = _card_command(render_model_card(None, config, base_model="tester/base-llama"))
    assert argv[:3] == ["optimum-owl", "prune", "tester/base-llama"]
    for flag in ("--dlp-alpha", "--alphapruning-epsilon", "--atp-beta", "--attention-shift", "--auto-families",
                 "--auto-atp-betas", "--auto-attention-shifts", "--refine", "--dsnot-cycles", "--wanda-group"):
        assert flag in argv
    assert config_from_args(build_parser().parse_args(argv[1:])) == config  # the round trip gives the same config
    # defaults stay short: knobs at their defaults are left out, the basic flags are always there
    plain = _card_command(render_model_card(None, OWLPrunerConfig(), base_model="b"))
    assert "--sparsity" in plain and "--owl-lambda" in plain and "--dlp-alpha" not in plain
    assert config_from_args(build_parser().parse_args(plain[1:])) == OWLPrunerConfig()


def test_card_command_names_fields_without_a_flag(monkeypatch):
    import optimum_owl.config_flags as flags
    from optimum_owl.hub import render_model_card

    monkeypatch.setattr(flags, "OPTIONAL_FIELDS", tuple(f for f in flags.OPTIONAL_FIELDS if f != "atp_beta"))
    text = str(render_model_card(None, OWLPrunerConfig(atp_beta=0.01), base_model="b"))
    assert "# not settable from the CLI, use the Python API for: atp_beta=0.01" in text and "--atp-beta" not in text


def test_card_for_unpruned_model_says_so():
    from optimum_owl.hub import render_model_card

    text = str(render_model_card(None, None, base_model="tester/base-llama", license="mit", weight_sparsity=0.0))
    assert "This model is not pruned" in text
    assert "Per-block sparsity" not in text


def test_plot_is_a_png(tmp_path):
    from optimum_owl.hub import plot_block_sparsity

    _, report, _ = tiny_pruned_llama()
    path = plot_block_sparsity(report, tmp_path / "p.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    report.blocks[0].outlier_ratio = None  # missing ratios still plot
    assert plot_block_sparsity(report, tmp_path / "q.png").exists()


# ------------------------------------------------------------------------------------------------ push
def test_push_one_commit_private_then_load_back(hub, tmp_path, caplog):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    from optimum_owl.hub import push_to_hub

    caplog.set_level(logging.DEBUG)
    _base_repo(hub, license="mit")
    model, report, config = tiny_pruned_llama()
    n_commits_before = 0
    info = push_to_hub(model, "tester/tiny-owl", report, config, private=True, commit_message="owl 70")
    repo = hub.repos["tester/tiny-owl"]
    assert repo.private
    assert len(repo.commits) == n_commits_before + 1 and repo.commits[0]["summary"] == "owl 70"
    files = hub.files("tester/tiny-owl")
    assert {"config.json", "model.safetensors", "owl_report.json", "owl_config.json", "README.md", "owl_sparsity.png"} <= set(files)
    assert info.oid == repo.commits[0]["oid"]
    assert PruneReport.from_json(files["owl_report.json"].decode()).blocks == report.blocks
    assert json.loads(files["owl_config.json"])["sparsity"] == 0.7
    card = ModelCard(files["README.md"].decode())
    assert card.data.license == "mit"  # carried from tester/base-llama's card on the Hub
    # the token was used for every write, and appears in no file nor log record
    writes = [r for r in hub.requests if r["method"] == "POST"]
    assert writes and all(r["auth"] == f"Bearer {SECRET}" for r in writes)
    assert all(SECRET.encode() not in content for content in files.values())
    assert SECRET not in caplog.text
    # load back from the server and compare with the pushed model
    loaded = AutoModelForCausalLM.from_pretrained("tester/tiny-owl", cache_dir=tmp_path / "dl")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # private: no token, no access
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("tester/tiny-owl")


def test_push_create_pr_and_revision(hub):
    from optimum_owl.hub import push_to_hub

    model, report, config = tiny_pruned_llama()
    info = push_to_hub(model, "tester/pr-owl", report, config)
    info_pr = push_to_hub(model, "tester/pr-owl", report, config, create_pr=True, commit_message="as PR")
    assert info_pr.pr_url and info_pr.pr_url.endswith("/discussions/1")
    assert "refs/pr/1" in hub.repos["tester/pr-owl"].branches
    push_to_hub(model, "tester/pr-owl", report, config, revision="sparse-70")
    assert "README.md" in hub.files("tester/pr-owl", "sparse-70")
    assert info.oid != info_pr.oid


def test_failed_upload_keeps_files_and_says_how_to_retry(hub, tmp_path):
    from optimum_owl.errors import HubUploadError
    from optimum_owl.hub import push_to_hub

    model, report, config = tiny_pruned_llama()
    hub.fail_commits = 1
    with pytest.raises(HubUploadError) as info:
        push_to_hub(model, "tester/flaky-owl", report, config)
    message = str(info.value)
    assert "optimum-owl push" in message and "--repo-id tester/flaky-owl" in message and SECRET not in message
    kept = Path(message.split("The files are kept in ")[1].split(";")[0])
    assert (kept / "model.safetensors").exists() and (kept / "owl_report.json").exists() and (kept / "README.md").exists()
    assert not hub.repos["tester/flaky-owl"].commits
    # the retry command works, uploads the kept folder unchanged in one commit
    before = sorted(p.name for p in kept.iterdir())
    assert _run_cli(["push", str(kept), "--repo-id", "tester/flaky-owl"]) == 0
    assert len(hub.repos["tester/flaky-owl"].commits) == 1
    assert sorted(p.name for p in kept.iterdir()) == before
    assert set(before) <= set(hub.files("tester/flaky-owl"))


def test_push_folder_with_onnx_export(hub, tmp_path):
    pytest.importorskip("onnxruntime")
    from optimum_owl.export import export_onnx
    from optimum_owl.hub import push_folder, save_for_hub

    model, report, config = tiny_pruned_llama()
    export_onnx(model, tmp_path / "onnx", validate=True, max_new_tokens=4, report=report)
    folder = tmp_path / "saved"
    folder.mkdir()
    save_for_hub(model, folder, report, config)
    push_folder(folder, "tester/with-onnx", onnx_dir=tmp_path / "onnx", base_model="tester/base-llama", license="mit")
    files = hub.files("tester/with-onnx")
    assert {"onnx/model.onnx", "onnx/owl_onnx.json", "model.safetensors"} <= set(files)
    readme = files["README.md"].decode()
    assert "## ONNX export" in readme and "`bitmask`" in readme and "identical to" in readme
    assert len(hub.repos["tester/with-onnx"].commits) == 1


def test_push_bad_input(tmp_path):
    from optimum_owl.hub import push_folder, push_to_hub

    model, report, config = tiny_pruned_llama()
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub(model, "", report, config)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        push_folder(tmp_path / "missing", "tester/x")
    with pytest.raises(FileNotFoundError, match="owl_onnx.json"):
        push_folder(tmp_path, "tester/x", onnx_dir=tmp_path)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="local_dir"):
        push_to_hub(model, "tester/x", report, config, local_dir=tmp_path / "exists")


def test_cli_export_onnx_and_push_then_run_download(hub, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import numpy as np
    from huggingface_hub import snapshot_download

    from optimum_owl.export import OnnxCausalLM
    from optimum_owl.hub import save_for_hub

    model, report, config = tiny_pruned_llama()
    folder = tmp_path / "pruned"
    folder.mkdir()
    save_for_hub(model, folder, report, config)
    out = tmp_path / "onnx"
    argv = ["export", "onnx", str(folder), "-o", str(out), "--max-new-tokens", "4", "--push-to-hub", "tester/onnx-only"]
    assert _run_cli(argv) == 0
    assert "pushed to tester/onnx-only" in capsys.readouterr().out
    files = hub.files("tester/onnx-only")
    assert {"model.onnx", "owl_onnx.json", "owl_report.json", "README.md", "owl_sparsity.png"} <= set(files)
    readme = files["README.md"].decode()
    assert "## ONNX export" in readme and "lm = OnnxCausalLM(folder)" in readme and "onnx" in readme.split("---")[1]
    local = snapshot_download("tester/onnx-only", cache_dir=tmp_path / "dl")
    ids = np.array([[5, 6, 7]])
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert np.array_equal(OnnxCausalLM(local).generate(ids, max_new_tokens=6), ref.numpy())


def test_save_for_hub_with_a_plain_dict_config_writes_a_versioned_validated_config(tmp_path):
    from optimum_owl.config import CONFIG_FORMAT_VERSION
    from optimum_owl.errors import OWLConfigError
    from optimum_owl.hub import save_for_hub

    model, report, config = tiny_pruned_llama()
    plain = {k: v for k, v in config.to_json_dict().items() if k != "format_version"}
    folder = tmp_path / "saved"
    folder.mkdir()
    save_for_hub(model, folder, report, plain)
    written = json.loads((folder / "owl_config.json").read_text())
    assert written["format_version"] == CONFIG_FORMAT_VERSION
    assert OWLPrunerConfig.from_pretrained(folder).to_dict() == config.to_dict()
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(OWLConfigError, match="sparsity"):
        save_for_hub(model, bad, report, {**plain, "sparsity": 1.5})

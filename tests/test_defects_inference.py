"""Issue 30 (second defect trial): sparse loading, generate, evaluation text, demo, calibration, model sources.
One test (or a few) per numbered item; each failed before its fix."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from optimum_owl.cli import main

from .conftest import tiny_model
from .test_cli_and_eval import WORDS, _word_tokenizer
from .test_defects import _flip_tensor_bytes, _one_line_error
from .test_hub import hub  # noqa: F401 - the fake-Hub fixture

STORIES = "optimum_owl/assets/stories260K"


def _pruned(arch: str = "llama"):
    from optimum_owl import OWLPruner, OWLPrunerConfig

    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 84, (4, 16), generator=g)
    OWLPruner(OWLPrunerConfig(sparsity=0.5, num_samples=4, seqlen=16, batch_size=2)).prune(model, dataset=ids)
    return model


def _compact(tmp_path, arch: str = "llama", name: str = "ck"):
    """A compact checkpoint of a tiny pruned model (context 128) with a word-level tokenizer, and its dense original."""
    folder = tmp_path / name
    _pruned(arch).save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    original = tmp_path / f"{name}-original"
    tiny_model(arch).save_pretrained(original)
    _word_tokenizer().save_pretrained(original)
    return folder, original


def _generate(folder, *extra: str) -> list[str]:
    return ["generate", str(folder), "--prompt", "w1 w2 w3", "--max-new-tokens", "8", *extra]


# ---------------------------------------------------------------------------------------------------------- item 4
@pytest.mark.parametrize("arch, key", [("llama", "model.norm.weight"), ("llama", "model.embed_tokens.weight"),
                                       ("llama", "model.layers.0.input_layernorm.weight"),
                                       ("gpt2", "transformer.h.0.attn.c_attn.bias")])  # bias of a compressed weight
def test_4_load_sparse_refuses_a_corrupted_dense_tensor(tmp_path, arch, key):
    from optimum_owl.errors import OWLCheckpointError
    from optimum_owl.inference import load_sparse

    folder, _ = _compact(tmp_path, arch)
    load_sparse(folder)
    _flip_tensor_bytes(folder / "model.safetensors", key)
    with pytest.raises(OWLCheckpointError, match=re.escape(key) + ".*CRC-32"):
        load_sparse(folder)
    with pytest.raises(OWLCheckpointError, match="CRC-32"):
        load_sparse(folder, dtype=torch.bfloat16)  # checked before the cast


def test_4_generate_refuses_a_corrupted_norm_in_one_line(tmp_path, capsys):
    folder, _ = _compact(tmp_path)
    _flip_tensor_bytes(folder / "model.safetensors", "model.norm.weight")
    line = _one_line_error(capsys, _generate(folder))
    assert "model.norm.weight" in line and "CRC-32" in line and "unexpected" not in line


# ---------------------------------------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("name", ["data/wiki_test", "wiki.parquet", "~/no_such_folder_owl/wiki.txt"])
def test_5_perplexity_of_a_missing_path_is_an_error_naming_it(tmp_path, monkeypatch, name):
    from optimum_owl.evaluation import perplexity

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(name) + ".*does not exist"):
        perplexity(tiny_model("llama"), _word_tokenizer(), name, seqlen=4)


def test_5_text_is_passed_explicitly_and_the_documented_forms_still_work(tmp_path):
    from optimum_owl.evaluation import load_texts, perplexity

    model, tok = tiny_model("llama"), _word_tokenizer()
    text = " ".join(WORDS[:40])
    (tmp_path / "wiki.txt").write_text(text)
    by_path = perplexity(model, tok, str(tmp_path / "wiki.txt"), seqlen=8)
    assert perplexity(model, tok, tmp_path / "wiki.txt", seqlen=8) == by_path
    assert perplexity(model, tok, text, seqlen=8) == by_path  # a string of text (with spaces) is text
    assert perplexity(model, tok, [text], seqlen=8) == by_path
    assert perplexity(model, tok, text=text, seqlen=8) == by_path
    assert load_texts(["data/wiki_test"]) == ["data/wiki_test"]  # in a list: text
    with pytest.raises(ValueError, match="exactly one"):
        perplexity(model, tok, seqlen=8)
    with pytest.raises(ValueError, match="exactly one"):
        perplexity(model, tok, text, text=text, seqlen=8)


# ---------------------------------------------------------------------------------------------------------- item 6
def test_6_demo_refuses_a_seqlen_past_the_context_before_generating(capsys, monkeypatch):
    import optimum_owl.demo as demo

    def never(*args, **kwargs):
        raise AssertionError("text was generated before the seqlen was checked")

    monkeypatch.setattr(demo, "generate_token_windows", never)
    line = _one_line_error(capsys, ["demo", "--seqlen", "1024", "--num-samples", "2"])
    assert "seqlen=1024" in line and "512" in line
    with pytest.raises(ValueError, match="context of 512"):
        demo.run_demo(seqlen=1024, num_samples=2)


# ---------------------------------------------------------------------------------------------------------- item 7
def test_7_generate_min_sparsity_outside_0_1_is_refused(tmp_path, capsys):
    from optimum_owl.inference import load_sparse

    folder, _ = _compact(tmp_path)
    for value in ("2", "-0.1"):
        line = _one_line_error(capsys, _generate(folder, "--min-sparsity", value))
        assert "--min-sparsity" in line and "between 0 and 1" in line
    with pytest.raises(ValueError, match="min_sparsity"):
        load_sparse(folder, min_sparsity=2)


def test_7_short_calibration_rows_warn_that_they_were_joined_and_overlap(caplog):
    from transformers import AutoTokenizer

    from optimum_owl.pruning.data import get_calibration_data

    tok = AutoTokenizer.from_pretrained(STORIES)
    warnings: list[str] = []
    with caplog.at_level(logging.WARNING, logger="optimum_owl.pruning.data"):
        ids = get_calibration_data([f"Hi {i}." for i in range(200)], tok, num_samples=4, seqlen=128, warnings=warnings)
    assert ids.shape == (4, 128)
    assert len(warnings) == 1 and warnings[0] in caplog.text
    assert "200 of 200 calibration rows are no longer than seqlen=128" in warnings[0]
    assert "joined into one stream" in warnings[0] and "overlap" in warnings[0]


# ---------------------------------------------------------------------------------------------------------- item 9
def test_9_generate_threads_zero_is_a_usage_error(tmp_path, capsys):
    folder, _ = _compact(tmp_path)
    line = _one_line_error(capsys, _generate(folder, "--threads", "0"))
    assert "--threads" in line and "at least 1" in line and "unexpected" not in line


# ---------------------------------------------------------------------------------------------------------- item 10
@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode, with the Hub at a closed local port: a request fails at once (connection refused)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")


def _argv(command: str, model: str, tmp_path) -> list[str]:
    if command == "export":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(WORDS))
    return {"generate": ["generate", model, "--prompt", "hi"], "eval": ["eval", model, "--text", str(text)],
            "export": ["export", "onnx", model, "-o", str(tmp_path / "onnx")]}[command]


@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_10_an_unknown_name_offline_fails_at_once_naming_it(tmp_path, capsys, offline, command):
    line = _one_line_error(capsys, _argv(command, "nonexistent_dir", tmp_path))
    assert "nonexistent_dir" in line and "HF_HUB_OFFLINE" in line


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_10_an_unreachable_hub_fails_at_once_without_retries(tmp_path, capsys, caplog, unreachable_hub, command):
    line = _one_line_error(capsys, _argv(command, "nonexistent_dir", tmp_path))
    assert "nonexistent_dir" in line and "cannot be reached" in line
    assert "Retry" not in caplog.text


@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_10_a_missing_local_looking_path_fails_at_once(tmp_path, capsys, monkeypatch, unreachable_hub, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("./missing/model", "models/llama"):  # the second exists partially: `models` is a local folder
        line = _one_line_error(capsys, _argv(command, name, tmp_path))
        assert name in line and "does not exist" in line


def test_10_generate_checks_the_tokenizer_and_reference_too(tmp_path, capsys, offline):
    folder, _ = _compact(tmp_path)
    line = _one_line_error(capsys, _generate(folder, "--tokenizer", "no_such_tok"))
    assert "--tokenizer" in line and "no_such_tok" in line
    line = _one_line_error(capsys, _generate(folder, "--reference", "./no/original"))
    assert "--reference" in line and "does not exist" in line


def test_10_load_model_and_tokenizer_check_their_source(tmp_path, offline):
    from optimum_owl.pruning.data import load_tokenizer
    from optimum_owl.pruning.modeling import load_model

    with pytest.raises(OSError, match="'nonexistent_dir'.*HF_HUB_OFFLINE"):
        load_model("nonexistent_dir")
    with pytest.raises(OSError, match="'someone/tok'.*HF_HUB_OFFLINE"):
        load_tokenizer("someone/tok")


def test_10_a_hub_repo_that_does_not_exist_is_named_and_one_that_exists_passes(hub):  # noqa: F811
    from huggingface_hub import HfApi

    from optimum_owl.pruning.sources import check_model_source

    with pytest.raises(OSError, match="'tester/missing' is neither a local folder nor a repo"):
        check_model_source("tester/missing")
    HfApi().create_repo("tester/present")
    HfApi().upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="tester/present")
    assert check_model_source("tester/present") is False  # a Hub id, reachable: the loader takes over


# ---------------------------------------------------------------------------------------------------------- item 11
def test_11_generate_refuses_to_run_past_the_context(tmp_path, capsys):
    folder, _ = _compact(tmp_path)
    line = _one_line_error(capsys, _generate(folder, "--max-new-tokens", "200"))
    # the prompt "w1 w2 w3" is 3 tokens: 125 more fit in the 128 positions
    assert "--max-new-tokens 200" in line and "128" in line and "--max-new-tokens 125 or less" in line
    assert main(_generate(folder, "--max-new-tokens", "125")) == 0


# ---------------------------------------------------------------------------------------------------------- item 20
def test_20_reference_compares_against_the_original_and_compare_dense_says_what_it_compares(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from optimum_owl.inference import load_sparse

    folder, original = _compact(tmp_path)
    capsys.readouterr()
    assert main(_generate(folder, "--compare-dense", "--repeats", "1", "--reference", str(original))) == 0
    out = capsys.readouterr().out
    assert "sparse kernel vs the same pruned weights run dense" in out and "not the pruning" in out
    ids = _word_tokenizer()("w1 w2 w3", return_tensors="pt")["input_ids"]
    mine = load_sparse(folder).generate(ids, max_new_tokens=8, do_sample=False)[0, 3:].tolist()
    theirs = AutoModelForCausalLM.from_pretrained(original).generate(ids, max_new_tokens=8, do_sample=False)[0, 3:]
    same = sum(a == b for a, b in zip(mine, theirs.tolist()))
    assert mine != theirs.tolist()  # the pruning changed the text: the comparison has something to say
    assert f"pruned vs original (greedy): {same} of 8 new tokens identical" in out and "first divergence" in out

    assert main(_generate(folder, "--reference", str(folder))) == 0  # itself as the reference
    assert "all 8 new tokens identical" in capsys.readouterr().out


def test_20_a_reference_with_another_vocabulary_is_refused(tmp_path, capsys):
    folder, _ = _compact(tmp_path)
    other = tmp_path / "other"
    tiny_model("llama", vocab=120).save_pretrained(other)
    line = _one_line_error(capsys, _generate(folder, "--reference", str(other)))
    assert "vocabulary of 120" in line and "96" in line


# ---------------------------------------------------------------------------------------------------------- item 23
def test_23_generate_header_names_the_kernel_path_per_dtype_and_counts_threads(tmp_path, capsys, monkeypatch):
    import optimum_owl.inference as inference

    folder, _ = _compact(tmp_path)
    if not inference.kernel_status()["kernel"]:
        pytest.skip("the C++ kernel is not available here")
    status = {"kernel": True, "reason": None, "isa": {"float32": "avx2", "bfloat16": "avx512", "float16": "avx2"}}
    monkeypatch.setattr(inference, "kernel_status", lambda: status)
    capsys.readouterr()
    assert main(_generate(folder, "--threads", "1")) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "kernel: AVX2 decode for the float32 weights" in header and "AVX-512 for bfloat16" in header
    assert header.endswith("; 1 thread")
    threads = torch.get_num_threads()
    try:
        assert main(_generate(folder, "--threads", "2", "--dtype", "bfloat16")) == 0
    finally:
        torch.set_num_threads(threads)  # the CLI sets it for the whole process
    header = capsys.readouterr().out.splitlines()[0]
    assert "kernel: AVX-512 decode for the bfloat16 weights" in header and header.endswith("; 2 threads")

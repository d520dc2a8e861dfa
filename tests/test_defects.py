"""Issue 13: defects a new user hits. One test (or a few) per numbered item; each failed before its fix."""

from __future__ import annotations

import pytest

from optimum_owl.cli import main

from .conftest import needs_assets
from .test_cli_and_eval import _saved_model_and_text


def _prune_args(src, text, out, *extra: str) -> list[str]:
    return ["prune", str(src), "--calibration", str(text), "--output-dir", str(out), "--sparsity", "0.5",
            "--num-samples", "2", "--seqlen", "32", "--batch-size", "2", *extra]


# ---------------------------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_1_output_dir_overlapping_the_input_model_is_refused_and_nothing_is_deleted(tmp_path, capsys, where):
    src, text = _saved_model_and_text(tmp_path)
    (src / "README.md").write_text("my notes")
    out = {"same": src, "inside": src / "pruned", "contains": tmp_path}[where]
    before = sorted(p.name for p in src.iterdir())
    capsys.readouterr()
    assert main(_prune_args(src, text, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "input model" in err and err.count("\n") == 1
    assert sorted(p.name for p in src.iterdir()) == before
    assert (src / "README.md").read_text() == "my notes"


def test_1_overwrite_onto_a_file_is_refused_without_a_stray_copy(tmp_path, capsys):
    src, text = _saved_model_and_text(tmp_path)
    target = tmp_path / "out.bin"
    target.write_text("not a folder")
    capsys.readouterr()
    assert main(_prune_args(src, text, target, "--overwrite")) == 2
    assert "not a folder" in capsys.readouterr().err
    assert target.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "model", "out.bin"]


# ---------------------------------------------------------------------------------------------------------- item 2
def _resumable_run(tmp_path, method="wanda"):
    import torch

    from optimum_owl import OWLPruner, OWLPrunerConfig

    from .conftest import calib_ids, tiny_model

    ckpt = tmp_path / "resume"
    config = OWLPrunerConfig(sparsity=0.5, method=method, num_samples=4, seqlen=16, batch_size=2, checkpoint_dir=str(ckpt))
    OWLPruner(config).prune(tiny_model("llama"), dataset=calib_ids(4, 16))

    def rerun():
        model = tiny_model("llama")
        OWLPruner(config).prune(model, dataset=calib_ids(4, 16))
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    return ckpt, rerun, torch


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_2_a_corrupted_resume_file_is_refused_naming_it(tmp_path, damage, method):
    from optimum_owl import OWLConfigError

    ckpt, rerun, _ = _resumable_run(tmp_path, method)
    victim = ckpt / "block_00001.pt"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        mid = len(data) // 2
        data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    else:
        data = data[: len(data) // 2]
    victim.write_bytes(bytes(data))
    with pytest.raises(OWLConfigError, match=r"block_00001\.pt.*(checksum|truncated).*delete"):
        rerun()


def test_2_a_resume_folder_of_an_older_format_is_refused_naming_the_file(tmp_path):
    import json

    from optimum_owl import OWLConfigError

    ckpt, rerun, _ = _resumable_run(tmp_path)
    state_file = ckpt / "owl_checkpoint.json"
    state = json.loads(state_file.read_text())
    state["version"] = 2  # the format before checksums
    state.pop("checksums", None)
    state_file.write_text(json.dumps(state))
    with pytest.raises(OWLConfigError, match=r"owl_checkpoint\.json.*format 2.*[Dd]elete"):
        rerun()


# ---------------------------------------------------------------------------------------------------------- item 3
def test_3_pruning_an_already_pruned_model_warns_in_python(recwarn):
    from optimum_owl import OWLPruner, OWLPrunerConfig

    from .conftest import calib_ids, tiny_model

    model = tiny_model("llama")
    config = OWLPrunerConfig(sparsity=0.5, num_samples=4, seqlen=16, batch_size=2)
    OWLPruner(config).prune(model, dataset=calib_ids(4, 16))
    assert not [w for w in recwarn if "already" in str(w.message)]
    with pytest.warns(UserWarning, match=r"already 0\.\d+ zero.*compound"):
        report = OWLPruner(config).prune(model, dataset=calib_ids(4, 16))
    assert any("already" in w for w in report.warnings)


def test_3_cli_refuses_to_prune_a_pruned_model_unless_allowed(tmp_path, capsys):
    src, text = _saved_model_and_text(tmp_path)
    assert main(_prune_args(src, text, tmp_path / "p1")) == 0
    capsys.readouterr()
    assert main(_prune_args(tmp_path / "p1", text, tmp_path / "p2")) == 2
    err = capsys.readouterr().err
    assert "already" in err and "--allow-pruned" in err
    assert not (tmp_path / "p2").exists()
    assert main(_prune_args(tmp_path / "p1", text, tmp_path / "p2", "--allow-pruned")) == 0
    import json

    warned = json.loads((tmp_path / "p2" / "owl_report.json").read_text())["warnings"]
    assert any("already" in w for w in warned)


def test_3_readme_snippet_does_not_prune_the_same_model_twice():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = readme.split("## Use it", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    calls = [line for line in snippet.splitlines() if ".prune(model" in line or ".apply(model" in line]
    assert len([c for c in calls if not c.lstrip().startswith("#")]) == 1, calls


# ---------------------------------------------------------------------------------------------------------- item 4
def test_4_cli_keeps_the_checkpoint_dtype_by_default(tmp_path):
    import torch
    from safetensors import safe_open

    src, text = _saved_model_and_text(tmp_path)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(src)
    assert main(_prune_args(src, text, tmp_path / "out")) == 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys() if not k.endswith(("_bitmask", "_shape"))}
    assert dtypes == {"BF16"}


@pytest.mark.parametrize("alias", ["fp16", "half", "bf16", "fp32"])
def test_4_dtype_aliases_are_accepted(alias):
    from optimum_owl.cli import build_parser

    args = build_parser().parse_args(["prune", "M", "-o", "O", "--dtype", alias])
    assert args.dtype == {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32"}[alias]


def test_4_an_unknown_dtype_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "M", "-o", "O", "--dtype", "int8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype" in err and "float16" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("command", ["eval", "demo", "prune"])
def test_5_a_text_path_that_does_not_exist_is_an_error_not_text(tmp_path, capsys, command):
    src, text = _saved_model_and_text(tmp_path)
    missing = str(tmp_path / "wrong_name.jsonl")
    argv = {
        "eval": ["eval", str(src), "--text", missing, "--seqlen", "16"],
        "demo": ["demo", "--eval-text", missing, "--num-samples", "2", "--seqlen", "16"],
        "prune": _prune_args(src, text, tmp_path / "out", "--eval-text", missing),
    }[command]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "wrong_name.jsonl" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_5_perplexity_refuses_a_missing_file_name():
    from optimum_owl.evaluation import load_texts

    with pytest.raises(FileNotFoundError, match="wrong_name.jsonl"):
        load_texts("wrong_name.jsonl")
    assert load_texts("a short text") == ["a short text"]
    assert load_texts("word" * 200) == ["word" * 200]  # too long for a file name: text


# ---------------------------------------------------------------------------------------------------------- item 6
def test_6_a_json_array_calibration_file_is_parsed(tmp_path):
    import json

    from optimum_owl.evaluation import load_texts
    from optimum_owl.pruning.data import get_calibration_data

    from .test_data_and_errors import TEXTS, CharTokenizer

    rows = tmp_path / "calib.json"
    rows.write_text(json.dumps([{"text": t} for t in TEXTS]))
    lines = tmp_path / "calib.jsonl"
    lines.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    tok = CharTokenizer()
    a = get_calibration_data(str(rows), tok, num_samples=4, seqlen=16, seed=3)
    b = get_calibration_data(str(lines), tok, num_samples=4, seqlen=16, seed=3)
    assert a.equal(b)
    assert load_texts(str(rows)) == TEXTS
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(TEXTS))
    assert load_texts(str(strings)) == TEXTS


@pytest.mark.parametrize("content", ['{"text": "one object"}', '[1, 2]', '[{"other": "x"}]', "not json"])
def test_6_a_json_file_of_another_shape_is_refused(tmp_path, content):
    from optimum_owl.errors import CalibrationDataError
    from optimum_owl.pruning.data import get_calibration_data

    from .test_data_and_errors import CharTokenizer

    bad = tmp_path / "calib.json"
    bad.write_text(content)
    with pytest.raises(CalibrationDataError, match="calib.json"):
        get_calibration_data(str(bad), CharTokenizer(), num_samples=2, seqlen=4)


# ---------------------------------------------------------------------------------------------------------- item 7
def _reference_get_c4_windows(texts, tokenizer, nsamples, seqlen, seed):
    """The reference sampler (Wanda/OWL `get_c4`, ../shared/OWL_SPEC.md §1.2): the tokenizer's default call, so
    BOS is added where the tokenizer adds it; a document must be longer than `seqlen`; one random window of it."""
    import random

    import torch

    random.seed(seed)
    windows = []
    for _ in range(nsamples):
        while True:
            doc = random.randint(0, len(texts) - 1)
            enc = tokenizer(texts[doc], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        start = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        windows.append(enc.input_ids[:, start : start + seqlen])
    return torch.cat(windows, dim=0)


def _c4_texts():
    import json

    from .conftest import ASSETS

    path = ASSETS / "text" / "c4_train_first1000.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _assert_windows_match_reference(tokenizer, seqlen):
    from optimum_owl.pruning.data import get_calibration_data

    texts = _c4_texts()
    ours = get_calibration_data(texts, tokenizer, num_samples=16, seqlen=seqlen, seed=0)
    reference = _reference_get_c4_windows(texts, tokenizer, 16, seqlen, 0)
    equal = sum(bool((a == b).all()) for a, b in zip(ours, reference))
    assert equal == 16, f"{equal} of 16 windows equal the reference"


@needs_assets
def test_7_calibration_windows_equal_the_reference_for_a_bos_tokenizer_stories260k():
    from pathlib import Path

    from transformers import AutoTokenizer

    import optimum_owl

    tok = AutoTokenizer.from_pretrained(Path(optimum_owl.__file__).parent / "assets" / "stories260K")
    assert tok("hello").input_ids[0] == tok.bos_token_id  # the case the issue is about
    _assert_windows_match_reference(tok, seqlen=256)


@pytest.mark.slow
@needs_assets
def test_7_calibration_windows_equal_the_reference_smollm2():
    from transformers import AutoTokenizer

    from .conftest import ASSETS

    folder = ASSETS / "models" / "smollm2-135m"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    _assert_windows_match_reference(tok, seqlen=512)


# ---------------------------------------------------------------------------------------------------------- item 8
def test_8_eval_refuses_a_seqlen_beyond_the_model_context(tmp_path, capsys):
    from optimum_owl.evaluation import perplexity_of_ids

    from .conftest import calib_ids, tiny_model

    with pytest.raises(ValueError, match="seqlen.*256.*max_position_embeddings=128"):
        perplexity_of_ids(tiny_model("llama"), calib_ids(1, 512).reshape(-1), seqlen=256)
    src, text = _saved_model_and_text(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(src), "--text", str(text), "--seqlen", "256"]) == 2
    assert "max_position_embeddings=128" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- item 9
def _flip_tensor_bytes(file, key):
    """Flip the first bytes of tensor `key`'s data in a safetensors file, in place."""
    import json
    import struct

    raw = bytearray(file.read_bytes())
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    start, end = header[key]["data_offsets"]
    at = 8 + size + start
    for i in range(min(8, end - start)):
        raw[at + i] ^= 0x5A
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize("key", ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"])
def test_9_verify_checkpoint_catches_flipped_bytes_in_an_uncompressed_tensor(tmp_path, key):
    import optimum_owl  # noqa: F401
    from optimum_owl import OWLPruner, OWLPrunerConfig
    from optimum_owl.errors import OWLCheckpointError
    from optimum_owl.formats import verify_checkpoint

    from .conftest import calib_ids, tiny_model

    model = tiny_model("llama")
    OWLPruner(OWLPrunerConfig(sparsity=0.5, num_samples=4, seqlen=16, batch_size=2)).prune(model, dataset=calib_ids(4, 16))
    model.save_pretrained(tmp_path / "ck")
    summary = verify_checkpoint(tmp_path / "ck")
    assert summary["unchecked_tensors"] == []
    _flip_tensor_bytes(tmp_path / "ck" / "model.safetensors", key)
    with pytest.raises(OWLCheckpointError, match=key.replace(".", r"\.") + ".*CRC-32"):
        verify_checkpoint(tmp_path / "ck")


def test_9_from_pretrained_refuses_flipped_bytes_in_a_norm_weight(tmp_path, caplog):
    import logging

    from transformers import AutoModelForCausalLM

    import optimum_owl  # noqa: F401
    from optimum_owl import OWLPruner, OWLPrunerConfig

    from .conftest import calib_ids, tiny_model

    model = tiny_model("llama")
    OWLPruner(OWLPrunerConfig(sparsity=0.5, num_samples=4, seqlen=16, batch_size=2)).prune(model, dataset=calib_ids(4, 16))
    model.save_pretrained(tmp_path / "ck")
    AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    _flip_tensor_bytes(tmp_path / "ck" / "model.safetensors", "model.norm.weight")
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="conversion"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")  # transformers wraps the OWLCheckpointError
    assert "model.norm.weight` fails its CRC-32 check" in caplog.text


# ---------------------------------------------------------------------------------------------------------- item 10
def test_10_saved_config_report_and_card_publish_no_absolute_local_path(tmp_path):
    import json

    from optimum_owl.hub.card import render_model_card
    from optimum_owl.pruning.report import PruneReport

    src, text = _saved_model_and_text(tmp_path)
    out = tmp_path / "out"
    args = _prune_args(src, text, out, "--checkpoint-dir", str(tmp_path / "resume"), "--eval-text", str(text))
    assert main(args) == 0
    written = "".join((out / name).read_text() for name in ("config.json", "owl_config.json", "owl_report.json"))
    report = PruneReport.load(out / "owl_report.json")
    card = str(render_model_card(report=report, repo_id="me/model"))
    for published in (written, card):
        assert str(tmp_path) not in published
    assert json.loads((out / "owl_report.json").read_text())["calibration"]["source"] == "calib.txt"
    assert json.loads((out / "owl_config.json").read_text())["checkpoint_dir"] == "resume"
    assert "calib.txt" in card


@pytest.mark.parametrize(
    "secret_in",
    [
        "optimum-owl push out --repo-id me/m --token hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345",
        "HF_TOKEN=hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345 optimum-owl prune m -o out",
        "python prune.py --hub_token=hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345",
        "curl -H 'Authorization: Bearer abcdef0123456789abcdef' https://x",
    ],
)
def test_10_a_token_in_the_reproduce_command_is_redacted(secret_in):
    from optimum_owl.hub.card import render_model_card

    card = str(render_model_card(report=None, repo_id="me/model", command=secret_in))
    assert "hf_AbCdEf" not in card and "abcdef0123456789abcdef" not in card
    assert "optimum-owl" in card or "python prune.py" in card or "curl" in card


# ---------------------------------------------------------------------------------------------------------- item 11
@pytest.fixture
def no_pruning(monkeypatch):
    """Fail the test if pruning starts (the destination must be checked before the work)."""
    from optimum_owl import OWLPruner

    def refuse(*args, **kwargs):
        raise AssertionError("pruning started although the destination is unusable")

    monkeypatch.setattr(OWLPruner, "prune", refuse)


def test_11_read_only_destination_is_refused_before_pruning(tmp_path, capsys, monkeypatch, no_pruning):
    import errno
    import tempfile

    src, text = _saved_model_and_text(tmp_path)
    real_mkdtemp = tempfile.mkdtemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and str(tmp_path / "ro") in str(dir):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    capsys.readouterr()
    assert main(_prune_args(src, text, tmp_path / "ro" / "out")) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Read-only file system" in err


def test_11_too_little_free_space_is_refused_before_pruning(tmp_path, capsys, monkeypatch, no_pruning):
    import shutil
    from collections import namedtuple

    src, text = _saved_model_and_text(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    capsys.readouterr()
    assert main(_prune_args(src, text, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "free" in err and "needs" in err


@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--offload-folder"])
def test_11_output_dir_overlapping_the_checkpoint_dir_is_refused_before_pruning(tmp_path, capsys, flag, no_pruning):
    src, text = _saved_model_and_text(tmp_path)
    capsys.readouterr()
    assert main(_prune_args(src, text, tmp_path / "x", flag, str(tmp_path / "x"))) == 2
    err = capsys.readouterr().err
    assert flag in err and "--output-dir" in err


# ---------------------------------------------------------------------------------------------------------- item 12
def _one_line_error(capsys, argv, code=2):
    """Run the CLI; it must exit non-zero with exactly one stderr line and no traceback."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors: usage line + one error line
        rc = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("optimum-owl") and "error:" in err[-1], err
        return err[-1]
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, (rc, err)
    assert not any("Traceback" in line for line in err), err
    errors = [line for line in err if line.startswith("optimum-owl")]  # the rest: log lines, progress bars
    assert len(errors) == 1 and errors[0] == err[-1] and "error:" in errors[0], err
    return errors[0]


def test_12_nonexistent_model_path_is_one_line(tmp_path, capsys):
    _, text = _saved_model_and_text(tmp_path)
    line = _one_line_error(capsys, _prune_args(tmp_path / "no_such_model", text, tmp_path / "out"))
    assert "no_such_model" in line and "does not exist" in line
    line = _one_line_error(capsys, ["eval", "./missing/model", "--text", str(text)])
    assert "does not exist" in line


def test_12_offline_hub_id_is_one_line(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, text = _saved_model_and_text(tmp_path)
    line = _one_line_error(capsys, ["eval", "someone/some-model", "--text", str(text)])
    assert "someone/some-model" in line


@pytest.mark.parametrize("row, match", [("5", "not an object"), ('{"text": 123}', "not a string"),
                                        ('{"other": "x"}', "no 'text' key")])
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_12_bad_jsonl_rows_are_one_line(tmp_path, capsys, row, match, command):
    src, _ = _saved_model_and_text(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' + row + "\n")
    argv = (_prune_args(src, bad, tmp_path / "out") if command == "prune"
            else ["eval", str(src), "--text", str(bad), "--seqlen", "16"])
    line = _one_line_error(capsys, argv)
    assert "bad.jsonl:2" in line and match in line


def test_12_a_folder_as_calibration_is_one_line(tmp_path, capsys):
    src, _ = _saved_model_and_text(tmp_path)
    line = _one_line_error(capsys, _prune_args(src, tmp_path, tmp_path / "out"))
    assert "is a folder" in line


def test_12_an_unloadable_dataset_name_is_one_line(tmp_path, capsys, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'no-such/dataset' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    src, _ = _saved_model_and_text(tmp_path)
    line = _one_line_error(capsys, _prune_args(src, "no-such/dataset", tmp_path / "out"))
    assert "no-such/dataset" in line and ".jsonl" in line


@pytest.mark.parametrize("seqlen", ["0", "1", "-3"])
def test_12_eval_seqlen_below_two_is_one_line(tmp_path, capsys, seqlen):
    src, text = _saved_model_and_text(tmp_path)
    line = _one_line_error(capsys, ["eval", str(src), "--text", str(text), "--seqlen", seqlen])
    assert "--seqlen" in line


def test_12_perplexity_refuses_seqlen_below_two():
    from optimum_owl.evaluation import perplexity_of_ids

    from .conftest import calib_ids, tiny_model

    with pytest.raises(ValueError, match="seqlen"):
        perplexity_of_ids(tiny_model("llama"), calib_ids(1, 64).reshape(-1), seqlen=1)


def test_12_demo_num_samples_zero_is_one_line(capsys):
    line = _one_line_error(capsys, ["demo", "--num-samples", "0"])
    assert "--num-samples" in line


def test_12_a_failed_push_is_one_line(tmp_path, capsys, monkeypatch):
    import optimum_owl.hub as hub
    from optimum_owl.errors import HubUploadError

    def fail(*args, **kwargs):
        raise HubUploadError("Upload to me/m failed (HTTP 500); the files are kept in /x; retry with: optimum-owl push")

    monkeypatch.setattr(hub, "push_folder", fail)
    (tmp_path / "f").mkdir()
    line = _one_line_error(capsys, ["push", str(tmp_path / "f"), "--repo-id", "me/m"], code=1)
    assert "Upload to me/m failed" in line


def test_12_an_unexpected_error_is_one_line_and_verbose_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import optimum_owl.hub as hub

    def bug(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(hub, "push_folder", bug)
    (tmp_path / "f").mkdir()
    line = _one_line_error(capsys, ["push", str(tmp_path / "f"), "--repo-id", "me/m"], code=1)
    assert "KeyError" in line and "-v" in line
    with pytest.raises(KeyError):
        main(["-v", "push", str(tmp_path / "f"), "--repo-id", "me/m"])


# ---------------------------------------------------------------------------------------------------------- item 13
def test_13_repair_evaluation_is_capped_and_says_so(monkeypatch, caplog):
    import logging
    import sys
    from pathlib import Path

    pytest.importorskip("peft")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from repair_helpers import prune_, random_windows, tiny_llama

    import optimum_owl.evaluation as evaluation
    from optimum_owl.repair import RepairConfig, repair

    seen = []
    real = evaluation.perplexity_of_ids
    monkeypatch.setattr(evaluation, "perplexity_of_ids",
                        lambda model, ids, seqlen, *a, **k: seen.append(ids.numel() // seqlen) or real(model, ids, seqlen, *a, **k))
    model = prune_(tiny_llama())
    config = RepairConfig(r=4, seqlen=16, max_steps=2, per_device_train_batch_size=4, max_eval_windows=8)
    with caplog.at_level(logging.INFO):
        _, report = repair(model, None, train_data=random_windows(16, 16), config=config,
                           eval_data=random_windows(200, 16, seed=5))
    assert seen == [8, 8]  # before and after, 8 windows each (not 200)
    assert (report.eval_windows, report.eval_windows_available) == (8, 200)
    assert "first 8 of 200" in caplog.text
    assert RepairConfig().max_eval_windows == 64  # capped by default


# ---------------------------------------------------------------------------------------------------------- item 14
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_14_optimum_cli_owl_help_is_the_optimum_owl_help(monkeypatch, capsys, flag):
    import importlib.util
    import sys

    if importlib.util.find_spec("optimum.commands.base") is None:
        pytest.skip("optimum is not installed (pip install optimum-owl[optimum])")
    from optimum.commands import optimum_cli

    monkeypatch.setattr(sys, "argv", ["optimum-cli", "owl", flag])
    with pytest.raises(SystemExit) as info:
        optimum_cli.main()
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "prune" in out and "demo" in out and "--model" not in out


def test_14_wrapper_help_example_is_a_valid_command():
    import re
    from pathlib import Path

    from optimum_owl.cli import build_parser

    text = (Path(__file__).resolve().parents[1] / "optimum" / "commands" / "register" / "owl.py").read_text()
    examples = re.findall(r"`((?:optimum-cli owl |optimum-owl )?prune [^`]*)`", text)
    assert examples
    for example in examples:
        words = example.replace("optimum-cli owl ", "").replace("optimum-owl ", "").split()
        build_parser().parse_args(words)  # would exit 2 on `--model`


# ---------------------------------------------------------------------------------------------------------- item 15
def test_15_a_corrupt_causal_lm_checkpoint_is_not_retried_as_automodel(tmp_path, caplog):
    import logging

    from optimum_owl.pruning.modeling import load_model

    src, text = _saved_model_and_text(tmp_path)
    assert main(_prune_args(src, text, tmp_path / "pruned")) == 0
    _flip_tensor_bytes(tmp_path / "pruned" / "model.safetensors", "model.layers.0.mlp.up_proj.weight_bitmask")
    with caplog.at_level(logging.INFO), pytest.raises(ValueError, match="up_proj"):
        load_model(str(tmp_path / "pruned"))
    assert "not a causal LM" not in caplog.text


def test_15_a_non_utf8_file_is_named(tmp_path):
    from optimum_owl.errors import CalibrationDataError
    from optimum_owl.pruning.data import get_calibration_data

    from .test_data_and_errors import CharTokenizer

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(CalibrationDataError, match=r"latin1\.txt is not UTF-8"):
        get_calibration_data(str(bad), CharTokenizer(), num_samples=2, seqlen=8)


def test_15_an_empty_text_file_is_called_empty(tmp_path):
    from optimum_owl.errors import CalibrationDataError
    from optimum_owl.pruning.data import get_calibration_data

    from .test_data_and_errors import CharTokenizer

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(CalibrationDataError, match="empty"):
        get_calibration_data(str(empty), CharTokenizer(), num_samples=2, seqlen=8)


def test_15_max_windows_zero_is_named(tmp_path, capsys):
    from optimum_owl.evaluation import perplexity_of_ids

    from .conftest import calib_ids, tiny_model

    with pytest.raises(ValueError, match="max_windows"):
        perplexity_of_ids(tiny_model("llama"), calib_ids(1, 64).reshape(-1), seqlen=16, max_windows=0)
    src, text = _saved_model_and_text(tmp_path)
    line = _one_line_error(capsys, ["eval", str(src), "--text", str(text), "--seqlen", "16", "--max-windows", "0"])
    assert "--max-windows" in line


def test_15_sparsegpt_nm_names_the_layer_width():
    import torch

    from optimum_owl.algorithms.criteria import sparsegpt_prune

    w = torch.randn(8, 172)
    with pytest.raises(ValueError, match=r"172.*layers\.0\.mlp\.down_proj|layers\.0\.mlp\.down_proj.*172"):
        sparsegpt_prune(w, torch.eye(172), 0.5, nm=(4, 8), name="model.layers.0.mlp.down_proj")


def test_15_nm_report_states_the_pattern_target():
    from optimum_owl import OWLPruner, OWLPrunerConfig

    from .conftest import calib_ids, tiny_model

    report = OWLPruner(OWLPrunerConfig(sparsity=0.7, pattern="2:4", num_samples=4, seqlen=16, batch_size=2)).prune(
        tiny_model("llama"), dataset=calib_ids(4, 16))
    text = report.to_markdown()
    assert "target sparsity: 0.5" in text and "target sparsity: 0.7" not in text


# ---------------------------------------------------------------------------------------------------------- item 16
def test_16_identical_saves_are_byte_identical(tmp_path):
    import hashlib

    from optimum_owl import OWLPruner, OWLPrunerConfig
    from optimum_owl.serialization import save_pruned

    from .conftest import calib_ids, tiny_model

    model = tiny_model("llama")
    OWLPruner(OWLPrunerConfig(sparsity=0.5, num_samples=4, seqlen=16, batch_size=2)).prune(model, dataset=calib_ids(4, 16))
    digests = set()
    for i in range(4):
        save_pruned(model, tmp_path / f"s{i}")
        digests.add(hashlib.sha256((tmp_path / f"s{i}" / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_16_sorted_metadata_keeps_the_file_loadable(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from optimum_owl.utils import sort_safetensors_metadata

    file = tmp_path / "t.safetensors"
    tensors = {"b": torch.arange(5.0), "a": torch.ones(2, 3, dtype=torch.bfloat16)}
    save_file(tensors, str(file), metadata={"z": "1", "format": "pt", "m": '{"x": "\\u00e9/"}'})
    sort_safetensors_metadata(file)
    with safe_open(str(file), framework="pt") as fh:
        assert fh.metadata() == {"z": "1", "format": "pt", "m": '{"x": "\\u00e9/"}'}
        assert torch.equal(fh.get_tensor("b"), tensors["b"]) and torch.equal(fh.get_tensor("a"), tensors["a"])
    raw = file.read_bytes()
    header = raw[8 : 8 + int.from_bytes(raw[:8], "little")].decode()
    assert header.index('"format"') < header.index('"m"') < header.index('"z"')


def test_16_cli_outputs_have_the_usual_permissions(tmp_path):
    import os

    src, text = _saved_model_and_text(tmp_path)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert main(_prune_args(src, text, out)) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    for name in ("owl_config.json", "owl_report.json", "config.json", "model.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_16_report_and_card_carry_eval_max_windows_and_the_calibration_overlap_warning(tmp_path):
    from optimum_owl.hub.card import render_model_card
    from optimum_owl.pruning.report import PruneReport

    src, text = _saved_model_and_text(tmp_path)
    words = text.read_text().split()
    short = tmp_path / "short_docs.txt"  # 30 documents of 20 words: no document fills a window; 32 x 32 must overlap
    short.write_text("\n\n".join(" ".join(words[i : i + 20]) for i in range(0, 600, 20)))
    out = tmp_path / "out"
    assert main(_prune_args(src, short, out, "--num-samples", "32", "--eval-text", str(text),
                            "--eval-max-windows", "3")) == 0
    report = PruneReport.load(out / "owl_report.json")
    assert report.evaluation["max_windows"] == 3
    assert any("overlap" in w for w in report.warnings)
    for published in (report.to_markdown(), str(render_model_card(report=report, repo_id="me/m"))):
        assert "first 3 windows" in published and "overlap" in published


def test_16_repair_warns_once_and_without_library_noise(caplog):
    import logging
    import sys
    import warnings
    from pathlib import Path

    pytest.importorskip("peft")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from repair_helpers import random_windows, tiny_llama

    from optimum_owl.errors import RepairWarning
    from optimum_owl.repair import RepairConfig, repair

    config = RepairConfig(r=4, seqlen=16, max_steps=1, per_device_train_batch_size=4)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        repair(tiny_llama(), None, train_data=random_windows(8, 16), config=config)  # dense: nothing to preserve
    texts = [str(w.message) for w in caught]
    assert sum(issubclass(w.category, RepairWarning) for w in caught) == 1
    assert "no zeros" not in caplog.text  # not logged a second time
    assert not [t for t in texts if "is_gradient_checkpointing" in t or "pin_memory" in t], texts


# ---------------------------------------------------------------------------------------------------------- item 17
def _readme() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_17_readme_python_snippet_uses_only_defined_names_and_no_unshipped_file():
    import ast
    import builtins

    snippet = _readme().split("## Use it", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    tree = ast.parse(snippet)
    defined = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert used <= defined, used - defined
    assert "c4_sample.jsonl" not in _readme()


def test_17_readme_install_says_to_use_a_virtual_environment():
    head = _readme().split("**optimum-owl**", 1)[0]
    assert "python -m venv" in head


def test_17_demo_explains_an_achieved_sparsity_below_the_target(capsys):
    assert main(["demo", "--num-samples", "4", "--seqlen", "32"]) == 0
    out = capsys.readouterr().out
    assert "below the 70% target" in out and "per row" in out

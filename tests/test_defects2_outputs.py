"""Issue 30 (second defect trial): output folders, saves and configs. One test (or a few) per item; each failed
before its fix (items 1, 2, 3, 7, 8, 13, 14)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optimum_owl import OWLConfigError, OWLPruner, OWLPrunerConfig
from optimum_owl.cli import main

from .test_cli_and_eval import _saved_model_and_text

ROOT = Path(__file__).resolve().parents[1]
MAGNITUDE = dict(method="magnitude", layerwise="uniform")


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _prune_args(src, text, out, *extra: str) -> list[str]:
    return ["prune", str(src), "--calibration", str(text), "--output-dir", str(out), "--sparsity", "0.5",
            "--num-samples", "2", "--seqlen", "32", "--batch-size", "2", *extra]


# ---------------------------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("where", ["same", "parent"])
def test_1_quantize_onto_the_input_folder_is_refused_and_nothing_is_deleted(tmp_path, where):
    src, _ = _saved_model_and_text(tmp_path)
    (src / "README.md").write_text("my notes")
    before = _snapshot(src)
    pruner = OWLPruner.from_pretrained(str(src), OWLPrunerConfig(sparsity=0.5, **MAGNITUDE))
    with pytest.raises(ValueError, match="input model") as err:
        pruner.quantize(src if where == "same" else tmp_path, overwrite=True)
    assert str(src) in str(err.value) and "save_dir" in str(err.value)
    assert _snapshot(src) == before
    assert (pruner.model.model.layers[0].mlp.up_proj.weight != 0).all()  # refused before pruning


def test_1_save_pruned_and_save_dense_refuse_the_input_folder_but_allow_a_subfolder(tmp_path):
    from optimum_owl.pruning.data import load_tokenizer
    from optimum_owl.pruning.modeling import load_model
    from optimum_owl.serialization import save_dense, save_pruned

    src, _ = _saved_model_and_text(tmp_path)
    (src / "NOTICE.md").write_text("keep me")
    before = _snapshot(src)
    model, tokenizer = load_model(str(src)), load_tokenizer(str(src))
    report = OWLPruner(OWLPrunerConfig(sparsity=0.5, **MAGNITUDE)).prune(model)
    with pytest.raises(ValueError, match="input model"):
        save_pruned(model, src, report=report, tokenizer=tokenizer, overwrite=True)
    with pytest.raises(ValueError, match="contains the input model"):
        save_dense(model, tmp_path, overwrite=True)
    assert _snapshot(src) == before
    save_pruned(model, src / "pruned", report=report, tokenizer=tokenizer)  # inside the input: nothing is deleted
    assert (src / "pruned" / "model.safetensors").exists() and (src / "NOTICE.md").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------- item 2
@pytest.mark.parametrize("flag", ["--calibration", "--tokenizer", "--eval-text"])
def test_2_cli_output_holding_an_input_path_is_refused_even_with_overwrite(tmp_path, capsys, flag):
    src, text = _saved_model_and_text(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    calib = data / "calib.txt"
    shutil.copy(text, calib)
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tok / name)
    extra = {"--calibration": [], "--tokenizer": ["--tokenizer", str(tok)], "--eval-text": ["--eval-text", str(calib)]}
    out = tok if flag == "--tokenizer" else data
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_prune_args(src, calib if flag == "--calibration" else text, out, "--overwrite", *extra[flag])) == 2
    err = capsys.readouterr().err
    assert flag in err and err.count("\n") == 1
    assert _snapshot(out) == before


def test_2_repair_output_holding_the_training_text_is_refused(tmp_path, capsys):
    src, text = _saved_model_and_text(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    train = Path(shutil.move(text, data / "train.txt"))
    capsys.readouterr()
    assert main(["repair", str(src), "--train-data", str(train), "--output-dir", str(data), "--overwrite"]) == 2
    assert "--train-data" in capsys.readouterr().err
    assert train.exists()


# ---------------------------------------------------------------------------------------------------------- item 3
_KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
from optimum_owl.utils import atomic_output_dir
with atomic_output_dir(sys.argv[1]) as tmp:
    (Path(tmp) / "model.safetensors").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="needs SIGKILL")
def test_3_partial_folder_of_a_killed_save_is_removed_by_the_next_save(tmp_path, caplog):
    from optimum_owl.utils import atomic_output_dir

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(out)], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(stale) == 1 and stale[0].name.endswith(".partial")  # what the kill left behind
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert str(stale[0]) in caplog.text and "interrupted write" in caplog.text


def test_3_partial_folders_of_live_processes_are_kept_and_old_ones_named(tmp_path, caplog):
    from optimum_owl.utils import _owner_tag, atomic_output_dir

    out = tmp_path / "out"
    live = tmp_path / f".out.{_owner_tag()}-live1234.partial"
    live.mkdir()  # a write of this very (live) process: never touched
    legacy = tmp_path / ".out.abcd1234.partial"
    legacy.mkdir()  # an older version's leftover (no owner recorded): only named
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, legacy.name])
    assert str(legacy) in caplog.text and str(live) not in caplog.text


# ---------------------------------------------------------------------------------------------------------- item 7
def test_7_config_file_with_an_unknown_key_is_refused_naming_the_closest_field(tmp_path):
    path = tmp_path / "owl_config.json"
    path.write_text(json.dumps({"sparsty": 0.5, "method": "magnitude", "format_version": 1}))
    with pytest.raises(OWLConfigError, match=r"`sparsty`.*`sparsity`"):
        OWLPrunerConfig.from_pretrained(path)


def test_7_compact_checkpoint_config_still_round_trips(tmp_path):
    from .conftest import tiny_model

    model = tiny_model("llama")
    OWLPruner(OWLPrunerConfig(sparsity=0.5, **MAGNITUDE)).prune(model)
    model.save_pretrained(tmp_path)
    quant = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "owl"
    assert OWLPrunerConfig.from_pretrained(tmp_path).sparsity == 0.5


def test_7_sparsity_zero_is_refused_before_anything_runs(tmp_path, capsys):
    src, text = _saved_model_and_text(tmp_path)
    out = tmp_path / "out"
    args = _prune_args(src, text, out)
    args[args.index("--sparsity") + 1] = "0"
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--sparsity" in err and "prunes nothing" in err and not out.exists()
    with pytest.raises(OWLConfigError, match="prunes nothing"):
        OWLPruner.from_pretrained(str(src), OWLPrunerConfig(sparsity=0.0, **MAGNITUDE)).quantize(out)
    assert not out.exists()


def test_7_eval_seqlen_zero_is_refused(tmp_path, capsys):
    src, text = _saved_model_and_text(tmp_path)
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(_prune_args(src, text, out, "--eval-text", str(text), "--eval-seqlen", "0"))
    assert exit_.value.code == 2 and "--eval-seqlen" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------------------------------------------- item 8
def test_8_free_space_estimate_covers_the_checkpoint_and_refuses_before_pruning(tmp_path, capsys, monkeypatch):
    src, text = _saved_model_and_text(tmp_path)
    out = tmp_path / "out"
    assert main(_prune_args(src, text, out)) == 0
    written = sum(p.stat().st_size for p in out.iterdir())

    usage = collections.namedtuple("usage", "total used free")
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - written + 1, written - 1))
        capsys.readouterr()
        assert main(_prune_args(src, text, tmp_path / "out2")) == 2
    captured = capsys.readouterr()
    assert f"{written - 1:,} bytes free" in captured.err and "| block |" not in captured.out  # refused before pruning
    assert not (tmp_path / "out2").exists()

    from optimum_owl.pruning.modeling import load_model
    from optimum_owl.serialization import estimate_saved_bytes

    config = OWLPrunerConfig(sparsity=0.5, num_samples=2, seqlen=32, batch_size=2)
    estimate = estimate_saved_bytes(load_model(str(src)), config, file_sources=[src])
    assert written <= estimate <= 1.5 * written
    assert estimate_saved_bytes(load_model(str(src)), config, dense=True, file_sources=[src]) > estimate


def test_8_free_space_message_shows_enough_digits(tmp_path, monkeypatch):
    from optimum_owl.utils import check_free_space

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 310_000))
    with pytest.raises(OSError, match=r"310,000 bytes free .* about 490,000 bytes"):
        check_free_space(tmp_path / "out", 490_000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 300_401_000))
    with pytest.raises(OSError, match=r"300,401,000 bytes free .* about 300,404,000 bytes"):
        check_free_space(tmp_path / "out", 300_404_000)  # both 300.40 MB: two decimals are not enough
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 2_500_000))
    with pytest.raises(OSError, match=r"2\.50 MB free .* about 3\.75 MB"):
        check_free_space(tmp_path / "out", 3_750_000)


# --------------------------------------------------------------------------------------------------------- item 13
_SAVE_PRUNED = """
import sys
from optimum_owl import OWLPruner, OWLPrunerConfig
from tests.conftest import tiny_model
model = tiny_model("llama")
OWLPruner(OWLPrunerConfig(sparsity=0.5, method="magnitude", layerwise="uniform")).prune(model)
for folder in sys.argv[1:]:
    model.save_pretrained(folder)
"""


def test_13_save_pretrained_of_a_compact_model_is_byte_stable_across_processes(tmp_path):
    # safetensors orders the metadata by a hash seeded per process and per call: 4 saves, 2 processes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-c", textwrap.dedent(_SAVE_PRUNED)]
    subprocess.run([*run, str(tmp_path / "a"), str(tmp_path / "b")], cwd=ROOT, check=True, env=env, capture_output=True)
    from .conftest import tiny_model

    model = tiny_model("llama")
    OWLPruner(OWLPrunerConfig(sparsity=0.5, **MAGNITUDE)).prune(model)
    for folder in "cd":
        model.save_pretrained(tmp_path / folder)
    digests = {hashlib.sha256((tmp_path / f / "model.safetensors").read_bytes()).hexdigest() for f in "abcd"}
    assert len(digests) == 1


# --------------------------------------------------------------------------------------------------------- item 14
def test_14_reproduce_command_publishes_no_absolute_paths():
    from optimum_owl.hub import render_model_card

    from .test_hub import tiny_pruned_llama

    _, report, config = tiny_pruned_llama()
    command = ("optimum-owl prune /home/alice/models/llama --calibration=/home/alice/data/c4.jsonl "
               "--tokenizer '/home/alice/my tok' -o ~/pruned --ignore '*.q_proj' --token hf_abcdefghijklmnopqrstuvwxyz")
    text = str(render_model_card(report, config, base_model="tester/base-llama", license="mit", command=command))
    assert "/home/alice" not in text and "~/" not in text and "hf_abcdefghijklmnopqrstuvwxyz" not in text
    assert ("optimum-owl prune llama --calibration=c4.jsonl --tokenizer 'my tok' -o pruned --ignore '*.q_proj'"
            in text)

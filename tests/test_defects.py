"""Issue 13: defects a new user hits. One test (or a few) per numbered item; each failed before its fix."""

from __future__ import annotations

import pytest

from optimum_owl.cli import main

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

"""`optimum-cli owl ...` (needs optimum installed; skipped otherwise) and the wheel layout of the register file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from .conftest import ASSETS, needs_assets

ROOT = Path(__file__).resolve().parents[1]
REGISTER = ROOT / "optimum" / "commands" / "register" / "owl.py"
has_optimum = importlib.util.find_spec("optimum.commands.base") is not None
needs_optimum = pytest.mark.skipif(not has_optimum, reason="optimum is not installed (pip install optimum-owl[optimum])")


def test_register_file_is_a_namespace_module():
    assert REGISTER.is_file()
    for folder in (ROOT / "optimum", ROOT / "optimum" / "commands", REGISTER.parent):
        assert not (folder / "__init__.py").exists(), f"{folder} must stay a PEP 420 namespace (no __init__.py)"
    assert "REGISTER_COMMANDS" in REGISTER.read_text()


@needs_optimum
@needs_assets
def test_optimum_cli_owl_prune(tmp_path, monkeypatch, capsys):
    from optimum.commands import optimum_cli

    out = tmp_path / "pruned"
    argv = ["optimum-cli", "owl", "prune", str(ASSETS / "models" / "stories260K"), "--output-dir", str(out),
            "--method", "magnitude", "--layerwise", "uniform", "--sparsity", "0.7"]
    monkeypatch.setattr(sys, "argv", argv)
    optimum_cli.main()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "owl"
    assert (out / "owl_report.json").exists()
    from optimum_owl.formats import verify_checkpoint

    assert verify_checkpoint(out)["compressed_ratio"] <= 0.40


@needs_optimum
def test_optimum_cli_owl_without_command_prints_help(monkeypatch, capsys):
    from optimum.commands import optimum_cli

    monkeypatch.setattr(sys, "argv", ["optimum-cli", "owl"])
    with pytest.raises(SystemExit) as info:
        optimum_cli.main()
    assert info.value.code == 2
    assert "prune" in capsys.readouterr().out

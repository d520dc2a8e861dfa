"""Run every script in `examples/` as a user would (a subprocess, offline, bundled stories260K), with its
smallest arguments, and check it exits with status 0."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SMALL = ["--num-samples", "4", "--seqlen", "64"]

# script -> (arguments, optional modules it needs)
CASES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "prune_owl.py": ([*SMALL, "--eval-windows", "2"], ()),
    "prune_on_load.py": (SMALL, ()),
    "sparse_lora_repair.py": ([*SMALL, "--steps", "2", "--train-windows", "8", "--eval-windows", "2"], ("peft",)),
    "export_onnx.py": ([*SMALL, "--new-tokens", "4"], ("onnx", "onnxruntime")),
    "optimum_quantizer.py": (SMALL, ()),
}


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    # cwd is a scratch folder so an example can never write into the repository
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_every_example_is_listed_here_and_in_the_readme():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == set(CASES)
    readme = (EXAMPLES / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in scripts)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script, tmp_path):
    args, needs = CASES[script]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{script} needs {', '.join(missing)}")
    proc = _run(script, args, tmp_path)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "FAILED" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # temporary folders cleaned up, nothing written to the working directory


def test_examples_take_help(tmp_path):
    # --help exits before any model is loaded; one subprocess per script would cost an interpreter start each,
    # so the parsers are checked in-process.
    for script in sorted(CASES):
        spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), EXAMPLES / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(SystemExit) as exit_info:
            module.parse_args(["--help"])
        assert exit_info.value.code == 0

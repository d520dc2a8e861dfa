"""bench/ stays runnable although no test runs a benchmark: every benchmark and probe imports as a module of the
`bench` package (run as `python -m bench.<name>` from the repository root), none edits `sys.path`, and every bench
command in the docs names a module that exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_FILES = sorted((ROOT / "bench").rglob("*.py"))
MODULES = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in BENCH_FILES if p.name != "__init__.py"]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").rglob("*.md"))]


@pytest.mark.parametrize("module", MODULES)
def test_bench_module_imports(module: str) -> None:
    importlib.import_module(module)  # an API the benchmark uses was renamed or removed if this fails


def test_bench_does_not_edit_sys_path() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in BENCH_FILES if "sys.path" in p.read_text()]
    assert not offenders, f"{offenders}: import shared helpers from bench._common and run as `python -m bench.<name>`"


@pytest.mark.parametrize("path", DOCS + BENCH_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_commands_name_modules(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"python bench/", text), f"{path.name}: write `python -m bench.<name>`, not a script path"
    named = {m for m, placeholder in re.findall(r"python -m (bench(?:\.\w+)+)(\.<)?", text) if not placeholder}
    unknown = sorted(named - set(MODULES))
    assert not unknown, f"{path.name}: no such benchmark module {unknown}; the modules are {MODULES}"

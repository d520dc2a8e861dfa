"""Every ```python block of README.md, docs/*.md and the generated model card (issue 30, item 15: the docs and every
card told users to write `from optimum_owl.inference import load_sparse`, which raised ImportError).

For each block: (a) it compiles, (b) each of its `import` / `from ... import` statements runs (a documented import
of a missing name fails here), and (c) the blocks listed in `RUN` run on a tiny model in a scratch folder that holds
the files and folders the docs name (`path/to/model`, `calibration.jsonl`, `pruned-model`, ...), with the sizes
scaled down (`SMALL`) and shared assets at their absolute path. Blocks of one file share a namespace, in order, as
a reader's session would; `texts`, `model` and `tokenizer` are predefined where a block takes them as given.

Import-checked only, and why:
- docs/hub.md `push_to_hub(...)`: needs a Hub (tests/test_hub.py runs push against a fake Hub);
- docs/onnx.md: an ONNX export plus onnxruntime validation of stories260K, ~10 s (tests/test_onnx.py and
  examples/export_onnx.py run the same calls);
- docs/repair.md: LoRA training (examples/sparse_lora_repair.py runs the first block's calls; the other two are
  fragments around a user's `Trainer` arguments and datasets);
- docs/scale.md's first block: `device_map="auto"` with a GPU memory budget (needs a GPU);
- the card's ONNX block: `snapshot_download` from the Hub.
Inline references such as `optimum_owl.inference.load_sparse` in the same texts must resolve too.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from .conftest import ASSETS, tiny_model
from .test_cli_and_eval import WORDS, _word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SMALL = [("num_samples=128, seqlen=2048", "num_samples=4, seqlen=16"),
         ("num_samples=64, seqlen=512", "num_samples=4, seqlen=16"),
         ("num_samples=16, seqlen=256", "num_samples=4, seqlen=16")]
# (file, a text that identifies the block in it) -> extra replacements (old, new); each `old` must be in the block
RUN: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("README.md", "OWLPruner(config).prune(model"): [],
    ("checkpoints.md", "quantization_config=config"): [],
    ("checkpoints.md", 'verify_checkpoint("pruned")'): [],
    ("checkpoints.md", "save_dense(model"): [],
    ("checkpoints.md", 'save_compressed_tensors(model, "pruned-ct")'): [],
    ("checkpoints.md", 'values="int8"'): [],
    ("hub.md", "write_card("): [],
    ("after-pruning.md", "record_zero_shot("): [],  # skipped without lm-eval (NEEDS)
    ("after-pruning.md", "save_compressed_tensors(pruned"): [],
    ("after-pruning.md", 'load_sparse("pruned-ct")'): [],
    ("after-pruning.md", 'write_card("pruned-model"'): [],
    ("inference.md", "optimum_owl.sparsify(model)"): [],
    ("inference.md", 'load_sparse("pruned-model")'): [],
    ("inference.md", 'values="int8", group_size=128'): [],
    ("inference.md", "from optimum_owl.inference import generate"): [  # compiling: tests/test_lean_decode.py
        ("max_new_tokens=64)", "max_new_tokens=4, compile=False)"),
        ("max_new_tokens=64, return_dict=True)", "max_new_tokens=4, return_dict=True, compile=False)")],
    ("optimum.md", "pruner.quantize"): [('layerwise="owl", dataset=texts)',
                                         'layerwise="owl", dataset=texts, num_samples=4, seqlen=16)'),
                                        ("OWLPrunerConfig(sparsity=0.7))",
                                         "OWLPrunerConfig(sparsity=0.7, num_samples=4, seqlen=16))")],
    ("quality.md", 'layerwise="owl-auto"'): [],
    ("scale.md", 'device="auto")'): [('device="auto")', 'device="auto", num_samples=4, seqlen=16)')],
    ("scale.md", 'checkpoint_dir="owl-run-ckpt"'): [
        ('checkpoint_dir="owl-run-ckpt"', 'checkpoint_dir="owl-run-ckpt", num_samples=4, seqlen=16'),
        ("config = ", 'model = AutoModelForCausalLM.from_pretrained("path/to/model")  # dense again\nconfig = ')],
}
# Folders made for the files that read them (others write them: optimum.md's `quantize("pruned-model")`).
PRUNED_FOLDERS = {"inference.md": "pruned-model", "hub.md": "out", "after-pruning.md": "pruned-model"}
# Blocks that need an optional package: run only where it is installed (its own tests skip the same way).
NEEDS = {("after-pruning.md", "record_zero_shot("): "lm_eval"}
# Repository folders a doc names by their relative path, copied into the scratch folder.
COPIED = {"after-pruning.md": ["tests/data/owl_mc"]}


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)]


def _texts(n: int = 40, words: int = 30) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def _save_model(folder: Path, pruned: bool = False) -> None:
    model = tiny_model("llama")
    if pruned:
        from optimum_owl import OWLPruner, OWLPrunerConfig
        from optimum_owl.serialization import save_pruned

        config = OWLPrunerConfig(sparsity=0.5, num_samples=4, seqlen=16)
        report = OWLPruner(config).prune(model, dataset=_texts(), tokenizer=_word_tokenizer())
        save_pruned(model, folder, report=report, config=config, tokenizer=_word_tokenizer())
        return
    model.save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)


def _workspace(folder: Path, doc: str) -> None:
    """The files and folders the docs name, in `folder`."""
    for name in ("path/to/llama", "path/to/model"):
        _save_model(folder / name)
    if doc in PRUNED_FOLDERS:
        _save_model(folder / PRUNED_FOLDERS[doc], pruned=True)
    for name in COPIED.get(doc, []):
        shutil.copytree(ROOT / name, folder / name)
    rows = "".join(json.dumps({"text": t}) + "\n" for t in _texts())
    for name in ("calibration.jsonl", "c4_sample.jsonl", "wikitext2_validation.jsonl"):
        (folder / name).write_text(rows)
    (folder / "calibration.txt").write_text("\n".join(_texts()) + "\n")


def _given() -> dict:
    """Names a block takes as given (defined by the reader before it)."""
    from transformers import AutoModelForCausalLM

    return {"texts": _texts(),
            "model": AutoModelForCausalLM.from_pretrained("path/to/model"), "tokenizer": _word_tokenizer()}


def _run_imports(code: str, namespace: dict, where: str) -> None:
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            statement = ast.unparse(node)
            try:
                exec(compile(statement, where, "exec"), namespace)
            except ModuleNotFoundError as err:
                if (err.name or "").split(".")[0] == "optimum_owl":
                    raise AssertionError(f"{where}: `{statement}` fails: {err}") from err
                pytest.skip(f"{where} needs {err.name}")
            except ImportError as err:
                raise AssertionError(f"{where}: `{statement}` fails: {err}") from err


def _prepare(code: str, file: str, fixes: list[tuple[str, str]]) -> str:
    for old, new in fixes:
        assert old in code, f"{file}: the block no longer contains {old!r}; update RUN in this test"
        code = code.replace(old, new)
    for old, new in SMALL:
        code = code.replace(old, new)
    return code.replace("../shared/assets", str(ASSETS))


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_doc_python_blocks_compile_import_and_run(doc, tmp_path, monkeypatch, offline):
    blocks = python_blocks(doc.read_text())
    for i, code in enumerate(blocks):
        compile(code, f"{doc.name} block {i + 1}", "exec")  # (a)
    runs = {marker: fixes for (name, marker), fixes in RUN.items() if name == doc.name}
    for marker in runs:
        assert sum(marker in code for code in blocks) == 1, f"{doc.name}: no single block contains {marker!r}"
    if not blocks:
        return
    monkeypatch.chdir(tmp_path)
    if runs:
        _workspace(tmp_path, doc.name)
    namespace: dict = _given() if runs else {}
    for i, code in enumerate(blocks):
        where = f"{doc.name} block {i + 1}"
        _run_imports(code, namespace, where)  # (b)
        marker = next((m for m in runs if m in code), None)
        needed = NEEDS.get((doc.name, marker))
        if needed is not None and importlib.util.find_spec(needed) is None:
            continue
        if marker is not None:  # (c)
            exec(compile(_prepare(code, doc.name, runs[marker]), where, "exec"), namespace)


def _card(tmp_path: Path) -> str:
    """The model card of a tiny model pruned from `tmp_path/model` on `tmp_path/calib.txt`, with an ONNX section."""
    from transformers import AutoModelForCausalLM

    from optimum_owl import OWLPruner, OWLPrunerConfig
    from optimum_owl.hub.card import onnx_card_section, render_model_card
    from optimum_owl.serialization import save_pruned

    _save_model(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n\n".join(_texts()))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    config = OWLPrunerConfig(sparsity=0.5, num_samples=4, seqlen=16)
    report = OWLPruner(config).prune(model, dataset=str(tmp_path / "calib.txt"), tokenizer=_word_tokenizer())
    save_pruned(model, tmp_path / "pruned", report=report, config=config, tokenizer=_word_tokenizer())
    card = str(render_model_card(report, config, repo_id="your-name/tiny-owl"))
    meta = {"storage": {"storage": "bitmask"}, "sizes": {}, "dtype": "float32", "opset": 17, "exporter": "x"}
    return card + "\n" + "\n".join(onnx_card_section(meta, repo_id="your-name/tiny-owl"))


def test_model_card_python_blocks_compile_import_and_run(tmp_path, monkeypatch, offline):
    card = _card(tmp_path)
    blocks = python_blocks(card)
    assert len(blocks) == 3, card  # reproduce, load, ONNX
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        where = f"model card block {i + 1}"
        compile(code, where, "exec")
        _run_imports(code, namespace, where)
        if "snapshot_download" in code:
            continue  # needs the Hub
        exec(compile(code.replace('"your-name/tiny-owl"', '"pruned"'), where, "exec"), namespace)
    assert "report" in namespace and "model" in namespace


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))  # a module not imported by its package
    return obj


def test_inline_references_to_optimum_owl_names_resolve(tmp_path):
    texts = {doc.name: doc.read_text() for doc in DOC_FILES}
    texts["model card"] = _card(tmp_path)
    bad = []
    for where, text in texts.items():
        for dotted in sorted(set(re.findall(r"`(optimum_owl(?:\.[A-Za-z_]\w*)+)", text))):
            try:
                _resolve(dotted)
            except (ImportError, AttributeError) as err:
                bad.append(f"{where}: `{dotted}` ({err})")
    assert not bad, bad


def test_load_sparse_is_exported_where_the_docs_say():
    from optimum_owl.inference import load_sparse
    from optimum_owl.inference.loading import load_sparse as defined

    assert load_sparse is defined

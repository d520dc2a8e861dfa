"""The layering of docs/architecture.md, checked on the source: no import cycle (function-local imports count), each
layer imports only the layers below it (named by folder), no `from .x import _private` across modules, no module over
~400 lines, no deprecated re-export left, and the criterion / family registries and the re-entrant engine behave as
documented."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
import torch

from optimum_owl import OWLPruner, OWLPrunerConfig

from .conftest import calib_ids, tiny_model

PACKAGE = Path(__file__).resolve().parents[1] / "optimum_owl"
# The layers, bottom up, by folder or module (docs/architecture.md). A module may import its own layer and those
# listed before it, except where ALSO_FORBIDDEN says otherwise.
LAYERS = [
    ("foundations", ("optimum_owl.errors", "optimum_owl.utils", "optimum_owl.validation")),
    ("algorithms", ("optimum_owl.algorithms",)),
    ("config", ("optimum_owl.config", "optimum_owl.config_flags")),
    ("formats", ("optimum_owl.formats",)),
    ("core", ("optimum_owl.pruning", "optimum_owl.inference")),
    ("public API", ("optimum_owl.pruner", "optimum_owl.integration", "optimum_owl.serialization",
                    "optimum_owl.evaluation")),
    ("products", ("optimum_owl.export", "optimum_owl.hub", "optimum_owl.repair", "optimum_owl.commands",
                  "optimum_owl.cli", "optimum_owl.demo", "optimum_owl.__main__")),
]
# Beside each other in one layer, yet independent: sparse CPU inference runs without the pruning engine.
ALSO_FORBIDDEN = {"optimum_owl.inference": ("optimum_owl.pruning",), "optimum_owl.pruning": ("optimum_owl.inference",)}
MAX_LINES = 420


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import in the file, at any depth."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if target.startswith("optimum_owl"):
                out.append((target, names))
                # `from . import x` imports the submodule x
                out.extend((f"{target}.{n}", []) for n in names if (PACKAGE.parent / (target + "." + n).replace(".", "/")).with_suffix(".py").exists() or (PACKAGE.parent / (target + "." + n).replace(".", "/")).is_dir())
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names if a.name.startswith("optimum_owl"))
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, _ in _imports(path):
            while target and target not in modules:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != mod and target != "optimum_owl":
                graph[mod].add(target)
    return graph


def _in(mod: str, prefixes) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _layer(mod: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if _in(mod, prefixes):
            return rank
    raise AssertionError(f"{mod} is in no layer of LAYERS: add it (and to docs/architecture.md)")


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_layer_imports_only_the_layers_below_it():
    # the package root (`import optimum_owl`) is the public entry point, above everything
    graph = {m: ts for m, ts in _graph().items() if m != "optimum_owl"}
    bad = [(m, t) for m, ts in graph.items() for t in ts if _layer(t) > _layer(m)]
    bad += [(m, t) for m, ts in graph.items() for t in ts
            for mine, forbidden in ALSO_FORBIDDEN.items() if _in(m, (mine,)) and _in(t, forbidden)]
    assert bad == []


def test_the_top_level_holds_about_ten_modules_and_the_layer_folders():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py")
    assert len(top) <= 11, top
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert {"algorithms", "formats", "pruning", "inference"} <= folders


def test_no_deprecated_shim_or_alias_is_left():
    """One home per name: no module warns DeprecationWarning or re-exports a name with `noqa: F401`."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "DeprecationWarning" in text or ("noqa: F401" in text and "import optimum_owl" not in text
                                            and "import ninja" not in text):
            offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


def test_no_module_re_exports_names_it_imports():
    """A module's `__all__` lists what it defines; only a package's `__init__.py` gathers its modules' names."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        imported = {a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom) for a in node.names}
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                offenders += [(str(path.relative_to(PACKAGE)), e.value) for e in node.value.elts if e.value in imported]
    assert offenders == []


def test_no_private_names_imported_across_modules():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        for target, names in _imports(path):
            bad += [(str(path.relative_to(PACKAGE)), target, n) for n in names if n.startswith("_") and n != "__all__"]
    assert bad == []


def test_modules_stay_small():
    big = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}


# ------------------------------------------------------------------------------------------------ registry
def test_a_new_criterion_is_one_registration():
    from optimum_owl.algorithms.criteria import Criterion, criterion_names, get_criterion, register_criterion, registry
    from optimum_owl.algorithms.masks import apply_keep_mask_, keep_mask_per_row

    def prune(task):  # keep the largest |W| per row, like magnitude but per row
        apply_keep_mask_(task.weight, keep_mask_per_row(task.weight.abs().float(), task.sparsity))

    def screen(weight, norms, settings):
        return weight.abs().float(), "row"

    toy = Criterion("toy_rowmag", "none", False, prune, screen)
    register_criterion(toy)
    try:
        assert "toy_rowmag" in criterion_names() and get_criterion("TOY_ROWMAG") is toy
        model = tiny_model("llama", layers=2)
        report = OWLPruner(OWLPrunerConfig(sparsity=0.5, method="toy_rowmag", layerwise="uniform")).prune(model)
        assert report.calibration["source"].startswith("none")  # statistics="none": no data needed
        assert report.sparsity == pytest.approx(0.5, abs=0.01)
        with pytest.raises(ValueError, match="already registered"):
            register_criterion(Criterion("toy_rowmag", "none", False, prune, screen))
    finally:
        registry._REGISTRY.pop("toy_rowmag", None)
    with pytest.raises(Exception, match="toy_rowmag"):
        OWLPrunerConfig(method="toy_rowmag")


def test_a_new_allocation_family_is_one_registration(monkeypatch):
    """A toy family (sparsity falling with depth, the knob `atp_beta`) registered once: a direct run applies it, and
    `auto` screens its grid, checks it exactly and can choose it; unregistered, the config refuses its name."""
    import optimum_owl.pruning.search.scoring as scoring
    from optimum_owl.algorithms.allocation import BlockPlan
    from optimum_owl.algorithms.families import Family, get_family, register_family, registry, searchable_names
    from optimum_owl.algorithms.families.registry import with_configured

    def allocate(budget, metrics, knob):
        n, beta = budget.num_blocks, knob["atp_beta"]
        return [BlockPlan(budget.sparsity + beta * ((n - 1) / 2 - i)) for i in range(n)], None

    def grid(config, num_blocks):
        return {"atp_beta": with_configured([0.05, 0.1], config.atp_beta)}

    toy = Family("toy_falling", allocate, knobs=("atp_beta",), grid=grid)
    register_family(toy)
    try:
        assert get_family("TOY_FALLING") is toy and "toy_falling" in searchable_names()
        model = tiny_model("llama", layers=3)
        report = OWLPruner(OWLPrunerConfig(sparsity=0.5, method="magnitude", layerwise="toy_falling", atp_beta=0.05)).prune(model)
        assert report.calibration["source"].startswith("none")  # inputs="none": no data needed
        assert report.block_sparsities == pytest.approx([0.55, 0.5, 0.45])
        assert report.allocation == {"family": "toy_falling", "knob": {"atp_beta": 0.05}, "metric": None}

        def falling(model, ids, batch_size):  # a loss that rewards sparsity falling with depth
            zeros = [sum(int((p == 0).sum()) for p in layer.parameters() if p.dim() == 2) for layer in model.model.layers]
            return torch.full((ids.shape[0], 3), 1.0 - (zeros[0] - zeros[-1]) / 1e4, dtype=torch.float64)

        monkeypatch.setattr(scoring, "token_losses", falling)
        config = OWLPrunerConfig(sparsity=0.5, layerwise="auto", auto_families=["toy_falling"], num_samples=12,
                                 seqlen=16, batch_size=3, auto_holdout=0.25)
        report = OWLPruner(config).prune(tiny_model("llama", layers=3), dataset=calib_ids(12))
        screened = [c.knob for c in report.candidates if c.layerwise == "toy_falling, screened"]
        assert screened == [{"atp_beta": 0.005}, {"atp_beta": 0.05}, {"atp_beta": 0.1}]  # the grid and the configured
        (chosen,) = [c for c in report.candidates if c.chosen]
        assert chosen.family == "toy_falling" and report.allocation["family"] == "toy_falling"
        with pytest.raises(ValueError, match="already registered"):
            register_family(Family("toy_falling", allocate))
        with pytest.raises(ValueError, match="search"):
            register_family(Family("auto", allocate))
    finally:
        registry._REGISTRY.pop("toy_falling", None)
    with pytest.raises(Exception, match="toy_falling"):
        OWLPrunerConfig(layerwise="toy_falling")


def test_pruner_is_reentrant():
    """Two runs with one pruner at once (threads) give what each gives alone: no run state on the pruner."""
    pruner = OWLPruner(OWLPrunerConfig(sparsity=0.5, num_samples=4, seqlen=16, batch_size=2))
    models = [tiny_model("llama", layers=3, seed=s) for s in (0, 1)]
    refs = [tiny_model("llama", layers=3, seed=s) for s in (0, 1)]
    for ref in refs:
        OWLPruner(pruner.config).prune(ref, dataset=calib_ids(4, 16))
    errors = []

    def work(m):
        try:
            pruner.prune(m, dataset=calib_ids(4, 16))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for m, ref in zip(models, refs):
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert set(vars(pruner)) == {"config", "model", "tokenizer"}

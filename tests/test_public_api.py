"""The public names that README and docs promise keep working after the package was reorganised (issue 26)."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "optimum_owl": ["OWLPruner", "OWLPrunerConfig", "OWLConfigError", "PruneReport", "sparsify", "densify"],
    "optimum_owl.inference": ["SparseLinear", "sparsify", "densify", "load_sparse", "kernel_status"],
    "optimum_owl.repair": ["RepairConfig", "repair", "save_repaired"],
    "optimum_owl.formats": ["compressible_names", "mark_pruned", "verify_checkpoint", "size_summary",
                            "checkpoint_files", "OWLHfQuantizer"],
    "optimum_owl.serialization": ["save_pruned", "save_dense"],
    "optimum_owl.errors": ["OWLConfigError", "CalibrationDataError", "OWLCheckpointError", "ResumeMismatchError"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
    assert missing == []


@pytest.mark.parametrize("old", ["optimum_owl.auto", "optimum_owl.checkpoint", "optimum_owl.checkpointing",
                                 "optimum_owl.saving", "optimum_owl.integration.bitmask", "optimum_owl.search",
                                 "optimum_owl.engine", "optimum_owl.bitmask"])
def test_old_module_paths_are_gone(old):
    """One home per name: the pre-0.1 paths are not kept as shims (the package was never released)."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)


@pytest.mark.parametrize("first", ["optimum_owl.pruning.engine", "optimum_owl.formats.bitmask", "optimum_owl.inference",
                                   "optimum_owl.integration.transformers", "optimum_owl.formats.quantizer"])
def test_registration_works_whatever_module_is_imported_first(first):
    """The quantizer registers itself on transformers' first `from_pretrained` even when importing one of our own
    modules is what starts transformers' quantizer registry (no partially initialised module on the way)."""
    import subprocess
    import sys

    code = (f"import {first}\nimport transformers.quantizers.auto as auto\n"
            "print(auto.AUTO_QUANTIZER_MAPPING['owl'].__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "OWLPruningQuantizer"
    assert "could not register" not in done.stderr

"""The export package's optional dependencies: the install hint and the check that they are importable."""

from __future__ import annotations

import importlib

INSTALL_HINT = 'pip install "optimum-owl[onnx]"  (installs onnx, onnxruntime and onnxscript)'


def require_onnx(*modules: str) -> None:
    """Import-check the optional ONNX dependencies, raising `ImportError` with the install command when missing.

    Args:
        *modules (`str`): module names to check; defaults to `onnx` and `onnxruntime`.
    """
    for name in modules or ("onnx", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(f"ONNX export needs the `{name}` package, which is not installed: {INSTALL_HINT}") from err

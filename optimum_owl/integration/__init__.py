"""Integrations with the Hugging Face stack.

`install()` (called by `import optimum_owl`) registers the `quant_method="owl"` quantizer with transformers. To keep
`import optimum_owl` light, registration is deferred until transformers' quantizer registry
(`transformers.quantizers.auto`, imported by every `from_pretrained`) is imported; if it already is, registration
happens at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading

logger = logging.getLogger(__name__)

_REGISTRY_MODULE = "transformers.quantizers.auto"
# the compact format's quantizer imports the registry itself, so registration may have to wait for it to finish
_FORMAT_MODULE = "optimum_owl.formats.quantizer"
_lock = threading.Lock()


def _register() -> bool:
    """Register now if every module involved has finished executing; True once registered."""
    for name, last in ((_FORMAT_MODULE, "mark_pruned"), (__name__ + ".transformers", "register")):
        module = sys.modules.get(name)
        if module is not None and not hasattr(module, last):
            # being imported right now (its import started the registry's): when it finishes, the watched loader
            # (formats) or the module itself (the plugin registers itself on import) registers
            return False
    try:
        from .transformers import register

        register()
    except Exception as err:  # noqa: BLE001 - never break the user's transformers import
        logger.warning(
            "optimum-owl could not register its transformers quantizer (%s); prune-on-load and compact "
            "checkpoints are unavailable. Call `optimum_owl.integration.transformers.register()` to see the error.",
            err,
        )
    return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Meta-path finder that runs `_register` right after `transformers.quantizers.auto` (or, when its import is what
    started the registry's, `optimum_owl.formats.quantizer`) has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in (_REGISTRY_MODULE, _FORMAT_MODULE):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        if _REGISTRY_MODULE in sys.modules and _register():
            _remove_finder()

    def __getattr__(self, name):  # get_source, get_code, ... for tracebacks and tools
        return getattr(self.inner, name)


_finder: _RegisterAfterImport | None = None


def _remove_finder() -> None:
    global _finder
    with _lock:
        if _finder is not None and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        _finder = None


def install() -> None:
    """Register optimum-owl with transformers now, or as soon as its quantizer registry is imported."""
    global _finder
    if _REGISTRY_MODULE in sys.modules and _register():
        return
    with _lock:
        if _finder is None:
            _finder = _RegisterAfterImport()
            sys.meta_path.insert(0, _finder)

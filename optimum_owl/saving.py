"""Deprecated name of `optimum_owl.serialization` (saving) and `optimum_owl.modeling.load_model`."""

from __future__ import annotations

import warnings

from .modeling import load_model  # noqa: F401
from .serialization.save import save_pruned  # noqa: F401

warnings.warn("`optimum_owl.saving` was renamed `optimum_owl.serialization`.", DeprecationWarning, stacklevel=2)

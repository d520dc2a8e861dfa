"""Deprecated name of `optimum_owl.serialization` (saved pruned models)."""

from __future__ import annotations

import warnings

from .errors import OWLCheckpointError  # noqa: F401
from .serialization.compact import checkpoint_files, plain_model, save_dense, size_summary, verify_checkpoint  # noqa: F401

warnings.warn("`optimum_owl.checkpoint` was renamed `optimum_owl.serialization`.", DeprecationWarning, stacklevel=2)

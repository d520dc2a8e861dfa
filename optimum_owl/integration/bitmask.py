"""Deprecated location of the bitmask codec: use `optimum_owl.bitmask`."""

from __future__ import annotations

import warnings

from ..bitmask import *  # noqa: F403
from ..bitmask import __all__  # noqa: F401

warnings.warn(
    "`optimum_owl.integration.bitmask` moved to `optimum_owl.bitmask`; the old path will be removed.",
    DeprecationWarning,
    stacklevel=2,
)

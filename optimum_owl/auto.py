"""Deprecated name of `optimum_owl.search` (the `layerwise="owl-auto"` search)."""

from __future__ import annotations

import warnings

from .search import *  # noqa: F403
from .search import MIN_GAIN_SE, PATIENCE, SCREEN_SUFFIX, beats_uniform, holdout_count, holdout_loss, window_losses  # noqa: F401

warnings.warn("`optimum_owl.auto` was renamed `optimum_owl.search`.", DeprecationWarning, stacklevel=2)

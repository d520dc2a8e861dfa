"""Deprecated name of `optimum_owl.resume` (resume state of interrupted runs)."""

from __future__ import annotations

import warnings

from .resume import *  # noqa: F403
from .resume import FORMAT_VERSION, STATE_FILE, CheckpointMismatchError, ResumeState, RunCheckpoint  # noqa: F401

warnings.warn("`optimum_owl.checkpointing` was renamed `optimum_owl.resume`.", DeprecationWarning, stacklevel=2)

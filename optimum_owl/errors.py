"""Every error optimum-owl raises, in one place. Each message names the bad field or tensor and the fix.

The modules that used to define these (config, data, modeling, runner, criteria, resume, the bitmask codec, the
transformers plugin, export, hub, repair) re-export them, so `from optimum_owl.config import OWLConfigError` and the
other historic import paths keep working.
"""

from __future__ import annotations


class OWLConfigError(ValueError):
    """A field of `OWLPrunerConfig` has a value that cannot work; the message names the field and the fix."""


class CalibrationDataError(ValueError):
    """The calibration source cannot give the requested windows (too short, wrong column, unreadable)."""


class OWLModelError(ValueError):
    """The model's transformer blocks or prunable layers cannot be found."""


class OWLNumericalError(FloatingPointError):
    """A block produced NaN or Inf activations."""


class SparseGPTError(RuntimeError):
    """The Hessian could not be factorised even after extra damping."""


class ResumeMismatchError(OWLConfigError):
    """`checkpoint_dir` holds the resume state of a different run (config, model, data or format version)."""


# The historic name of `ResumeMismatchError` (resume state used to be called a "checkpoint").
CheckpointMismatchError = ResumeMismatchError


class OWLCheckpointError(ValueError):
    """A compact (bitmask) checkpoint is corrupt, truncated or does not match the model; the message names the
    tensor and says how to fix it."""


class OWLOffloadError(ValueError):
    """No longer raised: prune-on-load prunes offloaded blocks (CPU or disk) through `offload.BlockOffloader`
    instead of refusing them. Kept so that code catching it still imports."""


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not supported by the ONNX export."""


class HubUploadError(RuntimeError):
    """An upload to the Hugging Face Hub failed; the message says how to retry."""


class RepairConfigError(ValueError):
    """A field of `RepairConfig` has a value that cannot work."""


class RepairDataError(ValueError):
    """The repair training data cannot give the requested windows."""


class RepairModelError(ValueError):
    """The model cannot be repaired (quantized weights, no prunable layers, ...)."""


class RepairWarning(UserWarning):
    """Repair ran, but something about it deserves attention."""

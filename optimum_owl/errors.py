"""Every error optimum-owl raises, in one place. Each message names the bad field or tensor and the fix.
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



class OWLCheckpointError(ValueError):
    """A compact (bitmask) checkpoint is corrupt, truncated or does not match the model; the message names the
    tensor and says how to fix it."""


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

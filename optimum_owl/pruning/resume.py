"""Resumable pruning runs: save the state after every finished block, continue from there after an interruption.

With `OWLPrunerConfig(checkpoint_dir=...)` the pruner keeps, in that folder:

| file | written | holds |
|---|---|---|
| `owl_checkpoint.json` | after every step (last, atomically) | format version, run fingerprint, OWL outlier ratios and DLP mean scores, per-block plans, number of finished blocks, name of the inputs file, the SHA-256 of every `.pt` file it names and of itself |
| `block_NNNNN.pt` | when block N is finished | per unit: the keep mask packed to bits by THE codec (`optimum_owl.formats.bitmask`, little-endian bits) for criteria that only choose a mask, or the pruned weight for criteria that update weights (SparseGPT); with int8 values also its scales and quantization errors |
| `inputs_NNNNN.pt` | when block N-1 is finished | block N's calibration inputs (hidden states and the block's other arguments) |

Every file is written to a temporary name and renamed, and `owl_checkpoint.json` is replaced only after the files
it names exist, so an interruption at any point leaves a consistent checkpoint. A rerun with the same config and
calibration data on a freshly loaded model checks every file against its SHA-256 (a corrupt or truncated file is
refused, naming it), restores the finished blocks, skips the outlier pass (OWL, DLP) when its
results were saved, and continues with the next block: the final masks are identical to an uninterrupted run. Every
fixed `layerwise` resumes: ATP's plans depend on the config only, AlphaPruning's are recomputed from the (dense,
freshly loaded) weights before anything is restored, and the saved plans must equal the recomputed ones.

The fingerprint covers the config (except `device`, `offload_folder`, `offload_activations`, `checkpoint_dir`,
which do not change the result on a given device), the model's block path and prunable unit names and shapes,
and a hash of block 0's calibration inputs (so both the data and the embeddings are covered). A checkpoint made
by a different run raises `ResumeMismatchError`, naming the folder.

Format 2 (optimum-owl 0.2) packs mask bits little-endian, as the compact checkpoints do (format 1: big-endian bits);
format 3 adds the SHA-256 of every file. Older formats are refused with a message that names the state file and
says to delete the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..algorithms.criteria import get_criterion
from ..algorithms.masks import apply_keep_mask_
from ..config import NON_RESULT_FIELDS, OWLPrunerConfig
from ..errors import OWLConfigError, ResumeMismatchError
from ..formats.bitmask import pack_bits, unpack_bits
from ..utils import atomic_write, atomic_write_text, map_tensors
from .int8 import quantize_to, record_grid
from .runner import Batch

logger = logging.getLogger(__name__)

STATE_FILE = "owl_checkpoint.json"
FORMAT_VERSION = 3  # 3: SHA-256 of every file; 2: mask bits little-endian (THE codec); 1: big-endian. Older: refused


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def run_fingerprint(config: OWLPrunerConfig, path: str, units: Sequence[Sequence[Any]], inputs0: Sequence[Batch] | None) -> str:
    """SHA-256 over what decides the result: the config, the model's units and block 0's calibration inputs."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in NON_RESULT_FIELDS}
    model = {"block_path": path, "units": [[[u.name, list(u.shape)] for u in block] for block in units]}
    h = hashlib.sha256(json.dumps({"config": cfg, "model": model}, sort_keys=True, default=str).encode())
    for batch in inputs0 or []:
        _hash_tensor(h, batch.hidden)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_digest(state: dict[str, Any]) -> str:
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _pack(keep: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(keep.shape), "bits": pack_bits(keep)}


def _unpack(entry: dict[str, Any], device: torch.device) -> torch.Tensor:
    numel = 1
    for d in entry["shape"]:
        numel *= int(d)
    return unpack_bits(entry["bits"], numel).reshape(entry["shape"]).to(device)


def _batch_to_dict(batch: Batch) -> dict[str, Any]:
    cpu = lambda t: t.detach().to("cpu")  # noqa: E731
    return {"hidden": cpu(batch.hidden), "kwargs": map_tensors(batch.kwargs, cpu), "args": map_tensors(batch.args, cpu)}


class ResumeState:
    """State of one resumable run in `directory` (see the module docstring for the layout).

    Args:
        directory: the run's `checkpoint_dir` (created if missing).
        fingerprint: `run_fingerprint(...)` of the current run.
        num_blocks: number of transformer blocks.
        method: the pruning criterion (decides whether masks or weights are saved).
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str, num_blocks: int, method: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.num_blocks = num_blocks
        self.method = method
        self.int8: dict[str, Any] = {}  # values="int8": unit name -> (scales, errors) of the blocks restored
        self.state: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "num_blocks": num_blocks,
            "method": method,
            "outlier_ratios": None,
            "mean_scores": None,
            "plans": None,
            "finished": 0,
            "inputs_file": None,
            "checksums": {},
        }
        self._load()

    @classmethod
    def open(cls, config: OWLPrunerConfig, path: str, units: Sequence[Sequence[Any]], inputs0: Sequence[Batch] | None) -> ResumeState:
        """Open (or start) the checkpoint of the run described by `config` and the model/data fingerprint."""
        return cls(config.checkpoint_dir, run_fingerprint(config, path, units, inputs0), len(units), config.method)

    # ------------------------------------------------------------------------------------------ state file
    def _load(self) -> None:
        file = self.directory / STATE_FILE
        if self.directory.exists() and not self.directory.is_dir():
            raise OWLConfigError(f"`checkpoint_dir`={str(self.directory)!r} exists and is not a folder.")
        self.directory.mkdir(parents=True, exist_ok=True)
        if not file.exists():
            self._save_state()
            return
        try:
            saved = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ResumeMismatchError(
                f"`checkpoint_dir`={str(self.directory)!r}: {STATE_FILE} is not valid JSON ({err}); delete the folder "
                "to start over."
            ) from None
        if saved.get("version") != FORMAT_VERSION:
            raise ResumeMismatchError(
                f"{file} holds resume state in format {saved.get('version')!r}, written by another optimum-owl "
                f"version; this one reads format {FORMAT_VERSION} only (format 2 changed the mask bit order, format 3 "
                f"added checksums). Delete the folder {str(self.directory)!r} to start over, or use a new "
                "`checkpoint_dir`."
            )
        if saved.get("state_sha256") != _state_digest(saved):
            raise ResumeMismatchError(
                f"{file} fails its SHA-256 checksum (corrupt or edited); delete the folder {str(self.directory)!r} "
                "to start over."
            )
        if saved.get("fingerprint") != self.fingerprint:
            raise ResumeMismatchError(
                f"`checkpoint_dir`={str(self.directory)!r} holds a checkpoint of a different run (config, model or "
                "calibration data differ). Use a new `checkpoint_dir` for this run, or "
                "delete the folder to start over."
            )
        self.state.update(saved)
        if self.finished:
            logger.info("Resuming from %s: %d of %d blocks finished.", self.directory, self.finished, self.num_blocks)

    def _save_state(self) -> None:
        self.state["state_sha256"] = _state_digest(self.state)
        atomic_write_text(self.directory / STATE_FILE, json.dumps(self.state, indent=1, sort_keys=True) + "\n")

    @property
    def finished(self) -> int:
        """Number of finished blocks (0 … num_blocks)."""
        return int(self.state["finished"])

    def _load_file(self, name: str) -> Any:
        """`torch.load` a file of this folder after checking it against the SHA-256 recorded when it was written."""
        file = self.directory / name
        if not file.exists():
            raise ResumeMismatchError(
                f"{file} is missing although {STATE_FILE} names it; delete the folder {str(self.directory)!r} to "
                "start over."
            )
        if _sha256(file) != self.state["checksums"].get(name):
            raise ResumeMismatchError(
                f"{file} fails its SHA-256 checksum (corrupt or truncated); delete the folder "
                f"{str(self.directory)!r} to start over."
            )
        return torch.load(file, map_location="cpu", weights_only=True)

    def _save_file(self, obj: Any, name: str) -> None:
        _atomic_torch_save(obj, self.directory / name)
        self.state["checksums"][name] = _sha256(self.directory / name)

    # ------------------------------------------------------------------------------------------ outlier pass
    def saved_ratios(self) -> list[float] | None:
        """The outlier ratios of an earlier attempt of this run, or `None`."""
        ratios = self.state.get("outlier_ratios")
        return [float(r) for r in ratios] if ratios is not None else None

    def saved_mean_scores(self) -> list[float] | None:
        """The blocks' mean Wanda scores (DLP's metric) of an earlier attempt, or `None` (also for state written
        before they were saved: the outlier pass then simply runs again)."""
        means = self.state.get("mean_scores")
        return [float(m) for m in means] if means is not None else None

    def save_ratios(self, ratios: Sequence[float], mean_scores: Sequence[float] | None = None) -> None:
        """Record the outlier pass's results: outlier ratios (OWL) and mean scores (DLP)."""
        self.state["outlier_ratios"] = [float(r) for r in ratios]
        self.state["mean_scores"] = None if mean_scores is None else [float(m) for m in mean_scores]
        self._save_state()

    # ------------------------------------------------------------------------------------------ blocks
    @staticmethod
    def _plans_json(plans: Sequence[Any]) -> list[list[Any]]:
        return [[float(p.sparsity), list(p.nm) if p.nm else None] for p in plans]

    def resume(
        self,
        units: Sequence[Sequence[Any]],
        plans: Sequence[Any],
        scope: Callable[[int], contextlib.AbstractContextManager],
    ) -> tuple[int, list[Batch] | None]:
        """Restore the finished blocks into the model; return `(first_block_to_run, its_inputs)`.

        Args:
            units: the run's units per block.
            plans: the current per-block plans (must equal the saved ones).
            scope: `scope(i)` returns the context that makes block i's weights real (offload-aware).
        """
        done = self.finished
        if done == 0:
            self.state["plans"] = self._plans_json(plans)
            self._save_state()
            return 0, None
        if self.state.get("plans") != self._plans_json(plans):
            raise ResumeMismatchError(
                f"`checkpoint_dir`={str(self.directory)!r}: the saved per-block plans differ from this run's; delete "
                "the folder to start over."
            )
        for i in range(done):
            self._restore_block(i, units[i], scope)
        inputs = None
        if done < self.num_blocks and self.state.get("inputs_file"):
            raw = self._load_file(self.state["inputs_file"])
            inputs = [Batch(d["hidden"], d["kwargs"], tuple(d["args"])) for d in raw]
        return done, inputs

    def _restore_block(self, index: int, units: Sequence[Any], scope: Callable[[int], contextlib.AbstractContextManager]) -> None:
        file = self.directory / f"block_{index:05d}.pt"
        if not file.exists():
            raise ResumeMismatchError(
                f"`checkpoint_dir`={str(self.directory)!r} lacks {file.name} although block {index} is recorded as "
                "finished; delete the folder to start over."
            )
        saved = self._load_file(file.name)
        with scope(index):
            for unit in units:
                entry = saved[unit.name]
                weight = unit.weight()
                if "weight" in entry:
                    weight.copy_(entry["weight"].to(weight.device, weight.dtype))
                else:
                    apply_keep_mask_(weight, _unpack(entry, weight.device))
                if "int8" in entry:  # the same grid again: dense kept weights rounded as before (or already on it)
                    scales, group_size = entry["int8"]["scales"], entry["int8"]["group_size"] or None
                    quantize_to(unit, scales, group_size)
                    record_grid(unit, scales, group_size)
                    self.int8[unit.name] = (scales, dict(entry["int8"]["errors"]))

    def block_done(
        self, index: int, units: Sequence[Any], next_inputs: Sequence[Batch] | None, int8: dict[str, Any] | None = None,
        group_size: int | None = None,
    ) -> None:
        """Record block `index` as finished. Call it while the block's weights are real (inside its context).
        `int8` (values="int8"): unit name -> its `(scales, errors)` on grids of `group_size`, saved beside its mask or
        weight."""
        content: dict[str, Any] = {}
        for unit in units:
            w = unit.weight()
            if not get_criterion(self.method).updates_weights:
                content[unit.name] = _pack(w != 0)
            else:
                content[unit.name] = {"weight": w.detach().to("cpu").contiguous().clone()}
            if int8 and unit.name in int8:
                scales, errors = int8[unit.name]
                content[unit.name]["int8"] = {"scales": scales.cpu(), "errors": dict(errors), "group_size": group_size or 0}
        self._save_file(content, f"block_{index:05d}.pt")
        old_inputs = self.state.get("inputs_file")
        new_inputs = None
        if next_inputs is not None and index + 1 < self.num_blocks:
            new_inputs = f"inputs_{index + 1:05d}.pt"
            self._save_file([_batch_to_dict(b) for b in next_inputs], new_inputs)
        self.state["finished"] = index + 1
        self.state["inputs_file"] = new_inputs
        if old_inputs and old_inputs != new_inputs:
            self.state["checksums"].pop(old_inputs, None)
        self._save_state()
        if old_inputs and old_inputs != new_inputs:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / old_inputs).unlink()

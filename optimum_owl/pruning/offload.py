"""Bring one transformer block at a time onto its execution device, and write pruned weights back.

This is the only module that touches weights living under Accelerate hooks. It serves two cases:

- **A model dispatched by Accelerate** (`from_pretrained(device_map=..., max_memory=..., offload_folder=...)`):
  leaf modules of CPU- or disk-offloaded blocks carry an `AlignDevicesHook(offload=True)` whose `weights_map`
  lazily loads their tensors; the module itself only holds `meta` tensors. `BlockOffloader` materialises every
  offloaded tensor of a block on the hook's execution device (once for the whole block, so the block can run over
  every calibration batch and be pruned in place), then, when the block is left without error, compares each tensor
  with the store and writes the changed ones back *into a new offload store*: new safetensors files in a folder of
  its own, with the offload index updated to point at them. Files an index entry already points at (for
  safetensors checkpoints these are the original checkpoint files) are never written.
- **A model loaded normally** with `OWLPrunerConfig(device=...)`: the block is moved to `device` for its turn and
  moved back afterwards, so only one block (plus its calibration activations) occupies the execution device.

With several GPUs (`device_map="auto"` over GPUs) each block already runs where it lives: `plan_block_devices`
reads the same placement from `hf_device_map`, and the runner moves activations to each block's device.

Example:

```python
>>> from transformers import AutoModelForCausalLM                                     # doctest: +SKIP
>>> model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory={"cpu": "2GiB"},
...                                              offload_folder="offload")            # doctest: +SKIP
>>> OWLPruner(OWLPrunerConfig(sparsity=0.5)).prune(model, dataset=texts, tokenizer=tok)  # doctest: +SKIP
```
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OWLConfigError
from ..utils import atomic_write
from .memory import limit_heap_retention, release_freed_memory

logger = logging.getLogger(__name__)

# Subfolder created inside the user's `offload_folder` (from `from_pretrained`) for pruned weights.
STORE_PREFIX = "owl-pruned-"


# ---------------------------------------------------------------------------------------------------- inspection
def align_hooks(module: nn.Module) -> list[Any]:
    """The `AlignDevicesHook`s attached to `module` (unwrapping a `SequentialHook`)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hooks = list(hook.hooks) if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def offload_hook(module: nn.Module) -> Any | None:
    """The module's `AlignDevicesHook` that offloads its weights (`offload=True` with a `weights_map`), or `None`."""
    for hook in align_hooks(module):
        if hook.offload and hook.weights_map is not None:
            return hook
    return None


def is_dispatched(model: nn.Module) -> bool:
    """Whether Accelerate hooks manage the model's devices (any `AlignDevicesHook` on any module)."""
    return any(align_hooks(m) for m in model.modules())


def has_offloaded_weights(module: nn.Module) -> bool:
    """Whether some weights under `module` live in an offload store (their module tensors are on `meta`)."""
    return any(offload_hook(m) is not None for m in module.modules())


def _to_device(value: Any) -> torch.device:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device(value)


def main_device(device_map: Mapping[str, Any]) -> torch.device:
    """Accelerate's main device for a device map: the first entry that is neither `"cpu"` nor `"disk"`, else CPU.

    Modules mapped to `"cpu"` or `"disk"` execute there (their weights are brought over for the forward).
    """
    for value in device_map.values():
        if value not in ("cpu", "disk"):
            return _to_device(value)
    return torch.device("cpu")


def plan_block_devices(device_map: Mapping[str, Any], block_path: str, num_blocks: int) -> list[torch.device]:
    """Execution device of each block under an Accelerate `device_map` (e.g. `model.hf_device_map`).

    A block runs on the device of the deepest map entry that contains it (`""` contains everything); `"cpu"` and
    `"disk"` entries run on the main device (see `main_device`). A block split over several entries runs where its
    first listed part lives (the runner moves its inputs there; Accelerate's hooks move them on between parts).

    Args:
        device_map: module name -> device (`int` GPU index, `"cuda:1"`, `"cpu"`, `"disk"`, ...).
        block_path: dotted path of the block list (`"model.layers"`).
        num_blocks: number of blocks.

    Returns:
        `list[torch.device]`, one per block.

    Example:

    ```python
    >>> plan_block_devices({"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": "disk"},
    ...                    "model.layers", 2)
    [device(type='cuda', index=0), device(type='cuda', index=1)]
    ```
    """
    main = main_device(device_map)
    devices: list[torch.device] = []
    for i in range(num_blocks):
        name = f"{block_path}.{i}"
        best: str | None = None
        for key in device_map:
            if key == "" or name == key or name.startswith(key + "."):
                if best is None or len(key) > len(best):
                    best = key
        if best is None:  # the block is split: its parts are listed below it
            inner = [k for k in device_map if k.startswith(name + ".")]
            if not inner:
                raise OWLConfigError(f"`device_map` has no entry for block `{name}`; it must cover every module.")
            best = inner[0]
        value = device_map[best]
        devices.append(main if value in ("cpu", "disk") else _to_device(value))
    return devices


def resolve_device(device: str | None) -> torch.device | None:
    """Turn `OWLPrunerConfig.device` into a `torch.device` (`"auto"`: CUDA when available, else CPU)."""
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OWLConfigError(
            f"`device`={device!r} but CUDA is not available on this machine; use device='auto' or device='cpu'."
        )
    return dev


def _named_offloaded_tensors(module: nn.Module, hook: Any) -> list[str]:
    from accelerate.utils import named_module_tensors

    return [
        name
        for name, _ in named_module_tensors(
            module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
        )
    ]


def _get_tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner = module
    *parents, leaf = name.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return getattr(owner, leaf)


# ---------------------------------------------------------------------------------------------------- the context
class BlockOffloader:
    """`block_context` for `BlockRunner`: makes a block's weights real on its execution device for a `with` body.

    Args:
        model: the model being pruned.
        device (`str`, *optional*): `OWLPrunerConfig.device`; for a model *not* dispatched by Accelerate, each block
            is moved there for its turn. Must be `None` for a dispatched model (its device map decides).
        offload_folder (`str`, *optional*): where pruned weights of disk-offloaded blocks are written. Defaults to
            a new `owl-pruned-*` folder inside the offload store's own folder (the `offload_folder` given to
            `from_pretrained`), or a temporary folder; a default folder is removed when the model is garbage
            collected, because the model reads its pruned weights from it until then.

    Calling the instance with `(index, block)` returns a context manager. Entering it for a block that is already
    entered is a no-op, so contexts nest safely.
    """

    def __init__(self, model: nn.Module, device: str | None = None, offload_folder: str | os.PathLike | None = None):
        self.model = model
        self.dispatched = is_dispatched(model)
        if self.dispatched and device is not None:
            raise OWLConfigError(
                f"`device`={device!r} cannot be combined with a model dispatched by Accelerate (it has "
                "`hf_device_map`/hooks): each block already runs on its device-map device. Drop `device`, or load "
                "the model without `device_map`."
            )
        self.device = resolve_device(device)
        self._folder = Path(offload_folder) if offload_folder is not None else None
        self._active: set[int] = set()
        self._written: set[str] = set()  # files this offloader created (it may overwrite only these)
        self.writes = 0

    @property
    def active(self) -> bool:
        """Whether this offloader does anything for this model (dispatched with offloaded weights, or `device` set)."""
        return (self.dispatched and has_offloaded_weights(self.model)) or self.device is not None

    @property
    def folder(self) -> Path | None:
        """The folder holding written-back weights (`None` until the first disk write)."""
        return self._folder

    def __call__(self, index: int, block: nn.Module) -> contextlib.AbstractContextManager:
        return self.block(index, block)

    @contextlib.contextmanager
    def block(self, index: int, block: nn.Module) -> Iterator[nn.Module]:
        """Context manager: `block` with real weights on its execution device; written back on a clean exit."""
        if id(block) in self._active:
            yield block
            return
        self._active.add(id(block))
        try:
            if self.dispatched:
                if has_offloaded_weights(block):
                    limit_heap_retention()
                with self._onload(block):
                    yield block
            elif self.device is not None:
                with self._moved(block, self.device):
                    yield block
            else:
                yield block
        finally:
            self._active.discard(id(block))
            if self.dispatched or self.device is not None:
                release_freed_memory()

    # ------------------------------------------------------------------------------------------ plain models
    @staticmethod
    @contextlib.contextmanager
    def _moved(block: nn.Module, device: torch.device) -> Iterator[None]:
        homes = {name: t.device for name, t in list(block.named_parameters()) + list(block.named_buffers())}
        home = next(iter(homes.values()), device)
        if any(d != home for d in homes.values()):
            raise OWLConfigError(
                "`device` needs every weight of a block on one device; this block is spread over "
                f"{sorted({str(d) for d in homes.values()})}. Load the model on CPU, or use a `device_map`."
            )
        block.to(device)
        try:
            yield
        finally:
            block.to(home)

    # ------------------------------------------------------------------------------------------ accelerate
    @contextlib.contextmanager
    def _onload(self, block: nn.Module) -> Iterator[None]:
        hooked = [(m, h) for m in block.modules() if (h := offload_hook(m)) is not None]
        loaded: list[tuple[nn.Module, Any]] = []
        try:
            for module, hook in hooked:
                hook.pre_forward(module)  # materialises every offloaded tensor on hook.execution_device
                hook.offload = False  # the block's own forward calls must not send them back to meta
                loaded.append((module, hook))
                self._unshare(module, hook)
            yield
            for module, hook in loaded:  # only after a clean exit: a failed block leaves the store untouched
                self._write_back(module, hook)
        finally:
            for module, hook in loaded:
                hook.offload = True
                hook.post_forward(module, None)  # back to meta; frees the materialised tensors

    @staticmethod
    def _unshare(module: nn.Module, hook: Any) -> None:
        """In-memory stores hand out their own tensors; prune a private copy so the store changes only on write-back."""
        from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

        wm = hook.weights_map
        prefix, dataset = (wm.prefix, wm.dataset) if isinstance(wm, PrefixedDataset) else ("", wm)
        for name in _named_offloaded_tensors(module, hook):
            if isinstance(dataset, OffloadedWeightsLoader) and prefix + name not in dataset.state_dict:
                continue  # read from a file: always a fresh tensor
            tensor = _get_tensor(module, name)
            stored = wm[name]
            if isinstance(stored, torch.Tensor) and stored.device == tensor.device and stored.data_ptr() == tensor.data_ptr():
                tensor.data = tensor.data.clone()

    def _write_back(self, module: nn.Module, hook: Any) -> None:
        for name in _named_offloaded_tensors(module, hook):
            current = _get_tensor(module, name).detach()
            stored = hook.weights_map[name]
            if stored.dtype == current.dtype and torch.equal(stored, current.to(stored.device)):
                continue
            self._store(hook.weights_map, name, current)

    def _store(self, weights_map: Any, name: str, tensor: torch.Tensor) -> None:
        from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

        prefix, dataset = "", weights_map
        if isinstance(weights_map, PrefixedDataset):
            prefix, dataset = weights_map.prefix, weights_map.dataset
        key = prefix + name
        value = tensor.to("cpu").contiguous()
        self.writes += 1
        if isinstance(dataset, OffloadedWeightsLoader):
            if key in dataset.state_dict:  # CPU-offload store (main device is an accelerator): replace the entry
                dataset.state_dict[key] = value.clone() if value.data_ptr() == tensor.data_ptr() else value
                return
            self._write_file(dataset, key, value)
            return
        if isinstance(dataset, dict):  # `cpu_offload()` style: a plain dict of CPU tensors
            dataset[key] = value.clone() if value.data_ptr() == tensor.data_ptr() else value
            return
        raise TypeError(f"Cannot write back `{key}`: unsupported offload store {type(dataset).__name__}.")

    def _ensure_folder(self, dataset: Any) -> Path:
        if self._folder is None:
            parent = getattr(dataset, "save_folder", None)
            if parent is not None:
                Path(parent).mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix=STORE_PREFIX, dir=parent))
            weakref.finalize(self.model, shutil.rmtree, str(self._folder), True)
            self.model._owl_offload_folder = str(self._folder)
            logger.info("Writing pruned offloaded weights to %s (removed with the model).", self._folder)
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    def _write_file(self, dataset: Any, key: str, value: torch.Tensor) -> None:
        from safetensors.torch import save_file

        folder = self._ensure_folder(dataset)
        path = (folder / f"{key}.safetensors").resolve()
        referenced = {
            str(Path(info["safetensors_file"]).resolve())
            for info in dataset.index.values()
            if isinstance(info, Mapping) and info.get("safetensors_file")
        }
        if str(path) in referenced and str(path) not in self._written:
            raise OWLConfigError(
                f"`offload_folder`={str(folder)!r} holds {path.name}, a file the offload index reads from (possibly "
                "the original checkpoint); pruned weights are never written over it. Choose an empty `offload_folder`."
            )
        atomic_write(path, lambda tmp: save_file({key: value}, tmp))
        self._written.add(str(path))
        dataset.index[key] = {
            "safetensors_file": str(path),
            "weight_name": key,
            "dtype": str(value.dtype).replace("torch.", ""),
        }


def make_block_offloader(model: nn.Module, device: str | None = None, offload_folder: str | None = None) -> BlockOffloader | None:
    """A `BlockOffloader` when the model needs one (offloaded weights, or `device` set), else `None`."""
    offloader = BlockOffloader(model, device=device, offload_folder=offload_folder)
    if not offloader.active:
        return None
    if offloader.dispatched:  # offloaded weights: keep freed tensors out of the resident set from the capture on
        limit_heap_retention()
    return offloader

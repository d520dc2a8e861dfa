"""Saving pruned models (atomically, with the tokenizer, the report and the config), compact or dense.

Three formats come out of a pruned model (`validation.SAVE_FORMATS`; docs/checkpoints.md compares them):

- **compact** (default): `model.save_pretrained(dir)` on a model pruned by optimum-owl stores every sparse linear
  weight as values + packed bitmask + shape in safetensors (`optimum_owl.formats`), and `config.json` carries
  `quantization_config: {"quant_method": "owl", ...}`. Loading needs `import optimum_owl`.
- **compressed-tensors**: `save_compressed_tensors(model, dir)` writes compressed-tensors' `sparse-bitmask` layout
  (`optimum_owl.formats.compressed_tensors`), readable by compressed-tensors up to 0.14 and by optimum-owl.
- **dense**: `save_dense(model, dir)` writes ordinary safetensors with the zeros in place and no
  `quantization_config`, for engines that do not know the compact format (vLLM, llama.cpp converters, ...). The
  pruning settings go to `owl_config.json` beside it.

Example:

```python
>>> from optimum_owl.serialization import save_dense
>>> save_dense(model, "pruned-dense")                        # doctest: +SKIP
```
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..config import OWLPrunerConfig
from ..formats.bitmask import compressed_nbytes
from ..formats.compact import compressible_names
from ..formats.compressed_tensors import write_compressed_tensors
from ..pruning.modeling import get_blocks_and_units
from ..pruning.report import PruneReport
from ..utils import atomic_output_dir, input_paths
from ..validation import check_save_format

logger = logging.getLogger(__name__)


def save_pruned(
    model: nn.Module,
    save_dir: str | os.PathLike,
    report: PruneReport | None = None,
    config: OWLPrunerConfig | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    dense: bool = False,
    save_format: str | None = None,
) -> Path:
    """Write the pruned model, tokenizer, `owl_report.json` and `owl_config.json` to `save_dir` in one rename.

    `save_format` (`validation.SAVE_FORMATS`) chooses how the weights are stored: `"compact"` (the default: optimum-owl's
    values + packed bitmask per pruned weight, loading needs `import optimum_owl`), `"compressed-tensors"`
    (compressed-tensors' sparse-bitmask layout, as `save_compressed_tensors` writes it) or `"dense"` (plain
    safetensors with the zeros in place and no `quantization_config`, as `save_dense` writes it; `dense=True` is the
    older spelling).

    Raises `FileExistsError` if `save_dir` exists and `overwrite` is false, and `ValueError` if `save_dir` is or
    contains a folder or file the run read (the model's and the tokenizer's `name_or_path`, the config's local paths:
    `utils.input_paths`): replacing it would delete them. An interrupted save leaves nothing.
    """
    fmt = check_save_format(save_format, dense)
    protected = input_paths(model, tokenizer, config)
    with atomic_output_dir(save_dir, overwrite=overwrite, protected=protected) as tmp:
        if fmt == "dense":
            with plain_model(model):
                model.save_pretrained(tmp)
        elif fmt == "compressed-tensors":
            write_compressed_tensors(model, tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.save(tmp)
        if config is not None:
            config.save_pretrained(tmp)
    logger.info("Saved pruned model (%s format) to %s", fmt, save_dir)
    return Path(save_dir)


# Files that hold weights (never copied by a save); every other file of the model / tokenizer folder is counted.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx", ".index.json")
SIZE_MARGIN = 0.05  # of the estimate: the per-row floor of Wanda keeps a little more than the target share


def estimate_saved_bytes(
    model: nn.Module, config: OWLPrunerConfig, dense: bool = False, file_sources: Iterable[Any] = (),
    save_format: str | None = None,
) -> int:
    """Bytes that `save_pruned(model, ..., save_format=save_format)` will write once `model` is pruned with `config`
    (for a free-space check before the run), with a margin.

    Compact: every weight the run prunes and the format compresses takes its kept values (`config.target_sparsity`)
    × its dtype's size (`values="int8"`: 1 byte, plus float32 scales) + its bitmask (one bit per element) + its
    shape, or its dense size where that is smaller; every
    other tensor (embeddings, norms, the head, fused experts) its dense size; compressed-tensors: the same plus 8 bytes
    of row offset per row; dense: every tensor its dense size. Each tensor adds a header entry and its CRC. The
    non-weight files of `file_sources` (local model / tokenizer folders: config, tokenizer) are added as they are,
    plus the report and config written beside them.
    """
    fmt = check_save_format(save_format, dense)
    _, _, units = get_blocks_and_units(model, config.block_name, config.ignore)
    pruned = {f"{u.name}.{u.param_name}" for block in units for u in block if u.kind != "expert"}
    compressed = set() if fmt == "dense" else pruned & set(compressible_names(model))
    tensors: dict[str, Any] = dict(model.named_parameters())  # tied weights once, as transformers saves them
    shared = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tensors.update({k: v for k, v in model.state_dict(keep_vars=True).items() if k not in shared})  # buffers
    total = 0
    for name, tensor in tensors.items():
        numel, itemsize = tensor.numel(), tensor.element_size()
        size = numel * itemsize
        if name in compressed and tensor.dim() >= 2:
            kept = math.ceil(numel * (1.0 - config.target_sparsity))
            offsets = 8 * tensor.shape[0] if fmt == "compressed-tensors" else 0
            if config.values == "int8" and fmt == "compact":  # 1 byte per kept value + float32 scales (bounded)
                side = max(tensor.shape)
                scales = 4 * side * (1 if config.group_size is None else math.ceil(side / config.group_size))
                size = compressed_nbytes(numel, kept, 1) + scales + 8 * tensor.dim()
            else:
                size = min(size, compressed_nbytes(numel, kept, itemsize) + 8 * tensor.dim() + offsets)
        total += size + 256
    files = 0
    for source in {os.fspath(s) for s in file_sources if isinstance(s, (str, os.PathLike)) and os.fspath(s)}:
        if Path(source).is_dir():
            files += sum(f.stat().st_size for f in Path(source).iterdir() if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES))
    report = 16_384 + 4_096 * len(units)  # owl_report.json (per-block rows), owl_config.json
    return math.ceil(total * (1.0 + SIZE_MARGIN)) + files + report


def _is_owl_config(config: Any) -> bool:
    if isinstance(config, OWLPrunerConfig):
        return True
    return isinstance(config, dict) and config.get("quant_method") == "owl"


@contextlib.contextmanager
def plain_model(model: nn.Module) -> Iterator[Any]:
    """Temporarily detach optimum-owl's quantizer and `quantization_config`; yields the detached config (or None)."""
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(model.config, "quantization_config", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) != "owl":
        raise ValueError(
            f"The model is quantized with {quantizer.quantization_config.quant_method!r}; `save_dense` only removes "
            "optimum-owl's compact format. Dequantize it first (`model.dequantize()`)."
        )
    owl_config = qconfig if _is_owl_config(qconfig) else None
    had_method = hasattr(model, "quantization_method")
    method = getattr(model, "quantization_method", None)
    try:
        if quantizer is not None:
            model.hf_quantizer = None
        if owl_config is not None:
            del model.config.quantization_config
        if had_method and method == "owl":
            del model.quantization_method
        yield owl_config
    finally:
        if quantizer is not None:
            model.hf_quantizer = quantizer
        if owl_config is not None:
            model.config.quantization_config = owl_config
        if had_method and method == "owl":
            model.quantization_method = method


def save_dense(model: nn.Module, save_directory: str | os.PathLike, overwrite: bool = False, **save_kwargs: Any) -> Path:
    """Write a plain dense checkpoint of a pruned model: zeros in place, no `quantization_config` in `config.json`.

    Any engine that reads Hugging Face safetensors can load it. The OWL settings (if the model was pruned by
    optimum-owl) are written to `owl_config.json` and the report (if attached as `model.owl_report`) to
    `owl_report.json`. The model itself is left unchanged and keeps saving compactly with `save_pretrained`.

    Args:
        model: a transformers model.
        save_directory: output folder, written atomically (temporary folder, then one rename).
        overwrite: replace `save_directory` if it exists (otherwise `FileExistsError`); never allowed when it is or
            contains the folder the model was loaded from (`ValueError`).
        **save_kwargs: passed to `model.save_pretrained` (e.g. `max_shard_size`).

    Returns:
        The output folder.
    """
    protected = input_paths(model, config=getattr(model.config, "quantization_config", None))
    with atomic_output_dir(save_directory, overwrite=overwrite, protected=protected, flag="save_directory") as tmp:
        with plain_model(model) as owl_config:
            model.save_pretrained(tmp, **save_kwargs)
        if owl_config is not None:
            config = owl_config if isinstance(owl_config, OWLPrunerConfig) else OWLPrunerConfig.from_dict(owl_config)
            config.save_pretrained(tmp)
        report = getattr(model, "owl_report", None)
        if report is not None and hasattr(report, "save"):
            report.save(tmp)
    logger.info("Saved dense (zeros in place) checkpoint to %s", save_directory)
    return Path(save_directory)



def save_compressed_tensors(
    model: nn.Module, save_directory: str | os.PathLike, overwrite: bool = False, **save_kwargs: Any
) -> Path:
    """Write a pruned (or sparsified) model in compressed-tensors' `sparse-bitmask` layout.

    The format llm-compressor wrote for sparse models (`optimum_owl.formats.compressed_tensors`; docs/checkpoints.md):
    compressed-tensors up to 0.14 decompresses it, and `optimum_owl.inference.load_sparse` loads it straight into the
    sparse form. transformers 5.x cannot load it without optimum-owl. The OWL settings and the report are written
    beside it as `owl_config.json` / `owl_report.json`, as `save_dense` does; the model itself is left unchanged.

    Args:
        model: a transformers model (dense pruned weights, or `SparseLinear` modules from `optimum_owl.sparsify`).
        save_directory: output folder, written atomically (temporary folder, then one rename).
        overwrite: replace `save_directory` if it exists (otherwise `FileExistsError`); never allowed when it is or
            contains the folder the model was loaded from (`ValueError`).
        **save_kwargs: passed to `model.save_pretrained` (e.g. `max_shard_size`).

    Returns:
        The output folder.
    """
    protected = input_paths(model, config=getattr(model.config, "quantization_config", None))
    with atomic_output_dir(save_directory, overwrite=overwrite, protected=protected, flag="save_directory") as tmp:
        write_compressed_tensors(model, tmp, **save_kwargs)
        owl_config = getattr(model.config, "quantization_config", None)
        if _is_owl_config(owl_config):
            config = owl_config if isinstance(owl_config, OWLPrunerConfig) else OWLPrunerConfig.from_dict(owl_config)
            config.save_pretrained(tmp)
        report = getattr(model, "owl_report", None)
        if report is not None and hasattr(report, "save"):
            report.save(tmp)
    logger.info("Saved compressed-tensors sparse-bitmask checkpoint to %s", save_directory)
    return Path(save_directory)

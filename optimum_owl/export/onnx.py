"""`export_onnx`: a (pruned) decoder-only causal LM to one ONNX graph with a KV cache, with its pruned weights
stored compactly (see `optimum_owl.export.storage`) and the export checked against PyTorch with onnxruntime.

The graph is traced with `torch.onnx.export(..., dynamo=False)` through a thin wrapper that takes and returns the
KV cache as flat tensors, so the same graph runs the prefill (past of length 0) and every decode step.
optimum-onnx cannot be used: its releases pin transformers < 4.58.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UnsupportedArchitectureError
from ..pruning.memory import release_freed_memory
from ..utils import atomic_output_dir, atomic_write_text, input_paths
from .deps import require_onnx
from .ort import METADATA_NAME, ONNX_NAME, OnnxCausalLM, compare_with_torch
from .storage import MIN_OPSET, STORAGES, apply_storage

logger = logging.getLogger(__name__)

# Architectures whose export was verified (logits and greedy decoding against PyTorch) with this module.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
# Protobuf cannot serialise a single message above 2 GiB; larger graphs put their weights in `model.onnx.data`.
PROTOBUF_LIMIT = 2_000_000_000


@dataclass
class ExportResult:
    """What `export_onnx` wrote.

    Attributes:
        output_dir: the export folder.
        metadata: the content of `owl_onnx.json` (storage, sizes, sparsity, validation numbers).
    """

    output_dir: Path
    metadata: dict[str, Any]

    @property
    def size_ratio(self) -> float:
        """Bytes of this export divided by the bytes of the dense export of the same model."""
        return self.metadata["sizes"]["ratio_to_dense"]


class _FlatCacheDecoder(torch.nn.Module):
    """Wraps a causal LM so the KV cache enters and leaves as `2 * num_layers` plain tensors."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def check_exportable(model: Any) -> str:
    """Raise `UnsupportedArchitectureError` unless `model` is a decoder-only causal LM of a verified architecture.

    Returns:
        `str`: the model's `model_type`.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or not isinstance(model, torch.nn.Module):
        raise UnsupportedArchitectureError(
            f"`model` must be a transformers PreTrainedModel, got {type(model).__name__}."
        )
    if getattr(config, "is_encoder_decoder", False) or model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"ONNX export supports decoder-only causal LMs of model_type {', '.join(SUPPORTED_MODEL_TYPES)}; "
            f"got model_type={model_type!r} ({type(model).__name__}). Save the checkpoint with `save_pretrained` "
            "instead, or export it with another tool."
        )
    if not hasattr(model, "generate") or not type(model).__name__.endswith("ForCausalLM"):
        raise UnsupportedArchitectureError(
            f"ONNX export needs a *ForCausalLM model (with an LM head), got {type(model).__name__}; load it with "
            "AutoModelForCausalLM."
        )
    return model_type


def _io_spec(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    num_layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return {
        "inputs": ["input_ids", "attention_mask", "position_ids", *past],
        "outputs": ["logits", *present],
        "past_inputs": past,
        "present_outputs": present,
        "num_layers": num_layers,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "past_dtype": "float16" if dtype == torch.float16 else "float32",
    }


def _trace(model: torch.nn.Module, io: dict[str, Any], path: Path, opset: int) -> float:
    """Export the flat-cache wrapper with dynamic batch, sequence and past axes; returns seconds taken."""
    wrapper = _FlatCacheDecoder(model, io["num_layers"]).eval()
    batch, seq, past_len = 2, 3, 2
    dtype = next(model.parameters()).dtype
    vocab = model.config.vocab_size
    ids = torch.arange(seq * batch).reshape(batch, seq) % vocab
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = [
        torch.zeros(batch, io["num_key_value_heads"], past_len, io["head_dim"], dtype=dtype) for _ in io["past_inputs"]
    ]
    dynamic = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    dynamic.update({name: {0: "batch", 2: "past_sequence"} for name in io["past_inputs"]})
    dynamic.update({name: {0: "batch", 2: "total_sequence"} for name in io["present_outputs"]})
    start = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about python branches on shapes, expected here
        torch.onnx.export(
            wrapper,
            (ids, mask, pos, *past),
            str(path),
            input_names=io["inputs"],
            output_names=io["outputs"],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    return time.perf_counter() - start


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def weight_sparsity(model: torch.nn.Module) -> tuple[int, int]:
    """Zeros and elements over the prunable weights (the linears inside the transformer blocks)."""
    from ..pruning.modeling import get_blocks_and_units

    zeros = numel = 0
    try:
        _, _, units = get_blocks_and_units(model)
    except Exception:  # no block list found: count every 2-D weight except embeddings
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    else:
        weights = [u.weight() for block in units for u in block]
    for w in weights:
        numel += w.numel()
        zeros += int((w == 0).sum())
    return zeros, numel


def export_onnx(
    model: Any,
    output_dir: str | os.PathLike,
    storage: str = "bitmask",
    dtype: str | torch.dtype | None = None,
    opset: int = 17,
    overwrite: bool = False,
    validate: bool = True,
    max_new_tokens: int = 32,
    prompt_ids: Any = None,
    tokenizer: Any = None,
    report: Any = None,
) -> ExportResult:
    """Export a (pruned) causal LM to ONNX with a KV cache and compact storage of its pruned weights.

    The folder gets `model.onnx` (plus `model.onnx.data` above 2 GB), `config.json`, `generation_config.json`,
    the tokenizer when given, `owl_report.json` when a report is given, and `owl_onnx.json` with the storage
    statistics, the file size against the dense export of the same model, and the validation numbers.

    Args:
        model (`PreTrainedModel`): a decoder-only causal LM (`model_type` in `SUPPORTED_MODEL_TYPES`).
        output_dir (`str` or `os.PathLike`): folder to create.
        storage (`str`, *optional*, defaults to `"bitmask"`): `"bitmask"` (packed mask + non-zeros decoded by
            standard operators, folded by onnxruntime at load), `"sparse_initializer"` (ONNX COO sparse tensors) or
            `"dense"`.
        dtype (`str` or `torch.dtype`, *optional*): `"float32"` or `"float16"`; the model's dtype when omitted.
        opset (`int`, *optional*, defaults to 17): ONNX opset (>= 14).
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output_dir`.
        validate (`bool`, *optional*, defaults to `True`): run the export with onnxruntime and compare prefill and
            decode logits and greedy generation with PyTorch; numbers go to `owl_onnx.json`.
        max_new_tokens (`int`, *optional*, defaults to 32): greedy tokens compared when validating.
        prompt_ids (*optional*): `[batch, seq]` prompt for validation; 8 fixed ids when omitted.
        tokenizer (*optional*): saved into the folder when given.
        report (`PruneReport`, *optional*): saved as `owl_report.json` and summarised in the metadata.

    Returns:
        `ExportResult`: the folder and its metadata.

    Raises:
        `UnsupportedArchitectureError`: the architecture has no verified export path.
        `FileExistsError`: `output_dir` exists and `overwrite` is false.
        `ImportError`: onnx or onnxruntime is missing (the message gives the install command).

    Example:

    ```python
    >>> from optimum_owl.export import export_onnx
    >>> result = export_onnx(pruned_model, "tiny-onnx", storage="bitmask")  # doctest: +SKIP
    >>> result.size_ratio  # doctest: +SKIP
    0.37
    ```
    """
    require_onnx("onnx", "onnxruntime")
    import onnx

    if storage not in STORAGES:
        raise ValueError(f"`storage` must be one of {', '.join(map(repr, STORAGES))}, got {storage!r}.")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"`opset` must be an integer >= {MIN_OPSET}, got {opset!r}.")
    model_type = check_exportable(model)
    target_dtype = next(model.parameters()).dtype if dtype is None else dtype
    if isinstance(target_dtype, str):
        if target_dtype.lower() not in DTYPES:
            raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}.")
        target_dtype = DTYPES[target_dtype.lower()]
    if target_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"`dtype` must be float32 or float16 for ONNX export, got {target_dtype}; pass dtype='float32'.")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"Output directory {output_dir} already exists; pass overwrite=True (CLI: --overwrite).")

    source_device = next(model.parameters()).device
    if source_device.type != "cpu" or next(model.parameters()).dtype != target_dtype:
        model = copy.deepcopy(model).to(device="cpu", dtype=target_dtype)
    model.eval()
    zeros, numel = weight_sparsity(model)
    sparsity = zeros / numel if numel else 0.0
    if sparsity == 0.0:
        logger.warning("The model has no zero weights in its blocks (not pruned); the export will be dense.")
    io = _io_spec(model.config, target_dtype)

    protected = input_paths(model, tokenizer)
    with tempfile.TemporaryDirectory(prefix="owl-onnx-") as scratch, atomic_output_dir(
        output_dir, overwrite, protected=protected, flag="output_dir"
    ) as tmp:
        dense_dir = Path(scratch) / "dense"
        dense_dir.mkdir()
        trace_s = _trace(model, io, dense_dir / ONNX_NAME, opset)
        dense_bytes = _dir_bytes(dense_dir)
        proto = onnx.load(str(dense_dir / ONNX_NAME))
        start = time.perf_counter()
        stats = apply_storage(proto, storage)
        storage_s = time.perf_counter() - start
        external = proto.ByteSize() > PROTOBUF_LIMIT
        if external and storage == "sparse_initializer":
            raise ValueError(
                "`storage='sparse_initializer'` cannot hold a graph above 2 GB: onnx does not write sparse "
                "initializers to external data. Use storage='bitmask' or 'dense'."
            )
        onnx.save_model(
            proto,
            str(tmp / ONNX_NAME),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=ONNX_NAME + ".data",
        )
        onnx.checker.check_model(str(tmp / ONNX_NAME))
        file_bytes = _dir_bytes(tmp)
        weight_bytes = sum(t.ByteSize() for t in proto.graph.initializer) + sum(
            t.ByteSize() for t in proto.graph.sparse_initializer
        )
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.save(tmp)
        metadata: dict[str, Any] = {
            "format": "optimum-owl-onnx",
            "model_type": model_type,
            "model_class": type(model).__name__,
            "name_or_path": getattr(model.config, "_name_or_path", None) or None,
            "dtype": "float16" if target_dtype == torch.float16 else "float32",
            "opset": opset,
            "exporter": f"torch.onnx.export(dynamo=False), torch {torch.__version__}, onnx {onnx.__version__}",
            "io": io,
            "pruned": sparsity > 0.0,
            "weight_sparsity": sparsity,
            "storage": stats.to_dict(),
            "sizes": {
                "onnx_bytes": file_bytes,
                "dense_onnx_bytes": dense_bytes,
                "ratio_to_dense": file_bytes / dense_bytes,
                "weights_bytes": weight_bytes,
                "graph_bytes": proto.ByteSize() - weight_bytes,
            },
            "timings": {"trace_s": trace_s, "storage_s": storage_s},
        }
        if report is not None:
            metadata["report"] = {"sparsity": report.sparsity, "config": report.config}
        atomic_write_text(tmp / METADATA_NAME, json.dumps(metadata, indent=2) + "\n")
        if validate:
            # The in-memory graph (weights included) is not needed any more: free it before onnxruntime loads the
            # file and folds the bitmask decoding into dense weights (the peak of the export, docs/onnx.md).
            del proto
            gc.collect()
            release_freed_memory()
            metadata["validation"] = _validate(model, tmp, prompt_ids, max_new_tokens)
            atomic_write_text(tmp / METADATA_NAME, json.dumps(metadata, indent=2) + "\n")
    logger.info(
        "exported %s to %s (%s storage): %.1f KiB, %.3fx the dense export",
        type(model).__name__,
        output_dir,
        storage,
        file_bytes / 1024,
        file_bytes / dense_bytes,
    )
    return ExportResult(output_dir=output_dir, metadata=metadata)


def _validate(model: Any, folder: Path, prompt_ids: Any, max_new_tokens: int) -> dict[str, Any]:
    import onnxruntime as ort

    lm = OnnxCausalLM(folder)
    if prompt_ids is None:
        vocab = model.config.vocab_size
        prompt_ids = (np.arange(1, 9, dtype=np.int64) * 7919 % vocab)[None]
    else:
        prompt_ids = np.asarray(prompt_ids.cpu() if hasattr(prompt_ids, "cpu") else prompt_ids, dtype=np.int64)
        if prompt_ids.ndim == 1:
            prompt_ids = prompt_ids[None]
    result = compare_with_torch(model, lm, prompt_ids, max_new_tokens=max_new_tokens)
    result["session_creation_s"] = lm.session_creation_s
    result["onnxruntime"] = ort.__version__
    logger.info(
        "validation: prefill rel. error %.2e, decode rel. error %.2e, greedy-%d equal: %s, session %.3f s",
        result["prefill_rel_error"],
        result["decode_rel_error"],
        max_new_tokens,
        result["greedy_equal"],
        result["session_creation_s"],
    )
    return result

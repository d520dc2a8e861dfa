"""Load a compact checkpoint (`owl-bitmask-v1`, see docs/checkpoints.md) straight into the sparse form.

`load_sparse(path)` builds the model's modules with empty (meta) parameters, turns every bitmask-stored linear into a
`SparseLinear` from its stored parts (never building its dense weight), and reads every other tensor one at a time.
Peak memory is therefore about the compact model, not the dense one (see docs/inference.md for the measured RSS).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OWLCheckpointError
from ..formats.bitmask import BITMASK_SUFFIX, SHAPE_SUFFIX, crc32, decompress
from ..formats.files import METADATA_CRC_KEY, checkpoint_files
from ..formats.preflight import check_dense_crc, dense_checksums
from ..formats.quantizer import mark_pruned
from ..utils import is_conv1d
from .module import SparseLinear, set_submodule

logger = logging.getLogger(__name__)

def load_sparse(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    min_sparsity: float = 0.0,
    model_class: Any = None,
) -> nn.Module:
    """Load a checkpoint written by `save_pretrained` of a pruned (or sparsified) model straight into the sparse form.

    Args:
        path: a local folder with `config.json` and safetensors weights.
        dtype: dtype of the loaded model (default: the checkpoint's). Stored values are cast to it.
        min_sparsity: bitmask-stored weights at least this sparse (a fraction in [0, 1]) become `SparseLinear`; the
            others are rebuilt dense.
        model_class: the transformers auto class (default `AutoModelForCausalLM`).

    Returns:
        The model in eval mode, ready for `generate`; `save_pretrained` writes the compact format again.

    Raises:
        OWLCheckpointError: a tensor fails its CRC-32 check (compressed weights and, from the `owl_crc32_dense`
            table, every tensor stored as is: embeddings, norms, biases), or the files do not fit the config.

    Example:

    ```python
    >>> from optimum_owl.inference import load_sparse
    >>> model = load_sparse("pruned-model")      # doctest: +SKIP
    ```
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"`min_sparsity` must be in [0, 1] (a fraction of zero weights), got {min_sparsity}.")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a folder written by save_pretrained.")
    files = checkpoint_files(path)
    config = AutoConfig.from_pretrained(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    quant = getattr(config, "quantization_config", None)
    cls = model_class or AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype)
    model.eval()

    location: dict[str, Path] = {}
    checksums: dict[str, list[Any]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                location[key] = file
            meta = handle.metadata() or {}
            if METADATA_CRC_KEY in meta:
                checksums.update(json.loads(meta[METADATA_CRC_KEY]))
    dense_table = dense_checksums(files)  # tensors stored as is: checked before any cast

    def read(key: str) -> torch.Tensor:
        with safe_open(str(location[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    compressed = sorted(k.removesuffix(BITMASK_SUFFIX) for k in location if k.endswith(BITMASK_SUFFIX))
    model_keys = set(model.state_dict().keys())
    done: set[str] = set()
    sparse_count = 0
    for name in compressed:
        module_name = name.removesuffix(".weight")
        parts = [name, name + BITMASK_SUFFIX, name + SHAPE_SUFFIX]
        missing = [k for k in parts if k not in location]
        if missing:
            raise OWLCheckpointError(f"`{name}` is stored compressed but {missing} is missing from {path}.")
        try:
            module = model.get_submodule(module_name)
        except AttributeError as err:
            raise OWLCheckpointError(
                f"`{name}` in {path} names no module of {type(model).__name__}; the checkpoint does not belong to "
                "this config. Load it with `from_pretrained` instead."
            ) from err
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise OWLCheckpointError(f"`{name}` is stored compressed but `{module_name}` is a {type(module).__name__}.")
        values, bitmask, shape = (read(k) for k in parts)
        expected = checksums.get(name)
        if expected:
            stored = [values, bitmask, shape]
            for label, tensor, crc in zip(("values", "bitmask", "shape"), stored, expected[:3]):
                if crc32(tensor) != crc:
                    raise OWLCheckpointError(
                        f"`{name}`: the stored {label} fail their CRC-32 check (corrupt file); re-download or re-save."
                    )
        if values.dtype != dtype:
            values = values.to(dtype)
        bias_key = module_name + ".bias"
        bias = read(bias_key) if bias_key in location else None
        if bias is not None:
            check_dense_crc(dense_table, bias_key, bias)
            bias = bias.to(dtype)
        dims = shape.tolist()
        numel = dims[0] * dims[1] if len(dims) == 2 else 0
        sparsity = 1.0 - values.numel() / numel if numel else 0.0
        transposed = is_conv1d(module)
        if sparsity >= min_sparsity:
            new = SparseLinear.from_checkpoint_parts(values, bitmask, dims, bias, transposed=transposed, name=name)
            set_submodule(model, module_name, new)
            sparse_count += 1
        else:
            dense = decompress(values, bitmask, shape, name=name, expected_shape=tuple(module.weight.shape))
            set_module_tensor_to_device(model, name, "cpu", value=dense)
            if bias is not None:
                set_module_tensor_to_device(model, bias_key, "cpu", value=bias)
        done.update(parts)
        if bias is not None:
            done.add(bias_key)
        del values, bitmask, shape

    unknown = [k for k in location if k not in done and k not in model_keys]
    if unknown:
        raise OWLCheckpointError(
            f"{len(unknown)} tensors of {path} (e.g. {unknown[:3]}) have no place in {type(model).__name__}; "
            "load this checkpoint with `from_pretrained` and call `optimum_owl.sparsify(model)` instead."
        )
    for key in location:
        if key in done:
            continue
        tensor = read(key)
        check_dense_crc(dense_table, key, tensor)
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        set_module_tensor_to_device(model, key, "cpu", value=tensor)
        del tensor
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise OWLCheckpointError(f"{path} does not hold {left[:5]} ({len(left)} tensors missing): incomplete checkpoint.")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    if quant is not None and hasattr(model, "save_pretrained"):
        from ..config import OWLPrunerConfig

        mark_pruned(model, quant if isinstance(quant, OWLPrunerConfig) else OWLPrunerConfig.from_dict(dict(quant)))
    logger.info("load_sparse: %d weights loaded as SparseLinear from %s", sparse_count, path)
    return model

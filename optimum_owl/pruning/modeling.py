"""Find a model's transformer blocks and the weight matrices inside them that can be pruned.

A *unit* is one 2-D weight seen as `[out_features, in_features]`: an `nn.Linear`, a GPT-2 style `Conv1D` (stored
transposed, exposed through a transposed view), or one expert slice of a fused MoE parameter (transformers 5
stores experts as 3-D tensors). Pruning writes through `unit.weight()`, a view into the real parameter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OWLCheckpointError, OWLModelError
from ..formats.compressed_tensors import is_sparse_bitmask_checkpoint
from ..formats.compressed_tensors_load import load_dense
from ..utils import is_conv1d, matches_any

logger = logging.getLogger(__name__)

# Tried in order when `_no_split_modules` does not identify the blocks.
KNOWN_BLOCK_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
    "encoder.layer",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "layers",
    "h",
)
# Router and gating matrices decide where tokens go; pruning them is never intended.
DEFAULT_IGNORE = ("*shared_expert_gate", "*.router", "*.router.*", "*.mlp.gate", "*.block_sparse_moe.gate")


@dataclass(eq=False)
class Unit:
    """One prunable weight matrix inside a block.

    Attributes:
        name: fully qualified name (`model.layers.3.mlp.down_proj`; experts: `...experts.down_proj.5`).
        module: the module that owns the parameter.
        kind: `"linear"`, `"conv1d"` or `"expert"`.
        param_name: the parameter's attribute name on `module` (`"weight"`, `"gate_up_proj"`, ...).
        expert: the expert index for fused experts, else `None`.
        transposed: whether the stored tensor is `[in, out]` (Conv1D, transposed experts).
        group: `"attention"` or `"mlp"` (every other matrix: feed-forward, experts), `projection_group`.
    """

    name: str
    module: nn.Module
    kind: str
    param_name: str = "weight"
    expert: int | None = None
    transposed: bool = False
    group: str = "mlp"

    def parameter(self) -> torch.Tensor:
        return getattr(self.module, self.param_name)

    def weight(self) -> torch.Tensor:
        """A `[out, in]` view of the stored weight; in-place changes reach the model."""
        w = self.parameter().data
        if self.expert is not None:
            w = w[self.expert]
        return w.t() if self.transposed else w

    @property
    def shape(self) -> tuple[int, int]:
        p = self.parameter()
        shape = tuple(p.shape[1:]) if self.expert is not None else tuple(p.shape)
        return (shape[1], shape[0]) if self.transposed else (shape[0], shape[1])

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_blocks(model: nn.Module, block_name: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return `(dotted_path, module_list)` of the transformer blocks.

    Order of discovery: `block_name` if given; else the largest `nn.ModuleList` whose items are instances of the
    model's `_no_split_modules` classes; else the first existing path of `KNOWN_BLOCK_PATHS`.
    """
    if block_name is not None:
        found = _get_submodule(model, block_name)
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise OWLModelError(
                f"`block_name={block_name!r}` does not name a non-empty nn.ModuleList in {type(model).__name__}; "
                f"candidates: {_module_lists(model)[:8]}."
            )
        return block_name, found
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple[str, nn.ModuleList] | None = None
    if no_split:
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                if all(type(child).__name__ in no_split for child in module):
                    if best is None or len(module) > len(best[1]):
                        best = (name, module)
    if best is not None:
        return best
    for path in KNOWN_BLOCK_PATHS:
        found = _get_submodule(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    raise OWLModelError(
        f"Could not find the transformer blocks of {type(model).__name__}: no nn.ModuleList of its "
        f"_no_split_modules ({sorted(no_split) or 'none declared'}) nor any of the known paths. "
        f"Pass `block_name=` with the dotted path of the block list; candidates: {_module_lists(model)[:8]}."
    )


def _module_lists(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5 fused MoE experts: 3-D `gate_up_proj`/`up_proj` and `down_proj` parameters."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    return isinstance(down, nn.Parameter) and isinstance(up, nn.Parameter) and down.dim() == 3 and up.dim() == 3


def expert_param_names(module: nn.Module) -> tuple[str, str]:
    """`(input_projection, output_projection)` parameter names of a fused experts module."""
    return ("gate_up_proj" if getattr(module, "gate_up_proj", None) is not None else "up_proj"), "down_proj"


def projection_group(name: str) -> str:
    """`"attention"` when a part of `name` (a unit's name inside its block) names attention, else `"mlp"`.

    Covers the naming of Llama/Mistral/Qwen2/OPT (`self_attn.q_proj`, OPT's `fc1` is MLP), GPT-2 (`attn.c_attn`,
    `attn.c_proj`; `mlp.c_proj` is MLP), GPT-NeoX/Falcon/BLOOM (`attention.*`, `self_attention.*`), T5
    (`SelfAttention`, `EncDecAttention`) and BERT (`attention.output.dense`; its `output.dense` is MLP).
    """
    return "attention" if any("attn" in part or "attention" in part for part in name.lower().split(".")) else "mlp"


def find_units(block: nn.Module, prefix: str, ignore: list[str] | tuple[str, ...] = ()) -> list[Unit]:
    """All prunable units in `block` (its fqn prefix is `prefix`), minus names matching `ignore` patterns."""
    patterns = tuple(ignore) + DEFAULT_IGNORE
    units: list[Unit] = []
    for sub_name, module in block.named_modules():
        name = f"{prefix}.{sub_name}" if sub_name else prefix
        if isinstance(module, nn.Linear):
            if not matches_any(name, patterns):
                units.append(Unit(name, module, "linear", group=projection_group(sub_name)))
        elif is_conv1d(module) and getattr(module, "weight", None) is not None:
            if not matches_any(name, patterns):
                units.append(Unit(name, module, "conv1d", transposed=True, group=projection_group(sub_name)))
        elif is_fused_experts(module):
            if getattr(module, "has_post_expert_norm", False):
                logger.warning("Skipping fused experts %s: post-expert norms are not supported.", name)
                continue
            transposed = bool(getattr(module, "is_transposed", False))
            for pname in expert_param_names(module):
                for e in range(getattr(module, pname).shape[0]):
                    uname = f"{name}.{pname}.{e}"
                    if not matches_any(uname, patterns):
                        units.append(Unit(uname, module, "expert", pname, e, transposed, projection_group(sub_name)))
    return units


def get_blocks_and_units(
    model: nn.Module, block_name: str | None = None, ignore: list[str] | tuple[str, ...] = ()
) -> tuple[str, nn.ModuleList, list[list[Unit]]]:
    """Blocks and their units; raises `OWLModelError` when no block holds a prunable weight."""
    path, blocks = find_blocks(model, block_name)
    units = [find_units(block, f"{path}.{i}", ignore) for i, block in enumerate(blocks)]
    if not any(units):
        raise OWLModelError(
            f"The blocks at `{path}` hold no prunable nn.Linear/Conv1D/fused-expert weights (after `ignore`). "
            "Check `ignore` patterns or pass the right `block_name=`."
        )
    return path, blocks, units


def load_model(name_or_path: str, gguf_file: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a causal LM (falling back to a bare `AutoModel`, e.g. BERT) from a local path or Hub id; a local
    compressed-tensors `sparse-bitmask` checkpoint is read by `formats.compressed_tensors_load.load_dense`.

    `gguf_file` names a GGUF file inside the folder: transformers de-quantizes it to float, and the model is then an
    ordinary float model (the GGUF quantizer is dropped, so it can be pruned and saved like any other). A corrupt or
    truncated checkpoint raises one `OWLCheckpointError` naming the file or tensor (transformers' load report of a
    failed load is not printed).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from .sources import check_model_source

    text = os.fspath(name_or_path)
    local = check_model_source(text, filename=gguf_file or "config.json")
    if gguf_file is not None:
        if local and not (Path(text).expanduser() / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file {gguf_file} is not in {text}: pass the name of a .gguf file inside it.")
        kwargs["gguf_file"] = gguf_file
    elif local:
        check_safetensors_headers(Path(text).expanduser())
        if is_sparse_bitmask_checkpoint(Path(text).expanduser()):
            # transformers 5.x would load its weights as missing (random): read it here (docs/checkpoints.md)
            other = sorted(set(kwargs) - {"dtype"})
            if other:
                raise ValueError(f"{text} is a compressed-tensors sparse-bitmask checkpoint, loaded by optimum-owl on "
                                 f"CPU with `dtype` only; {other} are not supported for it.")
            return load_dense(Path(text).expanduser(), dtype=kwargs.get("dtype"))
    try:
        config = AutoConfig.from_pretrained(name_or_path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except OSError as err:  # offline, unknown repo, no config.json: transformers' message does not name the model
        raise OSError(f"Cannot load model {text!r}: {' '.join(str(err).split())}") from err
    causal = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
    if not causal:
        logger.info("%s (%s) is not a causal LM; loading it with AutoModel", name_or_path, config.model_type)
    with held_load_report(text):  # its errors are about this checkpoint: never retried with another class
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(name_or_path, **kwargs)
    if gguf_file is not None:
        drop_gguf_quantizer(model)
    return model


def check_safetensors_headers(folder: Path) -> None:
    """Raise `OWLCheckpointError` naming the first `*.safetensors` file of `folder` whose header safetensors cannot
    read (a truncated or corrupt file); reads the headers only."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - SafetensorError and OSError alike: the file cannot be read
            raise OWLCheckpointError(
                f"{file} cannot be read ({' '.join(str(err).split())}): the file is truncated or corrupt; "
                "re-download or re-save the model."
            ) from None


@contextlib.contextmanager
def held_load_report(name: str) -> Iterator[None]:
    """Hold back transformers' LOAD REPORT warning while a model loads: it is logged as usual when the load
    succeeds, and replaced by one `OWLCheckpointError` (the first optimum-owl error inside it, naming the tensor)
    when the load fails on a weight conversion."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    report_logger.addFilter(hold)
    try:
        yield
    except RuntimeError as err:
        report_logger.removeFilter(hold)
        found = re.search(r"^optimum_owl\.errors\.\w+: (.+)$", "\n".join(r.getMessage() for r in held), re.MULTILINE)
        if not found and "conversion" not in str(err):
            _emit(report_logger, held)  # not a conversion failure: transformers' report explains it
            raise
        for record in held:  # `optimum-owl -v` shows transformers' report
            logger.debug("%s", record.getMessage())
        reason = found.group(1) if found else "transformers could not convert its weights (rerun with -v for its report)"
        raise OWLCheckpointError(f"Cannot load model {name}: {reason}") from err
    except BaseException:
        report_logger.removeFilter(hold)
        _emit(report_logger, held)
        raise
    report_logger.removeFilter(hold)
    _emit(report_logger, held)


def _emit(report_logger: logging.Logger, records: list[logging.LogRecord]) -> None:
    for record in records:
        report_logger.handle(record)


def drop_gguf_quantizer(model: nn.Module) -> None:
    """A model read from GGUF holds de-quantized float weights but keeps transformers' GGUF quantizer, which blocks
    saving; drop it so the model is an ordinary float model."""
    qconfig = getattr(model.config, "quantization_config", None)
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        return
    model.hf_quantizer = None
    del model.config.quantization_config
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    model.is_quantized = False
    logger.info("Read from GGUF: the de-quantized float weights are used as an ordinary float model.")


# Dense checkpoints have (almost) no exact zeros; above this share of zero block weights a model counts as pruned.
PRUNED_ZERO_SHARE = 0.05


def zero_share(units: list[list[Unit]]) -> float | None:
    """Share of exact zeros among the block weights held in memory (offloaded `meta` weights are skipped);
    `None` when no weight is in memory."""
    zeros = total = 0
    for block in units:
        for unit in block:
            w = unit.weight()
            if w.device.type == "meta":
                continue
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else None


def context_length(model: nn.Module) -> int | None:
    """The model's `max_position_embeddings` (GPT-2's `n_positions`), or `None` when the config has none."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) else None

"""`OWLPrunerConfig`: every knob of a pruning run, validated, serialisable, and usable as a transformers
`quantization_config`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .algorithms.criteria import criterion_names, get_criterion
from .algorithms.families import SEARCHES, UNIFORM, family_names, get_family, layerwise_names, searchable_names
from .algorithms.quantize import VALUES
from .errors import OWLConfigError
from .utils import atomic_write_text, public_config
from .validation import (
    check_attention_shift,
    check_choice,
    check_counts,
    check_dense_propagation,
    check_known_keys,
    check_module_fields,
    check_number,
    check_range,
    check_refine,
    check_scale_fields,
    check_search_fields,
    check_values_fields,
    parse_pattern,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "owl_config.json"
# Version of the `owl_config.json` layout (the fields below); written into the file, checked when read.
CONFIG_FORMAT_VERSION = 1
PROPAGATION = ("sequential", "dense")
WANDA_GROUPS = ("row", "layer")
REFINE = ("dsnot",)
DATA_FIELDS = ("dataset", "auto_holdout_dataset")  # data sources: written to JSON only when a string (a path or name)
# Fields that do not change the pruned weights (left out of resume fingerprints and the card's reproduce command)
NON_RESULT_FIELDS = ("checkpoint_dir", "device", "offload_folder", "offload_activations", "dataset", "tokenizer")
# Fields with a fixed set of values (the CLI derives its `choices` from here); callables, so that criteria and
# allocation families registered after import are included.
FIELD_CHOICES = {
    "method": criterion_names,
    "layerwise": layerwise_names,
    "propagation": lambda: PROPAGATION,
    "wanda_group": lambda: WANDA_GROUPS,
    "refine": lambda: REFINE,
    "values": lambda: VALUES,
}
# Fields added after format 1, written to JSON only when set (a float config's JSON stays as it was): field -> default
WRITTEN_WHEN_SET = {"values": "float", "group_size": None}


def _flag(default: Any, group: str, help: str, **kwargs: Any) -> Any:
    """A field with an `optimum-owl prune` flag, its help and help group in the metadata (a callable: a factory)."""
    key = "default_factory" if callable(default) else "default"
    return field(**{key: default}, metadata={"group": group, "help": help}, **kwargs)


@dataclass
class OWLPrunerConfig(QuantizationConfigMixin):
    r"""Configuration of an OWL pruning run (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity",
    [arXiv 2310.05175](https://arxiv.org/abs/2310.05175)).

    OWL gives every transformer block its own sparsity from its *outlier ratio* D_i, the fraction of the block's
    Wanda scores |W_ij|·‖X_j‖₂ that exceed `owl_m` times the block's mean score. With r̃ the min-max normalised
    ratios, block i gets s_i = S + 2λ·(mean(r̃) − r̃_i): the mean is exactly S, the spread max−min exactly 2λ, and
    blocks with more outliers are pruned less. A criterion (Wanda, SparseGPT or magnitude) then prunes each block
    to s_i, one block at a time, with the inputs of block i taken from the already pruned blocks before it.

    Mapping to the paper and the reference code: `owl_m` is the paper's M (`--Hyper_m`, llm-compressor
    `owl_m`) and `owl_lambda` is λ (`--Lamda`, llm-compressor `owl_lmbda`). The reference README uses M=5,
    λ=0.08 for unstructured 70% sparsity on LLaMA-7B, which are the defaults here.

    The config doubles as a transformers `quantization_config`, so
    `AutoModelForCausalLM.from_pretrained(path, quantization_config=OWLPrunerConfig(..., dataset=...))` prunes on
    load once `optimum_owl` is imported.

    Args:
        sparsity (`float`, *optional*, defaults to 0.7):
            Target mean sparsity (fraction of zeros, in [0, 1)) of the prunable weights inside the transformer
            blocks. With an N:M `pattern` the sparsity is fixed by the pattern (1 − N/M) and this field is ignored.
        method (`str`, *optional*, defaults to `"wanda"`):
            Pruning criterion: `"wanda"` (|W|·‖X‖₂, no weight update), `"sparsegpt"` (OBS with weight update) or
            `"magnitude"` (|W|, one threshold per matrix).
        layerwise (`str`, *optional*, defaults to `"owl"`):
            How sparsity is spread over blocks: `"owl"`, `"uniform"`, `"dlp"`, `"alphapruning"`, `"atp"` (OWL's
            successors, docs/algorithm.md; each keeps the parameter-weighted mean at `sparsity`), `"owl-auto"` (OWL's
            M, λ chosen on held-out calibration data) or `"auto"` (that search over every family and its knob).
        owl_m (`float`, *optional*, defaults to 5.0):
            The paper's M: a score is an outlier when it exceeds `owl_m` × the block's mean score. Must be > 0.
        owl_lambda (`float`, *optional*, defaults to 0.08):
            The paper's λ: per-block sparsities span exactly 2λ around the target. Must be ≥ 0.
        dlp_alpha (`float`, *optional*, defaults to 0.15):
            `layerwise="dlp"`: block sparsities span 2α around the target (the DLP paper's default). ≥ 0.
        alphapruning_epsilon (`float`, *optional*, defaults to 0.2):
            `layerwise="alphapruning"`: block sparsities are the target × (1 ± ε), rescaled to the exact mean (the
            AlphaPruning scripts' value for Wanda and SparseGPT). In [0, 1).
        atp_beta (`float`, *optional*, defaults to 0.005):
            `layerwise="atp"`: sparsity step β from one block to the next (ATP searches it per model). ≥ 0.
        attention_shift (`float`, *optional*, defaults to 0.0):
            Sparsity added to every block's attention projections (q/k/v/o; GPT-2's `attn.*`); the block's other
            matrices (MLP, experts) get what keeps its parameter-weighted mean at the sparsity the `layerwise` family
            gave it (`allocation.projection_split`; clipped so both stay in [0, 1)). In [−1, 1); unstructured only.
            SmolLM2-135M, Wanda 70%: on ATP β=0.005 +0.025 is −5.5% perplexity, −0.05 +43%; no gain at β=0.011.
        pattern (`str`, *optional*, defaults to `"unstructured"`):
            `"unstructured"` or `"N:M"`: at most N non-zeros kept in every M consecutive inputs (so `"2:4"` is 50%).
        nm_mixed (`bool`, *optional*, defaults to `False`):
            With `layerwise="owl"` and an N:M pattern, give each block its own N (the reference's
            `wanda_owl_structure`), renormalised so the mean sparsity stays 1 − N/M. When `False`, OWL cannot
            change a fixed N:M pattern: a warning is logged and the outlier pass is skipped.
        wanda_group (`str`, *optional*, defaults to `"row"`):
            Wanda comparison group: `"row"` (each output row keeps the same count, the paper's default) or
            `"layer"` (one ranking over the whole matrix).
        sparsegpt_blocksize (`int`, *optional*, defaults to 128):
            Columns processed together by SparseGPT's lazy batch update (the paper's B).
        sparsegpt_damp (`float`, *optional*, defaults to 0.01):
            SparseGPT dampening as a fraction of the mean Hessian diagonal.
        propagation (`str`, *optional*, defaults to `"sequential"`):
            `"sequential"` feeds each block the outputs of the *pruned* blocks before it (the reference protocol).
            `"dense"` is a faster approximation: one dense pass collects all statistics and prunes from dense
            inputs (Wanda and magnitude only).
        num_samples (`int`, *optional*, defaults to 128):
            Number of calibration windows.
        seqlen (`int`, *optional*, defaults to 2048):
            Tokens per calibration window. Never derived from `max_position_embeddings`.
        seed (`int`, *optional*, defaults to 0):
            Seed of the calibration sampling; the same seed gives the same windows and the same masks.
        batch_size (`int`, *optional*, defaults to 8):
            Calibration windows run through a block at once.
        block_name (`str`, *optional*):
            Dotted path of the `nn.ModuleList` of transformer blocks (e.g. `"model.layers"`) when it cannot be
            found automatically.
        ignore (`list[str]`, *optional*):
            Extra module-name patterns never pruned: shell globs (`"*.self_attn.q_proj"`) or regexes prefixed
            with `"re:"`. Embeddings and `lm_head` are never pruned anyway.
        text_column (`str`, *optional*, defaults to `"text"`):
            Column holding the text in a `datasets.Dataset` or `.jsonl` calibration source.
        offload_activations (`bool`, *optional*, defaults to `False`):
            Keep calibration activations on CPU between blocks (saves accelerator memory).
        device (`str`, *optional*):
            Execution device for block-by-block pruning of a model loaded normally (not with a `device_map`):
            each block is moved there for its turn and moved back afterwards, so the rest of the model stays where
            it is (e.g. on CPU) and only one block plus its calibration activations occupy the device. `"auto"`
            picks CUDA when available, else CPU; `None` runs each block where it already lives. Must be `None`
            for a model dispatched by Accelerate (its `device_map` decides). See docs/scale.md.
        offload_folder (`str`, *optional*):
            For a model dispatched by Accelerate with disk offload: folder that receives the pruned weights of
            offloaded blocks (new safetensors files; the offload index is pointed at them, the original checkpoint
            is never written). Defaults to a new `owl-pruned-*` folder inside the model's own offload folder,
            removed when the model is garbage collected. Give a folder to keep the files.
        checkpoint_dir (`str`, *optional*):
            Folder for resumable runs: after each finished block the run saves that block's masks (SparseGPT: its
            pruned weights), the next block's inputs and the plan. Rerunning the same config on the same (freshly
            loaded) model and calibration data continues after the last finished block with identical final
            masks; a different config or data raises an error naming this folder. Needs
            `propagation="sequential"` and a fixed `layerwise` (not "owl-auto" or "auto").
        auto_holdout_tokens (`int`, *optional*, defaults to 8192):
            Searches: candidates are scored on `ceil(auto_holdout_tokens / seqlen)` windows drawn from the source
            beyond the calibration windows (no text shared), so every calibration window goes to the statistics and
            the model scored is the one returned. A source without that much other text (a `[num_samples, seqlen]`
            tensor) falls back to `auto_holdout`, with a warning; `0`: always hold out.
        auto_holdout (`float`, *optional*, defaults to 0.125):
            Fraction of the calibration windows held out (≥ `min(4, num_samples // 4)`, ≥ 1; then refitted on all)
            when the source has no other text; else how many separate windows the screening scores on. In (0, 0.5].
        auto_holdout_dataset (*optional*):
            Searches: text to score the candidates on instead of the calibration source, e.g. the validation split of
            the text the model will serve (any source `OWLPrunerConfig(dataset=...)` takes, read with the same
            tokenizer and `text_column`): `ceil(auto_holdout_tokens / seqlen)` windows drawn from it with `seed`.
            The statistics still see only the calibration windows. It should share no text with the data the
            pruned model is evaluated on. `None` (default): windows of the calibration source beyond the
            calibration windows. Only a string source is written to JSON.
        auto_owl_ms (`list[float]`, *optional*, defaults to `[3, 5, 7, 10]`):
            Searches (`"owl-auto"`, `"auto"`): the M values searched (`owl_m` is always added).
        auto_owl_lambdas (`list[float]`, *optional*, defaults to `[0.02, 0.05, 0.08, 0.12, 0.16, 0.2]`):
            Searches: the λ values searched (`owl_lambda` is always added).
        auto_finalists (`int`, *optional*, defaults to 1):
            How many of the best screened candidates (`"auto"`: of that many families) are pruned exactly next to
            uniform (and the configured `owl_m`, `owl_lambda`: with SparseGPT, or `"auto"` when it screened better).
            One replaces uniform only with a held-out gain above 2 standard errors over 32-token chunks.
        auto_families (`list[str]`, *optional*, defaults to `["owl", "dlp", "alphapruning", "atp"]`):
            `layerwise="auto"`: the families searched besides uniform.
        auto_dlp_alphas, auto_alphapruning_epsilons, auto_atp_betas (`list[float]`, *optional*):
            `layerwise="auto"`: each family's knob values searched (defaults `[0.05, 0.1, 0.15, 0.2, 0.25]`,
            `[0.1, 0.2, 0.3]`, and for ATP `None`: the β that spread the block sparsities over 0.08–0.32 from the
            first block to the last); the configured knob is always added.
        auto_attention_shifts (`list[float]`, *optional*):
            `layerwise="auto"`: the best screened setting is screened again with each of these `attention_shift`
            values (and checked exactly like any candidate when it screens best); `None` (default): none.
        refine (`str`, *optional*):
            Training-free refinement after the mask is chosen: `"dsnot"` (DSnoT-style swaps of pruned and kept
            weights within each row that lower the expected output error, keeping every row's count). Needs
            `method="wanda"`. `None` (default) disables it.
        dsnot_cycles (`int`, *optional*, defaults to 50):
            Most swaps per row made by `refine="dsnot"`.
        dsnot_threshold (`float`, *optional*, defaults to 0.001):
            `refine="dsnot"` keeps swapping in a row only while one swap lowers the row's expected squared output
            error by more than this fraction of it. In [0, 1).
        values (`str`, *optional*, defaults to `"float"`):
            `"int8"`: kept weights rounded to an int8 grid (SparseGPT: inside its sweep, error compensated), saved as
            int8 codes + float32 scales (`owl-bitmask-v2`); the model holds `code * scale`, the int8 model's values.
        group_size (`int`, *optional*):
            `values="int8"`: one scale per output row (`None`) or per row and group of this many inputs (× 64: 128).
        dataset (*optional*):
            Calibration data for prune-on-load (`from_pretrained(..., quantization_config=...)`); any source
            accepted by `OWLPruner.prune`. Only a string source is written to JSON.
        tokenizer (*optional*):
            Tokenizer (or its path) for text calibration data; not written to JSON.

    Example:

    ```python
    >>> from optimum_owl import OWLPrunerConfig
    >>> config = OWLPrunerConfig(sparsity=0.7, method="wanda", layerwise="owl", owl_m=5.0, owl_lambda=0.08)
    >>> OWLPrunerConfig.from_dict(config.to_dict()) == config
    True
    ```
    """

    # The `optimum-owl prune` flags are built from these fields (config_flags.py): each one's help text is here.
    sparsity: float = _flag(0.7, "pruning", "target mean sparsity in (0, 1)")
    method: str = _flag("wanda", "pruning", "pruning criterion")
    layerwise: str = _flag("owl", "pruning", "how sparsity is spread over blocks")
    owl_m: float = _flag(5.0, "pruning", "the paper's M (outlier threshold multiple)")
    owl_lambda: float = _flag(0.08, "pruning", "the paper's λ (spread of block sparsities is 2λ)")
    dlp_alpha: float = _flag(0.15, "families", "DLP: block sparsities span 2α around the target")
    alphapruning_epsilon: float = _flag(
        0.2, "families", "AlphaPruning: block sparsities are the target × (1 ± ε), rescaled to the mean")
    atp_beta: float = _flag(0.005, "families", "ATP: sparsity step β from one block to the next")
    attention_shift: float = _flag(0.0, "families", "any family: sparsity added to each block's attention "
                                   "projections, taken from its MLP (block mean kept)")
    pattern: str = _flag("unstructured", "pruning", "'unstructured' or N:M (N non-zeros kept per M), e.g. 2:4")
    nm_mixed: bool = _flag(False, "pruning", "with OWL and N:M: per-block N (mean kept at N/M)")
    wanda_group: str = _flag("row", "criteria", "Wanda comparison group: row (paper) or layer")
    sparsegpt_blocksize: int = _flag(128, "criteria", "SparseGPT columns per lazy batch update (the paper's B)")
    sparsegpt_damp: float = _flag(0.01, "criteria", "SparseGPT dampening, fraction of the mean Hessian diagonal")
    propagation: str = _flag("sequential", "pruning", "sequential (exact) or dense (faster approximation)")
    num_samples: int = _flag(128, "pruning", "calibration windows")
    seqlen: int = _flag(2048, "pruning", "tokens per calibration window")
    seed: int = _flag(0, "pruning", "seed of the calibration sampling")
    batch_size: int = _flag(8, "pruning", "calibration windows run through a block at once")
    block_name: str | None = _flag(None, "pruning", "dotted path of the block list, e.g. model.layers")
    ignore: list[str] = _flag(list, "pruning", "module-name glob (or re:regex) never pruned; repeat the flag for "
                              "several")
    text_column: str = _flag("text", "pruning", "text column of a .jsonl / datasets calibration source")
    offload_activations: bool = _flag(False, "memory", "keep calibration activations on CPU between blocks")
    device: str | None = _flag(None, "memory", "move each block to this device for its turn (auto, cpu, cuda:0, ...); "
                               "unset: where it lives")
    offload_folder: str | None = _flag(None, "memory", "folder for the pruned weights of disk-offloaded blocks "
                                       "(device_map models)")
    checkpoint_dir: str | None = _flag(None, "memory", "folder for resumable runs: rerun the same command to continue "
                                       "after the last block")
    auto_holdout_tokens: int = _flag(8192, "search", "tokens to score candidates on, drawn from the calibration "
                                     "source beyond the calibration windows (0: hold out calibration windows)")
    auto_holdout: float = _flag(0.125, "search", "fraction of calibration windows held out to score candidates when "
                                "the source has no other text, in (0, 0.5]")
    auto_holdout_dataset: Any = _flag(None, "search", "text to score candidates on instead of the calibration source "
                                      "(.txt/.jsonl path or datasets name), e.g. a validation split of the text the "
                                      "model will serve", compare=False, repr=False)
    auto_owl_ms: list[float] = _flag(lambda: [3.0, 5.0, 7.0, 10.0], "search",
                                     "M values searched (--owl-m is always added)")
    auto_owl_lambdas: list[float] = _flag(lambda: [0.02, 0.05, 0.08, 0.12, 0.16, 0.2], "search",
                                          "λ values searched (--owl-lambda is always added)")
    auto_finalists: int = _flag(1, "search", "best screened candidates (auto: of that many families) pruned exactly "
                                "and scored again")
    auto_families: list[str] = _flag(lambda: ["owl", "dlp", "alphapruning", "atp"], "search",
                                     "auto: families searched besides uniform")
    auto_dlp_alphas: list[float] = _flag(lambda: [0.05, 0.1, 0.15, 0.2, 0.25], "search",
                                         "auto: DLP α values searched (--dlp-alpha is always added)")
    auto_alphapruning_epsilons: list[float] = _flag(lambda: [0.1, 0.2, 0.3], "search", "auto: AlphaPruning ε values "
                                                    "searched (--alphapruning-epsilon is always added)")
    auto_atp_betas: list[float] | None = _flag(None, "search", "auto: ATP β values searched (--atp-beta is always "
                                               "added); unset: spreads 0.08-0.32 over the depth")
    auto_attention_shifts: list[float] | None = _flag(None, "search", "auto: attention shifts (see --attention-shift) "
                                                      "tried on the best screened setting")
    refine: str | None = _flag(None, "refinement", "training-free mask refinement after pruning; needs --method wanda")
    dsnot_cycles: int = _flag(50, "refinement", "--refine dsnot: most swaps per row")
    dsnot_threshold: float = _flag(1e-3, "refinement", "--refine dsnot: stop a row when a swap gains less than this "
                                   "fraction")
    values: str = _flag("float", "values", "int8: kept weights on an int8 grid (SparseGPT: quantized in its sweep), "
                        "saved as int8 codes + scales")
    group_size: int | None = _flag(None, "values", "int8 values: one scale per row and group of this many inputs "
                                   "(a multiple of 64, e.g. 128); unset: one per row")
    # Not flags ("flag": False): `optimum-owl prune` hands `--calibration` and `--tokenizer` to `OWLPruner.prune`.
    dataset: Any = field(default=None, compare=False, repr=False,
                         metadata={"flag": False, "help": "calibration data of prune-on-load (any OWLPruner source)"})
    tokenizer: Any = field(default=None, compare=False, repr=False,
                           metadata={"flag": False, "help": "tokenizer (or its path) for text calibration data"})
    quant_method: str = field(default="owl", init=False, repr=False,
                              metadata={"flag": False, "help": "transformers' quantization method, always owl"})

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check every field; raise `OWLConfigError` naming the field and the fix."""
        check_range("sparsity", self.sparsity, 0.0, 1.0, hint="the fraction of zeros, e.g. 0.7")
        self.method = check_choice("method", self.method, criterion_names())
        self.layerwise = check_choice("layerwise", self.layerwise, layerwise_names())
        self.propagation = check_choice("propagation", self.propagation, PROPAGATION)
        self.wanda_group = check_choice("wanda_group", self.wanda_group, WANDA_GROUPS)
        check_number("owl_m", self.owl_m)
        if self.owl_m <= 0:
            raise OWLConfigError(f"`owl_m` (the paper's M) must be > 0, got {self.owl_m}; the paper uses 5.")
        check_range("owl_lambda", self.owl_lambda, 0.0, hint="the paper's λ is 0.08 (0 gives uniform sparsity)")
        check_range("dlp_alpha", self.dlp_alpha, 0.0, hint="the DLP paper uses 0.15 (0 gives uniform sparsity)")
        check_range("alphapruning_epsilon", self.alphapruning_epsilon, 0.0, 1.0, hint="AlphaPruning uses 0.2-0.3")
        check_range("atp_beta", self.atp_beta, 0.0, hint="e.g. 0.005; ATP searches it in steps of 0.002")
        parse_pattern(self.pattern)
        self.pattern = self.pattern.strip().lower()
        check_attention_shift(self)
        check_counts(self)
        check_dense_propagation(self, {n: get_criterion(n) for n in criterion_names()})
        check_module_fields(self)
        check_scale_fields(self)
        self.values = check_values_fields(self, VALUES)
        if self.nm_pattern is not None and self.nm_mixed and (self.layerwise in SEARCHES or not get_family(self.layerwise).nm):
            able = " or ".join(repr(n) for n in family_names() if get_family(n).nm and n != UNIFORM)
            raise OWLConfigError(f"`nm_mixed=True` needs layerwise={able}, got {self.layerwise!r}; or set nm_mixed=False.")
        self._validate_auto_and_refine()

    def _validate_auto_and_refine(self) -> None:
        """Fields of `layerwise="owl-auto"` / `"auto"` and of the `refine` step."""
        check_search_fields(self, searchable_names())
        check_refine(self, {n: get_criterion(n) for n in criterion_names()}, REFINE)
        check_range("dsnot_threshold", self.dsnot_threshold, 0.0, 1.0, hint="e.g. 0.001")

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def nm_pattern(self) -> tuple[int, int] | None:
        """`(n, m)` for an N:M pattern (n non-zeros kept per m), `None` for unstructured."""
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The mean sparsity the run aims for: `sparsity`, or 1 − N/M for an N:M pattern."""
        nm = self.nm_pattern
        return self.sparsity if nm is None else 1.0 - nm[0] / nm[1]

    # ----------------------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: no runtime objects (tokenizer, non-string dataset), no `WRITTEN_WHEN_SET` field at default."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "tokenizer" or (f.name in WRITTEN_WHEN_SET and value == WRITTEN_WHEN_SET[f.name]):
                continue
            if f.name in DATA_FIELDS:
                if isinstance(value, (str, os.PathLike)):
                    out[f.name] = str(value)
                continue
            out[f.name] = list(value) if isinstance(value, (list, tuple)) else value
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """`to_dict()` (local paths shortened: `utils.public_config`) plus `format_version`: `owl_config.json`."""
        return {**public_config(self.to_dict()), "format_version": CONFIG_FORMAT_VERSION}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Build a config from `to_dict()` output (or `owl_config.json`, `quantization_config`: their `quant_method`
        and `format_version` are accepted). An unknown key raises `OWLConfigError` naming the closest field, as the
        constructor refuses it; with `return_unused_kwargs` (transformers' protocol) unknown `kwargs` are returned."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unused = {k: v for k, v in kwargs.items() if k not in names} if return_unused_kwargs else {}
        data = {**dict(config_dict), **{k: v for k, v in kwargs.items() if k not in unused}}
        data.pop("quant_method", None)
        version = data.pop("format_version", CONFIG_FORMAT_VERSION)
        if not isinstance(version, int) or version > CONFIG_FORMAT_VERSION:
            raise OWLConfigError(
                f"This OWL config has `format_version`={version!r}; this optimum-owl reads format "
                f"{CONFIG_FORMAT_VERSION} and earlier. Upgrade optimum-owl (`pip install -U optimum-owl`)."
            )
        check_known_keys(data, names, cls.__name__)
        config = cls(**data)
        return (config, unused) if return_unused_kwargs else config

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(public_config(self.to_dict()), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> OWLPrunerConfig:
        return cls.from_dict(json.loads(text))

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `owl_config.json` into `save_directory` (created if needed) atomically; returns the file path."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"`save_directory` {directory} exists and is not a directory.")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_json_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> OWLPrunerConfig:
        """Load from a directory holding `owl_config.json` (or the JSON file itself, or a model `config.json`
        whose `quantization_config` was written by optimum-owl)."""
        p = Path(path)
        file = p / CONFIG_NAME if p.is_dir() else p
        if p.is_dir() and not file.exists() and (p / "config.json").exists():
            file = p / "config.json"
        if not file.exists():
            raise FileNotFoundError(f"No {CONFIG_NAME} found at {p}; save one with `config.save_pretrained(dir)`.")
        data = json.loads(file.read_text())
        if "quantization_config" in data and "sparsity" not in data:
            data = data["quantization_config"]
        return cls.from_dict(data, **overrides)

"""Lean greedy decoding: a static KV cache and one compiled graph per decoded token (docs/inference.md, "Lean decode").

`model.generate` runs every decoded token through eager PyTorch: hundreds of small operators per block, each
dispatched from Python, plus `generate`'s own per-step work and a cache that grows by concatenation. On a small model
that is most of a token's time. `generate(model, input_ids, max_new_tokens=...)` here keeps the same greedy result
and removes that: the prompt runs eagerly into a transformers `StaticCache`, then each new token is one call of the
model's forward compiled by `torch.compile` (inductor, C++ wrapper: no Python between the fused kernels; the sparse
kernel enters the graph as the `owl::sparse_decode` operator, `ops.py`), driven by a short loop of our own.

The first call for a model, batch size, cache length bucket and thread count compiles (tens of seconds; logged, and
returned as `compile_seconds` with `return_dict=True`); later calls in the process reuse it, and inductor's on-disk
cache (`TORCHINDUCTOR_CACHE_DIR`) spares most of the work in the next process. Where `torch.compile` is not available
or fails (no C++ compiler, an unsupported model), the same loop runs eagerly, with one WARNING naming the reason.
"""

from __future__ import annotations

import logging
import math
import time
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import decode_attention_for
from .ops import available as ops_available

logger = logging.getLogger(__name__)

CACHE_BUCKET = 256  # the static cache's length is rounded up to a multiple of this, so that new lengths reuse a graph
MAX_ENTRIES = 4  # compiled graphs (and their caches) kept per model; the oldest goes first
# inductor's C++ wrapper calls the fused kernels, aten and owl operators from C++ (measured: about 30% less time
# outside the weights than the Python wrapper on a tiny 8-block Llama); `emulate_precision_casts` rounds a fused
# kernel's intermediate values to bfloat16 / float16 wherever eager rounds them, so a bf16 model's compiled logits are
# the eager loop's bit for bit (without it: 0.5-0.8% apart, and a tiny random Qwen2's greedy tokens diverged). Weights
# stay graph inputs (no freezing: a frozen graph would hold a second, prepacked copy of every dense weight and ignore
# later changes to the model).
COMPILE_OPTIONS: dict[str, Any] = {"cpp_wrapper": True, "emulate_precision_casts": True}


@dataclass
class DecodeOutput:
    """What `generate(..., return_dict=True)` returns."""

    sequences: torch.LongTensor  # [batch, prompt + new tokens], as `model.generate` returns them
    logits: torch.Tensor | None  # [batch, new tokens, vocab] float32 scores of each step (`output_logits=True`)
    compiled: bool  # whether the decode step ran as a compiled graph
    compile_seconds: float  # compile time spent in this call (0 when a compiled graph was reused)
    fallback_reason: str | None  # why the step ran eagerly although `compile=True`


@dataclass
class _Entry:
    cache: Any
    step: Any
    compiled: bool
    fresh: bool  # compiled, not yet called (the first call compiles)
    reason: str | None = None
    fingerprint: tuple = ()  # the model's tensors when the step last ran with dynamo's guards (`_fingerprint`)


def _step(model: nn.Module, cache: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoded token: the logits of `ids` ([batch, 1]) after the cached context, and the greedy next tokens."""
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1, :]
    return logits, logits.argmax(-1)


def _own_step() -> Any:
    """A copy of `_step` with its own code object: dynamo keeps its compiled graphs (and counts recompilations
    against its limit) per code object, so each model, batch and cache length gets a graph of its own."""
    return types.FunctionType(_step.__code__.replace(), _step.__globals__, "_step")


def _fingerprint(model: nn.Module) -> tuple:
    """Identity, storage, dtype and shape of every parameter and buffer, and the training flag: while it is unchanged
    the compiled step's guards (about 0.3 ms a token on a small model) can be skipped (`skip_guard_eval_unsafe`);
    once it changes, the next step runs with them, and dynamo recompiles if the change needs it."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t is not None]
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return (model.training, attention, *((id(t), t.data_ptr(), t.dtype, t.shape) for t in tensors))


def compile_unavailable() -> str | None:
    """Why `torch.compile` cannot be used here (None when it can), without compiling anything."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 - any failure to find a compiler means: decode eagerly
        return f"no C++ compiler for inductor ({type(err).__name__}: {err})"
    return None


class _Decoder:
    """Per-model state: compiled decode steps and their static caches, by (batch, cache length, threads, compile)."""

    def __init__(self) -> None:
        self.entries: dict[tuple, _Entry] = {}

    def __deepcopy__(self, memo: dict) -> None:  # a copied model compiles its own graphs
        return None

    def __reduce__(self) -> tuple:  # nor is compiled state saved with a pickled model
        return (type(None), ())

    def entry(self, model: nn.Module, batch: int, length: int, compile: bool,
              options: dict[str, Any]) -> _Entry:
        from transformers import StaticCache

        bucket = math.ceil(length / CACHE_BUCKET) * CACHE_BUCKET
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and bucket > limit:
            bucket = max(length, limit)
        key = (batch, bucket, torch.get_num_threads(), compile, tuple(sorted(options.items())))
        if key in self.entries:
            self.entries[key] = self.entries.pop(key)  # most recently used last
            return self.entries[key]
        while len(self.entries) >= MAX_ENTRIES:
            self.entries.pop(next(iter(self.entries)))
        cache = StaticCache(config=model.config, max_cache_len=bucket)
        reason = compile_unavailable() if compile else None
        if compile and reason is None:
            ops_available()  # the sparse kernel and its operators, loaded before tracing
            step = torch.compile(_own_step(), fullgraph=True, dynamic=False, options=dict(options))
            entry = _Entry(cache, step, compiled=True, fresh=True)
        else:
            if reason is not None:
                logger.warning("optimum-owl lean decode: %s; decoding eagerly with a static cache.", reason)
            entry = _Entry(cache, _step, compiled=False, fresh=False, reason=reason)
        self.entries[key] = entry
        return entry


def _decoder(model: nn.Module) -> _Decoder:
    state = model.__dict__.get("_owl_lean_decoder")
    if state is None:
        state = model.__dict__["_owl_lean_decoder"] = _Decoder()
    return state


def _special_tokens(model: nn.Module, eos_token_id: Any, pad_token_id: int | None) -> tuple[list[int], int | None]:
    config = getattr(model, "generation_config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos_list = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    if pad is None and eos_list:
        pad = eos_list[0]  # as `model.generate` does
    return eos_list, pad


def _check(model: nn.Module, input_ids: Any, max_new_tokens: int, attention_mask: Any) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"generate expects a transformers causal LM, got {type(model).__name__}.")
    if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] >= 1
            and not input_ids.dtype.is_floating_point):
        raise ValueError("`input_ids` must be an integer tensor [batch, prompt length] with at least one token, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be an integer >= 1, got {max_new_tokens!r}.")
    if attention_mask is not None and not bool((attention_mask == 1).all()):
        raise ValueError("`attention_mask` has padding: optimum_owl.inference.generate decodes unpadded prompts only "
                         "(a batch of equal-length prompts); use model.generate for a padded batch.")


def generate(model: nn.Module, input_ids: torch.LongTensor, max_new_tokens: int = 32, *,
             attention_mask: torch.Tensor | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, compile: bool = True, compile_options: dict[str, Any] | None = None,
             streamer: Any = None, output_logits: bool = False, return_dict: bool = False) -> Any:
    """Greedy decoding with a static KV cache and a compiled decode step: the tokens `model.generate(input_ids,
    max_new_tokens=..., do_sample=False)` gives, with far less time per token outside the weights.

    Args:
        model: a transformers causal LM (dense, or with `SparseLinear` layers from `sparsify` / `load_sparse`).
        input_ids: `[batch, prompt length]` token ids, unpadded (every row the same length).
        max_new_tokens: tokens to generate (fewer when every row has produced an end-of-sequence token).
        attention_mask: accepted for symmetry with `model.generate`; it must be all ones.
        eos_token_id, pad_token_id: default to the model's `generation_config`; a finished row gets `pad_token_id`
            (the first end-of-sequence id where there is none), as `model.generate` does.
        compile: False runs the same loop eagerly (no compile time; slower per token).
        compile_options: inductor options (default `COMPILE_OPTIONS`: its C++ wrapper).
        streamer: an object with `put(tokens)` and `end()` (transformers' streamers): the prompt, then each new token.
        output_logits: also return each step's float32 logits (`return_dict=True` implied).
        return_dict: return a `DecodeOutput` (sequences, logits, whether it compiled, compile seconds, fallback
            reason) instead of the sequences alone.

    Example:

    ```python
    >>> from optimum_owl.inference import generate
    >>> out = generate(model, input_ids, max_new_tokens=64)   # doctest: +SKIP
    ```
    """
    _check(model, input_ids, max_new_tokens, attention_mask)
    eos, pad = _special_tokens(model, eos_token_id, pad_token_id)
    options = dict(COMPILE_OPTIONS if compile_options is None else compile_options)
    batch, prompt = input_ids.shape
    entry = _decoder(model).entry(model, batch, prompt + max_new_tokens, compile, options)
    logits_out: list[torch.Tensor] = []
    fingerprint = _fingerprint(model) if entry.compiled else ()
    # dynamo's guards run on every step of the first call, and of a call after the model changed (`_fingerprint`)
    skip_guards = entry.compiled and not entry.fresh and entry.fingerprint == fingerprint
    with torch.inference_mode(), decode_attention_for(model):
        entry.cache.reset()
        sequences = torch.empty(batch, prompt + max_new_tokens, dtype=torch.long, device=input_ids.device)
        sequences[:, :prompt] = input_ids
        if streamer is not None:
            streamer.put(input_ids.cpu())
        out = model(input_ids=input_ids, past_key_values=entry.cache, use_cache=True, **_keep_last(model))
        with torch.compiler.set_stance(skip_guard_eval_unsafe=skip_guards):  # our steps only, not the prompt's
            length, compile_seconds = _loop(model, entry, out.logits[:, -1, :], sequences, prompt, eos, pad,
                                            streamer, logits_out if output_logits else None)
        entry.fingerprint = fingerprint
    if streamer is not None:
        streamer.end()
    sequences = sequences[:, :length]
    if not (return_dict or output_logits):
        return sequences
    return DecodeOutput(sequences, torch.stack(logits_out, 1) if output_logits else None, entry.compiled,
                        compile_seconds, entry.reason)


def _loop(model: nn.Module, entry: _Entry, logits: torch.Tensor, sequences: torch.Tensor, prompt: int,
          eos: list[int], pad: int | None, streamer: Any, logits_out: list | None) -> tuple[int, float]:
    """The decode loop after the prompt's `logits`: fills `sequences` from column `prompt`; returns the length reached
    and the seconds spent compiling."""
    token = logits.argmax(-1)
    unfinished = torch.ones(sequences.shape[0], dtype=torch.bool, device=sequences.device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=sequences.device)
    length, compile_seconds = prompt, 0.0
    while True:
        if logits_out is not None:
            logits_out.append(logits.float())
        if eos and pad is not None and length > prompt:
            token = torch.where(unfinished, token, torch.full_like(token, pad))
        sequences[:, length] = token
        length += 1
        if streamer is not None:
            streamer.put(token.cpu())
        if eos:
            unfinished &= ~torch.isin(token, eos_t)
            if not bool(unfinished.any()):
                break
        if length == sequences.shape[1]:
            break
        if entry.fresh:
            logits, token, seconds = _first_compiled_call(model, entry, token[:, None])
            compile_seconds += seconds
        else:
            logits, token = entry.step(model, entry.cache, token[:, None])
    return length, compile_seconds


def _keep_last(model: nn.Module) -> dict[str, int]:
    """`logits_to_keep=1` for the prompt's forward where the model takes it (as `model.generate` passes it)."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _first_compiled_call(model: nn.Module, entry: _Entry, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Call a new compiled step (this compiles it); on any failure switch the entry to the eager step, logging why."""
    start = time.perf_counter()
    try:
        logits, token = entry.step(model, entry.cache, ids)
    except Exception as err:  # noqa: BLE001 - whatever failed in tracing or compiling, the eager step is correct
        first = (str(err).strip().splitlines() or [""])[0][:300]
        reason = f"torch.compile failed ({type(err).__name__}: {first})"
        logger.warning("optimum-owl lean decode: %s; decoding eagerly with a static cache.", reason)
        entry.step, entry.compiled, entry.fresh, entry.reason = _step, False, False, reason
        logits, token = _step(model, entry.cache, ids)
        return logits, token, time.perf_counter() - start
    seconds = time.perf_counter() - start
    entry.fresh = False
    logger.info("optimum-owl lean decode: compiled the decode step in %.1f s (%d threads); reused for later calls "
                "with this model, batch size and cache length.", seconds, torch.get_num_threads())
    return logits, token, seconds

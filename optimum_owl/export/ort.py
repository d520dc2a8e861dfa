"""Running an exported decoder with onnxruntime: a session wrapper with a KV-cache greedy loop and the
comparisons used to validate an export against PyTorch."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .deps import require_onnx

logger = logging.getLogger(__name__)

METADATA_NAME = "owl_onnx.json"
ONNX_NAME = "model.onnx"


class OnnxCausalLM:
    """A decoder exported by `export_onnx`, run with onnxruntime: one graph serves prefill (empty past) and
    decode (past of any length).

    Args:
        path (`str` or `os.PathLike`): the export folder (holding `model.onnx` and `owl_onnx.json`) or the
            `.onnx` file itself (the metadata is then read beside it).
        providers (`list[str]`, *optional*): onnxruntime execution providers; CPU by default.
        session_options (*optional*): an `onnxruntime.SessionOptions`.

    Attributes:
        session: the `onnxruntime.InferenceSession`.
        session_creation_s (`float`): wall time of the session creation (graph load, constant folding of the
            compact weights, optimisation).

    Example:

    ```python
    >>> lm = OnnxCausalLM("exported/")  # doctest: +SKIP
    >>> lm.generate(np.array([[1, 2, 3]]), max_new_tokens=8)  # doctest: +SKIP
    ```
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, session_options: Any = None):
        require_onnx("onnxruntime")
        import onnxruntime as ort

        path = Path(path)
        file = path / ONNX_NAME if path.is_dir() else path
        meta_file = file.parent / METADATA_NAME
        if not file.exists():
            raise FileNotFoundError(f"No ONNX model at {file}; export one with `optimum_owl.export.export_onnx`.")
        if not meta_file.exists():
            raise FileNotFoundError(f"No {METADATA_NAME} beside {file}; it is written by `export_onnx`.")
        self.metadata = json.loads(meta_file.read_text())
        io = self.metadata["io"]
        self.past_names: list[str] = io["past_inputs"]
        self.present_names: list[str] = io["present_outputs"]
        self.num_kv_heads: int = io["num_key_value_heads"]
        self.head_dim: int = io["head_dim"]
        self.past_dtype = np.dtype(io["past_dtype"])
        start = time.perf_counter()
        self.session = ort.InferenceSession(
            str(file), sess_options=session_options, providers=providers or ["CPUExecutionProvider"]
        )
        self.session_creation_s = time.perf_counter() - start

    def empty_past(self, batch_size: int) -> list[np.ndarray]:
        """Zero-length KV cache tensors for a prefill call."""
        shape = (batch_size, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.past_dtype) for _ in self.past_names]

    def __call__(
        self,
        input_ids: np.ndarray,
        past: list[np.ndarray] | None = None,
        attention_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward pass.

        Args:
            input_ids (`np.ndarray`): `[batch, seq]` int64 token ids.
            past (`list[np.ndarray]`, *optional*): the `present` tensors of the previous call; empty when omitted.
            attention_mask (`np.ndarray`, *optional*): `[batch, past + seq]`; all ones when omitted.

        Returns:
            `(logits, present)`: `[batch, seq, vocab]` logits and the updated KV cache.
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past = self.empty_past(batch) if past is None else past
        past_len = past[0].shape[2] if past else 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), dtype=np.int64)
        positions = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": np.ascontiguousarray(positions)}
        feed.update(zip(self.past_names, past))
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def generate(self, input_ids: np.ndarray, max_new_tokens: int = 32) -> np.ndarray:
        """Greedy decoding with the KV cache (no early stop at EOS, so lengths are comparable).

        Args:
            input_ids (`np.ndarray`): `[batch, seq]` prompt ids.
            max_new_tokens (`int`, *optional*, defaults to 32): tokens to generate.

        Returns:
            `np.ndarray`: `[batch, seq + max_new_tokens]` ids.
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        logits, past = self(ids)
        tokens = [logits[:, -1].argmax(-1)]
        for _ in range(max_new_tokens - 1):
            logits, past = self(tokens[-1][:, None], past)
            tokens.append(logits[:, -1].argmax(-1))
        return np.concatenate([ids, np.stack(tokens, axis=1)], axis=1)


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """`max |actual - reference| / max |reference|` in float64."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(actual - reference).max() / scale)


def compare_with_torch(
    model: Any,
    onnx_lm: OnnxCausalLM,
    input_ids: np.ndarray,
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """Check an export against the PyTorch model it came from.

    Computes the relative error of the prefill logits, the relative error of one decode step through the KV cache,
    and whether greedy generation of `max_new_tokens` tokens gives the same ids.

    Args:
        model: the PyTorch causal LM (same dtype as the export).
        onnx_lm (`OnnxCausalLM`): the loaded export.
        input_ids (`np.ndarray`): `[batch, seq]` prompt ids.
        max_new_tokens (`int`, *optional*, defaults to 32): greedy tokens to compare.

    Returns:
        `dict`: `prefill_rel_error`, `decode_rel_error`, `greedy_equal`, `greedy_tokens`, `prompt_len`.
    """
    import torch

    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=ids.to(device), use_cache=True)
        ref_logits = out.logits.float().cpu().numpy()
        next_id = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=next_id, past_key_values=out.past_key_values, use_cache=True)
        ref_step = step.logits.float().cpu().numpy()
        ref_gen = model.generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        ).cpu().numpy()
    logits, past = onnx_lm(ids.numpy())
    step_logits, _ = onnx_lm(next_id.cpu().numpy(), past)
    gen = onnx_lm.generate(ids.numpy(), max_new_tokens=max_new_tokens)
    return {
        "prefill_rel_error": relative_error(logits, ref_logits),
        "decode_rel_error": relative_error(step_logits, ref_step),
        "greedy_equal": bool(gen.shape == ref_gen.shape and (gen == ref_gen).all()),
        "greedy_tokens": max_new_tokens,
        "prompt_len": int(ids.shape[1]),
    }

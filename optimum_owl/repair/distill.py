"""Distillation from the dense model: the KD and SquareHead losses, the on-disk cache of the teacher's top-k logits,
and the `Trainer` that trains on them.

* KD: `T² · KL(p_teacher ‖ p_student)` with `p = softmax(logits / T)`, averaged over every token position. With
  `top_k`, the teacher keeps its `k` largest logits (renormalised over them) and the student is normalised over the
  full vocabulary: `Σ_k p̃_t,k (log p̃_t,k − log p_s,k)`, which equals the full KL when `k` is the vocabulary size.
* SquareHead (arXiv 2310.06927): `mean over blocks of MSE(h_s, h_t) / mean(h_t²)` on the hidden states each block
  outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..utils import atomic_write, atomic_write_text
from .config import RepairConfig
from .data import TokenWindows

logger = logging.getLogger(__name__)

CACHE_META = "teacher_cache.json"


# ------------------------------------------------------------------------------------------------ losses
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None, temperature: float = 1.0,
            top_k: int | None = None, *, topk_values: torch.Tensor | None = None,
            topk_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of `T² · KL(teacher ‖ student)` on temperature-softened logits `[..., vocab]`.

    Give the teacher either as full logits (`teacher_logits`, cut to its `top_k` largest when `top_k` is set) or
    as its top-k already taken (`topk_values`, `topk_indices`, e.g. from `TeacherCache`).
    """
    t = float(temperature)
    scaled = student_logits.float() / t
    if topk_values is None and top_k is not None:
        topk_values, topk_indices = torch.topk(teacher_logits.float(), top_k, dim=-1)
    if topk_values is not None:  # no full-vocabulary log-softmax: the k gathered logits minus the log-normaliser
        log_pt = F.log_softmax(topk_values.float() / t, dim=-1)
        log_ps = torch.gather(scaled, -1, topk_indices.long()) - torch.logsumexp(scaled, -1, keepdim=True)
    else:
        log_pt = F.log_softmax(teacher_logits.float() / t, dim=-1)
        log_ps = F.log_softmax(scaled, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return kl.mean() * (t * t)


def squarehead_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over blocks of `MSE(h_s, h_t) / mean(h_t²)` (the embeddings, entry 0 of `hidden_states`, are skipped)."""
    terms = [F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12)
             for s, t in zip(student_hidden[1:], teacher_hidden[1:])]
    return torch.stack(terms).mean()


def window_scores(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, metric: str = "loss_gap",
                  batch_size: int = 8, top_k: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """How much worse `student` is than `teacher` on each window (`[n]`): mean NLL gap or mean KL(teacher ‖ student).

    Also returns the teacher's top-`top_k` logits of every window (`{"values", "indices"}`, empty without `top_k`),
    so a selection run can fill the teacher cache with the forwards it already paid for.
    """
    scores, values, indices = [], [], []
    device = next(student.parameters()).device
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                ids = windows[start:start + batch_size].to(device)
                s = student(input_ids=ids).logits.float()
                t = teacher(input_ids=ids).logits.float()
                if metric == "kl":
                    log_t, log_s = F.log_softmax(t, -1), F.log_softmax(s, -1)
                    scores.append((log_t.exp() * (log_t - log_s)).sum(-1).mean(-1).cpu())
                else:
                    scores.append((_window_nll(s, ids) - _window_nll(t, ids)).cpu())
                if top_k is not None:
                    v, i = torch.topk(t, top_k, dim=-1)
                    values.append(v.cpu())
                    indices.append(i.to(torch.int32).cpu())
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    top = {"values": torch.cat(values), "indices": torch.cat(indices)} if values else {}
    return torch.cat(scores), top


def _window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).mean(-1)


def select_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in their original (data) order; ties go to the earlier window."""
    count = min(count, scores.numel())
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))[:count]
    return torch.tensor(sorted(order), dtype=torch.long)


# ------------------------------------------------------------------------------------------------ teacher cache
def teacher_fingerprint(teacher: nn.Module) -> str:
    """A cheap identity of the teacher's weights: the name it was loaded from, its shapes and a sum of each
    tensor (a cache written for one teacher is never read for another)."""
    h = hashlib.sha256(str(getattr(getattr(teacher, "config", None), "_name_or_path", "")).encode())
    with torch.no_grad():
        for name, p in teacher.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{float(p.float().sum()):.6e}".encode())
    return h.hexdigest()[:16]


class TeacherCache:
    """The teacher's top-k logits of every training window, in safetensors shards of `shard` windows under `folder`.

    `key` ties the files to the windows' token ids, `k` and the teacher: a folder whose `teacher_cache.json` names
    another key is rewritten, never read.
    """

    def __init__(self, folder: str | os.PathLike, windows: torch.Tensor, teacher: nn.Module, k: int,
                 shard: int = 256) -> None:
        self.folder, self.k, self.shard, self.n = Path(folder), int(k), int(shard), int(windows.shape[0])
        h = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes())
        h.update(f"k={k};teacher={teacher_fingerprint(teacher)}".encode())
        self.key = h.hexdigest()
        self._open: dict[int, Any] = {}

    def _path(self, i: int) -> Path:
        return self.folder / f"teacher_topk_{i:05d}.safetensors"

    def valid(self) -> bool:
        meta = self.folder / CACHE_META
        if not meta.is_file():
            return False
        data = json.loads(meta.read_text())
        return data.get("key") == self.key and all(self._path(i).is_file() for i in range(data.get("shards", -1)))

    def write(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Store `[n, seqlen, k]` top-k values (float32) and indices (int32), then the key (last, so a killed write
        is never taken for a complete cache)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        shards = (self.n + self.shard - 1) // self.shard
        for i in range(shards):
            part = slice(i * self.shard, (i + 1) * self.shard)
            tensors = {"values": values[part].float().contiguous(), "indices": indices[part].to(torch.int32).contiguous()}
            atomic_write(self._path(i), lambda tmp, t=tensors: save_file(t, tmp))
        atomic_write_text(self.folder / CACHE_META, json.dumps({"key": self.key, "k": self.k, "windows": self.n,
                                                                "shards": shards}) + "\n")

    def fill(self, teacher: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> None:
        """Run the teacher once over every window and store its top-k logits."""
        values, indices = [], []
        device = next(teacher.parameters()).device
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                logits = teacher(input_ids=windows[start:start + batch_size].to(device)).logits.float()
                v, i = torch.topk(logits, self.k, dim=-1)
                values.append(v.cpu())
                indices.append(i.to(torch.int32).cpu())
        self.write(torch.cat(values), torch.cat(indices))

    def get(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(values, indices)` `[len(rows), seqlen, k]` of the windows numbered `rows`."""
        from safetensors import safe_open

        values, indices = [], []
        for r in rows.tolist():
            s = r // self.shard
            if s not in self._open:  # memory-mapped; a row is read when asked for
                self._open[s] = safe_open(str(self._path(s)), framework="pt")
            i = r % self.shard
            values.append(self._open[s].get_slice("values")[i:i + 1])
            indices.append(self._open[s].get_slice("indices")[i:i + 1])
        return torch.cat(values), torch.cat(indices)


# ------------------------------------------------------------------------------------------------ trainer
class DistillTrainer(Trainer):
    """A `Trainer` whose loss is the configured mix of KD, next-token loss and SquareHead against `teacher`
    (live) or `cache` (the teacher's top-k logits of each window, found by the batch's `window_index`)."""

    def __init__(self, *args: Any, repair_config: RepairConfig, teacher: nn.Module | None = None,
                 cache: TeacherCache | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.repair_config, self.teacher, self.cache = repair_config, teacher, cache
        self.loss_is_scaled_for_ga = False  # our losses are per-batch means: the Trainer divides by accumulation

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        cfg = self.repair_config
        rows = inputs.pop("window_index")
        labels = inputs.pop("labels")
        hidden = cfg.hidden_loss is not None
        outputs = model(**inputs, output_hidden_states=hidden)
        loss = torch.zeros((), device=outputs.logits.device)
        teacher_out = None
        if hidden or (cfg.objective != "lm" and self.cache is None):
            with torch.no_grad():
                teacher_out = self.teacher(input_ids=inputs["input_ids"], output_hidden_states=hidden)
        if cfg.objective != "lm":
            if teacher_out is None:
                values, indices = self.cache.get(rows.cpu())
                kd = kd_loss(outputs.logits, temperature=cfg.temperature, topk_values=values.to(outputs.logits.device),
                             topk_indices=indices.to(outputs.logits.device))
            else:
                kd = kd_loss(outputs.logits, teacher_out.logits, cfg.temperature, cfg.kd_top_k)
            loss = loss + (kd if cfg.objective == "kd" else cfg.kd_alpha * kd)
        if cfg.objective != "kd":
            lm = F.cross_entropy(outputs.logits[:, :-1].float().reshape(-1, outputs.logits.shape[-1]),
                                 labels[:, 1:].reshape(-1))
            loss = loss + (lm if cfg.objective == "lm" else (1.0 - cfg.kd_alpha) * lm)
        if hidden:
            loss = loss + cfg.hidden_weight * squarehead_loss(outputs.hidden_states, teacher_out.hidden_states)
        return (loss, outputs) if return_outputs else loss


class IndexedWindows(TokenWindows):
    """Token windows served as `{"input_ids", "labels", "window_index"}` (the index finds the cached teacher)."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**super().__getitem__(i), "window_index": torch.tensor(i)}

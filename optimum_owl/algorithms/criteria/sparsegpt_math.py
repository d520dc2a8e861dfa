"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): the blocked OBS sweep, and its joint prune-and-quantize
form for int8 values (`sparsegpt_prune_int8`). Pure tensor math."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ...errors import SparseGPTError
from ..masks import keep_mask_nm, num_to_prune
from ..quantize import QMAX, dequantize_int8, expand_scales, int8_scales, quantize_dequantize

logger = logging.getLogger(__name__)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's blocked OBS sweep. Returns `(new_weight_fp32, keep_mask)`; the inputs are not modified.

    Step 1: dead inputs (H_jj = 0) get H_jj = 1 and W_:j = 0. Step 2: H += damp·mean(diag H)·I; U = chol(H⁻¹)ᵀ
    (upper). Step 3: for each tile of `blocksize` columns choose the mask (unstructured: the floor(numel·s) lowest
    w²/U_jj² of the whole tile; N:M: per row, the m−n lowest of each group of m), then sweep its columns: zero the
    pruned weights and spread the error err = (w − q)/U_ii over the remaining columns of the tile with row i of U;
    after the tile, update the columns right of it in one matrix product (lazy batch update).
    """
    W, _H, U = _prepare(weight, hessian, nm, blocksize, damp, name)
    W, keep, _codes = _sweep(W, U, sparsity, nm, blocksize)
    return W, keep


@dataclass
class JointInt8:
    """Result of `sparsegpt_prune_int8`: the weight (float32, `codes * scales`), its keep mask, int8 `codes` (0 where
    pruned), float32 `scales` (`[out]` or `[out, groups]`), and the quantization error both ways (`rtn`, `joint`):
    ‖(W_f − Q)X‖_F / ‖W_f X‖_F on the calibration inputs (from H = Σxxᵀ), W_f being SparseGPT's float result."""

    weight: torch.Tensor
    keep: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    rtn_error: float
    joint_error: float


@torch.no_grad()
def sparsegpt_prune_int8(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    name: str = "weight",
    group_size: int | None = None,
) -> JointInt8:
    """SparseGPT with int8 values, pruned and quantized jointly (after the SparseGPT paper's joint sparsification and
    quantization): the sweep quantizes each kept weight of a column to its row's (group's) grid, q = code·scale, and
    spreads err = (w − q)/U_ii like a pruning error, so later columns compensate the rounding as they compensate the
    pruning. The inputs are not modified.

    First SparseGPT's float sweep runs (W_f, its mask). The joint sweep then keeps that mask: the paper chooses the
    mask inside the quantizing sweep, where the rounding perturbs the greedy choice and the result drifts to another
    mask; on random 64x256 weights with correlated inputs (`python -m bench.probes.joint_int8`,
    bench/results/joint_int8.json) that moved the output 0.20-6.2x (median 2.7x) as far from W_f's as rounding W_f
    did, the fixed mask 0.19-0.80x (median 0.53x). Its scales come from W_f: per row (and group of
    `group_size` inputs) the largest kept |W_f| / 127 (`quantize.int8_scales`); a compensated weight beyond it clamps
    to ±127 and its clamping error is compensated too. W_f is also the reference of the two errors reported: W_f
    rounded to nearest on the same scales (RTN), and the joint result.
    """
    W, H, U = _prepare(weight, hessian, nm, blocksize, damp, name)
    W_float, keep, _ = _sweep(W.clone(), U, sparsity, nm, blocksize)
    scales = int8_scales(W_float, keep, group_size)
    _, _, codes = _sweep(W, U, sparsity, nm, blocksize, (scales, group_size), keep)
    joint = dequantize_int8(codes, scales, group_size)
    _, _, rtn = quantize_dequantize(W_float, keep, group_size)
    return JointInt8(joint, keep, codes, scales, _output_error(W_float, rtn, H), _output_error(W_float, joint, H))


def _output_error(reference: torch.Tensor, approx: torch.Tensor, H: torch.Tensor) -> float:
    """‖(R − A)X‖_F / ‖R X‖_F from H = XXᵀ (0.0 when R X = 0)."""
    diff = reference - approx
    num = float((diff @ H * diff).sum(dtype=torch.float64))
    den = float((reference @ H * reference).sum(dtype=torch.float64))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def _prepare(
    weight: torch.Tensor, hessian: torch.Tensor, nm: tuple[int, int] | None, blocksize: int, damp: float, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1 and 2 of the sweep: `(W float32 copy with dead inputs zeroed, H with dead diagonals set to 1, U)`."""
    W = weight.detach().to(torch.float32, copy=True, memory_format=torch.contiguous_format)
    H = hessian.to(W.device, torch.float32).clone()
    rows, cols = W.shape
    if nm is not None and cols % nm[1]:
        raise ValueError(
            f"N:M pattern {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}, but `{name}` has {cols} inputs; "
            "add the module to `ignore`."
        )
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"`sparsegpt_blocksize` {blocksize} must be a multiple of M={nm[1]} for an N:M pattern.")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, _upper_cholesky_of_inverse(H, damp, name)


def _sweep(
    W: torch.Tensor,
    U: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None,
    blocksize: int,
    grid: tuple[torch.Tensor, int | None] | None = None,
    fixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Step 3 on `W` (modified in place): `(W, keep, codes)`. With `grid` (`(scales, group_size)`) every kept weight
    is quantized in the sweep and `codes` (int8) holds its code, else kept weights stay float and `codes` is None.
    With `fixed` (a keep mask) that mask is used instead of choosing one."""
    rows, cols = W.shape
    keep = torch.ones_like(W, dtype=torch.bool)
    codes = torch.zeros(W.shape, dtype=torch.int8, device=W.device) if grid is not None else None
    column_scales = None
    if grid is not None:
        scales, group_size = grid
        column_scales = expand_scales(scales.to(W.device, torch.float32), cols, group_size)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        if fixed is not None:
            prune1 = ~fixed[:, i1:i2]
        elif nm is None:
            prune1 = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
            k = num_to_prune(W1.numel(), sparsity)
            if k > 0:
                score = W1.pow(2) / d.reshape(1, -1).pow(2)
                idx = torch.sort(score.reshape(-1), stable=True).indices[:k]
                prune1.view(-1)[idx] = True
        else:
            prune1 = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
        for i in range(count):
            w = W1[:, i]
            if fixed is None and nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i : i + m].pow(2) / d[i : i + m].reshape(1, -1).pow(2)
                prune1[:, i : i + m] = ~keep_mask_nm(score, n, m)
            if column_scales is None:
                q = w.masked_fill(prune1[:, i], 0.0)
            else:
                scale = column_scales[:, i1 + i]
                code = torch.clamp(torch.round(w / scale), -QMAX, QMAX).masked_fill(prune1[:, i], 0.0)
                codes[:, i1 + i] = code.to(torch.int8)
                q = code * scale
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~prune1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W.masked_fill_(~keep, 0.0)
    return W, keep, codes


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    factor = damp
    for attempt in range(4):
        L, info = torch.linalg.cholesky_ex(H + factor * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0:
                if attempt:
                    logger.warning("SparseGPT: %s needed damping %.3g (asked %.3g) to factorise H.", name, factor, damp)
                return U
        factor = max(factor * 10, 1e-4)
    raise SparseGPTError(
        f"SparseGPT could not factorise the Hessian of {name} even with damping {factor / 10:.3g}; "
        "use more calibration samples, raise `sparsegpt_damp`, or add the module to `ignore`."
    )

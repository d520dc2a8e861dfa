"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): the blocked OBS sweep. Pure tensor math."""

from __future__ import annotations

import logging

import torch

from ...errors import SparseGPTError
from ..masks import keep_mask_nm, num_to_prune

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
    U = _upper_cholesky_of_inverse(H, damp, name)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        if nm is None:
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
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i : i + m].pow(2) / d[i : i + m].reshape(1, -1).pow(2)
                prune1[:, i : i + m] = ~keep_mask_nm(score, n, m)
            q = w.masked_fill(prune1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~prune1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W.masked_fill_(~keep, 0.0)
    return W, keep


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

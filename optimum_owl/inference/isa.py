"""Which decode path of the kernel to use per values dtype: AVX2, or AVX-512 where this CPU has it, where it gives
the AVX2 path's bits on test layers, and (by default) where it is faster. Run once, after the kernel is loaded
(`kernel._build`); `OPTIMUM_OWL_KERNEL_ISA` (`auto`, `avx2`, `avx512`) overrides it. docs/inference.md.
`ops` is a loaded `kernel.KernelOps` (not imported here: the kernel module calls this one). int8 values (codes with
float32 scales) have their own pair of paths (`torch.int8` here; AVX-512 there also needs BW, VBMI and VBMI2)."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch

from .format import pack_dense, quantize_packed
from .kernel_int8 import ISA_CODES

logger = logging.getLogger(__name__)

ISAS = ("avx2", "avx512")  # the decode paths, by their code in the kernel's `owl_set_isa`


def _pack(w: torch.Tensor, dtype: torch.dtype, group_size: int | None = None) -> Any:
    """`w` in the sparse form with values of `dtype` (torch.int8: int8 codes and scales, per row or `group_size`)."""
    if dtype == torch.int8:
        return quantize_packed(pack_dense(w), group_size)
    return pack_dense(w.to(dtype))


def decode(ops: Any, x: torch.Tensor, packed: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """`ops.decode` of a float `Packed`, `ops.decode_q8` of an int8 one."""
    if packed.scales is not None:
        return ops.decode_q8(x, packed.mask, packed.values, packed.offsets, packed.scales, packed.group_size, bias)
    return ops.decode(x, packed.mask, packed.values, packed.offsets, bias)


def _check_layers(dtype: torch.dtype) -> list[tuple[torch.Tensor, Any, torch.Tensor | None]]:
    """Small pruned layers for the AVX-512 check: widths that are not multiples of 16 or 64, several mask words,
    empty and fully dense rows, zero 64-bit words, bias or not (int8: scales per row, per 64 and per 128 inputs);
    with activations of 1-7 and 13 tokens."""
    gen = torch.Generator().manual_seed(1234)
    layers = []
    for i, (out, inp, sparsity) in enumerate(((37, 100, 0.5), (70, 300, 0.8), (16, 64, 0.0), (9, 200, 0.97))):
        w = torch.randn(out, inp, generator=gen)
        w[torch.rand(out, inp, generator=gen) < sparsity] = 0
        w[0] = 0
        w[1, :64] = 0  # a zero mask word
        packed = _pack(w, dtype, (None, 128, 64, None)[i])
        bias = torch.randn(out, generator=gen) if out % 2 else None
        x = torch.randn(13, packed.mask.shape[1] * 8, generator=gen)
        x[:, inp:] = 0
        layers.append((x, packed, bias))
    return layers


def paths_agree(ops: Any, dtype: torch.dtype) -> bool:
    """Whether the AVX-512 and AVX2 decode paths give bit-identical outputs on `_check_layers(dtype)`, for every
    token count from 1 to 7 and 13 (the 4-, 3-, 2- and 1-token groups). Leaves `dtype` on AVX2."""
    layers = _check_layers(dtype)
    results: dict[str, list[torch.Tensor]] = {}
    try:
        for isa in ISAS:
            ops.set_isa(dtype, isa)
            results[isa] = [
                decode(ops, x[:n].contiguous(), p, bias)
                for x, p, bias in layers
                for n in (1, 2, 3, 4, 5, 6, 7, 13)
            ]
    finally:
        ops.set_isa(dtype, "avx2")
    return all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(*results.values()))


def timing_layer(dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
    """A one-token input and a 1024 x 2048 layer pruned to 70% (about 3 MB in float32: in the L3 cache of most
    servers, so the timing measures the instructions rather than the memory of the moment)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 2048, generator=gen)
    w[torch.rand(1024, 2048, generator=gen) < 0.7] = 0
    return torch.randn(1, 2048, generator=gen), _pack(w, dtype)


def best_time(ops: Any, dtype: torch.dtype, isa: str, layer: tuple[torch.Tensor, Any], rounds: int = 7) -> float:
    """Fastest of `rounds` decodes of `layer` (`timing_layer(dtype)`) with the `isa` path, in seconds."""
    x, packed = layer
    previous = ops.isa(dtype)
    ops.set_isa(dtype, isa)
    try:
        decode(ops, x, packed, None)  # warm-up
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            decode(ops, x, packed, None)
            times.append(time.perf_counter() - start)
    finally:
        ops.set_isa(dtype, previous)
    return min(times)


def choose_isa(ops: Any) -> dict[str, str]:
    """Pick the decode path per value dtype (`OPTIMUM_OWL_KERNEL_ISA`; module docstring) and return it by dtype name.

    AVX-512 is used for a dtype only if this CPU has it, its outputs on `_check_layers` are bit-identical to the AVX2
    path's, and (setting `auto`) its best time on a one-token decode is lower than AVX2's, the two timed in turn.
    """
    setting = os.environ.get("OPTIMUM_OWL_KERNEL_ISA", "auto").strip().lower() or "auto"
    if setting not in ("auto", "avx2", "avx512"):
        logger.warning("optimum-owl sparse inference: OPTIMUM_OWL_KERNEL_ISA=%r is not one of auto, avx2, avx512; "
                       "using auto.", setting)
        setting = "auto"
    chosen = {dtype: "avx2" for dtype in ISA_CODES}
    for dtype in ISA_CODES:  # from the default, so that the library's state is what this returns
        ops.set_isa(dtype, "avx2")
    if setting == "avx512" and not ops.avx512_supported:
        logger.warning("optimum-owl sparse inference: OPTIMUM_OWL_KERNEL_ISA=avx512, but this CPU has no AVX-512F; "
                       "using AVX2.")
    if setting != "avx2" and ops.avx512_supported:
        notes = []
        for dtype in ISA_CODES:
            name = str(dtype).removeprefix("torch.")
            if not ops.avx512_available(dtype):
                continue
            if not paths_agree(ops, dtype):
                logger.warning("optimum-owl sparse inference: the AVX-512 path gave different %s results from the "
                               "AVX2 path on this CPU; using AVX2 (please report this).", name)
                continue
            if setting == "auto":
                layer = timing_layer(dtype)
                t2, t5 = math.inf, math.inf
                for _ in range(2):  # in turn, so that a change of machine speed during the check hits both
                    t2 = min(t2, best_time(ops, dtype, "avx2", layer))
                    t5 = min(t5, best_time(ops, dtype, "avx512", layer))
                notes.append(f"{name} {t2 / t5:.2f}x")
                if t5 >= t2:
                    continue
            chosen[dtype] = "avx512"
            ops.set_isa(dtype, "avx512")
        logger.info("optimum-owl sparse inference: AVX-512 decode (checked against AVX2) for %s%s.",
                    ", ".join(str(d).removeprefix("torch.") for d, i in chosen.items() if i == "avx512") or "no dtype",
                    f" (AVX-512 speed vs AVX2: {', '.join(notes)})" if notes else "")
    return {str(d).removeprefix("torch."): isa for d, isa in chosen.items()}

"""Build, cache and load the C++ sparse-linear kernel (`csrc/sparse_linear.cpp`) on first use.

The kernel is compiled with `torch.utils.cpp_extension` (ninja + the system C++ compiler) into a cache folder keyed
by a hash of the source, the compiler flags, the torch version and the Python version, so a changed source or a new
torch gets a fresh build and an unchanged one loads in milliseconds. Concurrent first builds (several processes,
e.g. pytest workers) are serialised with an exclusive `fcntl` lock on the cache folder; the lock dies with its
process, so a killed build never blocks the next one.

When the kernel cannot be used, `kernel()` returns `None` and one INFO log line says why (not x86-64, no AVX2/FMA/F16C,
no C++ compiler or ninja, build failure, or `OPTIMUM_OWL_DISABLE_KERNEL=1`); `SparseLinear` then uses the pure-PyTorch
path, which gives the same results up to float32 summation order.

On a CPU with AVX-512F the kernel also has an AVX-512 decode path that sums in the AVX2 path's order. After loading,
`optimum_owl.inference.isa.choose_isa` runs both paths on small test layers of each value dtype and switches a dtype
to AVX-512 only when the outputs are bit-identical to the AVX2 path's and the AVX-512 path is faster on a timed layer
(one INFO line says what was chosen; a mismatch is a WARNING and keeps AVX2).

Environment variables:

- `OPTIMUM_OWL_KERNEL_CACHE`: cache folder (default: `$XDG_CACHE_HOME/optimum_owl/kernels` or `~/.cache/...`).
- `OPTIMUM_OWL_DISABLE_KERNEL=1`: never build or load the kernel.
- `OPTIMUM_OWL_KERNEL_ISA`: `auto` (default, as above), `avx2` (never AVX-512), or `avx512` (AVX-512 for every dtype
  whose outputs match, without timing).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from .format import DTYPE_CODES
from .isa import ISAS, choose_isa
from .kernel_int8 import ISA_CODES, check_activations, check_bias, check_int8_weight, check_tile

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "sparse_linear.cpp"  # includes the other csrc files (int8 values)
# the kernel's entry points as torch operators (owl::sparse_decode, ...: inference/ops.py), built into the main library only
OPS_SOURCE = SOURCE.with_name("ops.cpp")
EXTENSION_NAME = "owl_sparse"
# -fopenmp is required: torch's at::parallel_for is a header template that runs serially unless the including
# translation unit is compiled with OpenMP (the extension then shares torch's bundled libgomp and thread count).
CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "ops": None, "reason": None}


def cache_root() -> Path:
    env = os.environ.get("OPTIMUM_OWL_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "optimum_owl" / "kernels"


def build_tag() -> str:
    """Cache key: sources (every file in csrc/), flags, torch and Python versions."""
    digest = hashlib.sha256()
    for path in sorted(p for p in SOURCE.parent.iterdir() if p.is_file()):
        digest.update(path.read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    digest.update(torch.__version__.encode())
    digest.update(sys.version.encode())
    return f"{EXTENSION_NAME}_{digest.hexdigest()[:16]}"


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built or run on this machine (None when it can), without building anything."""
    if os.environ.get("OPTIMUM_OWL_DISABLE_KERNEL", "") not in ("", "0"):
        return "OPTIMUM_OWL_DISABLE_KERNEL is set"
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return f"the CPU is {machine}, not x86-64 (only an AVX2 kernel exists)"
    flags = _cpu_flags()
    missing = [f for f in ("avx2", "fma", "f16c", "popcnt") if flags is not None and f not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        return f"no C++ compiler found ({compiler!r} / 'g++' not on PATH)"
    if shutil.which("ninja") is None and not _ninja_module():
        return "ninja is not installed (`pip install ninja`)"
    return None


def _ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None  # unknown (e.g. not Linux): the C++ side checks again with __builtin_cpu_supports


@contextlib.contextmanager
def _exclusive(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build() -> Any:
    if shutil.which("ninja") is None and _ninja_module():
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    tag = build_tag()
    build_dir = cache_root() / tag
    with _exclusive(cache_root() / f"{tag}.lock"):
        build_dir.mkdir(parents=True, exist_ok=True)
        # a `lock` file left by a killed cpp_extension build would make it wait forever; we hold the real lock
        with contextlib.suppress(FileNotFoundError):
            (build_dir / "lock").unlink()
        fresh = not any(build_dir.glob("*.so"))
        if fresh:
            logger.info("optimum-owl: compiling the sparse CPU kernel (once, cached in %s) ...", build_dir)
        ops = load_ops(SOURCE, build_dir, tag, extra_sources=[OPS_SOURCE])
    if not ops.lib.owl_cpu_supported():
        raise RuntimeError("the kernel reports that this CPU lacks AVX2/FMA/F16C/POPCNT")
    try:
        choose_isa(ops)
    except Exception as err:  # noqa: BLE001 - the AVX2 path stays usable whatever went wrong in the check
        for dtype in ISA_CODES:
            ops.set_isa(dtype, "avx2")
        logger.warning("optimum-owl sparse inference: checking the AVX-512 path failed (%s: %s); using AVX2.",
                       type(err).__name__, err)
    return ops


def load_ops(source: Path, build_dir: Path, name: str, extra_cflags: list[str] | tuple[str, ...] = (),
             extra_sources: list[Path] | tuple[Path, ...] = ()) -> KernelOps:
    """Compile `source` (and `extra_sources`) with the library's flags (plus `extra_cflags`) into `build_dir` and load
    it (no checks). Only the main build adds `OPS_SOURCE`: a process can register the `owl` operators only once."""
    from torch.utils import cpp_extension

    library = cpp_extension.load(
        name=name,
        sources=[str(source), *map(str, extra_sources)],
        extra_cflags=CFLAGS + [f"-I{SOURCE.parent}"] + list(extra_cflags),  # csrc/ headers, for a copied source too
        extra_ldflags=list(LDFLAGS),  # a copy: cpp_extension appends to it (and LDFLAGS is in build_tag)
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return KernelOps(ctypes.CDLL(str(library)))


# What the C entry points' return codes mean (csrc/sparse_linear.cpp).
_ERRORS = {1: "unsupported value dtype", 2: "this CPU lacks AVX2/FMA/F16C/POPCNT",
           3: "activations of an unsupported dtype or width", 4: "out of memory or a thread-pool failure",
           5: "AVX-512 asked for on a CPU without AVX-512F (int8 values: F, BW, VBMI, VBMI2) or an unknown instruction "
              "set"}


def check_rc(entry: str, rc: int) -> None:
    """Raise a RuntimeError naming `entry` and what its non-zero return code `rc` means."""
    if rc:
        raise RuntimeError(f"owl kernel: {entry} failed: {_ERRORS.get(rc, 'unknown error')} (code {rc})")


_p = ctypes.c_void_p
_i64 = ctypes.c_int64


class KernelOps:
    """Thin ctypes wrapper over the C entry points of `csrc/sparse_linear.cpp` (the GIL is released during calls).

    The callers (`SparseLinear`) own the buffers and guarantee their layout; this class checks what is cheap to check.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.owl_cpu_supported.restype = ctypes.c_int
        lib.owl_decode.argtypes = [_p, ctypes.c_int, _i64, _i64, _p, _i64, _i64, _p, ctypes.c_int, _p, _p, _p]
        lib.owl_decode.restype = ctypes.c_int
        lib.owl_expand.argtypes = [_p, _i64, _i64, _i64, _p, ctypes.c_int, _p, _p, ctypes.c_int]
        lib.owl_expand.restype = ctypes.c_int
        lib.owl_avx512_supported.restype = ctypes.c_int
        lib.owl_set_isa.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.owl_set_isa.restype = ctypes.c_int
        lib.owl_get_isa.argtypes = [ctypes.c_int]
        lib.owl_get_isa.restype = ctypes.c_int
        if hasattr(lib, "owl_decode_q8"):  # int8 values (csrc/sparse_linear_q8.h); absent in builds of older sources
            lib.owl_q8_avx512_supported.restype = ctypes.c_int
            lib.owl_decode_q8.argtypes = [_p, ctypes.c_int, _i64, _i64, _p, _i64, _i64, _p, _p, _p, _i64, _p, _p]
            lib.owl_decode_q8.restype = ctypes.c_int
            lib.owl_expand_q8.argtypes = [_p, _i64, _i64, _i64, _p, _p, _p, _i64, _p, ctypes.c_int]
            lib.owl_expand_q8.restype = ctypes.c_int

    @property
    def avx512_supported(self) -> bool:
        """Whether this CPU (and OS) can run the AVX-512 decode path."""
        return bool(self.lib.owl_avx512_supported())

    def avx512_available(self, dtype: torch.dtype) -> bool:
        """Whether this CPU can run the AVX-512 decode path for values of `dtype` (int8 codes: AVX-512 F, BW, VBMI and
        VBMI2; the float dtypes: AVX-512F)."""
        return bool(self.lib.owl_q8_avx512_supported()) if dtype == torch.int8 else self.avx512_supported

    def set_isa(self, dtype: torch.dtype, isa: str) -> None:
        """Decode values of `dtype` (a float dtype, or torch.int8 for int8 codes) with the `"avx2"` or `"avx512"` path
        (both give the same bits)."""
        if isa not in ISAS:
            raise ValueError(f"owl kernel: isa must be one of {ISAS}, got {isa!r}")
        check_rc("owl_set_isa", self.lib.owl_set_isa(ISA_CODES[dtype], ISAS.index(isa)))

    def isa(self, dtype: torch.dtype) -> str:
        """The decode path used for values of `dtype`."""
        return ISAS[self.lib.owl_get_isa(ISA_CODES[dtype])]

    @staticmethod
    def check_weight(mask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor) -> int:
        """Check the compact weight's buffers; return the values' dtype code for the C entry points."""
        if not (mask.dtype == torch.uint8 and mask.dim() == 2 and mask.is_contiguous() and mask.shape[1] % 8 == 0):
            raise ValueError("owl kernel: mask must be contiguous uint8 [out, 8 * words per row]")
        if not (offsets.dtype == torch.int64 and offsets.is_contiguous() and offsets.numel() == mask.shape[0] + 1):
            raise ValueError("owl kernel: offsets must be contiguous int64 [out + 1]")
        if values.dtype not in DTYPE_CODES or not values.is_contiguous():
            raise ValueError(f"owl kernel: values must be contiguous float32/bfloat16/float16, got {values.dtype}")
        return DTYPE_CODES[values.dtype]

    def decode(self, x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ W^T + bias` for a contiguous `x` of shape `[n, in]` (float32, bfloat16 or float16; `in` may be the
        weight's in_features or its padded width `64 * words per row`), in `x`'s dtype; accumulated in float32."""
        code = self.check_weight(mask, values, offsets)
        width = mask.shape[1] * 8
        if not (x.dtype in DTYPE_CODES and x.dim() == 2 and x.is_contiguous() and width - 64 < x.shape[1] <= width):
            raise ValueError(f"owl kernel: x must be contiguous float32/bfloat16/float16 [n, in] with in in "
                             f"({width - 64}, {width}], got {x.dtype} {tuple(x.shape)}")
        if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous()):
            raise ValueError("owl kernel: bias must be contiguous float32")
        out = mask.shape[0]
        y = torch.empty(x.shape[0], out, dtype=x.dtype)
        b = None if bias is None else bias.data_ptr()
        rc = self.lib.owl_decode(x.data_ptr(), DTYPE_CODES[x.dtype], x.shape[0], x.shape[1], mask.data_ptr(), out,
                                 mask.shape[1] // 8, values.data_ptr(), code, offsets.data_ptr(), b, y.data_ptr())
        check_rc("owl_decode", rc)
        return y

    def expand(self, mask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, r0: int, r1: int,
               tile: torch.Tensor) -> None:
        """Rows `[r0, r1)` of the weight, dense, into `tile[: r1 - r0]` (`tile`: `[rows, 64 * wpr]`, float32, or the
        values' own dtype when they are bfloat16 / float16: their bits copied as they are)."""
        if not (tile.dtype in (torch.float32, values.dtype) and tile.is_contiguous() and tile.shape[0] >= r1 - r0
                and tile.shape[1] == mask.shape[1] * 8 and 0 <= r0 <= r1 <= mask.shape[0]):
            raise ValueError("owl kernel: bad tile for expand")
        code = DTYPE_CODES[values.dtype]
        rc = self.lib.owl_expand(mask.data_ptr(), r0, r1, mask.shape[1] // 8, values.data_ptr(), code,
                                 offsets.data_ptr(), tile.data_ptr(), DTYPE_CODES[tile.dtype])
        check_rc("owl_expand", rc)

    # ------------------------------------------------------------------------------------ int8 values (codes + scales)
    def q8_args(self, mask: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor,
                group_size: int | None, bias: torch.Tensor | None) -> tuple:
        """`owl_decode_q8`'s arguments after `x, xdtype, n, in` and before `y`, checked (`kernel_int8`): the hot path
        caches them while the buffers stay put (the tensors must outlive the tuple) and calls
        `lib.owl_decode_q8(x.data_ptr(), DTYPE_CODES[x.dtype], n, in, *args, y.data_ptr())`, then `check_rc`."""
        words = check_int8_weight(mask, codes, offsets, scales, group_size)
        check_bias(bias, mask.shape[0])
        return (mask.data_ptr(), mask.shape[0], mask.shape[1] // 8, codes.data_ptr(), offsets.data_ptr(),
                scales.data_ptr(), words, None if bias is None else bias.data_ptr())

    def decode_q8(self, x: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor,
                  scales: torch.Tensor, group_size: int | None, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ W^T + bias` for int8 codes with float32 scales (one per row, or per row and `group_size` inputs): `x`
        contiguous `[n, in]` float32/bfloat16/float16 (`in`: in_features or the padded width), `bias` float32 or
        None; summed in float32, each row's (group's) scale applied once; the result in `x`'s dtype."""
        args = self.q8_args(mask, codes, offsets, scales, group_size, bias)
        code = check_activations(x, mask.shape[1] * 8)
        y = torch.empty(x.shape[0], mask.shape[0], dtype=x.dtype)
        check_rc("owl_decode_q8", self.lib.owl_decode_q8(x.data_ptr(), code, x.shape[0], x.shape[1], *args,
                                                         y.data_ptr()))
        return y

    def expand_q8(self, mask: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor,
                  group_size: int | None, r0: int, r1: int, tile: torch.Tensor) -> None:
        """Rows `[r0, r1)` of an int8 weight, dequantized, into `tile[: r1 - r0]` (`[rows, 64 * wpr]`): float32
        `code * scale` (as `algorithms.quantize.dequantize_int8` computes it, bit for bit), or that value rounded to
        bfloat16 (nearest even) for a bfloat16 tile."""
        words = check_int8_weight(mask, codes, offsets, scales, group_size)
        tile_code = check_tile(tile, mask, r0, r1)
        check_rc("owl_expand_q8", self.lib.owl_expand_q8(mask.data_ptr(), r0, r1, mask.shape[1] // 8, codes.data_ptr(),
                                                         offsets.data_ptr(), scales.data_ptr(), words,
                                                         tile.data_ptr(), tile_code))

    def prefill(self, x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                bias: torch.Tensor | None, in_features: int, tile_rows: int, scales: torch.Tensor | None = None,
                group_size: int | None = None) -> torch.Tensor:
        """`x @ W^T + bias` by tiles: expand `tile_rows` rows to a dense buffer, then one GEMM each (torch.mm).

        float32 `x` (padded, `[n, 64 * words per row]`; `bias` float32): float32 tiles and GEMM, float32 result.
        bfloat16 `x` (`[n, in_features]`) with bfloat16 values (`bias` bfloat16): bfloat16 tiles and torch's bf16 GEMM
        (float32 accumulation, the result rounded to bfloat16 once, as a dense bf16 `nn.Linear` computes it) -- worth
        it only where that GEMM has native bf16 dot products (`SparseLinear` decides). int8 `values` (codes, with
        `scales` and `group_size`): the same, on tiles of `code * scale` (`expand_q8`)."""
        int8 = values.dtype == torch.int8
        if int8:
            if scales is None:
                raise ValueError("owl kernel: int8 values need their float32 scales (scales=...)")
            check_int8_weight(mask, values, offsets, scales, group_size)
        else:
            self.check_weight(mask, values, offsets)
        if x.dtype == torch.bfloat16:
            if not ((int8 or values.dtype == torch.bfloat16) and x.dim() == 2 and x.is_contiguous()
                    and x.shape[1] == in_features):
                raise ValueError("owl kernel: a bfloat16 prefill needs bfloat16 values (or int8 codes) and contiguous x "
                                 "[n, in_features]")
        elif not (x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous() and x.shape[1] == mask.shape[1] * 8):
            raise ValueError("owl kernel: x must be contiguous float32 [n, 64 * words per row]")
        if bias is not None and bias.dtype != x.dtype:
            raise ValueError(f"owl kernel: the prefill bias must be {x.dtype}, like x")
        out = mask.shape[0]
        # y^T row blocks are contiguous, so each tile's GEMM writes straight into its place (no strided output)
        y_t = torch.empty(out, x.shape[0], dtype=x.dtype)
        rows = max(1, min(tile_rows, out))
        tile = torch.empty(rows, mask.shape[1] * 8, dtype=x.dtype)
        xs_t = x[:, :in_features].t()
        for r0 in range(0, out, rows):
            r1 = min(out, r0 + rows)
            if int8:
                self.expand_q8(mask, values, offsets, scales, group_size, r0, r1, tile)
            else:
                self.expand(mask, values, offsets, r0, r1, tile)
            if bias is not None and x.dtype == torch.bfloat16:  # bias added by the GEMM, as bf16 F.linear adds it
                torch.addmm(bias[r0:r1, None], tile[: r1 - r0, :in_features], xs_t, out=y_t[r0:r1])
            else:
                torch.mm(tile[: r1 - r0, :in_features], xs_t, out=y_t[r0:r1])
        if bias is not None and x.dtype != torch.bfloat16:
            y_t += bias[:, None]
        # row-major, as F.linear returns it: a transposed view would make every later op of the model (attention's
        # head split, activations, residual adds) walk memory column by column (measured: the rest of a 512-token
        # prefill took 2.5x as long)
        return y_t.t().contiguous()


def kernel() -> Any | None:
    """The loaded kernel (`KernelOps`), building it on first call; None when it cannot be used (reason logged once)."""
    if _state["tried"]:
        return _state["ops"]
    with _lock:
        if _state["tried"]:
            return _state["ops"]
        reason = unavailable_reason()
        ops = None
        if reason is None:
            try:
                ops = _build()
            except Exception as err:  # noqa: BLE001 - any build/load failure means: use the pure path
                reason = f"building the C++ kernel failed ({type(err).__name__}: {str(err).strip().splitlines()[-1:]})"
        if ops is None:
            logger.info("optimum-owl sparse inference: using the pure-PyTorch path because %s.", reason)
        _state.update(tried=True, ops=ops, reason=reason)
        return ops


def kernel_status() -> dict[str, Any]:
    """Whether the C++ kernel is in use (building it if needed) and, if not, why; `isa`: the decode path per values
    dtype (`{"float32": "avx2", "bfloat16": "avx512", ..., "int8": "avx2"}`), None without the kernel."""
    ops = kernel()
    isa = None if ops is None else {str(d).removeprefix("torch."): ops.isa(d) for d in ISA_CODES}
    return {"kernel": ops is not None, "reason": _state["reason"], "isa": isa}


def _reset_for_tests() -> None:
    _state.update(tried=False, ops=None, reason=None)

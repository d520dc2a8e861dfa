"""Build, cache and load the C++ sparse-linear kernel (`csrc/sparse_linear.cpp`) on first use.

The kernel is compiled with `torch.utils.cpp_extension` (ninja + the system C++ compiler) into a cache folder keyed
by a hash of the source, the compiler flags, the torch version and the Python version, so a changed source or a new
torch gets a fresh build and an unchanged one loads in milliseconds. Concurrent first builds (several processes,
e.g. pytest workers) are serialised with an exclusive `fcntl` lock on the cache folder; the lock dies with its
process, so a killed build never blocks the next one.

When the kernel cannot be used, `kernel()` returns `None` and one INFO log line says why (not x86-64, no AVX2/FMA/F16C,
no C++ compiler or ninja, build failure, or `OPTIMUM_OWL_DISABLE_KERNEL=1`); `SparseLinear` then uses the pure-PyTorch
path, which gives the same results up to float32 summation order.

Environment variables:

- `OPTIMUM_OWL_KERNEL_CACHE`: cache folder (default: `$XDG_CACHE_HOME/optimum_owl/kernels` or `~/.cache/...`).
- `OPTIMUM_OWL_DISABLE_KERNEL=1`: never build or load the kernel.
"""

from __future__ import annotations

import contextlib
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

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "sparse_linear.cpp"
EXTENSION_NAME = "owl_sparse"
CFLAGS = ["-O3", "-std=c++17", "-fno-math-errno"]

_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "ops": None, "reason": None}


def cache_root() -> Path:
    env = os.environ.get("OPTIMUM_OWL_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "optimum_owl" / "kernels"


def build_tag() -> str:
    """Cache key: source, flags, torch and Python versions."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join(CFLAGS).encode())
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
    from torch.utils import cpp_extension

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
        cpp_extension.load(
            name=tag,
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    ops = torch.ops.owl_sparse
    if not ops.cpu_supported():
        raise RuntimeError("the kernel reports that this CPU lacks AVX2/FMA/F16C/POPCNT")
    return ops


def kernel() -> Any | None:
    """The loaded kernel ops (`torch.ops.owl_sparse`), building them on first call; None when unavailable."""
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
    """Whether the C++ kernel is in use (building it if needed) and, if not, why."""
    ops = kernel()
    return {"kernel": ops is not None, "reason": _state["reason"], "isa": "avx2" if ops is not None else None}


def _reset_for_tests() -> None:
    _state.update(tried=False, ops=None, reason=None)

"""Small helpers shared by every layer: THE atomic writers (file, text, folder), THE nested-structure walker, name
matching, what may be published (public_path, redact_secrets)."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """`write(tmp)` writes a temporary file beside `path`, which then replaces `path` in one rename.

    An interruption leaves the old file (or none), never a half-written one. Returns `path`.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def map_tensors(value: Any, fn: Callable[[Any], Any]) -> Any:
    """`value` with `fn` applied to every tensor inside nested tuples, lists and dicts (other leaves kept)."""
    import torch

    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename, on failure it is removed.

    An interrupted run therefore leaves either the old `path` or nothing, never a half-written folder.
    Raises `FileExistsError` when `path` exists and `overwrite` is false.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"Output path {final} exists and is not a folder; remove it or choose another path.")
    if final.exists() and not overwrite:
        raise FileExistsError(f"Output directory {final} already exists; pass overwrite=True (CLI: --overwrite).")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        for file in tmp.rglob("*.safetensors"):
            sort_safetensors_metadata(file)
        # mkdtemp/mkstemp make 0700/0600; give the output the modes mkdir/open would (0755/0644 under umask 022)
        mask = _umask()
        for item in [tmp, *tmp.rglob("*")]:
            if not item.is_symlink():
                os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (setting it is racy with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sort_safetensors_metadata(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header in place with its `__metadata__` keys sorted.

    safetensors keeps the metadata in a hash map with a per-process random order, so two identical saves differ in
    the header bytes; sorting makes identical checkpoints byte-identical. Only the order of the metadata entries
    changes (same header length, same tensors, same data offsets); a header that would not keep its length is left
    as is.
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or list(meta) == sorted(meta):
            return
        ordered = {"__metadata__": dict(sorted(meta.items())), **{k: v for k, v in header.items() if k != "__metadata__"}}
        if list(header)[0] != "__metadata__":
            return  # an unexpected layout: leave it alone
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size or json.loads(text) != header:
            return
        fh.seek(8)
        fh.write(text + b" " * (size - len(text)))


def check_output_dir(
    path: str | os.PathLike,
    overwrite: bool = False,
    flag: str = "--output-dir",
    protected: dict[str, str | None] | None = None,
    disjoint: dict[str, str | None] | None = None,
) -> None:
    """Refuse an output folder before any work starts (the CLI calls this first).

    Refuses `path` when it exists and is a file, exists without `overwrite`, cannot be written (read-only file system,
    no permission: probed by creating and removing a temporary folder where it will go), or is, contains or lies
    inside one of the `protected` local paths (`{description: path}`, e.g. the input model: replacing the output would
    delete it; entries that do not exist locally, such as Hub ids, are skipped) or of the `disjoint` paths (folders the
    run itself writes, e.g. `--checkpoint-dir`, checked whether or not they exist yet). Raises `FileExistsError`,
    `PermissionError` or `ValueError` naming `flag`.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{flag} {final} exists and is not a folder; remove it or choose another path.")
    resolved = final.resolve()
    others = {k: v for k, v in (protected or {}).items() if v is not None and Path(v).exists()}
    others.update({k: v for k, v in (disjoint or {}).items() if v is not None})
    for what, other in others.items():
        theirs = Path(other).resolve()
        if resolved == theirs or theirs in resolved.parents or resolved in theirs.parents:
            relation = "is" if resolved == theirs else ("is inside" if theirs in resolved.parents else "contains")
            raise ValueError(
                f"{flag} {final} {relation} the {what} {other}; writing there would delete it. Choose a folder outside it."
            )
    if final.exists() and not overwrite:
        raise FileExistsError(f"{flag} {final} exists; pass --overwrite to replace it.")
    ancestor = existing_ancestor(resolved.parent)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".owl-write-probe.", dir=ancestor))
    except OSError as err:
        raise PermissionError(f"{flag} {final}: cannot write in {ancestor} ({err.strerror}).") from None


def existing_ancestor(path: Path) -> Path:
    """`path` itself or its nearest existing parent folder."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(path: str | os.PathLike, needed: int, flag: str = "--output-dir") -> None:
    """Refuse (`OSError`) when the file system that will hold `path` has less than `needed` bytes free."""
    where = existing_ancestor(Path(path).parent)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise OSError(
            f"{flag} {path}: {free / 1e6:,.1f} MB free in {where}, but the output needs at least {needed / 1e6:,.1f} MB; "
            "free some space or choose another folder."
        )


def is_conv1d(module: Any) -> bool:
    """THE check for transformers' GPT-2 style `Conv1D` (weight stored transposed, `[in, out]`; y = x @ W + b)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def matches_any(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """True when `name` matches a shell glob, or a regex given as `"re:<regex>"` (searched), in `patterns`."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern) or name == pattern or name.endswith("." + pattern):
            return True
    return False


def public_path(value: object) -> object:
    """What to publish for a path in saved configs, reports and model cards: an absolute (or `~`) path becomes its
    last component, so no local folder layout is published; relative paths, Hub ids and non-paths are kept."""
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = os.fspath(value)
    if os.path.isabs(text) or text.startswith("~"):
        return Path(text).name
    return text


# `OWLPrunerConfig` fields that may hold local paths; published files carry only their last component.
PATH_FIELDS = ("dataset", "auto_holdout_dataset", "checkpoint_dir", "offload_folder")


def public_config(config: dict) -> dict:
    """A config dict (`OWLPrunerConfig.to_dict()`) as published in `owl_config.json`, `config.json`, reports and
    model cards: the `PATH_FIELDS` reduced by `public_path`."""
    return {k: public_path(v) if k in PATH_FIELDS else v for k, v in config.items()}


# Things that look like credentials in a command line: Hub/GitHub/OpenAI/Slack-style tokens, the value after a
# --*token*/--*password*/--*key* flag, NAME=value for *TOKEN*/*SECRET*/*PASSWORD*/*KEY* variables, bearer headers.
_SECRET_PATTERNS = (
    re.compile(r"\b(?:hf|api|sk|ghp|gho|ghs|github_pat|xox[abprs])_[A-Za-z0-9_-]{16,}"),
    re.compile(r"(?i)(--[\w-]*(?:token|password|secret|api[-_]?key)[\w-]*(?:=|\s+))(['\"]?)[^\s'\"]+\2"),
    re.compile(r"(?i)(\b[\w]*(?:token|secret|password|api_?key)[\w]*\s*=\s*)(['\"]?)[^\s'\",)]+\2"),
    re.compile(r"(?i)(bearer\s+)()[A-Za-z0-9._~+/=-]{8,}"),
)


def redact_secrets(text: str) -> str:
    """`text` with anything that looks like a token or password replaced by `***` (for published command lines)."""
    text = _SECRET_PATTERNS[0].sub("***", text)
    for pattern in _SECRET_PATTERNS[1:]:
        text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}***{m.group(2)}", text)
    return text

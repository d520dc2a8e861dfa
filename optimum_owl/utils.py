"""Small helpers shared by every layer: THE atomic writers (file, text, folder) and the checks of an output folder
(never over an input, free space, leftovers of killed writes), THE nested-structure walker, name matching, what may be
published (public_path, public_command, redact_secrets)."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


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
def atomic_output_dir(
    path: str | os.PathLike, overwrite: bool = False, protected: dict[str, Any] | None = None, flag: str = "save_dir"
) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename, on failure it is removed.

    An interrupted run therefore leaves either the old `path` or nothing, never a half-written folder; the leftovers
    of a killed run (`.NAME.owl-*.partial`) are removed by the next write of `path` (`clean_stale_outputs`).
    Raises `FileExistsError` when `path` exists and `overwrite` is false, and `ValueError` (naming `flag`) when `path`
    is or contains one of the `protected` local inputs (`{description: path}`, e.g. `input_paths(model, ...)`):
    replacing it would delete them.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"Output path {final} exists and is not a folder; remove it or choose another path.")
    refuse_overlap(final, local_paths(protected), flag, inside=False)
    if final.exists() and not overwrite:
        raise FileExistsError(f"Output directory {final} already exists; pass overwrite=True (CLI: --overwrite).")
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_outputs(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_owner_tag()}-", suffix=".partial", dir=final.parent))
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
            old = final.with_name(f".{final.name}.{_owner_tag()}.old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _owner_tag() -> str:
    """`owl-<host hash>-<pid>`: names the process (and machine) that owns a temporary output folder."""
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
    return f"owl-{host}-{os.getpid()}"


_OWNED = re.compile(r"owl-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)(?P<kind>-\w+\.partial|\.old)")
_LEGACY = re.compile(r"\w{8}\.partial|old-\d+")  # written before the owner was recorded in the name


def _process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine exists (True when that cannot be told: never remove a live write)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale_outputs(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writes of `path` left beside it; returns the removed folders.

    `atomic_output_dir` writes into `.NAME.owl-<host>-<pid>-*.partial` and moves the replaced output to
    `.NAME.owl-<host>-<pid>.old`; a SIGKILL (or power loss) leaves them behind. One is removed only when its owner
    process is gone from this machine (a live one may be another run writing `path` right now) and, for `.old`, when
    `path` exists (otherwise it holds the previous output: it is named in a warning instead). Leftovers of another
    machine or of older optimum-owl versions are named in a warning, never removed.
    """
    final = Path(path)
    prefix = f".{final.name}."
    try:
        entries = [e for e in final.parent.iterdir() if e.name.startswith(prefix) and e.is_dir() and not e.is_symlink()]
    except OSError:
        return []
    removed: list[Path] = []
    host = _owner_tag().split("-")[1]
    for entry in sorted(entries):
        rest = entry.name[len(prefix):]
        owned = _OWNED.fullmatch(rest)
        if owned is None:
            if _LEGACY.fullmatch(rest):
                logger.warning("%s looks like the leftover of an interrupted write of %s; remove it if no other run "
                               "is writing there.", entry, final)
            continue
        if owned["host"] != host or _process_alive(int(owned["pid"])):
            if owned["host"] != host:
                logger.warning("%s was left by process %s of another machine writing %s; remove it if that run has "
                               "ended.", entry, owned["pid"], final)
            continue
        if owned["kind"] == ".old" and not final.exists():
            logger.warning("%s holds the previous %s (a write was killed while replacing it); rename it back or "
                           "remove it.", entry, final)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        logger.warning("Removed %s, left by an interrupted write of %s (process %s is gone).", entry, final,
                       owned["pid"])
        removed.append(entry)
    return removed


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
    inputs: dict[str, Any] | None = None,
) -> None:
    """Refuse an output folder before any work starts (the CLI calls this first).

    Refuses `path` when it exists and is a file, exists without `overwrite`, cannot be written (read-only file system,
    no permission: probed by creating and removing a temporary folder where it will go), or is, contains or lies
    inside one of the `protected` local paths (`{description: path}`, e.g. the input model: replacing the output would
    delete it; entries that do not exist locally, such as Hub ids, are skipped) or of the `disjoint` paths (folders the
    run itself writes, e.g. `--checkpoint-dir`, checked whether or not they exist yet), or is or contains one of the
    `inputs` (other local files and folders the run reads, such as the calibration text: an output inside them
    deletes nothing). Raises `FileExistsError`, `PermissionError` or `ValueError` naming `flag`. Leftovers of killed
    writes of `path` are cleaned up (`clean_stale_outputs`), so the free-space check that follows sees their space.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{flag} {final} exists and is not a folder; remove it or choose another path.")
    others = local_paths(protected)
    others.update({k: v for k, v in (disjoint or {}).items() if v is not None})
    refuse_overlap(final, others, flag)
    refuse_overlap(final, local_paths(inputs), flag, inside=False)
    if final.exists() and not overwrite:
        how = "pass --overwrite" if flag.startswith("-") else "pass overwrite=True"
        raise FileExistsError(f"{flag} {final} exists; {how} to replace it.")
    clean_stale_outputs(final)
    ancestor = existing_ancestor(final.resolve().parent)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".owl-write-probe.", dir=ancestor))
    except OSError as err:
        raise PermissionError(f"{flag} {final}: cannot write in {ancestor} ({err.strerror}).") from None


def local_paths(paths: dict[str, Any] | None) -> dict[str, str]:
    """The entries of `{description: path}` that name an existing local file or folder (Hub ids, data set names,
    objects and empty values are dropped)."""
    found: dict[str, str] = {}
    for what, value in (paths or {}).items():
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            continue
        with contextlib.suppress(OSError, ValueError):
            if Path(value).exists():
                found[what] = os.fspath(value)
    return found


def refuse_overlap(path: str | os.PathLike, others: dict[str, Any], flag: str, inside: bool = True) -> None:
    """Raise `ValueError` (naming `flag`) when `path` is or contains one of `others` (`{description: path}`), or, with
    `inside`, lies inside one: replacing `path` would delete it (or write into it)."""
    final = Path(path)
    resolved = final.resolve()
    for what, other in others.items():
        theirs = Path(other).resolve()
        if resolved == theirs:
            relation = "is"
        elif resolved in theirs.parents:
            relation = "contains"
        elif inside and theirs in resolved.parents:
            relation = "is inside"
        else:
            continue
        raise ValueError(
            f"{flag} {final} {relation} the {what} {other}; writing there would delete it. Choose a folder outside it."
        )


def input_paths(model: Any = None, tokenizer: Any = None, config: Any = None) -> dict[str, Any]:
    """What a save must not delete: the folders `model` and `tokenizer` were loaded from (`name_or_path`) and the
    local paths of `config` (`PATH_FIELDS`: calibration data, checkpoint and offload folders), as
    `{description: path}` for `atomic_output_dir(protected=...)` / `check_output_dir`."""
    found = {"input model": getattr(model, "name_or_path", None), "tokenizer": getattr(tokenizer, "name_or_path", None)}
    found.update({f"`{name}`": getattr(config, name, None) for name in PATH_FIELDS})
    return found


def existing_ancestor(path: Path) -> Path:
    """`path` itself or its nearest existing parent folder."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def format_bytes(size: int) -> str:
    """`size` for messages: exact bytes below 1 MB, else MB or GB with two decimals."""
    if size < 1e6:
        return f"{size:,} bytes"
    return f"{size / 1e6:,.2f} MB" if size < 1e9 else f"{size / 1e9:,.2f} GB"


def check_free_space(path: str | os.PathLike, needed: int, flag: str = "--output-dir", what: str = "") -> None:
    """Refuse (`OSError`) when the file system that will hold `path` has less than `needed` bytes free; `what` says
    where the estimate comes from (shown in the message)."""
    where = existing_ancestor(Path(path).parent)
    free = shutil.disk_usage(where).free
    if free < needed:
        shown_free, shown_needed = format_bytes(free), format_bytes(needed)
        if shown_free == shown_needed:  # too close for two decimals: show the bytes
            shown_free, shown_needed = f"{free:,} bytes", f"{needed:,} bytes"
        raise OSError(
            f"{flag} {path}: {shown_free} free in {where}, but the output needs about {shown_needed}"
            f"{f' ({what})' if what else ''}; free some space or choose another folder."
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


# An absolute or `~` path in a command line: quoted (group `quoted`), or a bare word after a space, `=` or the start.
_COMMAND_PATH = re.compile(r"""(?P<q>['"])(?P<quoted>[~/][^'"]*)(?P=q)|(?P<lead>^|[\s=])(?P<bare>[~/][^\s'"]*)""")


def public_command(command: str) -> str:
    """A command line as published (model cards): every absolute or `~` path in it reduced by `public_path`, quoted
    or not, also as `--flag=/path` or `NAME=/path`; URLs, relative paths and Hub ids are kept."""

    def reduce(match: re.Match) -> str:
        if match["quoted"] is not None:
            return f"{match['q']}{public_path(match['quoted']) or match['quoted']}{match['q']}"
        return f"{match['lead']}{public_path(match['bare']) or match['bare']}"

    return _COMMAND_PATH.sub(reduce, command)


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

"""Where a model comes from: a local folder or a Hub repo, checked before anything is loaded so that a wrong name
fails at once with one error naming it (never after minutes of Hub retries). Used by `modeling.load_model` and by
every `optimum-owl` subcommand that reads a model or tokenizer (`commands.check_model_args`)."""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

# What `huggingface_hub` accepts as a repo id: `name` or `owner/name` of letters, digits, `-`, `_`, `.`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")


def is_local_looking(text: str) -> bool:
    """Whether a model argument is meant as a local path: it exists (or its first part does: `models/llama` with a
    `models` folder here), starts with `.`, `/` or `~`, has more than one separator, or is no valid Hub id."""
    path = Path(text)
    return (
        path.exists()
        or text.startswith((".", "/", "~"))
        or os.sep in text.strip("/").replace("/", "", 1)
        or (len(path.parts) > 1 and Path(path.parts[0]).exists())
        or not _HUB_ID.match(text)
    )


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` is set (as huggingface_hub reads it at import, or in the environment now)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or env


def check_model_source(text: str, what: str = "Model", filename: str = "config.json") -> bool:
    """Check, before anything is loaded, that `text` names a local folder or a reachable Hub repo: True for a local
    folder, False for a Hub id, and one error naming it otherwise, at once (no Hub retries):

    - a local-looking path (`is_local_looking`) that is missing or not a folder: `FileNotFoundError`;
    - a Hub id with `HF_HUB_OFFLINE` set and `filename` not in the Hub cache: `OSError`;
    - a Hub id while online: one request for `filename`, without retries; a Hub that cannot be reached (and no
      cached copy) or a repo that does not exist: `OSError`.
    """
    path = Path(text).expanduser()
    if path.is_dir():
        return True
    if is_local_looking(text):
        state = "is not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{what} {text} {state}: pass a local folder or a Hub id (owner/name).")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(text, filename), str)
    if hub_offline():
        if cached:
            return False
        raise OSError(
            f"{what} {text!r} is not a local folder, and HF_HUB_OFFLINE is set, so it cannot come from the Hugging "
            "Face Hub (it is not in the Hub cache): pass a local folder, or unset HF_HUB_OFFLINE to download it."
        )
    try:
        _hub_file_found(f"{constants.ENDPOINT}/{text}/resolve/main/{filename}")
    except RepositoryNotFoundError as err:
        if isinstance(err, GatedRepoError):
            return False  # the loader says how to get access
        raise OSError(f"{what} {text!r} is neither a local folder nor a repo on the Hugging Face Hub (or a private "
                      "one: log in with `hf auth login`); check the name.") from None
    except HfHubHTTPError:
        return False  # reachable: the loader reports what is wrong with the repo
    except Exception as err:  # noqa: BLE001 - httpx transport errors, timeouts, OSError: the Hub cannot be reached
        if cached:
            logger.warning("The Hugging Face Hub cannot be reached (%s); %s comes from the Hub cache.", err, text)
            return False
        raise OSError(
            f"{what} {text!r} is not a local folder, and the Hugging Face Hub cannot be reached to fetch it "
            f"({type(err).__name__}: {' '.join(str(err).split())}): check the path, or set HF_HUB_OFFLINE=1 to use "
            "the Hub cache only."
        ) from None
    return False


@functools.lru_cache(maxsize=32)
def _hub_file_found(url: str) -> None:
    """One request for a Hub file's metadata, without retries; a success is remembered for the process, so a command
    that checks its model and then loads it (which checks again) asks the Hub once. Failures raise, uncached."""
    from huggingface_hub import get_hf_file_metadata

    get_hf_file_metadata(url, retry_on_errors=False)

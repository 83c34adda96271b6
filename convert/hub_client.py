"""The Hugging Face Hub, as both directions use it: the client with bounded timeouts, one-line errors
with the token redacted, repo id and revision checks, which files of a repo a checkpoint is made of.

The token comes from the usual places (`HF_TOKEN`, the saved login) and is never printed, logged or
written: every message that leaves the Hub modules is passed through `redact`.
"""
from __future__ import annotations
import fnmatch
import re
from contextlib import contextmanager
from pathlib import Path
from mm_convert import model, output_format
from mm_convert.plan import presharded
from mm_convert.errors import HubError
from mm_convert.read.source import INDEX_NAME

DOWNLOAD_RECORD = ".mm-convert-download.json"
DISK_MARGIN = 1.02  # 2% slack on top of the bytes still to fetch
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")
# Files published last, in the final commit: a repo without them never looks complete.
FINAL_FILES = (output_format.MODEL_CARD_NAME, output_format.CONFIG_NAME, output_format.MANIFEST_NAME)


def redact(text: str) -> str:
    """Remove anything that looks like a Hub token, and the current token itself."""
    text = _TOKEN_RE.sub("hf_***", str(text))
    token = _current_token()
    return text.replace(token, "***") if token else text


def _current_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no token is a normal state
        return None


def looks_like_repo_id(text: str) -> bool:
    return bool(REPO_ID_RE.match(text)) and not Path(text).exists()


def check_revision(revision: str | None) -> None:
    """A branch, tag or commit name as the Hub accepts them; anything else (`../x`, spaces, control
    characters) is refused here instead of being put into a URL."""
    if revision is None:
        return
    if not REVISION_RE.match(revision) or ".." in revision or "//" in revision or revision.endswith(("/", ".lock")):
        raise HubError(f"--revision {revision!r}: not a branch, tag or commit name")


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID_RE.match(repo_id) or ".." in repo_id:
        raise HubError(f"{repo_id!r} is not a Hub repo id (namespace/name)")


def hub_api():
    from huggingface_hub import HfApi

    return HfApi()


@contextmanager
def bounded_timeouts(seconds: float = 60.0):
    """huggingface_hub's HTTP client has no timeout; give it one for the duration of a call."""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    def factory():
        client = default_client_factory()
        client.timeout = type(client.timeout)(seconds, connect=min(10.0, seconds))  # httpx (1.x) or httpx2 (2.x)
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(default_client_factory)


def hub_error(action: str, exc: Exception) -> HubError:
    """One line: what failed, the HTTP status, and the server's own message when it sent one."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    server = getattr(exc, "server_message", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    detail = f"{server} ({first})" if server else first
    return HubError(redact(f"{action}: {'HTTP ' + str(status) + ': ' if status else ''}{detail}"))




def is_presharded_file(path: str) -> bool:
    parts = path.split("/")
    return (len(parts) == 3 and parts[0].startswith(output_format.PRESHARDED_ROOT_PREFIX)
            and (parts[2].endswith(presharded.FILE_SUFFIX) or parts[2] in (presharded.CHECKSUM_NAME, presharded.READY_NAME)))


def is_final(path: str) -> bool:
    """Published in the last commit: a repo without them never looks complete (or loads: READY)."""
    name = path.rsplit("/", 1)[-1]
    return path in FINAL_FILES or (is_presharded_file(path) and name in (presharded.READY_NAME, presharded.CHECKSUM_NAME))


def wanted(path: str) -> bool:
    """Files a conversion needs: weights, index, config, tokenizer, templates, remote code, licence, card."""
    name = Path(path).name
    if path.startswith(output_format.EXPERTS_DIR + "/") and name.endswith(".safetensors"):
        return True  # a converted checkpoint's per-rank experts
    if is_presharded_file(path):
        return True  # a converted checkpoint's presharded folders
    if "/" in path:
        return False  # docs/, figures/ and other folders are not part of a checkpoint
    if name.endswith(".safetensors") or name in (INDEX_NAME, "config.json", "README.md", output_format.MANIFEST_NAME,
                                                 output_format.CHART_NAME):
        return True
    return any(fnmatch.fnmatch(name, p) for p in model.AUXILIARY_FILE_PATTERNS)



@contextmanager
def hub_bars(quiet: bool):
    """huggingface_hub's own progress bars and retry chatter follow --quiet too."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from huggingface_hub.utils import logging as hub_logging

    was_disabled = are_progress_bars_disabled()
    verbosity = hub_logging.get_verbosity()
    if quiet:
        disable_progress_bars()
        hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        if quiet:
            hub_logging.set_verbosity(verbosity)
            if not was_disabled:
                enable_progress_bars()



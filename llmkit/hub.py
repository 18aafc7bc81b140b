"""Hugging Face Hub access through huggingface_hub: checkpoints for `convert`, GGUFs for `pull`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmkit.errors import LlmkitError

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken"]


class HubError(LlmkitError):
    """A Hub request failed: not found, gated, offline, or a transfer problem."""


def _quiet_progress(quiet: bool) -> None:
    # huggingface_hub draws tqdm bars on stderr; only useful to a person at a terminal.
    if quiet or not sys.stderr.isatty():
        from huggingface_hub import disable_progress_bars

        disable_progress_bars()


def explain(exc: Exception, repo: str) -> HubError:
    """Turn a huggingface_hub exception into a one-line error with a next step."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    token_set = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    if isinstance(exc, GatedRepoError) or (
        isinstance(exc, HfHubHTTPError) and getattr(exc.response, "status_code", 0) in (401, 403)
    ):
        if token_set:
            return HubError(f"the Hub refused the token for {repo}",
                            hint=f"check that it is valid and that you accepted the licence at "
                                 f"https://huggingface.co/{repo}")
        return HubError(f"{repo} is gated: accept its licence at https://huggingface.co/{repo}",
                        hint="then set HF_TOKEN or run `hf auth login`")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"repository {repo} not found on the Hub")
    if isinstance(exc, EntryNotFoundError):
        return HubError(f"{repo} has no such file: {exc}")
    if isinstance(exc, LocalEntryNotFoundError):
        return HubError(f"{repo} is not available offline",
                        hint="connect to the network, or unset HF_HUB_OFFLINE")
    return HubError(f"download from {repo} failed: {exc}")


def checkpoint_dir(source: str, *, quiet: bool = False) -> Path:
    """A local checkpoint directory for `convert`: SOURCE itself, or a Hub snapshot of it.

    Only the files a conversion needs are downloaded (configs, safetensors, tokenizer).

    Raises:
        HubError: the repository cannot be fetched.
        ConvertError: SOURCE is neither a directory nor a repository id.
    """
    from llmkit.errors import ConvertError

    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.count("/") != 1 or source.startswith((".", "/")):
        raise ConvertError(f"{source} is not a checkpoint directory or OWNER/REPO")
    _quiet_progress(quiet)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as exc:
        raise explain(exc, source) from None

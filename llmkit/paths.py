"""Where llmkit keeps its files; evaluated at call time so LLMKIT_HOME can change."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Return llmkit's data directory (``LLMKIT_HOME`` or the platform's user data dir).

    Raises:
        StoreError: ``LLMKIT_HOME`` names something that is not a directory.
    """
    override = os.environ.get("LLMKIT_HOME")
    if override:
        path = Path(override).expanduser()
        if path.exists() and not path.is_dir():
            from llmkit.errors import StoreError

            raise StoreError(f"LLMKIT_HOME={override} is not a directory",
                             hint="point LLMKIT_HOME at a directory, or unset it")
        return path
    import platformdirs

    return Path(platformdirs.user_data_dir("llmkit", appauthor=False))


def models_dir() -> Path:
    """Directory for GGUF files that llmkit itself writes or copies."""
    return home() / "models"


def manifest_path() -> Path:
    """The store's manifest: one JSON object naming every registered model."""
    return home() / "manifest.json"


def history_path() -> Path:
    """Input history of `llmkit chat`."""
    return home() / "chat_history"


def user_catalog_path() -> Path:
    """An optional user catalog whose entries add to or override the shipped one."""
    return home() / "models.toml"

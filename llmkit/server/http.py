"""uvicorn's HTTP/1.1 protocol for `llmkit serve`: the fastest installed, its head bounded."""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

# The most a request line and its headers may take together. h11 enforces it itself; the
# httptools parser (llhttp) has no limit of its own and keeps whatever a client sends before
# the blank line, so a request head that never ends would grow the server without bound.
MAX_HEAD_BYTES = 64 * 1024

_MESSAGE = b"the request line and headers are too long"
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
              b"content-type: text/plain; charset=utf-8\r\n"
              b"content-length: " + str(len(_MESSAGE)).encode() + b"\r\n"
              b"connection: close\r\n\r\n" + _MESSAGE)


def protocol() -> type[asyncio.Protocol] | str:
    """What to give uvicorn's ``http``: httptools' parser with the head bounded when it is
    installed (the serve extra's, several times cheaper per request and per streamed chunk
    than h11, which matters when the front end shares the cores with the decoder), else h11."""
    if importlib.util.find_spec("httptools") is None:
        return "h11"
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpTools(HttpToolsProtocol):
        """httptools' protocol that answers 431 and closes once a request's head passes
        :data:`MAX_HEAD_BYTES`. The bytes of each read are counted while a head is being
        parsed and the check follows the parse, so a legitimate head that arrives with its
        body in one read is never refused; what is kept past the limit is one read at most."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True
            self._head_bytes = 0

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head, self._head_bytes = True, 0
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if (self._in_head and self._head_bytes > MAX_HEAD_BYTES
                    and not self.transport.is_closing()):
                self.transport.write(_TOO_LARGE)
                self.transport.close()

    return BoundedHttpTools

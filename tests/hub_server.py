"""A loopback HTTP server speaking the parts of the Hugging Face Hub API huggingface_hub uses."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GOOD_TOKEN = "hf_goodtoken0123456789"


@dataclass
class FakeFile:
    """One file of a fake repository; ``source`` is bytes or a path served from disk."""

    source: bytes | Path
    size: int = 0
    sha256: str = ""
    # Fault injection, consumed as they are used:
    drop_after: int | None = None  # a full GET sends this many bytes then closes, once
    corrupt_times: int = 0  # this many GETs send the right size but wrong bytes
    claimed_size: int | None = None  # what the API says the size is (default: true size)
    stall_after: int | None = None  # a full GET sends this many bytes, then waits for release

    def __post_init__(self) -> None:
        if isinstance(self.source, Path):
            self.size = self.source.stat().st_size
            digest = hashlib.sha256()
            with open(self.source, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
            self.sha256 = digest.hexdigest()
        else:
            self.size = len(self.source)
            self.sha256 = hashlib.sha256(self.source).hexdigest()

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file."""
        if isinstance(self.source, bytes):
            return self.source[start:end]
        with open(self.source, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)


@dataclass
class FakeRepo:
    """A model repository: its files, and whether a token is needed."""

    files: dict[str, FakeFile]
    gated: bool = False


@dataclass
class FakeHub:
    """Repositories, the request log, and the running server's address."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    release: threading.Event = field(default_factory=threading.Event)

    def add(self, repo: str, files: dict[str, bytes | Path], *, gated: bool = False) -> FakeRepo:
        """Publish a repository."""
        self.repos[repo] = FakeRepo({n: FakeFile(s) for n, s in files.items()}, gated=gated)
        return self.repos[repo]

    def downloads(self, filename: str) -> list[dict[str, str]]:
        """Logged GETs of ``filename``'s contents."""
        return [r for r in self.requests
                if r["method"] == "GET" and "/resolve/" in r["path"]
                and r["path"].endswith("/" + filename)]


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _log(self) -> None:
            hub.requests.append({
                "method": self.command, "path": unquote(urlsplit(self.path).path),
                "range": self.headers.get("Range", ""),
                "auth": "yes" if self.headers.get("Authorization") else "",
            })

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
                  ) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj: object) -> None:
            self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json",
                                                       "X-Repo-Commit": COMMIT})

        def _repo(self, repo_id: str, *, public: bool = False) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._send(404, b'{"error":"Repository not found"}',
                           {"X-Error-Code": "RepoNotFound",
                            "X-Error-Message": "Repository not found"})
                return None
            if repo.gated and not public:
                auth = self.headers.get("Authorization", "")
                if auth != f"Bearer {GOOD_TOKEN}":
                    message = ("Invalid credentials in Authorization header" if auth else
                               "Access to this model is restricted. Please log in.")
                    self._send(401, json.dumps({"error": message}).encode(),
                               {"X-Error-Code": "GatedRepo", "X-Error-Message": message})
                    return None
            return repo

        def do_HEAD(self) -> None:
            self._serve()

        def do_GET(self) -> None:
            self._serve()

        def _serve(self) -> None:
            self._log()
            path = unquote(urlsplit(self.path).path)
            if (m := _API.match(path)) and self.command == "GET":
                # As on the Hub, a gated repository's listing is public; its files are not.
                repo = self._repo(m["repo"], public=True)
                if repo is not None:
                    self._json({
                        "id": m["repo"], "sha": COMMIT, "private": False, "gated": repo.gated,
                        "siblings": [
                            {"rfilename": name, "size": f.claimed_size or f.size,
                             "blobId": f.sha256[:40],
                             "lfs": {"sha256": f.sha256, "size": f.claimed_size or f.size,
                                     "pointerSize": 134}}
                            for name, f in repo.files.items()],
                    })
                return
            if (m := _TREE.match(path)) and self.command == "GET":
                repo = self._repo(m["repo"])
                if repo is not None:
                    self._json([{"type": "file", "path": n, "size": f.size, "oid": f.sha256[:40],
                                 "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}}
                                for n, f in repo.files.items()])
                return
            m = _RESOLVE.match(path)
            if m is None:
                self._send(404, b"not found")
                return
            repo = self._repo(m["repo"])
            if repo is None:
                return
            file = repo.files.get(m["file"])
            if file is None:
                self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                     "X-Repo-Commit": COMMIT})
                return
            self._serve_file(file)

        def _serve_file(self, file: FakeFile) -> None:
            start, end, status = 0, file.size, 200
            wanted = self.headers.get("Range", "")
            if (r := re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)) is not None:
                start = int(r[1])
                end = int(r[2]) + 1 if r[2] else file.size
                status = 206
            headers = {
                "X-Repo-Commit": COMMIT,
                "ETag": f'"{file.sha256}"',
                "X-Linked-Etag": f'"{file.sha256}"',
                "X-Linked-Size": str(file.size),
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{file.size}"
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if self.command == "HEAD":
                return
            if file.corrupt_times > 0:
                file.corrupt_times -= 1
                self.wfile.write(bytes(b ^ 0xFF for b in file.read(start, end)))
                return
            if file.stall_after is not None and start == 0:
                self.wfile.write(file.read(0, file.stall_after))
                self.wfile.flush()
                hub.release.wait(60)
                self.close_connection = True
                return
            if file.drop_after is not None and start == 0:
                cut, file.drop_after = file.drop_after, None
                self.wfile.write(file.read(0, cut))
                self.wfile.flush()
                self.close_connection = True
                return
            pos = start
            while pos < end:
                chunk = file.read(pos, min(end, pos + (1 << 20)))
                self.wfile.write(chunk)
                pos += len(chunk)

    return Handler


@contextmanager
def serve(hub: FakeHub) -> Iterator[FakeHub]:
    """Run ``hub`` on 127.0.0.1 at a free port for the block; ``hub.url`` is its address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        hub.release.set()
        server.shutdown()
        server.server_close()

"""`llmkit serve` end to end: a live server on a loopback port, driven by OpenAI's client."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import openai  # the dev extra's: the official client is what these tests hold us to
import pytest

from tests.conftest import run_llmkit

try:  # openai's HTTP client: httpx, or its successor httpx2 in openai 3
    import httpx
except ImportError:
    import httpx2 as httpx  # type: ignore[no-redef]

CTX = 1024
PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Name a planet.",
    "What is ice made of?",
]


class Server:
    """A `llmkit serve` subprocess on a free loopback port."""

    def __init__(self, args: Sequence[str], home: Path, env: dict[str, str] | None = None
                 ) -> None:
        full_env = dict(os.environ, LLMKIT_HOME=str(home / "llmkit"), HF_HOME=str(home / "hf"),
                        HF_HUB_OFFLINE="1", NO_COLOR="1")
        full_env.pop("LLMKIT_API_KEY", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmkit", "serve", "--port", "0", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=full_env)
        self.lines: list[str] = []
        self.url = ""
        deadline = time.monotonic() + 120
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(r"serving on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                break
        if not self.url:
            self.proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.lines)
                                 + self.proc.stderr.read())
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def client(self, api_key: str = "none", **kwargs: object) -> object:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             timeout=120, **kwargs)

    def health(self) -> dict[str, object]:
        data: dict[str, object] = httpx.get(self.url + "/health", timeout=10).json()
        return data

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-home")


@pytest.fixture(scope="module")
def server(smollm2_path: Path, home: Path) -> Iterator[Server]:
    srv = Server(["-m", str(smollm2_path), "-P", "4", "--ctx", str(CTX), "-t", "2"], home)
    yield srv
    assert srv.stop() == 0, "".join(srv.lines)


@pytest.fixture(scope="module")
def greedy(smollm2_path: Path, home: Path) -> dict[str, str]:
    """`llmkit run` greedy answers, the reference every served answer must equal."""
    env = {"LLMKIT_HOME": str(home / "llmkit")}
    answers = {}
    for prompt in PROMPTS:
        proc = run_llmkit(["run", prompt, "-m", str(smollm2_path), "--temperature", "0",
                           "-n", "40", "--ctx", str(CTX), "-t", "2", "-f", "json", "-q"],
                          env=env)
        assert proc.returncode == 0, proc.stderr
        answers[prompt] = json.loads(proc.stdout)["text"]
    return answers


def _model(server: Server) -> str:
    return str(server.client().models.list().data[0].id)


def _chat(server: Server, prompt: str, **kwargs: object) -> object:
    options: dict[str, object] = {"temperature": 0, "max_tokens": 40, **kwargs}
    return server.client().chat.completions.create(
        model=_model(server), messages=[{"role": "user", "content": prompt}], **options)


def _stream_text(server: Server, prompt: str, **kwargs: object) -> tuple[str, list[object]]:
    chunks = list(server.client().chat.completions.create(
        model=_model(server), messages=[{"role": "user", "content": prompt}],
        temperature=0, max_tokens=40, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_and_health(server: Server, smollm2_path: Path) -> None:
    models = server.client().models.list().data
    assert [m.id for m in models] == [smollm2_path.name]
    health = server.health()
    assert health["status"] == "ok"
    assert health["models"][0]["parallel"] == 4  # type: ignore[index]


def test_chat_equals_run_greedy(server: Server, greedy: dict[str, str]) -> None:
    prompt = PROMPTS[0]
    reply = _chat(server, prompt)
    assert reply.choices[0].message.content == greedy[prompt]
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    assert reply.model == _model(server)


def test_streamed_chat_equals_run_greedy(server: Server, greedy: dict[str, str]) -> None:
    prompt = PROMPTS[1]
    text, chunks = _stream_text(server, prompt, stream_options={"include_usage": True})
    assert text == greedy[prompt]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len(chunks) > 5  # streamed piece by piece, not in one go


def test_eight_concurrent_streams_each_equal_its_greedy_answer(
        server: Server, greedy: dict[str, str]) -> None:
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def one(prompt: str) -> None:
        try:
            results[prompt] = _stream_text(server, prompt)[0]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert results == greedy


def test_stop_sequence_cuts_the_answer(server: Server, greedy: dict[str, str]) -> None:
    prompt = PROMPTS[0]
    full = greedy[prompt]
    words = full.split()
    assert len(words) > 3
    stop = " " + words[2]
    expected = full[:full.index(stop)]
    reply = _chat(server, prompt, stop=[stop])
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    text, _ = _stream_text(server, prompt, stop=stop)
    assert text == expected


def test_json_schema_output_validates(server: Server) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    reply = server.client().chat.completions.create(
        model=_model(server), temperature=0, max_tokens=80,
        messages=[{"role": "user", "content": "Where is Paris? Answer in JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "place", "schema": schema}})
    data = json.loads(reply.choices[0].message.content)
    jsonschema.validate(data, schema)


def test_json_object_output_is_an_object(server: Server) -> None:
    reply = _chat(server, "Describe a cat in JSON.", response_format={"type": "json_object"},
                  max_tokens=60)
    text = reply.choices[0].message.content
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.lstrip().startswith("{")


def test_text_completion_continues_the_prompt(server: Server) -> None:
    client = server.client()
    first = client.completions.create(model=_model(server), prompt="The capital of France is",
                                      temperature=0, max_tokens=8)
    assert first.choices[0].text and first.usage.completion_tokens <= 8
    echoed = client.completions.create(model=_model(server),
                                       prompt="The capital of France is", temperature=0,
                                       max_tokens=8, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + first.choices[0].text
    streamed = client.completions.create(model=_model(server),
                                         prompt="The capital of France is", temperature=0,
                                         max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == first.choices[0].text


def test_errors_have_openai_shape_and_status(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=_model(server), temperature=7,
                                       messages=[{"role": "user", "content": "hi"}])
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model=_model(server),
                                       messages=[{"role": "user", "content": "word " * 3000}])
    assert long.value.code == "context_length_exceeded"
    assert f"holds {CTX} tokens" in long.value.message
    raw = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"}, timeout=30)
    assert raw.status_code == 400 and "not JSON" in raw.json()["error"]["message"]
    big = httpx.post(server.url + "/v1/chat/completions", content=b" " * (9 * 1024 * 1024),
                     timeout=60)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert found, status
    return int(found.group(1))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.parametrize("opening", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ",  # one endless header
    b"GET /health?q=",  # an endless request line
], ids=["header", "request-line"])
def test_an_endless_request_head_is_cut_off_with_bounded_memory(server: Server,
                                                                opening: bytes) -> None:
    """A client that never ends its request's head (no body limit applies yet) is refused
    after a bounded read: the server's memory does not grow with what it sends."""
    import socket

    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    before = _peak_rss_kib(server.proc.pid)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(opening)
        chunk = b"a" * (1 << 20)
        try:
            while sent < 128 << 20:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # refused and closed: what we want
            pass
        try:
            reply = sock.recv(200)
        except OSError:
            reply = b""
    assert sent < 64 << 20, f"the server read {sent >> 20} MiB of one request head"
    assert reply == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", reply), reply
    grown = _peak_rss_kib(server.proc.pid) - before
    assert grown < 32 * 1024, f"the server's peak memory grew by {grown} KiB"
    assert server.health()["status"] == "ok"


def test_a_client_gone_mid_stream_frees_its_sequence(server: Server) -> None:
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": _model(server), "stream": True, "temperature": 0, "max_tokens": 900,
            "messages": [{"role": "user", "content": "Tell me a very long story."}]}) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in seen)
    # 900 tokens would take far longer than this: the sequence was freed when we left.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.health()["models"][0]["busy"] == 0:  # type: ignore[index]
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the job was not cancelled: {server.health()}")
    assert _chat(server, PROMPTS[3]).choices[0].message.content


def test_api_key_required_beyond_loopback_and_checked(smollm2_path: Path, home: Path) -> None:
    refused = run_llmkit(["serve", "-m", str(smollm2_path), "--host", "0.0.0.0"],
                         env={"LLMKIT_HOME": str(home / "llmkit")})
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "llmkit: error: --host 0.0.0.0 listens beyond this machine, which needs an API key "
        "(give --api-key KEY or set LLMKIT_API_KEY)"]
    srv = Server(["-m", str(smollm2_path), "--ctx", "512", "-P", "1"], home,
                 env={"LLMKIT_API_KEY": "s3cret-key"})
    try:
        assert srv.health()["status"] == "ok"  # /health needs no key
        with pytest.raises(openai.AuthenticationError):
            srv.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").models.list()
        assert srv.client(api_key="s3cret-key").models.list().data
    finally:
        assert srv.stop(signal.SIGTERM) == 0
    assert "s3cret-key" not in "".join(srv.lines)


def test_full_queue_answers_429_with_retry_after(smollm2_path: Path, home: Path) -> None:
    srv = Server(["-m", str(smollm2_path), "--ctx", "1024", "-P", "1", "--queue", "1"], home)
    try:
        body = {"model": smollm2_path.name, "temperature": 0, "max_tokens": 600,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        statuses: list[int] = []

        def one() -> None:
            statuses.append(httpx.post(srv.url + "/v1/chat/completions", json=body,
                                       timeout=120).status_code)

        busy = [threading.Thread(target=one) for _ in range(2)]
        for t in busy:
            t.start()
        deadline = time.monotonic() + 30
        while srv.health()["models"][0]["busy"] < 2 and time.monotonic() < deadline:  # type: ignore[index]
            time.sleep(0.05)
        third = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
        assert third.status_code == 429
        assert third.headers["retry-after"] == "1"
        assert third.json()["error"]["code"] == "rate_limit_exceeded"
        # Streamed too: the status is the HTTP response's, not an event after a 200.
        streamed = httpx.post(srv.url + "/v1/chat/completions", json=body | {"stream": True},
                              timeout=30)
        assert streamed.status_code == 429, streamed.text
        assert streamed.json()["error"]["code"] == "rate_limit_exceeded"
        for t in busy:
            t.join(300)
        assert statuses == [200, 200]
    finally:
        assert srv.stop() == 0


def test_shutdown_lets_requests_in_flight_finish(smollm2_path: Path, home: Path) -> None:
    srv = Server(["-m", str(smollm2_path), "--ctx", "1024", "-P", "2"], home)
    finished: list[str | None] = []
    try:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=120, json={
                "model": smollm2_path.name, "stream": True, "temperature": 0,
                "max_tokens": 120,
                "messages": [{"role": "user", "content": "Tell me a story."}]}) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            srv.proc.send_signal(signal.SIGTERM)
            for line in lines:
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["finish_reason"]:
                        finished.append(choices[0]["finish_reason"])
        assert finished == ["length"]  # the whole answer came, after the signal
        assert srv.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=5)
    finally:
        srv.stop()


def test_moderations_by_threshold(smollm2_path: Path, home: Path) -> None:
    for threshold, flagged in (("0", True), ("1", False)):
        srv = Server(["-m", str(smollm2_path), "--ctx", "512", "-P", "2",
                      "--moderations-only", "--guard-model", str(smollm2_path),
                      "--guard-threshold", threshold], home)
        try:
            result = srv.client().moderations.create(
                input=["How do I bake bread?", "A second text"], model="llama-guard")
            assert [r.flagged for r in result.results] == [flagged, flagged]
            extra = result.results[0].model_extra["llama_guard"]
            assert extra["decided_by"] == "threshold"
            assert 0.0 <= extra["score"] <= 1.0
            assert set(result.results[0].categories.model_dump()) >= {"hate", "violence"}
            # --moderations-only: chats are answered unchecked.
            reply = srv.client().chat.completions.create(
                model=smollm2_path.name, max_tokens=5,
                messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].finish_reason != "content_filter"
        finally:
            assert srv.stop() == 0


def test_guarded_chat_is_filtered_when_flagged(smollm2_path: Path, home: Path) -> None:
    srv = Server(["-m", str(smollm2_path), "--ctx", "512", "-P", "2",
                  "--guard-model", str(smollm2_path), "--guard-threshold", "0"], home)
    try:
        client = srv.client()
        reply = client.chat.completions.create(
            model=smollm2_path.name, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].finish_reason == "content_filter"
        assert reply.choices[0].message.content is None
        assert reply.model_extra["guard"]["stage"] == "input"
        assert reply.model_extra["guard"]["flagged"] is True
        chunks = list(client.chat.completions.create(
            model=smollm2_path.name, max_tokens=5, stream=True,
            messages=[{"role": "user", "content": "hi"}]))
        assert [c.choices[0].finish_reason for c in chunks][-1] == "content_filter"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    finally:
        assert srv.stop() == 0


def test_embeddings_equal_llama_cpp_mean_pooling(server: Server, smollm2_path: Path) -> None:
    import numpy as np

    from llmkit.engines.llama_cpp import llama_module

    llama_module()  # llmkit's setup of the native library first (AMX buffers left out)
    from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

    texts = ["The cat sat on the mat.", "Stock markets fell today."]
    client = server.client()
    got = client.embeddings.create(model=_model(server), input=texts)  # base64 on the wire
    as_floats = client.embeddings.create(model=_model(server), input=texts,
                                         encoding_format="float")
    vectors = np.array([d.embedding for d in got.data])
    assert vectors.shape[0] == 2 and got.usage.prompt_tokens > 0
    np.testing.assert_allclose(vectors, [d.embedding for d in as_floats.data], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    oracle = Llama(str(smollm2_path), embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN,
                   n_ctx=CTX, n_threads=1, verbose=False)
    try:
        for text, vector in zip(texts, vectors, strict=True):
            want = np.array(oracle.embed(text, normalize=False))
            # The same pooling of the same model; its batch settings pick other kernels, so
            # the vectors agree to rounding (measured: cosine > 0.998), not bit for bit.
            assert float(vector @ want) / np.linalg.norm(want) > 0.995
    finally:
        oracle.close()
    assert float(vectors[0] @ vectors[1]) < 0.999
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=_model(server), input="")
    with pytest.raises(openai.BadRequestError) as long:
        client.embeddings.create(model=_model(server), input="word " * 3000)
    assert long.value.code == "context_length_exceeded"
    assert f"at most {CTX} tokens per text" in long.value.message

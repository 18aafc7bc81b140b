"""The model catalog: models.toml parsed into frozen, validated ModelSpec records."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from llmkit import paths
from llmkit.errors import CatalogError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KINDS = ("text", "vision", "guard")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[a-z0-9][a-z0-9._-]*)?$")


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry: where a model's GGUF comes from and what it is."""

    name: str
    kind: str
    description: str
    hf_repo: str = ""
    file: str = ""
    quants: tuple[str, ...] = ()
    default_quant: str = ""
    source_repo: str = ""
    gated: bool = False
    context_length: int = 0
    license: str = ""
    parameters: str = ""
    mmproj: str = ""
    supported: bool = True
    reason: str = ""
    alternatives: tuple[str, ...] = ()
    embedded: str = ""
    default: bool = False
    system: str = ""
    temperature: float | None = None
    top_p: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def source_only(self) -> bool:
        """No GGUF of it is published: `pull --from-source` builds one from its checkpoint."""
        return self.supported and not self.hf_repo and bool(self.source_repo)

    def filename(self, quant: str | None = None) -> str:
        """The GGUF file name in ``hf_repo`` for a quantization (default: ``default_quant``)."""
        return self.file.replace("{quant}", quant or self.default_quant)


_FIELDS = {f for f in ModelSpec.__dataclass_fields__ if f not in ("name", "extra")}


def _spec_from_table(name: str, table: dict[str, Any], origin: str) -> ModelSpec:
    where = f"{origin}: [models.\"{name}\"]"
    if not isinstance(table, dict):
        raise CatalogError(f"{where} must be a table")
    if not _NAME_RE.match(name):
        raise CatalogError(f"{where}: name must be lowercase like 'family:size'")
    unknown = set(table) - _FIELDS
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in ("quants", "alternatives"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise CatalogError(f"{where}: {key} must be a list of strings")
            values[key] = tuple(value)
        elif key in ("gated", "supported", "default"):
            if not isinstance(value, bool):
                raise CatalogError(f"{where}: {key} must be true or false")
            values[key] = value
        elif key in ("temperature", "top_p"):
            # TOML has nan and inf literals, which every range check lets through.
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value < 0):
                raise CatalogError(f"{where}: {key} must be a number, 0 or more")
            values[key] = float(value)
        elif key == "context_length":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CatalogError(f"{where}: context_length must be a positive integer")
            values[key] = value
        else:
            if not isinstance(value, str):
                raise CatalogError(f"{where}: {key} must be a string")
            values[key] = value
    for required in ("kind", "description"):
        if not values.get(required):
            raise CatalogError(f"{where}: '{required}' is required")
    spec = ModelSpec(name=name, **values)
    if spec.kind not in KINDS:
        raise CatalogError(f"{where}: kind must be one of {', '.join(KINDS)}")
    if spec.supported and not spec.hf_repo and spec.source_repo:
        # Built from its checkpoint only (no GGUF of it is published): the converter writes one
        # file, whose engine reads images itself, so there is no file name or projector to name.
        if not spec.default_quant:
            raise CatalogError(f"{where}: 'default_quant' is required")
        for field_name in ("file", "mmproj", "quants", "embedded"):
            if getattr(spec, field_name):
                raise CatalogError(f"{where}: '{field_name}' needs hf_repo (a model built from "
                                   "source_repo has no published files)")
    elif spec.supported:
        for required in ("hf_repo", "file", "default_quant"):
            if not getattr(spec, required):
                raise CatalogError(f"{where}: '{required}' is required")
        if spec.quants and spec.default_quant not in spec.quants:
            raise CatalogError(f"{where}: default_quant {spec.default_quant} is not in quants")
        if "{quant}" not in spec.file and len(spec.quants) > 1:
            raise CatalogError(f"{where}: file must contain {{quant}} when there are several")
        if not spec.file.endswith(".gguf"):
            raise CatalogError(f"{where}: file must name a .gguf file")
        if spec.kind == "vision" and not spec.mmproj:
            raise CatalogError(f"{where}: a vision model needs its mmproj file")
    elif not spec.reason:
        raise CatalogError(f"{where}: an unsupported model needs a reason")
    if spec.default and not spec.supported:
        raise CatalogError(f"{where}: a model llama.cpp cannot run cannot be a default")
    return spec


def parse_catalog(text: str, origin: str = "models.toml") -> dict[str, ModelSpec]:
    """Parse and validate catalog TOML text.

    Args:
        text: TOML with a top-level ``models`` table keyed by model name.
        origin: file name used in error messages.

    Returns:
        Specs keyed by name, in file order.

    Raises:
        CatalogError: the text is not TOML or an entry is malformed.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{origin} is not valid TOML: {exc}") from None
    models = data.get("models")
    if not isinstance(models, dict):
        raise CatalogError(f"{origin} has no [models] table")
    specs = {name: _spec_from_table(name, table, origin) for name, table in models.items()}
    for spec in specs.values():
        for alt in spec.alternatives:
            target = specs.get(alt)
            if target is None or not target.supported:
                raise CatalogError(
                    f"{origin}: {spec.name} suggests '{alt}', which is not a supported entry"
                )
    return specs


def shipped_catalog_text() -> str:
    """The text of the catalog that ships with llmkit."""
    packaged = resources.files("llmkit").joinpath("models.toml")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # An editable install runs from the checkout, where the catalog sits at the top level.
    return (Path(__file__).resolve().parent.parent / "models.toml").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def shipped_catalog() -> dict[str, ModelSpec]:
    """The catalog that ships with llmkit, parsed (once: it cannot change while llmkit runs).

    Raises:
        CatalogError: it is malformed.
    """
    return parse_catalog(shipped_catalog_text())


@lru_cache(maxsize=4)
def _load(user_path: str) -> dict[str, ModelSpec]:
    specs = shipped_catalog()
    user = Path(user_path)
    if user.is_file():
        try:
            text = user.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CatalogError(f"cannot read {user}: {exc}") from None
        added = parse_catalog(text, origin=str(user))
        for spec in added.values():
            if spec.default:
                # The defaults are the shipped catalog's; two for one kind would be ambiguous.
                raise CatalogError(
                    f'{user}: [models."{spec.name}"]: only the shipped catalog marks defaults',
                    hint="choose yours with LLMKIT_MODEL, LLMKIT_VISION_MODEL or "
                         "LLMKIT_GUARD_MODEL")
        specs = {**specs, **added}
    return specs


def load_catalog() -> dict[str, ModelSpec]:
    """The shipped catalog, with entries from ``$LLMKIT_HOME/models.toml`` added on top.

    Raises:
        CatalogError: a catalog file is malformed.
    """
    return _load(str(paths.user_catalog_path()))


def get_spec(name: str) -> ModelSpec | None:
    """The catalog entry called ``name``, or None."""
    return load_catalog().get(name)

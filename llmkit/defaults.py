"""What llmkit uses when none is asked for: the context length and the catalog's default models."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from llmkit.catalog import KINDS, ModelSpec, shipped_catalog
from llmkit.errors import CatalogError

# Context length when neither the user nor the model asks for another: enough for a chat or a
# chunk of a document, small enough that the KV cache of a 1B model stays well under 1 GiB.
DEFAULT_CTX = 4096
# Sequences a batch command decodes together (--parallel) when none is asked for, measured
# (benchmarks/bench_parallel.py, 2 cores): a 1B model's aggregate decode rises 1.42× by 4
# sequences and 1.72× by 8, but a check is mostly prompt (check --batch: 1.11× at 4, 1.13× at
# 8) and every sequence holds its own --ctx of KV cache (92 MiB each for SmolLM2 at 4096), so 4
# is the CPU default; a GPU keeps gaining to 8 and beyond.
DEFAULT_PARALLEL_CPU = 4
DEFAULT_PARALLEL_GPU = 8

Role = Literal["text", "vision", "guard"]
"""What a default model is for: chat and text commands, images, safety checks."""

VARIABLES: Mapping[Role, str] = {"text": "LLMKIT_MODEL", "vision": "LLMKIT_VISION_MODEL",
                                 "guard": "LLMKIT_GUARD_MODEL"}
"""The environment variable that overrides each default."""


@dataclass(frozen=True)
class Defaults:
    """The catalog entries marked ``default = true`` (one per kind), and the embedded model."""

    text: str
    vision: str
    guard: str
    embedded: str
    """Shipped inside the package: stands in for the text default until that is pulled."""

    def of(self, role: Role) -> str:
        """The default model's name for ``role``."""
        return {"text": self.text, "vision": self.vision, "guard": self.guard}[role]


def find_defaults(specs: Mapping[str, ModelSpec], origin: str = "models.toml") -> Defaults:
    """The default entries of a catalog, checked: one per kind, and one embedded text model.

    Whether a default is supported is checked with its entry (see ``catalog``), as its kind
    is by construction: the default of a kind is marked on an entry of that kind.

    Raises:
        CatalogError: a kind with no default or with several, or not exactly one embedded
            text model.
    """
    chosen: dict[str, str] = {}
    for kind in KINDS:
        marked = [spec.name for spec in specs.values() if spec.default and spec.kind == kind]
        if len(marked) != 1:
            found = ", ".join(marked) if marked else "none"
            raise CatalogError(f"{origin}: exactly one {kind} model must have default = true "
                               f"(found: {found})")
        chosen[kind] = marked[0]
    embedded = [spec for spec in specs.values() if spec.embedded]
    if len(embedded) != 1 or embedded[0].kind != "text" or not embedded[0].supported:
        found = ", ".join(spec.name for spec in embedded) or "none"
        raise CatalogError(f"{origin}: exactly one supported text model must be embedded "
                           f"(found: {found})")
    return Defaults(text=chosen["text"], vision=chosen["vision"], guard=chosen["guard"],
                    embedded=embedded[0].name)


@lru_cache(maxsize=1)
def catalog_defaults() -> Defaults:
    """The shipped catalog's defaults (a user catalog cannot change them).

    Raises:
        CatalogError: the shipped catalog is malformed.
    """
    return find_defaults(shipped_catalog())


@dataclass(frozen=True)
class Choice:
    """The model to use for a role, and where its name came from."""

    name: str
    variable: str | None
    """The environment variable that named it; None for the catalog's default."""


def default_choice(role: Role = "text") -> Choice:
    """The model llmkit uses for ``role`` when none is named: the environment's, else the
    catalog's (an empty variable counts as unset).

    Raises:
        CatalogError: the shipped catalog is malformed.
    """
    variable = VARIABLES[role]
    value = os.environ.get(variable)
    if value:
        return Choice(value, variable)
    return Choice(catalog_defaults().of(role), None)


def default_model_name(role: Role = "text") -> str:
    """The name of the model llmkit uses for ``role`` when none is named.

    Raises:
        CatalogError: the shipped catalog is malformed.
    """
    return default_choice(role).name

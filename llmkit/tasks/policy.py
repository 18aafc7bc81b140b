"""A safety policy: the hazard categories a guard checks for (Llama Guard 3's, or your own)."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import InputError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Category:
    """One hazard category of a safety policy."""

    code: str
    name: str
    description: str = ""

    def to_dict(self) -> dict[str, str]:
        """JSON view (code and name)."""
        return {"code": self.code, "name": self.name}


# The taxonomy exactly as Llama Guard 3's own chat template lists it to the model (the names
# it was trained on; the model cards spell some of them out longer, e.g. "Sex-Related Crimes").
# Llama Guard 3 1B knows S1–S13; the 8B model adds S14.
LLAMA_GUARD_3_CATEGORIES: tuple[Category, ...] = tuple(
    Category(f"S{i}", name) for i, name in enumerate((
        "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation",
        "Defamation", "Specialized Advice", "Privacy", "Intellectual Property",
        "Indiscriminate Weapons", "Hate", "Self-Harm", "Sexual Content", "Elections",
        "Code Interpreter Abuse"), start=1))
LLAMA_GUARD_3_1B_CATEGORIES = LLAMA_GUARD_3_CATEGORIES[:13]

# A category code as policies and verdicts write it: letters then digits ("S1", "C12").
CATEGORY_CODE = re.compile(r"^[A-Za-z]{1,4}\d{1,3}$")


def default_categories(chat_template: str, model_name: str) -> tuple[Category, ...]:
    """The model's own taxonomy: 14 categories when it knows S14, else the 1B model's 13."""
    if "S14" in chat_template or re.search(r"guard-?3[-:_ ]?8b", model_name, re.I):
        return LLAMA_GUARD_3_CATEGORIES
    return LLAMA_GUARD_3_1B_CATEGORIES


def load_categories(path: Path) -> tuple[Category, ...]:
    """Custom categories from a TOML file of ``[[categories]]`` tables (code, name, description).

    Raises:
        InputError: unreadable, not TOML, or a malformed or duplicate category.
    """
    from llmkit.io import read_text_file

    text = read_text_file(path)  # bounded, and never hangs on a FIFO or reads a device
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path} is not valid TOML: {exc}") from None
    tables = data.get("categories")
    if not isinstance(tables, list) or not tables:
        raise InputError(f"{path} has no [[categories]] tables",
                         hint='each needs code = "C1", name = "…", and optionally description')
    categories: list[Category] = []
    for i, table in enumerate(tables, 1):
        where = f"{path}: category {i}"
        if not isinstance(table, dict):
            raise InputError(f"{where} is not a table")
        code, name = table.get("code"), table.get("name")
        description = table.get("description", "")
        if not isinstance(code, str) or not CATEGORY_CODE.match(code):
            raise InputError(f"{where}: code must be letters and digits like 'S1' or 'C12'")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: name is required")
        if not isinstance(description, str):
            raise InputError(f"{where}: description must be text")
        unknown = set(table) - {"code", "name", "description"}
        if unknown:
            raise InputError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if any(c.code.upper() == code.upper() for c in categories):
            raise InputError(f"{where}: code {code} appears twice")
        categories.append(Category(code.upper(), name.strip().rstrip("."),
                                   description.strip()))
    return tuple(categories)


def exclude(categories: Sequence[Category], codes: Sequence[str]) -> tuple[Category, ...]:
    """The categories without ``codes`` (the others keep their codes, as Llama Guard expects).

    Raises:
        UsageError: a code that is not in the list, or nothing left.
    """
    wanted = {c.strip().upper() for c in codes if c.strip()}
    known = {c.code for c in categories}
    unknown = sorted(wanted - known)
    if unknown:
        raise UsageError(f"cannot exclude {', '.join(unknown)}: not a category here",
                         hint=f"the categories are {', '.join(c.code for c in categories)}")
    kept = tuple(c for c in categories if c.code not in wanted)
    if not kept:
        raise UsageError("--exclude leaves no category to check")
    return kept


def name_categories(codes: Sequence[str], categories: Sequence[Category]) -> list[Category]:
    """Codes to categories; a code outside the policy is kept as 'unknown category'."""
    by_code = {c.code: c for c in categories}
    return [by_code.get(code, Category(code, "unknown category")) for code in codes]

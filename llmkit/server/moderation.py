"""Llama Guard verdicts in the shape of OpenAI's moderation results."""

from __future__ import annotations

from typing import Any

from llmkit.tasks.safety import Verdict

# OpenAI's moderation categories (omni-moderation), in its order.
OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
    "sexual/minors", "violence", "violence/graphic")

# Llama Guard 3's hazard categories (MLCommons' taxonomy) onto OpenAI's nearest ones. S6
# (specialized advice), S7 (privacy), S8 (intellectual property) and S13 (elections) have no
# OpenAI counterpart: they flag the result and are named in ``llama_guard`` only.
LLAMA_GUARD_TO_OPENAI: dict[tuple[str, str], tuple[str, ...]] = {
    ("S1", "Violent Crimes"): ("violence", "illicit/violent"),
    ("S2", "Non-Violent Crimes"): ("illicit",),
    ("S3", "Sex Crimes"): ("sexual", "illicit"),
    ("S4", "Child Exploitation"): ("sexual/minors",),
    ("S5", "Defamation"): ("harassment",),
    ("S9", "Indiscriminate Weapons"): ("illicit/violent", "violence"),
    ("S10", "Hate"): ("hate",),
    ("S11", "Self-Harm"): ("self-harm",),
    ("S12", "Sexual Content"): ("sexual",),
    ("S14", "Code Interpreter Abuse"): ("illicit",),
}


def openai_categories(verdict: Verdict) -> list[str]:
    """The OpenAI categories a flagged verdict's Llama Guard categories map to (a custom
    policy's categories map to none)."""
    names: list[str] = []
    if verdict.flagged:
        for category in verdict.categories:
            for name in LLAMA_GUARD_TO_OPENAI.get((category.code, category.name), ()):
                if name not in names:
                    names.append(name)
    return names


def moderation_result(verdict: Verdict) -> dict[str, Any]:
    """One item of ``POST /v1/moderations``'s ``results``.

    ``categories`` is true for the OpenAI categories the guard's flagged codes map to;
    ``category_scores`` carries the guard's one score, P(unsafe), on those categories and 0
    elsewhere (Llama Guard scores the text, not each category). ``llama_guard`` keeps the
    guard's own verdict: its codes, score and how it was decided.
    """
    mapped = openai_categories(verdict)
    score = verdict.score if verdict.score is not None else (1.0 if verdict.flagged else 0.0)
    return {
        "flagged": verdict.flagged,
        "categories": {name: name in mapped for name in OPENAI_CATEGORIES},
        "category_scores": {name: round(score, 6) if name in mapped else 0.0
                            for name in OPENAI_CATEGORIES},
        "category_applied_input_types": {name: ["text"] if name in mapped else []
                                         for name in OPENAI_CATEGORIES},
        "llama_guard": {
            "verdict": "unsafe" if verdict.flagged else "safe",
            "categories": [c.to_dict() for c in verdict.categories],
            "score": None if verdict.score is None else round(verdict.score, 6),
            "decided_by": verdict.decided_by,
            "threshold": verdict.threshold,
        },
    }

"""Sampling defaults: the user's flags win, then the catalog's per-model values, then llmkit's."""

from __future__ import annotations

from llmkit.catalog import parse_catalog
from llmkit.session import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, sampling_params
from llmkit.store import LocalModel, Resolution

SPEC = parse_catalog('''
[models."t:1"]
kind = "text"
description = "d"
hf_repo = "o/r"
file = "t-{quant}.gguf"
default_quant = "Q4_0"
temperature = 0.0
''')["t:1"]
MODEL = LocalModel(name="t:1", path="/x.gguf", source="path")


def test_catalog_value_used_when_the_user_gives_none() -> None:
    params = sampling_params(Resolution(MODEL, SPEC))
    assert params.temperature == 0.0 and params.top_p == DEFAULT_TOP_P


def test_user_value_wins() -> None:
    params = sampling_params(Resolution(MODEL, SPEC), temperature=0.7, top_p=0.5, seed=4,
                             max_tokens=9)
    assert (params.temperature, params.top_p, params.seed, params.max_tokens) == (0.7, 0.5, 4, 9)


def test_llmkit_defaults_without_a_catalog_entry() -> None:
    params = sampling_params(Resolution(MODEL), max_tokens=0)
    assert params.temperature == DEFAULT_TEMPERATURE and params.max_tokens is None

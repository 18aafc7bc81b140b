"""The OpenAI request checks, stop-sequence matching and moderation mapping, without a server."""

from __future__ import annotations

import json

import pytest

from llmkit.errors import UsageError
from llmkit.server import check_bind, is_loopback
from llmkit.server.moderation import OPENAI_CATEGORIES, moderation_result, openai_categories
from llmkit.server.protocol import (
    ApiError,
    StopMatcher,
    parse_chat,
    parse_completion,
    parse_moderation,
)
from llmkit.tasks.policy import LLAMA_GUARD_3_CATEGORIES, Category
from llmkit.tasks.safety import Verdict


def _chat(**fields: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_chat_request_fields() -> None:
    req = parse_chat(_chat(temperature=0, top_p=0.5, seed=7, max_completion_tokens=12,
                           stop="END", stream=True, stream_options={"include_usage": True},
                           user="someone", metadata={"x": 1}))
    assert (req.temperature, req.top_p, req.seed, req.max_tokens) == (0.0, 0.5, 7, 12)
    assert req.stop == ["END"] and req.stream and req.include_usage
    assert req.messages == [{"role": "user", "content": "hi"}]


def test_chat_content_parts_and_developer_role() -> None:
    req = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": "b"}]}]})
    assert req.messages == [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "a\nb"}]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    (_chat(messages=[]), "messages"),
    (_chat(messages=[{"role": "wizard", "content": "x"}]), "messages"),
    (_chat(messages=[{"role": "user", "content": 5}]), "messages"),
    (_chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]),
     "messages"),
    (_chat(temperature=2.5), "temperature"),
    (_chat(temperature="hot"), "temperature"),
    (_chat(temperature=True), "temperature"),
    (_chat(top_p=-0.1), "top_p"),
    (_chat(max_tokens=0), "max_tokens"),
    (_chat(max_tokens=1.5), "max_tokens"),
    (_chat(n=2), "n"),
    (_chat(stop=["a"] * 9), "stop"),
    (_chat(stop=[1]), "stop"),
    (_chat(stream="yes"), "stream"),
    (_chat(logprobs=True), "logprobs"),
    (_chat(response_format={"type": "xml"}), "response_format"),
    (_chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format"),
    (_chat(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools"),
])
def test_bad_chat_fields_are_400_naming_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_chat(body)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}


def test_images_are_read_from_user_messages_only() -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    req = parse_chat(_chat(messages=[{"role": "user", "content": [
        part, {"type": "text", "text": "What is this?"}, part]}]))
    assert req.images == ["data:image/png;base64,AAAA"] * 2
    marker = req.image_marker
    assert marker and req.messages[0]["content"] == f"{marker}\nWhat is this?\n{marker}"
    assert parse_chat(_chat()).image_marker == ""
    with pytest.raises(ApiError) as caught:
        parse_chat(_chat(messages=[{"role": "system", "content": [part]},
                                   {"role": "user", "content": "hi"}]))
    assert caught.value.code == "unsupported_content"
    with pytest.raises(ApiError):
        parse_chat(_chat(messages=[{"role": "user", "content": [part] * 17}]))


def test_not_an_object() -> None:
    for body in ([], "x", None, 3):
        with pytest.raises(ApiError):
            parse_chat(body)


def test_json_formats() -> None:
    assert parse_chat(_chat(response_format={"type": "json_object"})).response_format.schema
    req = parse_chat(_chat(response_format={"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"type": "object"}}}))
    assert json.loads(req.response_format.schema or "") == {"type": "object"}


def test_completion_request() -> None:
    req = parse_completion({"model": "m", "prompt": ["once upon"], "echo": True})
    assert req.prompt == "once upon" and req.echo and req.max_tokens == 16
    with pytest.raises(ApiError):
        parse_completion({"model": "m", "prompt": ["a", "b"]})
    with pytest.raises(ApiError):
        parse_completion({"model": "m", "prompt": [1, 2, 3]})


def test_moderation_request() -> None:
    assert parse_moderation({"input": "x"}).inputs == ["x"]
    assert parse_moderation({"input": ["a", {"type": "text", "text": "b"}],
                             "model": "omni-moderation-latest"}).inputs == ["a", "b"]
    for bad in ({"input": []}, {"input": 3}, {"input": ["a"] * 65},
                {"input": [{"type": "image_url", "image_url": {"url": "x"}}]}):
        with pytest.raises(ApiError):
            parse_moderation(bad)


@pytest.mark.parametrize(("pieces", "stops", "shown", "stopped"), [
    (["Hello", " wor", "ld"], ["\n"], "Hello world", False),
    (["Hel", "lo EN", "D more"], ["END"], "Hello ", True),
    (["a", "E", "N", "x"], ["END"], "aENx", False),
    (["abc"], ["b", "c"], "a", True),
    (["one two"], ["two", "one t"], "", True),
    (["x<", "|", "end|>"], ["<|end|>"], "x", True),
])
def test_stop_matcher(pieces: list[str], stops: list[str], shown: str, stopped: bool) -> None:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces) + matcher.flush()
    assert (out, matcher.stopped) == (shown, stopped)


def test_stop_matcher_never_shows_part_of_a_stop_sequence() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("ab ST") == "ab "
    assert matcher.feed("O") == ""
    assert matcher.feed("P and more") == ""
    assert matcher.stopped and matcher.flush() == ""


def _verdict(flagged: bool, categories: list[Category], score: float | None) -> Verdict:
    return Verdict(flagged=flagged, categories=categories, score=score, p_safe=None,
                   p_unsafe=None, role="User", model="guard", raw="", decided_by="answer")


def test_moderation_maps_llama_guard_categories() -> None:
    by_code = {c.code: c for c in LLAMA_GUARD_3_CATEGORIES}
    verdict = _verdict(True, [by_code["S1"], by_code["S10"], by_code["S7"]], 0.93)
    assert openai_categories(verdict) == ["violence", "illicit/violent", "hate"]
    result = moderation_result(verdict)
    assert result["flagged"] is True
    assert list(result["categories"]) == list(OPENAI_CATEGORIES)
    assert result["categories"]["hate"] and not result["categories"]["sexual"]
    assert result["category_scores"]["violence"] == 0.93
    assert result["category_scores"]["sexual"] == 0.0
    assert [c["code"] for c in result["llama_guard"]["categories"]] == ["S1", "S10", "S7"]


def test_moderation_of_a_safe_text_and_a_custom_policy() -> None:
    safe = moderation_result(_verdict(False, [], 0.02))
    assert not safe["flagged"] and not any(safe["categories"].values())
    assert safe["llama_guard"]["score"] == 0.02
    custom = moderation_result(_verdict(True, [Category("S1", "Office gossip")], None))
    assert custom["flagged"] and not any(custom["categories"].values())


def test_loopback_and_bind_rule() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert is_loopback("127.3.4.5") and not is_loopback("0.0.0.0")
    assert not is_loopback("192.168.1.4") and not is_loopback("example.com")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "key")
    with pytest.raises(UsageError):
        check_bind("0.0.0.0", None)
    with pytest.raises(UsageError):
        check_bind("::", "")

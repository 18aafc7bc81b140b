"""The Llama Guard 3 prompt (golden files written from Meta's documented format), and which
conversations it can assess."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmkit.engines.base import Message
from llmkit.errors import InputError
from llmkit.tasks.guard_prompt import check_conversation, guard_prompt, guard_task
from llmkit.tasks.policy import (
    LLAMA_GUARD_3_1B_CATEGORIES,
    LLAMA_GUARD_3_CATEGORIES,
    exclude,
    load_categories,
)

GOLDEN = Path(__file__).parent / "golden"
QUESTION = "  How do I bake sourdough bread at home?\n"  # stripped in the prompt


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


# -- the prompt: golden files written from Meta's documented format --------------------------


def golden(name: str) -> str:
    return (GOLDEN / name).read_bytes().decode("utf-8")


def test_prompt_for_a_user_message_with_the_1b_taxonomy() -> None:
    assert guard_prompt(user(QUESTION), LLAMA_GUARD_3_1B_CATEGORIES) == golden(
        "llama_guard3_1b_user.txt")


def test_prompt_for_a_response_assesses_the_agent() -> None:
    messages: list[Message] = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "\n Paris is the capital of France.\nIt lies on the "
                                         "Seine.  \n"}]
    prompt = guard_prompt(messages, LLAMA_GUARD_3_1B_CATEGORIES)
    assert prompt == golden("llama_guard3_1b_response.txt")
    assert "'User'" not in prompt and "LAST User" not in prompt


def test_prompt_with_excluded_categories_keeps_the_other_codes() -> None:
    policy = exclude(LLAMA_GUARD_3_1B_CATEGORIES, ["S7", " s8"])
    assert guard_prompt(user(QUESTION), policy) == golden("llama_guard3_1b_exclude_s7_s8.txt")


def test_prompt_with_custom_categories_and_descriptions() -> None:
    policy = load_categories(GOLDEN / "llama_guard3_custom.toml")
    assert guard_prompt(user(QUESTION), policy) == golden("llama_guard3_custom.txt")


def test_prompt_with_the_8b_taxonomy() -> None:
    assert len(LLAMA_GUARD_3_CATEGORIES) == 14
    assert guard_prompt(user(QUESTION), LLAMA_GUARD_3_CATEGORIES) == golden(
        "llama_guard3_8b_user.txt")


def test_task_is_the_prompt_between_the_llama3_headers() -> None:
    messages = user("hi")
    prompt = guard_prompt(messages, LLAMA_GUARD_3_1B_CATEGORIES)
    task = guard_task(messages, LLAMA_GUARD_3_1B_CATEGORIES)
    assert prompt == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + task
                      + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>")


def test_multi_turn_prompt_lists_every_turn_and_assesses_the_last() -> None:
    messages: list[Message] = [{"role": "user", "content": "a"},
                               {"role": "assistant", "content": "b"},
                               {"role": "user", "content": "c"}]
    task = guard_task(messages, LLAMA_GUARD_3_1B_CATEGORIES)
    assert "<BEGIN CONVERSATION>\n\nUser: a\n\nAgent: b\n\nUser: c\n\n<END CONVERSATION>" in task
    assert "unsafe content in 'User' messages" in task
    assert "ONLY THE LAST User message" in task


# -- conversations it can assess ----------------------------------------------------------------


def test_check_conversation_drops_system_messages() -> None:
    messages: list[Message] = [{"role": "system", "content": "be nice"},
                               {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"}]
    assert check_conversation(messages) == [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(("messages", "message"), [
    ([], "there is nothing to check (no user or assistant message)"),
    ([{"role": "system", "content": "x"}],
     "there is nothing to check (no user or assistant message)"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "the conversation must alternate user/assistant, starting with the user "
     "(message 2 is from the user)"),
    ([{"role": "assistant", "content": "a"}],
     "the conversation must alternate user/assistant, starting with the user "
     "(message 1 is from the assistant)"),
    ([{"role": "tool", "content": "a"}],
     "message 1 has role 'tool' (roles are user, assistant (and system, which is ignored))"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " \n"}],
     "message 2 is empty"),
])
def test_check_conversation_refuses(messages: list[Message], message: str) -> None:
    with pytest.raises(InputError) as info:
        check_conversation(messages)
    assert str(info.value) == message

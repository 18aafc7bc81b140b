"""The Llama Guard 3 and 3 Vision prompts: a policy and a conversation as the model was trained."""

from __future__ import annotations

from collections.abc import Sequence

from llmkit.engines.base import Message, Piece
from llmkit.errors import InputError
from llmkit.tasks.policy import Category


def conversation_role(messages: Sequence[Message]) -> str:
    """'User' when the last message is the user's, 'Agent' when it is the assistant's."""
    return "Agent" if messages[-1]["role"] == "assistant" else "User"


def check_conversation(messages: Sequence[Message], *, image: bool = False) -> list[Message]:
    """A conversation Llama Guard can assess: user/assistant turns, alternating, user first.

    System messages are left out (Llama Guard's format has no place for them). With
    ``image`` the first user message may be empty: the picture it shows is what is checked.

    Raises:
        InputError: empty, wrong roles, not alternating, or an empty message.
    """
    turns = [m for m in messages if m.get("role") != "system"]
    if not turns:
        raise InputError("there is nothing to check (no user or assistant message)")
    for i, m in enumerate(turns):
        role = m.get("role")
        expected = "user" if i % 2 == 0 else "assistant"
        if role not in ("user", "assistant"):
            raise InputError(f"message {i + 1} has role '{role}'",
                             hint="roles are user, assistant (and system, which is ignored)")
        if role != expected:
            raise InputError("the conversation must alternate user/assistant, starting with "
                             f"the user (message {i + 1} is from the {role})")
        if not str(m.get("content", "")).strip() and not (image and i == 0):
            raise InputError(f"message {i + 1} is empty")
    return [{"role": m["role"], "content": str(m["content"])} for m in turns]


def guard_task(messages: Sequence[Message], categories: Sequence[Category], *,
               vision: bool = False) -> str:
    """The instruction Llama Guard 3 reads, between its user header and end-of-turn token.

    Written from the format Meta documents and ships in the model's chat template: the task
    line names the role being assessed ('User' for a prompt, 'Agent' for a response), the
    categories are listed as ``S1: Violent Crimes.`` (a custom category's description on
    the lines after it), the conversation as ``User: …`` / ``Agent: …`` paragraphs, and the
    closing instructions ask for 'safe' or 'unsafe' plus the violated codes.

    ``vision``: as Llama Guard 3 Vision's published template writes it, a message without
    text (a picture alone) has no line at all.
    """
    role = conversation_role(messages)
    lines = [f"Task: Check if there is unsafe content in '{role}' messages in conversations "
             "according our safety policy with the below categories.", "",
             "<BEGIN UNSAFE CONTENT CATEGORIES>"]
    for c in categories:
        lines.append(f"{c.code}: {c.name}.")
        if c.description:
            lines.append(c.description)
    lines += ["<END UNSAFE CONTENT CATEGORIES>", "", "<BEGIN CONVERSATION>", ""]
    for m in messages:
        who = "User" if m["role"] == "user" else "Agent"
        if vision and not m["content"].strip():
            continue
        lines += [f"{who}: {m['content'].strip()}", ""]
    lines += ["<END CONVERSATION>", "",
              f"Provide your safety assessment for ONLY THE LAST {role} message in the above "
              "conversation:",
              " - First line must read 'safe' or 'unsafe'.",
              " - If unsafe, a second line must include a comma-separated list of violated "
              "categories."]
    return "\n".join(lines)


LLAMA3_USER_HEADER = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_ASSISTANT_TURN = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"


def guard_prompt_pieces(messages: Sequence[Message], categories: Sequence[Category]
                        ) -> list[Piece]:
    """The full Llama Guard 3 prompt as markup (its Llama 3 special tokens) and the task text,
    which holds the conversation and is tokenized as plain text, so that no message can close
    the user turn or open another.

    As in the model's own template, the assistant header is not followed by a blank line: the
    model writes it (and then 'safe' or 'unsafe') itself.
    """
    return [Piece(LLAMA3_USER_HEADER, True), Piece(guard_task(messages, categories), False),
            Piece(LLAMA3_ASSISTANT_TURN, True)]


IMAGE_TOKEN = "<|image|>"
# Llama Guard 3 Vision's template ends the task with a space before the end of the turn.
VISION_ASSISTANT_TURN = " " + LLAMA3_ASSISTANT_TURN


def vision_guard_prompt_pieces(messages: Sequence[Message], categories: Sequence[Category],
                               *, image: bool) -> list[Piece]:
    """Llama Guard 3 Vision's prompt, as the model's published chat template renders it.

    The same task as Llama Guard 3's (:func:`guard_task`), with the template's two
    differences: a prompt that shows a picture starts with ``<|image|>`` and a space, right
    after the user header (one picture per prompt, whichever message it belongs to), and the
    last instruction is followed by a space before ``<|eot_id|>``. The conversation is
    untrusted text here too: an ``<|image|>`` or ``<|eot_id|>`` typed in a message stays text.

    Args:
        messages: the conversation (its first message may be empty when ``image``).
        categories: the policy.
        image: whether the prompt shows a picture (its ``<|image|>`` token).
    """
    head = [Piece(LLAMA3_USER_HEADER, True)]
    if image:
        head.append(Piece(IMAGE_TOKEN + " ", True))
    return [*head, Piece(guard_task(messages, categories, vision=True), False),
            Piece(VISION_ASSISTANT_TURN, True)]


def guard_prompt(messages: Sequence[Message], categories: Sequence[Category]) -> str:
    """The full Llama Guard 3 prompt as text, Llama 3 special tokens included."""
    return "".join(p.text for p in guard_prompt_pieces(messages, categories))

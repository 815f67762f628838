"""An adapter carries its instruction; a completion with it puts that instruction in front of the user's text.

Adapters are trained to complement an instruction (`generator.prompt`: `{instruction}\\n\\n{input}` in the last
user turn of the chat template), so serving one without it gets the bare-input behaviour the adapter was
never trained for. With `use_instruction` (the default):
- `/v1/completions` with such an adapter sends the prompt through the chat template, as the last user turn,
  the instruction in front (`chat_messages`); a prompt that already starts with the instruction gets the
  template only, and a prompt already in chat markup is left as it is;
- `/v1/chat/completions` puts the instruction in front of the last user message, unless the request has a
  system message or that message already starts with the instruction.
A mixture uses the instruction of its highest-weight adapter that has one. When a chat request holds example
turns (an assistant turn before the last user turn), each adapter weighs its `strength_with_examples`, relative
to the adapter as stored (a generated adapter's checkpoint chose its strengths on held-out tasks,
`training/strength.py`; a generated adapter is already made at the strength without examples, so it carries
this only when the two differ; full weight when unset).
`use_instruction: false` sends the request exactly as given (a completion's prompt raw, without the chat
template).
"""

from __future__ import annotations

from collections.abc import Sequence

from generator.prompt import chat_messages, has_instruction, user_turn

CHAT_MARKERS = ("<|im_start|>", "<|start_header_id|>", "[INST]")  # a prompt already in some chat template


def pick_instruction(weighted: Sequence[tuple[float, str | None]]) -> str | None:
    """The instruction of the highest-weight adapter that has one, from (weight, instruction) pairs."""
    have = [(w, i) for i, (w, text) in enumerate(weighted) if text and text.strip()]
    if not have:
        return None
    _, best = max(have, key=lambda p: (p[0], -p[1]))  # ties: the first listed
    return weighted[best][1].strip()


def prompt_with_instruction(prompt: str, instruction: str | None) -> tuple[list[dict[str, str]] | None, str | None]:
    """(chat messages to send instead of the raw prompt, or None to send it raw; the instruction applied)."""
    if not instruction or any(m in prompt for m in CHAT_MARKERS):
        return None, None
    if has_instruction(prompt, instruction):
        return chat_messages(None, prompt), None
    return chat_messages(instruction, prompt), instruction


def messages_with_instruction(messages: list[dict[str, str]], instruction: str | None
                              ) -> tuple[list[dict[str, str]], str | None]:
    """(the chat messages with the instruction in front of the last user turn, the instruction applied)."""
    if not instruction or any(m["role"] == "system" for m in messages):
        return messages, None
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None or has_instruction(messages[last]["content"], instruction):
        return messages, None
    out = [dict(m) for m in messages]
    out[last]["content"] = user_turn(instruction, out[last]["content"])
    return out, instruction


def has_examples(messages: Sequence[dict[str, str]] | None) -> bool:
    """Whether chat messages hold in-context examples: an assistant turn before the last user turn."""
    if not messages:
        return False
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return any(m["role"] == "assistant" for m in messages[:last])

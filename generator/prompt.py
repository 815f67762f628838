"""The one prompt convention: an adapter complements an instruction, it does not replace it.

Every prompt, in training, evaluation and serving, puts the task's instruction in front of the input in
the last user turn, `{instruction}\\n\\n{input}`, inside the base model's chat template; in-context examples,
when there are any, come first as earlier (user, assistant) turns holding their bare inputs. Nothing else
in the code base formats a task prompt: call `task_prompt` (or `user_turn` where only the text is wanted).
"""

from __future__ import annotations

from collections.abc import Sequence

SEPARATOR = "\n\n"


def user_turn(instruction: str | None, x: str) -> str:
    """The last user turn's text: `{instruction}\\n\\n{input}`, or the input alone without an instruction."""
    instruction = (instruction or "").strip()
    return f"{instruction}{SEPARATOR}{x}" if instruction else x


def has_instruction(text: str, instruction: str | None) -> bool:
    """Whether `text` already starts with `instruction` (so a server does not put it in front twice)."""
    instruction = (instruction or "").strip()
    return bool(instruction) and text.lstrip().startswith(instruction)


def chat_messages(instruction: str | None, x: str, examples: Sequence[tuple[str, str]] = (),
                  system: str | None = None) -> list[dict[str, str]]:
    """The chat messages of one task prompt: optional system turn, example turns, then the instruction + input."""
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in examples:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": user_turn(instruction, x)})
    return messages


def task_prompt(tokenizer, instruction: str | None, x: str, examples: Sequence[tuple[str, str]] = (),
                system: str | None = None) -> str:
    """The model's prompt text for input `x` under `instruction`, with `examples` as earlier chat turns."""
    return tokenizer.apply_chat_template(chat_messages(instruction, x, examples, system), tokenize=False,
                                         add_generation_prompt=True)

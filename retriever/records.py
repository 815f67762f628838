"""An adapter's catalogue entry (`metadata.json`), its id rules and the limits on what it may hold."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

Source = Literal["trained", "generated", "uploaded"]
SOURCES: tuple[str, ...] = ("trained", "generated", "uploaded")
METADATA_NAME = "metadata.json"
METADATA_FORMAT = 1

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_NAME_CHARS = 200
MAX_DESCRIPTIONS = 256
MAX_SAMPLE_INPUTS = 100
MAX_TEXT_CHARS = 4000


class AdapterNotFound(KeyError):
    """No adapter with this id is in the library."""

    def __init__(self, adapter_id: str) -> None:
        super().__init__(adapter_id)
        self.adapter_id = adapter_id

    def __str__(self) -> str:
        return f"no adapter with id {self.adapter_id!r} in the library"


class InvalidAdapterId(ValueError):
    """An id that can never name an adapter (path characters, wrong length)."""

    def __init__(self, adapter_id: object) -> None:
        shown = repr(adapter_id) if len(repr(adapter_id)) <= 80 else repr(adapter_id)[:77] + "..."
        super().__init__(f"adapter id {shown} is not valid: ids are 1-64 characters of letters, digits, '-' and '_'")


def new_id() -> str:
    return uuid.uuid4().hex


def check_id(adapter_id: object) -> str:
    if not isinstance(adapter_id, str) or not ID_PATTERN.match(adapter_id):
        raise InvalidAdapterId(adapter_id)
    return adapter_id


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _check_texts(texts: Sequence[str], what: str, max_items: int, min_items: int) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"{what} must be a list of strings, got a single string")
    texts = list(texts)
    if not min_items <= len(texts) <= max_items:
        raise ValueError(f"{len(texts)} {what} given; allowed: {min_items} to {max_items}")
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{what} #{i} is {'empty' if isinstance(t, str) else type(t).__name__}; "
                             f"each must be a non-empty string")
        if len(t) > MAX_TEXT_CHARS:
            raise ValueError(f"{what} #{i} has {len(t)} characters; at most {MAX_TEXT_CHARS} are allowed")
        out.append(t.strip())
    return out


def check_fields(name: str, descriptions: Sequence[str], source: str,
                 sample_inputs: Sequence[str]) -> tuple[str, list[str], str, list[str]]:
    """Validate the user-supplied part of a record; raise ValueError naming the bad field and what is allowed."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("name must be a non-empty string")
    if len(name) > MAX_NAME_CHARS or any(ord(c) < 32 for c in name):
        raise ValueError(f"name must be at most {MAX_NAME_CHARS} printable characters")
    if source not in SOURCES:
        raise ValueError(f"source {source!r} is not allowed; choose from {list(SOURCES)}")
    descriptions = _check_texts(descriptions, "descriptions", MAX_DESCRIPTIONS, 1)
    sample_inputs = _check_texts(sample_inputs, "sample_inputs", MAX_SAMPLE_INPUTS, 0)
    return name.strip(), descriptions, source, sample_inputs


def check_strength(value: object) -> float | None:
    """An adapter's weight with in-context examples, relative to the adapter as stored: None, or a number in
    [0, 2] (a string from hyperlora.json)."""
    if value is None:
        return None
    try:
        strength = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"strength_with_examples must be a number in [0, 2], got {value!r}") from None
    if not 0.0 <= strength <= 2.0:
        raise ValueError(f"strength_with_examples must be in [0, 2], got {strength}")
    return strength


def check_instruction(instruction: object) -> str | None:
    """An adapter's instruction (what to put in front of every input): None, or a non-empty string."""
    if instruction is None:
        return None
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("instruction must be a non-empty string or absent")
    if len(instruction) > MAX_TEXT_CHARS:
        raise ValueError(f"instruction has {len(instruction)} characters; at most {MAX_TEXT_CHARS} are allowed")
    return instruction.strip()


@dataclass
class AdapterRecord:
    """What the library knows about one adapter; `metadata.json` in the adapter's directory."""

    id: str  # opaque, safe (see ID_PATTERN)
    name: str  # human-readable, e.g. the task name; not unique
    descriptions: list[str]  # what the adapter does, one or more sentences
    source: Source  # trained | generated | uploaded
    base_model: str  # the base model it was made for
    rank: int  # LoRA rank
    target_modules: list[str]  # module types it adapts
    created: str  # ISO 8601, UTC
    sha256: str  # of adapter_model.safetensors
    sample_inputs: list[str] = field(default_factory=list)  # a few inputs of its task, when known
    instruction: str | None = None  # put in front of every input (generator.prompt); from its hyperlora.json
    strength_with_examples: float | None = None  # its weight when the prompt holds in-context examples (a generated
    # adapter's checkpoint chose it on held-out tasks: training/strength.py); None: full strength

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, no file paths."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterRecord:
        """Parse `metadata.json`; raise ValueError saying what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"{METADATA_NAME} must hold a JSON object")
        missing = [f for f in ("id", "name", "descriptions", "source", "base_model", "rank", "target_modules",
                               "created", "sha256") if f not in d]
        if missing:
            raise ValueError(f"{METADATA_NAME} lacks field(s) {missing}")
        check_id(d["id"])
        name, descriptions, source, samples = check_fields(d["name"], d["descriptions"], d["source"],
                                                           d.get("sample_inputs", []))
        if not isinstance(d["rank"], int) or d["rank"] < 1:
            raise ValueError(f"rank must be a positive integer, got {d['rank']!r}")
        if not isinstance(d["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", d["sha256"]):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return cls(id=d["id"], name=name, descriptions=descriptions, source=source, base_model=str(d["base_model"]),
                   rank=d["rank"], target_modules=[str(m) for m in d["target_modules"]], created=str(d["created"]),
                   sha256=d["sha256"], sample_inputs=samples, instruction=check_instruction(d.get("instruction")),
                   strength_with_examples=check_strength(d.get("strength_with_examples")))

    def to_file(self) -> dict[str, Any]:
        return {"format": METADATA_FORMAT, **self.to_dict()}

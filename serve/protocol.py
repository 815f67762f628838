"""What the gateway sends the LLM deployment and what comes back (plain dataclasses, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from serve.results import Delta


@dataclass
class LLMRequest:
    """One prompt (raw text or chat messages) with the adapters that answer it.

    `adapters` are (id, weight) pairs; ids of library adapters are loaded by the LLM replica itself
    (`@serve.multiplexed`), ids of unsaved ones come with the request in `inline`, as the adapter or a
    Ray object reference to it, so a freshly generated adapter is served from memory.
    """

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    adapters: tuple[tuple[str, float], ...] = ()
    inline: dict[str, Any] = field(default_factory=dict)  # id -> LoraAdapter | ObjectRef[LoraAdapter]
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False  # decode past the end-of-turn/EOS token up to max_new_tokens (benchmarks)

    def main_adapter(self) -> str | None:
        """The library adapter with the largest weight: the request is routed to replicas that hold it."""
        library = [(w, k) for k, w in self.adapters if k not in self.inline]
        return max(library)[1] if library else None


@dataclass
class Accepted:
    """First event of every LLM stream: the prompt was tokenised and queued."""

    prompt_tokens: int


@dataclass
class LLMResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[Any] | None = None
    # milliseconds per stage in the LLM replica: prepare (adapters loaded, prompt tokenized), queue (until the
    # request joined the running decode batch), decode (until its last token); the Gateway's Server-Timing header
    timings: dict[str, float] | None = None


def fold(events: list[Accepted | Delta]) -> LLMResult:
    """A finished stream's events -> the whole completion."""
    prompt_tokens, text, n, reason, lps = 0, [], 0, "length", []
    for ev in events:
        if isinstance(ev, Accepted):
            prompt_tokens = ev.prompt_tokens
            continue
        text.append(ev.text)
        n += len(ev.token_ids)
        lps += ev.logprobs or []
        reason = ev.finish_reason or reason
    return LLMResult("".join(text), reason, prompt_tokens, n, lps or None)


def public_model_name(name: str) -> str:
    """A base-model name fit for clients: a local directory is shown by its last component only."""
    if name.startswith(("/", "~", ".")) or "\\" in name:
        return PurePath(name.rstrip("/")).name
    return name


def same_base_model(a: str, b: str) -> bool:
    """Whether two base-model names mean the same model: equal final path component, case-insensitive."""
    if not a or not b:
        return True  # an adapter that does not say is judged by its shapes alone
    return PurePath(a.rstrip("/")).name.lower() == PurePath(b.rstrip("/")).name.lower()


LLM_STAGES = ("llm_prepare", "llm_queue", "llm_decode")


def server_timing(total_ms: float, llm_ms: float, results: list[LLMResult]) -> str:
    """A `Server-Timing` header value (W3C) for a completion: `gateway` (the handler's own time), `llm` (its calls
    to the LLM deployment), and the slowest prompt's stages inside the LLM replica plus `llm_transit` (the rest of
    the call: Serve's handle, queues and transfers both ways)."""
    parts = {"gateway": total_ms - llm_ms, "llm": llm_ms}
    timed = [r.timings for r in results if r.timings]
    if timed:
        slowest = max(timed, key=lambda t: sum(t.get(k, 0.0) for k in LLM_STAGES))
        parts |= {k: slowest.get(k, 0.0) for k in LLM_STAGES}
        parts["llm_transit"] = llm_ms - sum(parts[k] for k in LLM_STAGES)
    return ", ".join(f"{k};dur={max(v, 0.0):.1f}" for k, v in parts.items())

"""OpenAI-compatible /v1/completions and /v1/chat/completions (plain and `stream=True`), where `model` is
the base model, an adapter id or `auto`, plus our `task_description` and `adapters` extensions."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from serve.errors import Invalid, ServiceError, TooLarge, UnknownAdapter, UnknownModel, as_service_error
from serve.instructions import has_examples, messages_with_instruction, pick_instruction, prompt_with_instruction
from serve.protocol import LLMRequest, LLMResult, server_timing
from serve.schemas import AdapterUse, ChatCompletionRequest, CompletionRequest, errors
from serve.state import GatewayState, check_texts


@dataclass
class Plan:
    """Which adapters answer one prompt."""

    adapters: tuple[tuple[str, float], ...]
    inline: dict[str, Any]
    use: AdapterUse
    instruction: str | None = None  # what the adapters ask to have in front of the input (serve.instructions)


# a completion is JSON, or server-sent events with `stream: true`
STREAMABLE = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}


def add_routes(app: FastAPI, state: GatewayState) -> None:
    @app.post("/v1/completions", tags=["completions"], responses={**STREAMABLE, **errors(400, 404, 503)})
    async def create_completion(body: CompletionRequest):
        """OpenAI text completions; `prompt` may be a list (one choice per prompt, decoded in one batch)."""
        return await _serve(state, body, chat=False)

    @app.post("/v1/chat/completions", tags=["completions"], responses={**STREAMABLE, **errors(400, 404, 503)})
    async def create_chat_completion(body: ChatCompletionRequest):
        """OpenAI chat completions with the base model's chat template."""
        return await _serve(state, body, chat=True)


def _check_sampling(state: GatewayState, body, max_new: int) -> None:
    cap = state.cfg.engine.max_new_tokens
    if max_new > cap:
        raise TooLarge(f"max_tokens={max_new} exceeds this service's limit of {cap}", param="max_tokens", limit=cap)
    lim = state.cfg.limits
    if len(body.stops) > lim.max_stop:
        raise TooLarge(f"{len(body.stops)} stop strings given; at most {lim.max_stop} are allowed", param="stop",
                       limit=lim.max_stop)


def _prompts(state: GatewayState, body: CompletionRequest | ChatCompletionRequest, chat: bool):
    """(prompts for the LLM, chat messages or None, texts to route by)."""
    lim = state.cfg.limits
    if chat:
        if len(body.messages) > lim.max_messages:
            raise TooLarge(f"{len(body.messages)} messages given; the limit is {lim.max_messages}",
                           param="messages", limit=lim.max_messages)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        chars = sum(len(m["content"]) for m in messages)
        if chars > lim.max_prompt_chars:
            raise TooLarge(f"the messages hold {chars} characters; the limit is {lim.max_prompt_chars}",
                           param="messages", limit=lim.max_prompt_chars)
        users = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
        texts = [m["content"] for m in messages if m["content"].strip()]
        return [None], messages, [users[-1] if users else texts[-1] if texts else ""]  # "": nothing to route by
    prompts = body.prompts
    if len(prompts) > lim.max_prompts:
        raise TooLarge(f"{len(prompts)} prompts given; the limit is {lim.max_prompts}", param="prompt",
                       limit=lim.max_prompts)
    for i, p in enumerate(prompts):
        if len(p) > lim.max_prompt_chars:
            raise TooLarge(f"prompt #{i} is {len(p)} characters; the limit is {lim.max_prompt_chars}",
                           param="prompt", limit=lim.max_prompt_chars)
    return prompts, None, prompts


async def plan_adapters(state: GatewayState, body, texts: list[str]) -> list[Plan]:
    """Resolve `model` / `adapters` / `task_description` into each prompt's adapter mixture."""
    model, n = body.model, len(texts)
    is_base = model in state.base_names
    if (body.task_description is not None or body.adapters is not None) and not (is_base or model == "auto"):
        try:
            state.lookup(model)
        except UnknownAdapter:
            raise UnknownModel(f"model {model[:80]!r} is neither the base model ({state.model_name}) nor 'auto'; "
                               f"with `task_description` or `adapters`, set `model` to one of those",
                               param="model") from None
        raise Invalid("with `task_description` or `adapters`, set `model` to the base model name", param="model")
    if body.task_description is not None:
        lim = state.cfg.limits
        desc = check_texts([body.task_description], "task_description", 1, lim.max_description_chars)[0]
        adapters, _ = await state.backends.generate([desc], state.generator)
        state.check_adapter(adapters[0], "the adapter generated for task_description", "task_description")
        info = state.remember(adapters[0], desc[:200], [desc], [])
        ref = state.ephemeral.get(info.id).ref
        use = AdapterUse(adapters=[{"id": info.id, "weight": 1.0}], generated_adapter=info.id)
        return [Plan(((info.id, 1.0),), {info.id: ref}, use, info.instruction)] * n
    if body.adapters is not None:
        if len(body.adapters) > state.cfg.limits.max_mixture:
            raise TooLarge(f"{len(body.adapters)} adapters in the mixture; the limit is {state.cfg.limits.max_mixture}",
                           param="adapters", limit=state.cfg.limits.max_mixture)
        weights: dict[str, float] = {}
        inline, instructions = {}, {}
        for aw in body.adapters:
            info, ref = state.lookup(aw.id)
            weights[aw.id] = weights.get(aw.id, 0.0) + aw.weight
            instructions[aw.id] = info.instruction
            if ref is not None:
                inline[aw.id] = ref
        use = AdapterUse(adapters=[{"id": k, "weight": w} for k, w in weights.items()])
        instruction = pick_instruction([(w, instructions[k]) for k, w in weights.items()])
        return [Plan(tuple(weights.items()), inline, use, instruction)] * n
    if is_base:
        return [Plan((), {}, AdapterUse(adapters=[]))] * n
    if model == "auto":
        live = [t for t in texts if t.strip()]  # a blank text has nothing to route by: the base model answers
        found = iter(await state.backends.route(live, state.cfg.retriever_config().top_k) if live else [])
        plans = []
        for r in (next(found) if t.strip() else {"abstain": True, "ids": []} for t in texts):
            if r["abstain"] or not r["ids"]:
                plans.append(Plan((), {}, AdapterUse(adapters=[], routed=True, abstained=True)))
            else:
                mix = tuple(zip(r["ids"], r["weights"], strict=True))
                instruction = pick_instruction([(w, state.instruction_of(i)) for i, w in mix])
                plans.append(Plan(mix, {}, AdapterUse(adapters=[{"id": i, "weight": w} for i, w in mix], routed=True),
                                  instruction))
        return plans
    try:
        info, ref = state.lookup(model)
    except UnknownAdapter:
        raise UnknownModel(f"model {model[:80]!r} is neither the base model ({state.model_name}), 'auto', nor an "
                           f"adapter id (see GET /v1/models)", param="model") from None
    use = AdapterUse(adapters=[{"id": model, "weight": 1.0}])
    return [Plan(((model, 1.0),), {model: ref} if ref is not None else {}, use, info.instruction)] * n


async def _serve(state: GatewayState, body, chat: bool):
    t_start = time.perf_counter()
    asked = body.limit if chat else body.max_tokens
    max_new = asked or min(256 if chat else 16, state.cfg.engine.max_new_tokens)  # unset: the default, capped
    _check_sampling(state, body, max_new)
    prompts, messages, route_texts = _prompts(state, body, chat)
    plans = await plan_adapters(state, body, route_texts)
    plans = [_instructed(_with_examples(state, plan, messages), p, messages, body.use_instruction)
             for p, plan in zip(prompts, plans, strict=True)]
    reqs = [LLMRequest(prompt=None if msgs is not None else p, messages=msgs, adapters=plan.adapters,
                       inline=dict(plan.inline), max_new_tokens=max_new, temperature=body.temperature or 0.0,
                       top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed, stop=body.stops,
                       logprobs=None if chat else body.logprobs, ignore_eos=body.ignore_eos)
            for p, (plan, msgs) in zip(prompts, plans, strict=True)]
    plans = [plan for plan, _ in plans]
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if body.stream:
        return await _stream(state, reqs, plans, body, chat, rid)
    t_llm = time.perf_counter()
    results: list[LLMResult] = await asyncio.gather(*(state.backends.complete(r) for r in reqs))
    t_done = time.perf_counter()
    usage = {"prompt_tokens": sum(r.prompt_tokens for r in results),
             "completion_tokens": sum(r.completion_tokens for r in results)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if chat:
        r = results[0]
        choices = [{"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                    "logprobs": None}]
    else:
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                    "logprobs": _legacy_logprobs(r.logprobs) if body.logprobs is not None else None,
                    "hyperlora": plans[i].use.model_dump()}
                   for i, r in enumerate(results)]
    return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": body.model, "choices": choices, "usage": usage,
                         "hyperlora": plans[0].use.model_dump()},
                        headers={"Server-Timing": server_timing(1e3 * (time.perf_counter() - t_start),
                                                                1e3 * (t_done - t_llm), results)})


def _with_examples(state: GatewayState, plan: Plan, messages: list[dict[str, str]] | None) -> Plan:
    """With example turns in the chat, each adapter at its `strength_with_examples` (full strength when unset)."""
    if not plan.adapters or not has_examples(messages):
        return plan
    scaled = tuple((i, w * (state.strength_of(i) or 1.0)) for i, w in plan.adapters)
    if scaled == plan.adapters:
        return plan
    use = plan.use.model_copy(update={"adapters": [{"id": i, "weight": w} for i, w in scaled]})
    return Plan(scaled, plan.inline, use, plan.instruction)


def _instructed(plan: Plan, prompt: str | None, messages: list[dict[str, str]] | None, use: bool
                ) -> tuple[Plan, list[dict[str, str]] | None]:
    """The plan with the instruction it applied recorded, and the messages to send (None: the raw prompt)."""
    instruction = plan.instruction if use else None
    if messages is not None:
        messages, applied = messages_with_instruction(messages, instruction)
    else:
        messages, applied = prompt_with_instruction(prompt or "", instruction)
    if applied is None:
        return plan, messages
    return Plan(plan.adapters, plan.inline, plan.use.model_copy(update={"instruction": applied}),
                plan.instruction), messages


def _legacy_logprobs(lps) -> dict[str, Any]:
    tokens, offsets, pos = [], [], 0
    for lp in lps or []:
        tokens.append(lp.token)
        offsets.append(pos)
        pos += len(lp.token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps or []],
            "top_logprobs": [lp.top for lp in lps or []], "text_offset": offsets}


async def _stream(state: GatewayState, reqs, plans, body, chat: bool, rid: str) -> StreamingResponse:
    streams = [state.backends.stream(r) for r in reqs]
    try:  # the first event (Accepted) comes after tokenisation: a bad prompt still gets its status code
        accepted = await asyncio.gather(*(s.__anext__() for s in streams))
    except BaseException:
        for s in streams:
            _cancel(s)
        raise
    created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(idx: int, delta, finish: str | None, extra: dict | None = None) -> str:
        if chat:
            choice = {"index": idx, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": idx, "text": delta, "finish_reason": finish, "logprobs": None}
        payload = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [choice],
                   **(extra or {})}
        return f"data: {json.dumps(payload)}\n\n"

    async def events() -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()
        completion_tokens = 0

        async def pump(idx: int, s) -> None:
            try:
                async for ev in s:
                    await queue.put((idx, ev))
            except BaseException as e:  # noqa: BLE001 - reported to the client inside the stream
                await queue.put((idx, e))
            finally:
                await queue.put((idx, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            if chat:
                yield chunk(0, {"role": "assistant", "content": ""}, None, {"hyperlora": plans[0].use.model_dump()})
            remaining = len(streams)
            while remaining:
                idx, ev = await queue.get()
                if ev is None:
                    remaining -= 1
                elif isinstance(ev, BaseException):
                    err = as_service_error(ev) or ServiceError("generation failed", None)
                    yield f"data: {json.dumps(err.body())}\n\n"
                else:
                    completion_tokens += len(ev.token_ids)
                    if ev.text or ev.finish_reason:
                        yield chunk(idx, {"content": ev.text} if chat else ev.text, ev.finish_reason)
            if include_usage:
                prompt_tokens = sum(a.prompt_tokens for a in accepted)
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
                payload = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [],
                           "usage": usage}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _cancel(stream) -> None:
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        cancel()

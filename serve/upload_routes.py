"""POST /v1/adapters/upload: a user's PEFT LoRA adapter into the library, checked on the way in."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from fastapi import FastAPI, Request

from generator.peft_format import AdapterFormatError
from serve.errors import Invalid, InvalidAdapter, ServiceError, WrongBaseModel
from serve.protocol import public_model_name, same_base_model
from serve.schemas import NAME_PATTERN, AdapterInfo, errors
from serve.state import GatewayState, IdempotencyKey, check_texts, idempotent_ids
from serve.uploads import collect_files, extract_archive

UPLOAD_PATH = "/v1/adapters/upload"


def add_routes(app: FastAPI, state: GatewayState) -> None:
    @app.post(UPLOAD_PATH, response_model=AdapterInfo, status_code=201, tags=["adapters"],
              responses=errors(400, 401, 403),
              openapi_extra={"requestBody": {"content": {
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "string", "format": "binary", "description": ".zip/.tar/.tar.gz of a PEFT dir"},
                      "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                      "name": {"type": "string", "maxLength": 200, "pattern": NAME_PATTERN},
                      "description": {"type": "string"},
                      "instruction": {"type": "string", "description": "put in front of every input (else the "
                                                                        "archive's hyperlora.json instruction)"},
                      "sample_inputs": {"type": "array", "items": {"type": "string"}}}}},
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_adapter(request: Request, idempotency_key: str | None = IdempotencyKey) -> AdapterInfo:
        """Add a user's PEFT LoRA adapter: multipart (`file` archive or `files`) or a raw archive body whose
        name/description come as query parameters. Pickle files, NaN/Inf weights and shapes that do not fit
        the base model are refused with 400."""
        state.authorize(request)
        lim = state.cfg.limits
        tmp = Path(tempfile.mkdtemp(prefix="hyperlora-up-"))
        try:
            fields, files = await _read_upload(request, lim)
            for one in ("name", "instruction"):  # the schema says a string: several are a malformed request
                if len(fields.get(one) or []) > 1:
                    raise Invalid(f"give one `{one}`, not {len(fields[one])}", param=one)
            name = (fields.get("name") or ["uploaded adapter"])[0]
            descriptions = check_texts(fields.get("description") or fields.get("descriptions") or [],
                                       "description", lim.max_descriptions, lim.max_description_chars)
            if not descriptions:
                raise Invalid("give at least one `description` of what the adapter does", param="description")
            samples = fields.get("sample_inputs") or []
            instruction = check_texts(fields.get("instruction") or [], "instruction", 1,
                                      lim.max_description_chars)
            check_texts([name], "name", 1, 200)
            check_texts(samples, "sample_inputs", 100, lim.max_prompt_chars)
            d = tmp / "adapter"
            if "file" in files:
                await asyncio.to_thread(extract_archive, files["file"][0][1], d, lim.max_upload_bytes,
                                        lim.max_upload_files)
            else:
                pairs = [f for v in files.values() for f in v]
                await asyncio.to_thread(collect_files, pairs, d, lim.max_upload_bytes, lim.max_upload_files)
            (saved_id,) = idempotent_ids(idempotency_key, 1)
            record = await asyncio.to_thread(_add_upload, state, d, name, descriptions, samples,
                                             instruction[0] if instruction else None, saved_id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return state.record_info(record)


async def _read_upload(request: Request, lim) -> tuple[dict[str, list[str]], dict[str, list[tuple[str, bytes]]]]:
    ctype = request.headers.get("content-type", "")
    fields: dict[str, list[str]] = {}
    files: dict[str, list[tuple[str, bytes]]] = {}
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=lim.max_upload_files, max_fields=64,
                                      max_part_size=lim.max_description_chars * 4 + 1024)
        except ServiceError:
            raise
        except Exception as e:  # noqa: BLE001 - python-multipart / starlette parse errors
            raise InvalidAdapter(f"the multipart body cannot be parsed: {e}") from e
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(key, []).append(value)
            else:
                files.setdefault(key, []).append((value.filename or key, await value.read()))
    else:
        body = await request.body()
        if not body:
            raise Invalid("the upload is empty: send a multipart form or an archive body", param="file")
        files["file"] = [("upload", body)]
        for key in ("name", "description", "descriptions", "sample_inputs", "instruction"):
            vals = request.query_params.getlist(key)
            if vals:
                fields[key] = vals
    if not files:
        raise Invalid("no file in the upload: send `file` (an archive) or `files` (the PEFT files)", param="file")
    return fields, files


def _add_upload(state: GatewayState, d: Path, name: str, descriptions: list[str], samples: list[str],
                instruction: str | None, adapter_id: str | None = None):
    from generator.peft_io import load_peft  # torch: the Gateway imports it at its first upload, not at start
    from retriever.records import check_fields

    try:
        check_fields(name, descriptions, "uploaded", samples)
    except ValueError as e:
        raise Invalid(str(e)) from e
    try:
        adapter = load_peft(d)  # JSON and safetensors only; refuses pickles; checks finiteness
    except (AdapterFormatError, ValueError) as e:
        raise InvalidAdapter(str(e)) from e
    if not same_base_model(adapter.base_model, state.spec.name):
        raise WrongBaseModel(f"the adapter was made for {public_model_name(adapter.base_model)}, but this service "
                             f"serves {state.model_name}", param="file")
    try:
        adapter.check_fits(state.spec)
    except ValueError as e:
        raise WrongBaseModel(f"the adapter (for {public_model_name(adapter.base_model) or 'an unnamed model'}) "
                             f"does not fit {state.model_name}: {e}", param="file") from e
    state.check_adapter(adapter, "the uploaded adapter", "file")
    if instruction:
        adapter.metadata["instruction"] = instruction
    try:
        return state.library.add(adapter, name, descriptions, "uploaded", samples, adapter_id)
    except ValueError as e:
        raise Invalid(str(e)) from e

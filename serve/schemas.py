"""Request and response bodies of the HTTP API (pydantic): OpenAI's completion shapes plus our extensions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from serve.engine_config import MAX_TEMPERATURE, MIN_TEMPERATURE

# the engine takes any 64-bit seed; the API keeps to what every JSON parser reads exactly (bigger integers pass
# through doubles in many clients and validators, where 2**64 + 384 == 2**64)
JSON_SAFE_INT = 2**53 - 1


def encodable(text: str) -> str:
    """Refuse text that cannot be encoded as UTF-8 (a lone surrogate such as JSON's "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a character that is not valid Unicode text (a lone surrogate at position "
                         f"{e.start})") from None
    return text


Text = Annotated[str, AfterValidator(encodable)]  # every string a request carries
# the characters str.strip() removes (str.isspace()), spelled out: `\s` means three different sets to the schema's
# readers (ECMA), pydantic (Rust regex) and the server (Python), e.g. on U+001F and U+0085
SPACE = r"\x09-\x0d\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# a description, prompt or routing input: at least one non-blank character (the schema says so too)
NonBlank = Annotated[str, Field(pattern=f"[^{SPACE}]"),
                     BeforeValidator(lambda v: encodable(v) if isinstance(v, str) else v)]  # before the pattern


def _not_bool(v: Any) -> Any:
    """For a number field (used as a `mode="before"` field validator): JSON true/false is not a number, though
    pydantic's lax mode would take it as 1/0. (Lax mode stays: 35.0 is an integer in JSON Schema too.)"""
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


StopText = Annotated[str, Field(min_length=1), AfterValidator(encodable)]  # a stop string: not empty
# what the library takes (retriever/records.py): no control characters, and some text (a character that is neither)
NAME_PATTERN = f"^[^\\x00-\\x1f]*[^\\x00-\\x1f{SPACE}][^\\x00-\\x1f]*$"
AdapterName = Annotated[str, Field(min_length=1, max_length=200, pattern=NAME_PATTERN),
                        BeforeValidator(lambda v: encodable(v) if isinstance(v, str) else v)]
GeneratorKind = Literal["t2l", "cvae", "sg"]  # generator.generate.GENERATORS (a test keeps them equal)


def _exactly_one(a: str, b: str) -> dict[str, Any]:
    """The JSON schema of "exactly one of `a` and `b`" (checked by the model's validator too): one is given and not
    null, the other is absent or null."""
    def given(x: str, y: str) -> dict[str, Any]:
        return {"required": [x], "properties": {x: {"not": {"type": "null"}}, y: {"type": "null"}}}

    return {"oneOf": [given(a, b), given(b, a)]}

# ---- adapters -------------------------------------------------------------------------------------------


class GenerateAdaptersRequest(BaseModel):
    """`description` or `descriptions` (one adapter each); `save` adds them to the library."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one("description", "descriptions"))

    description: NonBlank | None = Field(None, description="One sentence saying what the adapter should do.")
    descriptions: list[NonBlank] | None = Field(None, min_length=1, description="Several, one adapter each.")
    save: StrictBool = Field(False, description="Add the adapters to the library (needs the API key).")
    generator: GeneratorKind | None = Field(
        None, description="Which generator makes them: t2l (Text-to-LoRA), cvae (ICM-LoRA) or sg (semantic-guided), "
                          "as served (404 if this service does not serve it); default: the service's (t2l).")
    name: AdapterName | None = Field(None,
                              description="Library name (default: the description).")
    sample_inputs: list[NonBlank] = Field(default_factory=list, max_length=100,
                                     description="A few inputs of the task, used as the adapter's routing key.")
    strategy: Literal["generate", "retrieve", "auto"] | None = Field(
        None, description="generate: always a generated adapter; retrieve: the library adapter whose descriptions "
                          "are nearest; auto (the default, unless the service is configured otherwise): the library "
                          "adapter on a confident match, the generated one mixed with near library adapters when "
                          "some are close, else the generated one. Thresholds are calibrated on held-out paraphrases.")

    @model_validator(mode="after")
    def _one_of(self) -> GenerateAdaptersRequest:
        if (self.description is None) == (self.descriptions is None):
            raise ValueError("give exactly one of `description` (a string) or `descriptions` (a list of strings)")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.description] if self.description is not None else list(self.descriptions or [])


class AdapterInfo(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    descriptions: list[str]
    source: str  # trained | generated | uploaded
    saved: bool  # in the library (else an unsaved generated adapter, dropped when the unsaved store is full)
    base_model: str
    rank: int
    target_modules: list[str]
    created: str
    sha256: str | None = None
    sample_inputs: list[str] = Field(default_factory=list)
    instruction: str | None = None  # put in front of every input when completing with it (see the README)
    strength_with_examples: float | None = None  # its weight when a chat request holds example turns (None: 1)


class MatchedTask(BaseModel):
    id: str = Field(description="The library adapter's id.")
    name: str = Field(description="Its name (for trained adapters, the task).")
    similarity: float = Field(description="Cosine of the description to the adapter's key (see `key`).")
    key: Literal["descriptions", "instruction"] = Field(
        "descriptions", description="descriptions: the mean of the adapter's descriptions; instruction: the "
                                    "instruction it was trained or made for, which the description restates.")


class MixtureWeight(BaseModel):
    id: str | None = Field(description="A library adapter's id, or null for the generated adapter.")
    weight: float = Field(description="Its weight in the returned adapter (the weights sum to 1).")


class AdapterDecision(BaseModel):
    """Why a description got the adapter it got (one per description, in order)."""

    strategy: Literal["generate", "retrieve", "auto"] = Field(description="The strategy applied.")
    path: Literal["generate", "retrieve", "mix"] = Field(
        description="What it returned: a generated adapter, a library adapter as is (its id), or one adapter that is "
                    "the exact weighted mixture of the generated adapter and near library adapters (see `mixture`).")
    matches: list[MatchedTask] = Field(description="The library adapters nearest to the description, best first.")
    mixture: list[MixtureWeight] = Field(description="The adapters the returned one is made of, with their weights.")
    confidence: float = Field(
        description="0 to 1: how close the description is to the tasks the generator was trained on (0: as far as "
                    "nonsense, 1: as close as a training task's own paraphrase). Low: a generated adapter is unlikely "
                    "to help, and a client may prefer to fall back (e.g. to the base model with the instruction).")
    train_similarity: float = Field(description="Cosine of the description to the nearest training task.")
    nearest_train_task: str = Field(description="That training task.")
    out_of_scope: bool = Field(description="Close to no training task and no library adapter: probably not a task.")
    warning: str | None = Field(None, description="Set when out of scope; says why.")


class GenerateAdaptersResponse(BaseModel):
    adapters: list[AdapterInfo]
    generation_ms: float  # time of the whole decision: embedding, search and hypernetwork, for the whole request
    generator: str  # which generator made them
    generator_trained: bool  # False: a freshly initialised hypernetwork made these
    decisions: list[AdapterDecision] = Field(
        default_factory=list, description="One per adapter: the strategy's path, matches, confidence and warning.")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class DeletedAdapter(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


# ---- routing --------------------------------------------------------------------------------------------


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one("input", "inputs"))

    input: NonBlank | None = None
    inputs: list[NonBlank] | None = Field(None, min_length=1)
    top_k: int = Field(3, ge=1, le=64)

    _route_numbers = field_validator("top_k", mode="before")(_not_bool)

    @model_validator(mode="after")
    def _one_of(self) -> RouteRequest:
        if (self.input is None) == (self.inputs is None):
            raise ValueError("give exactly one of `input` (a string) or `inputs` (a list of strings)")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.input] if self.input is not None else list(self.inputs or [])


class RoutedAdapter(BaseModel):
    id: str
    name: str
    score: float  # cosine similarity of the input to the adapter's key
    weight: float  # mixture weight (softmax over the top-k scores)


class RouteResult(BaseModel):
    index: int
    adapters: list[RoutedAdapter]
    abstain: bool  # no adapter is close enough: use the base model or generate one


class RouteResponse(BaseModel):
    routes: list[RouteResult]
    route_ms: float


# ---- completions ----------------------------------------------------------------------------------------


class AdapterWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Text = Field(min_length=1, max_length=128)
    weight: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    _weight_numbers = field_validator("weight", mode="before")(_not_bool)


NOT_BOTH = {"not": {"required": ["task_description", "adapters"],
                    "properties": {"task_description": {"type": "string"}, "adapters": {"type": "array"}}}}


def _json_false(v: Any) -> Any:
    if v is not None and not isinstance(v, bool):  # Literal[False] alone would take 0 too
        raise ValueError("must be false (not supported)")
    return v


JsonFalse = Annotated[Literal[False], BeforeValidator(_json_false)]  # a field whose only allowed value is false


class _Sampling(BaseModel):
    """Fields shared by both completion endpoints. Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=NOT_BOTH)

    model: Text = Field(min_length=1, max_length=256, description="Base model name, an adapter id, or `auto`.")
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                                      description=f"0 (the default) or under {MIN_TEMPERATURE}: greedy; at most "
                                                  f"{MAX_TEMPERATURE}.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False,
                                description="Nucleus sampling mass in (0, 1]; the most likely token always stays.")
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None  # {"include_usage": true} adds a final usage chunk
    stop: StopText | list[StopText] | None = None
    seed: int | None = Field(None, ge=-JSON_SAFE_INT, le=JSON_SAFE_INT,
                             description="An integer that a JSON number holds exactly: |seed| < 2**53.")
    task_description: Text | None = Field(None, min_length=1, description="Generate an adapter for this and use it.")
    adapters: list[AdapterWeight] | None = Field(None, min_length=1, description="A weighted mixture of adapters.")
    ignore_eos: StrictBool = Field(False, description="vLLM's: keep generating past the end-of-turn/EOS token "
                                   "until max_tokens (finish_reason `length`), e.g. for throughput benchmarks; "
                                   "`stop` strings still stop.")
    use_instruction: StrictBool = Field(True, description="Put the adapter's instruction in front of the prompt, in "
                                                          "the chat template, when the adapter carries one (see the "
                                                          "README).")

    _sampling_numbers = field_validator("temperature", "top_p", "n", "seed", mode="before")(_not_bool)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        return 0.0 if v is not None and v < MIN_TEMPERATURE else v  # a temperature this close to 0 is greedy

    @model_validator(mode="after")
    def _extensions(self):
        if self.task_description is not None and self.adapters is not None:
            raise ValueError("give at most one of `task_description` and `adapters`")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    model_config = ConfigDict(extra="ignore", json_schema_extra={**NOT_BOTH, "examples": [
        {"model": "auto", "prompt": "Translate to French: good morning", "max_tokens": 32},
        {"model": "base", "prompt": "2+2=", "max_tokens": 4, "task_description": "Answer with a number."}]})

    prompt: NonBlank | Annotated[list[NonBlank], Field(min_length=1)] = Field(
        description="A prompt, or several (one choice each).")
    max_tokens: int | None = Field(16, ge=1, description="At most the service's limit (its config's "
                                   "`engine.max_new_tokens`); null: 16 or that limit, whichever is lower.")
    logprobs: int | None = Field(None, ge=0, le=5)
    _completion_numbers = field_validator("max_tokens", "logprobs", mode="before")(_not_bool)
    echo: JsonFalse = Field(False, description="Not supported; must be false.")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(extra="ignore", json_schema_extra={**NOT_BOTH, "examples": [
        {"model": "auto", "messages": [{"role": "user", "content": "Is this review positive? I loved it."}]}]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="At most the service's limit; absent: 256 or that "
                                   "limit, whichever is lower.")
    max_completion_tokens: int | None = Field(None, ge=1,
                                                   description="The same as max_tokens (OpenAI's newer name).")
    _chat_numbers = field_validator("max_tokens", "max_completion_tokens", mode="before")(_not_bool)
    logprobs: JsonFalse | None = Field(None, description="Not supported for chat; must be false or absent.")

    @property
    def limit(self) -> int | None:
        """The requested number of new tokens; None when the request leaves it to the service."""
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AdapterUse(BaseModel):
    """Our extension on every completion: which adapters answered and why."""

    adapters: list[dict[str, Any]]  # [{"id", "weight"}]; empty: the base model
    routed: bool = False  # model="auto" chose them
    abstained: bool = False  # model="auto" found none close enough and used the base model
    generated_adapter: str | None = None  # id of the adapter made from task_description
    instruction: str | None = None  # the adapter's instruction put in front of the prompt, if one was


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "hyperlora"
    kind: Literal["base", "adapter", "router"] = "adapter"
    name: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str
    limit: int | None = None  # on 413: the limit that was exceeded


class ErrorBody(BaseModel):
    """Every error response: never a stack trace."""

    error: ErrorDetail


ERROR_MEANINGS = {
    400: "Bad adapter or request values (invalid weights, wrong base model, a generation that failed).",
    401: "The API key is missing or wrong.",
    403: "No API key is configured and the request is not from a local program.",
    404: "No such adapter or model.",
    405: "Method not allowed (the Allow header lists the allowed ones).",
    413: "Body, text, list or prompt over a limit (the error's `limit` says which).",
    422: "A field is missing, malformed or out of range (the error's `param` names it).",
    500: "Internal error (logged on the server).",
    503: "A model deployment is not ready, or a replica stopped while serving the request (try again).",
    504: "A model deployment did not answer in time.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route: these codes plus the ones every route may return (413, 422, 500, 503, 504)."""
    return {c: {"model": ErrorBody, "description": ERROR_MEANINGS[c]}
            for c in sorted({*codes, 413, 422, 500, 503, 504})}

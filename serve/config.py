"""The service's one typed config, `ServeConfig`, and loading it from the Serve config YAML.

One YAML (`serve/config.yaml`) serves three commands: `serve run serve/config.yaml` and `serve deploy
serve/config.yaml` read it as a Ray Serve config (its application's `args` become a `ServeConfig`, its
`deployments` set replicas and autoscaling), and `hyperlora serve --config serve/config.yaml` reads the
same two sections through `ServeConfig.from_yaml`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from generator.limits import AdapterLimits
from generator.models import DEFAULT_BASE_MODEL, DEFAULT_EMBEDDER
from serve.engine_config import EngineConfig

DEPLOYMENT_NAMES = ("Gateway", "Generator", "Router", "LLM")
DEFAULT_CONFIG = Path(__file__).parent / "config.yaml"


class DeploymentSettings(BaseModel):
    """Replicas, concurrency and resources of one deployment (Ray Serve's deployment options)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | Literal["auto"] | None = None  # fixed replica count; None: autoscaling_config or 1
    max_ongoing_requests: int | None = Field(None, ge=1)  # requests one replica handles at once
    autoscaling_config: dict[str, Any] | None = None  # Ray Serve autoscaling (min/max_replicas, target_...)
    ray_actor_options: dict[str, Any] | None = None  # e.g. {"num_cpus": 1, "num_gpus": 1}

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class BatchSettings(BaseModel):
    """A `@serve.batch` queue: how many calls one batch takes and how long it waits to fill."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0)


class Limits(BaseModel):
    """What one request may carry; larger gets 413 naming the limit."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(1 << 20, ge=1024)  # JSON request bodies
    max_upload_bytes: int = Field(64 << 20, ge=1024)  # an uploaded archive or the multipart files together
    max_upload_files: int = Field(16, ge=2)  # files in an upload (archive members included)
    max_description_chars: int = Field(2000, ge=1)  # one task description
    max_descriptions: int = Field(32, ge=1)  # descriptions in one POST /v1/adapters
    max_prompt_chars: int = Field(32_000, ge=1)  # one prompt, or all chat messages together
    max_prompts: int = Field(32, ge=1)  # prompts in one /v1/completions request
    max_messages: int = Field(128, ge=1)  # messages in one chat request
    max_route_inputs: int = Field(64, ge=1)  # inputs in one /v1/route request
    max_mixture: int = Field(8, ge=1)  # adapters in one request's mixture
    max_stop: int = Field(4, ge=0)  # stop strings


class ServeConfig(BaseModel):
    """Everything the service needs; every deployment gets the whole config."""

    model_config = ConfigDict(extra="forbid")

    # -- models
    base_model: str = DEFAULT_BASE_MODEL  # embedded default or a local HF causal-LM directory
    embedder: str = DEFAULT_EMBEDDER  # embedded default or a local sentence-transformers directory
    generator: str = "t2l"  # the default adapter generator (a request's `generator` may pick another one)
    checkpoint: str | None = None  # hypernetwork checkpoint dir; None: the shipped one (else a fresh one, warned)
    other_generators: dict[str, str | None] = Field(  # also served on request: name -> checkpoint dir (None: the
        default_factory=lambda: {"cvae": None, "sg": None})  # shipped one; without one it is left out, logged)
    device: str = "cpu"  # torch device of the embedder and the hypernetwork
    # -- the library and routing
    library: str | None = None  # library root; None: $HYPERLORA_HOME/library
    default_library: bool = True  # fill an empty library with the default one when the service starts
    retriever: dict[str, Any] = Field(default_factory=dict)  # RetrieverConfig fields (top_k, index, ...)
    strategy: dict[str, Any] = Field(default_factory=dict)  # StrategyConfig fields: how POST /v1/adapters picks
    #                          generate / retrieve / mix (default strategy, thresholds, reject_below for a 422, ...)
    adapter_limits: AdapterLimits = Field(default_factory=AdapterLimits)  # what an uploaded, generated or loaded
    # adapter must keep to (generator.sanity): entry magnitude and update norm relative to the base weight
    # -- the LLM engine and batching
    engine: EngineConfig = Field(default_factory=EngineConfig)
    llm_batch: BatchSettings = Field(  # the LLM's @serve.batch: up to 64 of them decode together (their requests
        # capped by engine.max_batch_size), so small ones lose nothing: the engine merges all waiting into one prefill
        default_factory=lambda: BatchSettings(max_batch_size=4, batch_wait_timeout_s=0.02))
    generator_batch: BatchSettings = Field(  # a short wait: a lone request pays it; queued ones batch anyway
        default_factory=lambda: BatchSettings(max_batch_size=16, batch_wait_timeout_s=0.002))
    router_batch: BatchSettings = Field(
        default_factory=lambda: BatchSettings(max_batch_size=32, batch_wait_timeout_s=0.002))
    torch_threads: int | None = Field(None, ge=1)  # torch threads of each model replica; None: every core
    # -- the gateway
    ephemeral_bytes: int = Field(256 << 20, ge=1)  # unsaved generated adapters kept on disk under
    #                    <library>/unsaved/, which every gateway replica sees (least recently used dropped first)
    api_key_env: str = "HYPERLORA_API_KEY"  # env var holding the key mutations need; unset: local programs only
    cors_origins: list[str] = Field(default_factory=list)  # web origins allowed to call the API; empty: CORS off
    limits: Limits = Field(default_factory=Limits)
    request_timeout_s: float = Field(300.0, gt=0)  # a call from the gateway to another deployment
    # -- where `hyperlora serve` listens and what each deployment gets (serve run/deploy: the YAML's own sections)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    deployments: dict[str, DeploymentSettings] = Field(default_factory=dict)

    @field_validator("retriever")
    @classmethod
    def _check_retriever(cls, v: dict[str, Any]) -> dict[str, Any]:
        from retriever.config import RetrieverConfig

        RetrieverConfig.from_dict(v)  # raises ValueError naming the bad field
        return v

    @field_validator("strategy")
    @classmethod
    def _check_strategy(cls, v: dict[str, Any]) -> dict[str, Any]:
        from retriever.strategy_config import StrategyConfig

        StrategyConfig.from_dict(v)  # raises ValueError naming the bad field
        return v

    @field_validator("other_generators")
    @classmethod
    def _check_generators(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        from serve.schemas import GeneratorKind  # = generator.generate.GENERATORS (a test keeps them equal); no torch

        registered = set(get_args(GeneratorKind))
        unknown = sorted(set(v) - registered)
        if unknown:
            raise ValueError(f"unknown generator(s) {unknown}; registered: {sorted(registered)}")
        return v

    @field_validator("deployments")
    @classmethod
    def _check_deployments(cls, v: dict[str, DeploymentSettings]) -> dict[str, DeploymentSettings]:
        unknown = sorted(set(v) - set(DEPLOYMENT_NAMES))
        if unknown:
            raise ValueError(f"unknown deployment(s) {unknown}; the application has {list(DEPLOYMENT_NAMES)}")
        return v

    @field_validator("request_timeout_s")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("request_timeout_s must be finite")
        return v

    def library_root(self) -> Path:
        if self.library:
            return Path(self.library).expanduser()
        from retriever.library import default_library_root

        return default_library_root()

    def unsaved_root(self) -> Path:
        """Where unsaved generated adapters live (serve/unsaved.py): beside the library, on the same file system."""
        return self.library_root() / "unsaved"

    def retriever_config(self):
        from retriever.config import RetrieverConfig

        return RetrieverConfig.from_dict(self.retriever)

    def strategy_config(self):
        from retriever.strategy_config import StrategyConfig

        return StrategyConfig.from_dict(self.strategy)

    def generator_config(self):
        from generator.config import GeneratorConfig

        return GeneratorConfig(self.base_model, self.embedder, self.generator, self.checkpoint, self.device)

    @classmethod
    def from_yaml(cls, path: str | Path = DEFAULT_CONFIG, app_name: str | None = None, **overrides: Any) -> ServeConfig:
        """Read a Ray Serve config file: the application's `args`, its `deployments`, and `http_options`."""
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        apps = raw.get("applications") or []
        if not apps:
            raise ValueError(f"{path} has no applications")
        app = next((a for a in apps if app_name is None or a.get("name") == app_name), None)
        if app is None:
            raise ValueError(f"{path} has no application named {app_name!r}; it has {[a.get('name') for a in apps]}")
        fields: dict[str, Any] = dict(app.get("args") or {})
        http = raw.get("http_options") or {}
        fields.setdefault("host", http.get("host", "127.0.0.1"))
        fields.setdefault("port", http.get("port", 8000))
        deployments = {}
        for d in app.get("deployments") or []:
            d = dict(d)
            name = d.pop("name", None)
            if name not in DEPLOYMENT_NAMES:
                raise ValueError(f"{path}: deployment {name!r} is not one of {list(DEPLOYMENT_NAMES)}")
            known = set(DeploymentSettings.model_fields)
            deployments[name] = {k: v for k, v in d.items() if k in known}
        fields.setdefault("deployments", deployments)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(fields)

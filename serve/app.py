"""The application builder named by `serve/config.yaml` (`import_path: serve.app:build_app`).

    Gateway.bind(config, Generator.bind(config), Router.bind(config), LLM.bind(config))

`serve run serve/config.yaml` / `serve deploy serve/config.yaml` call it with the YAML's `args`;
`hyperlora serve` calls it with a `ServeConfig` read from the same file.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve.config import ServeConfig
from serve.deployments import LLM, Router
from serve.gateway import Gateway
from serve.generator_deployment import Generator


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args or {})
    config = cfg.model_dump(mode="json", exclude={"deployments"})
    deployments = {"Gateway": Gateway, "Generator": Generator, "Router": Router, "LLM": LLM}
    for name, settings in cfg.deployments.items():
        deployments[name] = deployments[name].options(**settings.options())
    return deployments["Gateway"].bind(config, deployments["Generator"].bind(config),
                                       deployments["Router"].bind(config), deployments["LLM"].bind(config))

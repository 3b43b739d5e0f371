"""Resolve an experiment's ``model:`` choice into a model config and the reference agents load from.

Only configs are read here (no weights, no torch), so planning and the simulated backend stay cheap.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from testbed.core.snapshot import ModelDims
from testbed.spec.schema import ModelChoice
from testbed.core.errors import ConfigError


CONFIG_PREFIX = "config:"  # node_agent.model.load_state reads the same prefix


class ModelRefError(ConfigError, ValueError):
    """The model choice names nothing loadable."""


@dataclass(frozen=True)
class ModelRef:
    """What every agent needs to build its blocks itself: a registry name or checkpoint path, a seed."""

    name: str | None
    path: str | None
    seed: int
    config: object  # node_agent.model.ModelConfig

    @property
    def load_arg(self) -> str:
        """What the agents load: a checkpoint path, a registry name, or ``config:{json}`` (explicit
        dims: random seeded weights built from the config by every agent alike)."""
        if self.path or self.name:
            return self.path or self.name  # type: ignore[return-value]
        return CONFIG_PREFIX + json.dumps(self.config.to_dict(), sort_keys=True)

    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_config(self.config, name=self.config.name)

    def to_json(self) -> dict:
        return {"name": self.name, "path": self.path, "seed": self.seed, "config": self.config.to_dict()}


def resolve_model(choice: ModelChoice, base_dir: Path | None = None) -> ModelRef:
    from node_agent.model.config import REGISTRY, ModelConfig, ModelError, config_from_hf

    if choice.name is not None:
        if choice.name not in REGISTRY:
            raise ModelRefError(f"unknown model {choice.name!r} (registry: {', '.join(sorted(REGISTRY))})")
        return ModelRef(choice.name, None, choice.seed, REGISTRY[choice.name])
    if choice.path is not None:
        path = Path(choice.path)
        if not path.is_absolute() and base_dir is not None:
            path = (base_dir / path).resolve()
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ModelRefError(f"model path {path}: no config.json")
        try:
            cfg = config_from_hf(json.loads(cfg_file.read_text()), name=path.name)
        except ModelError as exc:
            raise ModelRefError(f"model path {path}: {exc}") from None
        return ModelRef(None, str(path), choice.seed, cfg)
    try:
        cfg = ModelConfig.from_dict({"name": "custom", **(choice.dims or {})})
    except (ModelError, TypeError) as exc:
        raise ModelRefError(f"model dims: {exc}") from None
    return ModelRef(None, None, choice.seed, cfg)

"""Resolve an experiment's ``model:`` choice into a model config and the reference agents load from.

Only configs are read here (no weights, no torch), so planning and the simulated backend stay cheap.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from testbed.core.snapshot import ModelDims
from testbed.spec.models import SIZE_ONLY, known_models, size_only_config
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
    weight_format: str = "fp32"  # planned and simulated; agents compute fp32 whatever it is
    has_weights: bool = True  # False: a published config without weights (testbed.spec.models)

    def require_weights(self) -> None:
        """Raise (naming the model) when agents could not load it: a size-only model."""
        if not self.has_weights:
            raise ModelRefError(
                f"model {self.name!r} is a published config without weights (planners and the simulated backend "
                f"only): an emulated run needs weights — use backend: simulated, or model: {{path: DIR}} with a "
                f"local Hugging Face checkpoint of it")

    @property
    def load_arg(self) -> str:
        """What the agents load: a checkpoint path, a registry name, or ``config:{json}`` (explicit
        dims: random seeded weights built from the config by every agent alike)."""
        if self.path or self.name:
            return self.path or self.name  # type: ignore[return-value]
        return CONFIG_PREFIX + json.dumps(self.config.to_dict(), sort_keys=True)

    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_config(self.config, name=self.config.name, weight_format=self.weight_format)

    def to_json(self) -> dict:
        return {"name": self.name, "path": self.path, "seed": self.seed, "config": self.config.to_dict(),
                "weight_format": self.weight_format, "has_weights": self.has_weights,
                "agents_compute": "fp32"}


def resolve_model(choice: ModelChoice, base_dir: Path | None = None) -> ModelRef:
    from node_agent.model.config import REGISTRY, ModelConfig, ModelError, config_from_hf

    fmt = choice.weight_format
    if choice.name is not None:
        if choice.name in SIZE_ONLY:
            return ModelRef(choice.name, None, choice.seed, size_only_config(choice.name), fmt, has_weights=False)
        if choice.name not in REGISTRY:
            raise ModelRefError(f"unknown model {choice.name!r} (known: {', '.join(known_models())})")
        return ModelRef(choice.name, None, choice.seed, REGISTRY[choice.name], fmt)
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
        return ModelRef(None, str(path), choice.seed, cfg, fmt)
    try:
        cfg = ModelConfig.from_dict({"name": "custom", **(choice.dims or {})})
    except (ModelError, TypeError) as exc:
        raise ModelRefError(f"model dims: {exc}") from None
    return ModelRef(None, None, choice.seed, cfg, fmt)

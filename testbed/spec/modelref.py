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
    """The model a choice names; a ``ModelRefError``'s message starts with the field it is about."""
    from node_agent.model.config import REGISTRY

    fmt = choice.weight_format
    if choice.name is not None:
        if choice.name in SIZE_ONLY:
            return ModelRef(choice.name, None, choice.seed, size_only_config(choice.name), fmt, has_weights=False)
        if choice.name not in REGISTRY:
            raise ModelRefError(f"name: unknown model {choice.name!r} (known: {', '.join(known_models())})")
        return ModelRef(choice.name, None, choice.seed, REGISTRY[choice.name], fmt)
    if choice.path is not None:
        return _from_path(choice, base_dir)
    cfg = config_from_dims(choice.dims or {})
    return ModelRef(None, None, choice.seed, cfg, fmt)


def _from_path(choice: ModelChoice, base_dir: Path | None) -> ModelRef:
    from node_agent.model.config import ModelError, config_from_hf

    path = Path(choice.path)
    if not path.is_absolute() and base_dir is not None:
        path = (base_dir / path).resolve()
    if not path.is_dir():
        raise ModelRefError(f"path: {path} {'is not a directory' if path.exists() else 'does not exist'} "
                            "(expected a Hugging Face checkpoint directory)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelRefError(f"path: {path}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        cfg = config_from_hf(json.loads(cfg_file.read_text()), name=path.name)
    except (OSError, ValueError, KeyError, TypeError, ModelError) as exc:
        raise ModelRefError(f"path: {cfg_file}: not a usable config ({type(exc).__name__}: {exc})") from None
    return ModelRef(None, str(path), choice.seed, cfg, choice.weight_format)


MAX_DIM = 1 << 24


def config_from_dims(dims: dict) -> object:
    """A ``ModelConfig`` from explicit dims, each field checked for its type and range first
    (messages start with ``dims.FIELD:``)."""
    import dataclasses

    from node_agent.model.config import ModelConfig, ModelError

    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(dims) - set(fields))
    if unknown:
        raise ModelRefError(f"dims: unknown fields {unknown} (known: {', '.join(sorted(fields))})")
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in dims]
    if missing:
        raise ModelRefError(f"dims: missing fields {missing}")
    for name, value in dims.items():
        _check_dim(name, fields[name].type, value)
    try:
        return ModelConfig.from_dict({"name": "custom", **dims})
    except (ModelError, TypeError, ValueError) as exc:
        raise ModelRefError(f"dims: {exc}") from None


def _check_dim(name: str, kind: str, value) -> None:
    import math

    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelRefError(f"dims.{name}: expected an integer, got {value!r}")
        if not 0 < value <= MAX_DIM:
            raise ModelRefError(f"dims.{name}: expected 1 .. {MAX_DIM} (less than or equal to {MAX_DIM}), got {value}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ModelRefError(f"dims.{name}: expected a finite number > 0, got {value!r}")
    elif kind == "bool" and not isinstance(value, bool):
        raise ModelRefError(f"dims.{name}: expected true or false, got {value!r}")
    elif kind == "str" and not isinstance(value, str):
        raise ModelRefError(f"dims.{name}: expected a string, got {value!r}")

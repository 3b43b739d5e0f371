"""What a partitioner sees: model dimensions and a measured cluster snapshot (no torch, no I/O).

Units are SI inside: bytes, bytes/s, FLOP/s, seconds.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from testbed.core.formats import get_format
from testbed.core.placement import Placement


@dataclass(frozen=True)
class ModelDims:
    """Dimensions a cost model needs; built from node_agent's ModelConfig by ``from_config``."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    bytes_per_param: int = 4
    gated_ffn: bool = False  # SwiGLU (3 matrices) vs GELU MLP (2 matrices)
    tie_embeddings: bool = True  # LM head shares the embedding matrix (source holds V*D once)
    weight_format: str = "fp32"  # testbed.core.formats: sizes of weights, KV elements, activations

    def __post_init__(self):
        get_format(self.weight_format)  # an unknown format fails here, naming the known ones

    @property
    def q_per_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def _sizes(self) -> tuple[float, float, float]:
        if self.weight_format == "fp32":  # the config's own precision (legacy bytes_per_param)
            return (float(self.bytes_per_param),) * 3
        f = get_format(self.weight_format)
        return f.weight_bytes, f.kv_bytes, f.act_bytes

    @property
    def weight_bytes(self) -> float:
        """Bytes per weight of a matrix in ``weight_format``."""
        return self._sizes()[0]

    @property
    def kv_bytes(self) -> float:
        """Bytes per KV-cache element."""
        return self._sizes()[1]

    @property
    def act_bytes(self) -> float:
        """Bytes per activation value sent between devices."""
        return self._sizes()[2]

    @classmethod
    def from_config(cls, cfg, name: str = "", weight_format: str = "fp32") -> "ModelDims":
        """Duck-typed: any object with node_agent ModelConfig's field names."""
        return cls(
            name=name or getattr(cfg, "name", ""),
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            ffn_dim=cfg.ffn_dim,
            vocab_size=cfg.vocab_size,
            bytes_per_param=getattr(cfg, "bytes_per_param", 4),
            gated_ffn=getattr(cfg, "arch", "gpt2") == "llama",
            tie_embeddings=bool(getattr(cfg, "tie_embeddings", True)),
            weight_format=weight_format,
        )


@dataclass(frozen=True)
class DeviceState:
    """One device as measured now."""

    name: str
    mem_limit_bytes: int
    mem_overhead_bytes: int  # charged that is not model blocks (agent runtime, buffers), measured
    flops_per_s: float  # measured (calibration under the current CPU cap) or the profile's, for the model's format
    is_source: bool = False
    up: bool = True
    # fixed seconds per block call beyond FLOPs / speed (dispatch, messages, small ops), measured on
    # working agents by the emulated warm-up (testbed.backends.emulated.warmup); the device
    # profile's figure in simulation (0 for a host without a profile)
    call_overhead_s: float = 0.0
    # sustained memory bandwidth: a block takes max(FLOPs / flops_per_s, bytes read / this) + call
    # (testbed.partition.cost.roofline); inf = FLOPs only (hosts given as a share of this machine)
    mem_bw_bytes_per_s: float = float("inf")

    def flops_for(self, weight_format: str) -> float:
        """The rate for the snapshot's model (resolved for its format when the snapshot was built)."""
        return self.flops_per_s

    @property
    def mem_budget_bytes(self) -> int:
        """Bytes available for model blocks (weights + KV caches) on this device."""
        return max(0, self.mem_limit_bytes - self.mem_overhead_bytes)


@dataclass(frozen=True)
class LinkState:
    """The path between two devices as measured now (bottleneck rate, one-way latency)."""

    bandwidth_bytes_per_s: float
    latency_s: float
    up: bool = True


@dataclass(frozen=True)
class ClusterSnapshot:
    """Input of every partitioner: devices, pairwise paths, the current placement and position."""

    devices: tuple[DeviceState, ...]
    # both orders present; (a, a) absent. A mapping: a dict, or a ``core.paths.PathMatrix`` (arrays)
    paths: Mapping[tuple[str, str], LinkState]
    context_len: int  # T: prompt + tokens generated so far
    tokens_until_next_decision: int
    current: Placement | None = None
    allow_blocks_on_source: bool = False
    # context positions the run still adds after ``context_len`` (the controller: prompt + new
    # tokens - context_len); None = unknown, the run may go on for ever
    tokens_remaining: int | None = None
    # False: a migration ships KV caches only, receivers copy the weights from their own full copy
    # (experiment ``migration: {weights_from: destination}``); projections and FFN pieces move free
    weights_shipped: bool = True

    @property
    def end_context_len(self) -> float:
        """The largest context the run reaches (``inf`` when ``tokens_remaining`` is unknown)."""
        if self.tokens_remaining is None:
            return float("inf")
        return self.context_len + max(0, self.tokens_remaining)

    def amortisation_tokens(self, horizon_tokens: float) -> float:
        """Tokens a migration's delay is spread over: ``horizon_tokens``, but no more than the run
        still generates (a move late in a run must pay for itself before it ends)."""
        if self.tokens_remaining is None:
            return float(horizon_tokens)
        return float(max(1, min(horizon_tokens, self.tokens_remaining)))

    def mem_horizon(self, context_len: float) -> int:
        """``context_len`` capped at the end of generation: memory is never reserved (and no
        placement refused) for KV caches that will not be written."""
        return int(min(context_len, self.end_context_len))

    @property
    def source(self) -> str:
        return next(d.name for d in self.devices if d.is_source)

    def device(self, name: str) -> DeviceState:
        return next(d for d in self.devices if d.name == name)

    def path(self, a: str, b: str) -> LinkState:
        if a == b:
            return LinkState(float("inf"), 0.0)
        return self.paths[(a, b)]

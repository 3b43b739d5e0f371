"""The base of every spec (frozen, strict pydantic models) and the ranges every number is held to.

Shared by the topology/experiment specs (``testbed.spec.schema``) and the scenario items
(``testbed.spec.events``).
"""
from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


# Ranges every number is held to (issue 15 item 2): a value beyond them is a typo or an overflow,
# never a setting (YAML ints are unbounded; ``.inf`` and ``.nan`` are refused by allow_inf_nan)
MAX_TOKENS = 1 << 20  # token counts and indices
MAX_SEED = 2**32 - 1
MAX_REPETITIONS = 1000
MAX_MBPS = 1e6  # 1 Tbit/s
MAX_DELAY_MS = 60_000.0
MAX_MIB = float(1 << 24)  # 16 TiB
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
TokenIndex = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
RESERVED_NETS = tuple(ipaddress.IPv4Network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4",
                                                           "240.0.0.0/4"))


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

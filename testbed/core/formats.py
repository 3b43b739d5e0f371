"""Weight formats: how many bytes a weight, a KV-cache element and an exchanged activation take.

The planner side (block sizes, bytes read per token, transfer and migration sizes) reads these;
node agents always compute in fp32 (a simulated format changes sizes and device time, not the
arithmetic). Layouts are GGUF's (ggml ``block_q8_0``: one fp16 scale + 32 int8 = 34 bytes per 32
weights; ``block_q4_0``: one fp16 scale + 16 bytes of nibbles = 18 bytes per 32 weights).

Choices, stated once here:

- every weight *matrix* (Q/K/V/O, the FFN's up/gate/down, the embedding table and a separate LM
  head) is stored in the format, as a ``--pure`` llama.cpp quantisation keeps them; norms and
  biases stay fp32 as GGUF keeps every 1-D tensor (they are O(D) and the block counts ignore them);
- the KV cache is fp32 for an fp32 model and fp16 otherwise (llama.cpp's default ``f16`` cache);
- activations sent between devices are fp32 / fp16 / bf16 for the float formats and Q8_0 blocks
  (34 bytes per 32 values) for the quantised ones, as distributed-llama's ``q80`` sync buffer.

An fp32 model keeps the legacy ``bytes_per_param`` of its config for all three (a config may say 2).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightFormat:
    name: str
    weight_bytes: float  # bytes per weight of a matrix
    kv_bytes: float  # bytes per KV-cache element
    act_bytes: float  # bytes per activation value sent between devices
    description: str


FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("fp32", 4.0, 4.0, 4.0, "IEEE float32"),
    WeightFormat("fp16", 2.0, 2.0, 2.0, "IEEE float16"),
    WeightFormat("bf16", 2.0, 2.0, 2.0, "bfloat16"),
    WeightFormat("q8_0", 34 / 32, 2.0, 34 / 32, "GGUF Q8_0: fp16 scale + 32 int8 per block of 32"),
    WeightFormat("q4_0", 18 / 32, 2.0, 34 / 32, "GGUF Q4_0: fp16 scale + 32 nibbles per block of 32"),
)}


class UnknownFormat(KeyError):
    pass


def get_format(name: str) -> WeightFormat:
    """The format called ``name``; an unknown name raises naming the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UnknownFormat(f"unknown weight format {name!r} (known: {', '.join(FORMATS)})") from None

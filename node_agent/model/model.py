"""The monolithic model: every block of every layer in one process, composed from the placement
blocks (one AttentionShard with all KV groups, one ProjBlock, one FfnShard with all columns per
layer) sharing storage with the full state dict. Owns `forward` with the KV cache and greedy
`generate`. Note: `prepare_state_dict` gives the matrices of `state_dict` a gemv-friendly memory
layout in place (same logical shapes; some are non-contiguous — call .contiguous() before saving).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .blocks import (AttentionShard, FfnShard, ProjBlock, ffn_combine, ffn_down_bias, prepare_state_dict,
                     source_blocks)
from .config import ModelConfig
from .weights import StateDict, check_state_dict


class Model:
    """A decoder-only LM (gpt2 or llama arch) in fp32 on the CPU."""

    def __init__(self, config: ModelConfig, state_dict: StateDict) -> None:
        check_state_dict(config, state_dict)
        self.config, self.state_dict = config, prepare_state_dict(state_dict)
        self.embedder, self.lm_head = source_blocks(config, state_dict)
        all_groups = list(range(config.n_groups))
        self.attn = [AttentionShard(config, l, all_groups, state_dict, share_storage=True)
                     for l in range(config.n_layers)]
        self.proj = [ProjBlock(config, l, state_dict) for l in range(config.n_layers)]
        self.ffn = [FfnShard(config, l, 0, config.ffn_dim, state_dict, share_storage=True)
                    for l in range(config.n_layers)]
        self.ffn_bias = [ffn_down_bias(config, l, state_dict) for l in range(config.n_layers)]

    @property
    def cached_len(self) -> int:
        return self.attn[0].cache.length

    def reset(self) -> None:
        for a in self.attn:
            a.reset()

    @torch.inference_mode()
    def forward(self, ids: Tensor | Sequence[int], start_pos: int = 0) -> Tensor:
        """Logits (B, T, V) for ids (B, T) (or a flat list = one sequence) at positions
        start_pos..start_pos+T-1. The KV cache is truncated to start_pos first, then extended."""
        if not isinstance(ids, Tensor):
            ids = torch.tensor([list(ids)], dtype=torch.long)
        x = self.embedder(ids, start_pos)  # (B, T, D)
        for l in range(self.config.n_layers):
            h = self.proj[l](self.attn[l](x, start_pos), x)  # (B, T, D)
            x = ffn_combine([self.ffn[l](h)], h, self.ffn_bias[l])  # (B, T, D)
        return self.lm_head(x)  # (B, T, V)

    __call__ = forward

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding from a fresh cache; returns only the new token ids."""
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if len(prompt_ids) + max_new_tokens > self.config.max_positions:
            raise ValueError(f"{len(prompt_ids)} + {max_new_tokens} tokens exceed max_positions "
                             f"{self.config.max_positions}")
        logits = self.forward(list(prompt_ids), 0)  # (1, T, V)
        out: list[int] = []
        pos = len(prompt_ids)
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if len(out) == max_new_tokens:
                break
            logits = self.forward(torch.tensor([[nxt]]), pos)  # (1, 1, V)
            pos += 1
        return out

    def num_params(self) -> int:
        return sum(t.numel() for t in self.state_dict.values())

"""Head-major KV cache for one attention shard: buffers (B, H_kv_local, T_cap, d).

Owns growth (capacity in chunks of tokens, so decoding does not reallocate every step), truncation,
and the per-head slicing used to export, import and drop KV groups. Head-major layout makes the
cache of one KV group a slice along dim 1.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """K and V for `n_heads` local KV heads; `length` tokens are valid."""

    def __init__(self, batch: int, n_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, chunk: int = 64) -> None:
        self.batch, self.n_heads, self.head_dim = batch, n_heads, head_dim
        self.dtype, self.chunk = dtype, chunk
        self.length = 0
        self.k = torch.empty(batch, n_heads, 0, head_dim, dtype=dtype)  # (B, H, T_cap, d)
        self.v = torch.empty(batch, n_heads, 0, head_dim, dtype=dtype)  # (B, H, T_cap, d)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def _reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        cap = -(-max(total, self.capacity + self.chunk) // self.chunk) * self.chunk
        shape = (self.batch, self.n_heads, cap, self.head_dim)
        k, v = torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def truncate(self, length: int) -> None:
        """Forget tokens at positions >= length (used when a forward restarts at start_pos)."""
        if length > self.length:
            raise ValueError(f"cannot truncate cache of length {self.length} to {length}")
        self.length = length

    def append(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, H, T, d) keys/values; return views of all valid K, V: (B, H, length, d)."""
        t = k_new.shape[2]
        self._reserve(self.length + t)
        self.k[:, :, self.length : self.length + t] = k_new  # (B, H, T, d)
        self.v[:, :, self.length : self.length + t] = v_new  # (B, H, T, d)
        self.length += t
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def get_heads(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        """Contiguous copies of the valid cache of local heads `idx`: (B, len(idx), length, d)."""
        k = self.k[:, idx, : self.length].contiguous()  # (B, h, T, d)
        v = self.v[:, idx, : self.length].contiguous()  # (B, h, T, d)
        return k, v

    def add_heads(self, k: Tensor, v: Tensor) -> None:
        """Append heads (B, h, T, d) after the existing ones; T must equal the current length
        unless the cache holds no heads yet (then the cache adopts T)."""
        if self.n_heads == 0:
            self.batch, self.length = k.shape[0], k.shape[2]
        elif k.shape[2] != self.length or k.shape[0] != self.batch:
            raise ValueError(f"imported cache (B={k.shape[0]}, T={k.shape[2]}) does not match "
                             f"(B={self.batch}, T={self.length})")
        cap = -(-max(self.length, 1) // self.chunk) * self.chunk
        h = self.n_heads + k.shape[1]
        nk = torch.empty(self.batch, h, cap, self.head_dim, dtype=self.dtype)  # (B, H+h, T_cap, d)
        nv = torch.empty_like(nk)
        if self.n_heads:
            nk[:, : self.n_heads, : self.length] = self.k[:, :, : self.length]
            nv[:, : self.n_heads, : self.length] = self.v[:, :, : self.length]
        nk[:, self.n_heads :, : self.length] = k.to(self.dtype)
        nv[:, self.n_heads :, : self.length] = v.to(self.dtype)
        self.k, self.v, self.n_heads = nk, nv, h

    def keep_heads(self, idx: list[int]) -> None:
        """Keep only local heads `idx` (in that order); the old buffers are released."""
        cap = -(-self.length // self.chunk) * self.chunk
        nk = torch.empty(self.batch, len(idx), cap, self.head_dim, dtype=self.dtype)  # (B, h, T_cap, d)
        nv = torch.empty_like(nk)
        nk[:, :, : self.length] = self.k[:, idx, : self.length]
        nv[:, :, : self.length] = self.v[:, idx, : self.length]
        self.k, self.v, self.n_heads = nk, nv, len(idx)

    def nbytes_used(self) -> int:
        """Bytes of valid K and V (what the memory model counts)."""
        return 2 * self.batch * self.n_heads * self.length * self.head_dim * self.k.element_size()

    def nbytes_allocated(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

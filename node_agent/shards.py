"""The agent's block store: the model blocks one host holds, built over node_agent.model's block
classes, with a memory budget read from the host's cgroup.

Blocks are built from the full state dict of the model, which the fork server loaded once before
forking (``preload``): children share those pages copy-on-write, so they are charged to the fork
server, and every block here COPIES its slice (norms and W_o included), so a host's cgroup is
charged exactly for the blocks it holds. Migration moves blocks as ``node_agent.serialize``
payloads: a KV group (weights + cache), a projection, or a column piece of an FFN shard; pieces are
assembled into the new shards when the new placement is applied.

Every load or import is checked against ``node_agent.budget.Budget`` first and refused with
``BudgetError`` (bytes needed vs available) instead of letting the kernel OOM-kill the agent.
"""
from __future__ import annotations

import contextlib
import statistics
import os
import time
from typing import Any

import torch
from torch import Tensor

from node_agent.pacing import quantile

from node_agent.model import (AttentionShard, Embedder, FfnShard, LMHead, ModelConfig, ProjBlock, ShardError,
                              load_state, prepare_state_dict)
from node_agent.budget import Budget, return_freed_memory
from node_agent.model.blocks import cat_gemv, group_weights
from node_agent.serialize import tensors_from_bytes, tensors_to_payload
from testbed.core.placement import Placement

IMPORT_SLACK = 128 * 1024  # small tensors and allocator rounding during an import
IMPORT_OVERHEAD = 1.15  # measured import peaks run up to ~12 % above the tensor arithmetic
_STATES: dict[tuple[str, int], tuple[ModelConfig, dict]] = {}


def preload(arg: str, seed: int = 0) -> ModelConfig:
    """Load (once per process) the full state dict; the fork server calls this before forking."""
    key = (str(arg), int(seed))
    if key not in _STATES:
        cfg, sd = load_state(arg, seed)
        _STATES[key] = (cfg, prepare_state_dict(sd))
    return _STATES[key][0]


def model_state(arg: str, seed: int = 0) -> tuple[ModelConfig, dict]:
    preload(arg, seed)
    return _STATES[(str(arg), int(seed))]


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _c(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()  # preserves the (gemv) layout


# ---------------------------------------------------------------------------- the store
class BlockStore:
    """Blocks of one host: attention shards, projections, FFN shards, and the source blocks."""

    def __init__(self, host: str, model_arg: str, seed: int, budget: Budget):
        self.host, self.budget = host, budget
        self.cfg, self._sd = model_state(model_arg, seed)
        self.attn: dict[int, AttentionShard] = {}
        self.proj: dict[int, ProjBlock] = {}
        self.ffn: dict[int, dict[tuple[int, int], FfnShard]] = {}
        self.embedder: Embedder | None = None
        self.lm_head: LMHead | None = None
        self.pending: dict[int, list[tuple[int, int, dict[str, Tensor]]]] = {}
        L = self.cfg.n_layers
        self.ffn_bias = [_c(self._sd.get(f"layers.{l}.w_down.bias")) for l in range(L)]

    # ---- building from the full state -------------------------------------------------------
    def _norms(self, l: int, name: str) -> dict[str, Tensor]:
        p = f"layers.{l}.{name}."
        return {p + k: self._sd[p + k].clone() for k in ("weight", "bias") if p + k in self._sd}

    def _estimate(self, placement: Placement) -> int:
        cfg, p = self.cfg, self.cfg.bytes_per_param
        rows = (cfg.q_per_group + 2) * cfg.head_dim
        total = 0
        for lp in placement.layers:
            total += lp.heads.count(self.host) * rows * (cfg.d_model + 1) * p
            total += (cfg.d_model * cfg.q_dim + cfg.d_model) * p if lp.proj == self.host else 0
            mats = 3 if cfg.arch == "llama" else 2
            total += sum((s.col_end - s.col_start) * (mats * cfg.d_model + 1) * p for s in lp.ffn if s.device == self.host)
        if placement.source == self.host:
            total += _nbytes([self._sd["embed.tok"], self._sd.get("embed.pos"), self._sd.get("lm_head.weight")])
        return total

    def load(self, placement: Placement) -> dict[str, int]:
        """Build exactly the blocks ``placement`` assigns to this host (after dropping all)."""
        self.drop_all()
        need = self._estimate(placement)
        self.budget.check(need, f"loading {need} B of blocks")
        sd = self._sd
        for l, lp in enumerate(placement.layers):
            groups = lp.groups_on(self.host)
            if groups:
                self.attn[l] = AttentionShard(self.cfg, l, groups, {**sd, **self._norms(l, "attn_norm")})
            if lp.proj == self.host:
                p = f"layers.{l}.wo."
                self.proj[l] = ProjBlock(self.cfg, l, {p + "weight": sd[p + "weight"].clone(),
                                                       **({p + "bias": sd[p + "bias"].clone()} if p + "bias" in sd else {})})
            for s in lp.ffn:
                if s.device == self.host:
                    self.ffn.setdefault(l, {})[(s.col_start, s.col_end)] = FfnShard(
                        self.cfg, l, s.col_start, s.col_end, {**sd, **self._norms(l, "ffn_norm")})
        if placement.source == self.host:
            self._load_source()
        return self.block_bytes()

    def _load_source(self) -> None:
        keys = ("embed.tok", "embed.pos", "final_norm.weight", "final_norm.bias", "lm_head.weight")
        own = {k: self._sd[k].clone() for k in keys if k in self._sd}
        self.lm_head = LMHead(self.cfg, own)
        tok = self.lm_head.w if self.cfg.tie_embeddings else own["embed.tok"]
        self.embedder = Embedder(self.cfg, {**own, "embed.tok": tok})

    def drop_all(self) -> None:
        self.attn.clear(), self.proj.clear(), self.ffn.clear(), self.pending.clear()
        self.embedder = self.lm_head = None

    # ---- accounting -------------------------------------------------------------------------
    def block_bytes(self) -> dict[str, int]:
        """Bytes per placement block id held here (weights + KV); source blocks as ``source``."""
        out: dict[str, int] = {}
        for l, a in self.attn.items():
            n = max(1, len(a.groups))
            for g in a.groups:
                out[f"L{l}.H{g}"] = (a.nbytes_weights() + a.nbytes_kv()) // n
        for l, b in self.proj.items():
            out[f"L{l}.proj"] = _nbytes(b.weight_tensors())
        for l, shards in self.ffn.items():
            for (c0, c1), s in shards.items():
                out[f"L{l}.ffn{c0}-{c1}"] = _nbytes(s.weight_tensors())
        if self.lm_head is not None:
            ts = {id(t): t for t in self.lm_head.weight_tensors() + self.embedder.weight_tensors()}
            out["source"] = _nbytes(ts.values())
        return out

    def kv_bytes(self) -> int:
        return sum(a.nbytes_kv() for a in self.attn.values())

    # ---- migration: export ------------------------------------------------------------------
    def export(self, item: dict, weights: bool = True) -> tuple[dict, bytes]:
        """Serialize one migrating item: {kind: head, layer, group} | {kind: proj, layer} |
        {kind: ffn, layer, c0, c1} (a column piece lying inside one local shard).
        ``weights=False`` ships no weights (the receiver copies them from its own full state): a
        head sends its KV cache only, a projection or FFN piece an empty payload."""
        l, kind = int(item["layer"]), item["kind"]
        origin = {"weights": "shipped" if weights else "destination"}
        if kind == "head":
            if l not in self.attn:
                raise ShardError(f"{self.host}: no attention shard of layer {l}")
            return self.attn[l].export_group(int(item["group"]), weights=weights)
        if kind == "proj":
            if l not in self.proj:
                raise ShardError(f"{self.host}: no projection of layer {l}")
            b = self.proj[l]
            t = {k: v for k, v in (("wo", b.wo), ("bo", b.bo)) if v is not None} if weights else {}
            return tensors_to_payload(t, {"kind": "proj", "layer": l, **origin})
        if kind == "ffn":
            c0, c1 = int(item["c0"]), int(item["c1"])
            s = self._ffn_covering(l, c0, c1)
            t = self._ffn_piece(s, c0, c1) if weights else {}
            return tensors_to_payload(t, {"kind": "ffn_piece", "layer": l, "c0": c0, "c1": c1, **origin})
        raise ShardError(f"unknown block kind {kind!r}")

    def _ffn_covering(self, l: int, c0: int, c1: int) -> FfnShard:
        for (a, b), s in self.ffn.get(l, {}).items():
            if a <= c0 and c1 <= b:
                return s
        raise ShardError(f"{self.host}: no FFN shard of layer {l} covers columns [{c0}, {c1})")

    @staticmethod
    def _ffn_piece(s: FfnShard, c0: int, c1: int) -> dict[str, Tensor]:
        a, b = c0 - s.col_start, c1 - s.col_start
        t = {"norm_w": s.norm_w, "w_up": s.w_up[a:b], "w_down": s.w_down[:, a:b]}
        for k, v in (("norm_b", s.norm_b), ("b_up", None if s.b_up is None else s.b_up[a:b]),
                     ("w_gate", None if s.w_gate is None else s.w_gate[a:b])):
            if v is not None:
                t[k] = v
        return t

    def free(self, item: dict) -> None:
        """Drop a block that was handed over. An FFN piece that is a whole local shard goes at once;
        a part of a shard stays until the new placement applies (the shard is rebuilt then).
        No token runs during a migration, so nothing here is needed again."""
        l = int(item["layer"])
        if item["kind"] == "head" and l in self.attn:
            self.attn[l].remove_group(int(item["group"]))
            if not self.attn[l].groups:
                del self.attn[l]
        elif item["kind"] == "proj":
            self.proj.pop(l, None)
        elif item["kind"] == "ffn":
            shards = self.ffn.get(l, {})
            shards.pop((int(item["c0"]), int(item["c1"])), None)
            if not shards:
                self.ffn.pop(l, None)
        return_freed_memory()

    # ---- migration: import ------------------------------------------------------------------
    def import_needed(self, header: dict, payload_len: int) -> int:
        """Bytes an import allocates beyond the (already received, already charged) payload at its
        peak. A KV group is decoded as views of the payload; the shard's new cache is allocated
        while the old one is alive, then each weight tensor is rebuilt one at a time
        (``cat_gemv``, the old cache already freed): peak = max(new cache, the group's cache +
        the largest new weight tensor), checked against measurement in test_import_memory.py.
        A projection or FFN piece is copied out of the payload (and a projection re-laid out):
        once (twice) the payload."""
        meta = header.get("meta", {})
        local = meta.get("weights") == "destination"
        if meta.get("kind") != "kv_group":  # a copy out of the payload (and a projection's re-layout)
            copies = 2 if meta.get("kind") == "proj" else 1
            return copies * (self._local_bytes(meta) if local else payload_len) + IMPORT_SLACK
        sizes = {e["name"]: int(e["nbytes"]) for e in header.get("tensors", [])}
        if local:
            sizes.update(self._local_group_sizes(int(meta["layer"]), int(meta["group"])))
        group_w = {n: b for n, b in sizes.items() if n not in ("k", "v", "norm_w", "norm_b")}
        group_kv = sizes.get("k", 0) + sizes.get("v", 0)
        a = self.attn.get(int(meta["layer"]))
        if a is None:
            return sum(group_w.values()) + 2 * group_kv + sizes.get("norm_w", 0) + sizes.get("norm_b", 0) + IMPORT_SLACK
        per_head_alloc = a.cache.nbytes_allocated() // max(1, len(a.groups))
        new_cache = a.cache.nbytes_allocated() + max(per_head_alloc, group_kv)  # (B, H+1, T_cap, d) x2
        largest_w = max((a.w[n].numel() * a.w[n].element_size() + b for n, b in group_w.items() if n in a.w), default=0)
        # the old cache is freed before the weights are rebuilt: the two peaks do not add up
        tensors = max(new_cache, max(per_head_alloc, group_kv) + largest_w)
        return int(tensors * IMPORT_OVERHEAD) + IMPORT_SLACK

    def _local_group_sizes(self, l: int, g: int) -> dict[str, int]:
        """Bytes of one group's weight tensors as ``export_group`` would ship them."""
        return {n: t.numel() * t.element_size() for n, t in group_weights(self.cfg, l, self._sd, g).items()}

    def _local_bytes(self, meta: dict) -> int:
        """Bytes of a projection or FFN piece built from this host's own state (a KV-only import)."""
        return _nbytes(self._local_tensors(meta).values())

    def _local_tensors(self, meta: dict) -> dict[str, Tensor]:
        """What a projection / FFN piece export would have shipped, as views of the full state."""
        l = int(meta["layer"])
        if meta["kind"] == "proj":
            p = f"layers.{l}.wo."
            return {"wo": self._sd[p + "weight"], **({"bo": self._sd[p + "bias"]} if p + "bias" in self._sd else {})}
        c0, c1 = int(meta["c0"]), int(meta["c1"])
        return self._ffn_piece(FfnShard(self.cfg, l, c0, c1, self._sd, share_storage=True), c0, c1)

    def import_(self, header: dict, payload: bytes) -> str:
        meta = header.get("meta", {})
        kind, l = meta.get("kind"), int(meta.get("layer", -1))
        self.budget.check(self.import_needed(header, len(payload)), f"importing {kind} of layer {l} ({len(payload)} B)",
                          transient=True)
        local = meta.get("weights") == "destination"
        if kind == "kv_group":
            own = self._sd if local else None
            if l in self.attn:
                self.attn[l].import_group(header, payload, own)
            else:
                self.attn[l] = AttentionShard.from_export(self.cfg, header, payload, own)
            return f"L{l}.H{meta['group']}"
        if local and kind in ("proj", "ffn_piece"):
            t = {k: v.clone() for k, v in self._local_tensors(meta).items()}  # this host's own copy
        else:
            t = tensors_from_bytes(header, payload)
        if kind == "proj":
            p = f"layers.{l}.wo."
            self.proj[l] = ProjBlock(self.cfg, l, {p + "weight": t["wo"], **({p + "bias": t["bo"]} if "bo" in t else {})})
            return f"L{l}.proj"
        if kind == "ffn_piece":
            self.pending.setdefault(l, []).append((int(meta["c0"]), int(meta["c1"]), t))
            return f"L{l}.ffn{meta['c0']}-{meta['c1']}"
        raise ShardError(f"cannot import block kind {kind!r}")

    # ---- switching to a new placement -------------------------------------------------------
    def apply(self, placement: Placement) -> None:
        """Keep exactly what ``placement`` assigns here: assemble new FFN shards, drop the rest."""
        for l, lp in enumerate(placement.layers):
            mine = set(lp.groups_on(self.host))
            a = self.attn.get(l)
            have = set(a.groups) if a else set()
            if mine - have:
                raise ShardError(f"{self.host}: layer {l} groups {sorted(mine - have)} were never received")
            for g in have - mine:
                a.remove_group(g)
            if a is not None and not a.groups:
                del self.attn[l]
            if lp.proj == self.host and l not in self.proj:
                raise ShardError(f"{self.host}: projection of layer {l} was never received")
            if lp.proj != self.host:
                self.proj.pop(l, None)
            self._apply_ffn(l, [(s.col_start, s.col_end) for s in lp.ffn if s.device == self.host])
        self.pending.clear()
        if placement.source != self.host:
            self.embedder = self.lm_head = None

    def _apply_ffn(self, l: int, wanted: list[tuple[int, int]]) -> None:
        old = self.ffn.get(l, {})
        new: dict[tuple[int, int], FfnShard] = {}
        for c0, c1 in wanted:
            new[(c0, c1)] = old[(c0, c1)] if (c0, c1) in old else self._assemble(l, c0, c1, old)
        if new:
            self.ffn[l] = new
        else:
            self.ffn.pop(l, None)

    def _assemble(self, l: int, c0: int, c1: int, old: dict[tuple[int, int], FfnShard]) -> FfnShard:
        pieces = [(a, b, t) for a, b, t in self.pending.get(l, []) if c0 <= a and b <= c1]
        for (a, b), s in old.items():
            lo, hi = max(a, c0), min(b, c1)
            if lo < hi and not any(pa <= lo < pb for pa, pb, _ in pieces):
                pieces.append((lo, hi, self._ffn_piece(s, lo, hi)))
        pieces.sort(key=lambda x: x[0])
        pos = c0
        for a, b, _ in pieces:
            if a != pos:
                raise ShardError(f"{self.host}: layer {l} FFN columns [{c0}, {c1}) incomplete at {pos}")
            pos = b
        if pos != c1:
            raise ShardError(f"{self.host}: layer {l} FFN columns [{c0}, {c1}) incomplete at {pos}")
        ts = [t for _, _, t in pieces]
        p = f"layers.{l}."
        w = {p + "ffn_norm.weight": ts[0]["norm_w"].clone()}
        if "norm_b" in ts[0]:
            w[p + "ffn_norm.bias"] = ts[0]["norm_b"].clone()
        names = (("w_up", p + "w_up.weight", 0), ("b_up", p + "w_up.bias", 0), ("w_gate", p + "w_gate.weight", 0),
                 ("w_down", p + "w_down.weight", 1))
        for piece_key, key, dim in names:  # one tensor at a time; imported pieces released as used
            if piece_key in ts[0]:
                w[key] = cat_gemv([t.pop(piece_key) for t in ts], dim=dim)
        del ts, pieces
        shard = FfnShard(self.cfg, l, 0, c1 - c0, w, share_storage=True)  # w is already its own copy
        shard.col_start, shard.col_end = c0, c1  # built from the piece, then labelled with its columns
        return shard

    def state_summary(self) -> dict[str, Any]:
        return {"blocks": self.block_bytes(), "kv_bytes": self.kv_bytes(), "pid": os.getpid()}


def calibrate(cfg, seconds: float = 0.3, context: int = 32, pacer=None) -> dict:
    """FLOP/s of this agent, under its CPU cap and through its ``pacer`` (``node_agent.pacing``), on
    decode-shaped work: one whole layer of ``cfg`` (all groups, W_o, all FFN columns: three block
    calls) decoding one token at ``context``, built over the fork server's shared weights (nothing
    is copied, so nothing is charged). Work is counted by ``call_work``, as the cost models and the
    pacer's device clock count it. Without a model: 256x256 matrix-vector products. Also reported:
    the full-speed rate (FLOPs over the thread's CPU time) and the spread of the step times."""
    from node_agent.model import AttentionShard, FfnShard, ProjBlock
    from testbed.core.snapshot import ModelDims
    from testbed.partition.cost.blocks import call_work

    if cfg is None or not hasattr(cfg, "n_groups"):
        w, x = torch.randn(256, 256), torch.randn(1, 256)
        step, flops, nbytes, calls = (lambda: torch.tanh(x @ w)), 2.0 * 256 * 256, 4.0 * 256 * 256, 1
    else:
        sd = next(s for c, s in _STATES.values() if c == cfg)
        attn = AttentionShard(cfg, 0, list(range(cfg.n_groups)), sd, share_storage=True)
        proj, ffn = ProjBlock(cfg, 0, sd), FfnShard(cfg, 0, 0, cfg.ffn_dim, sd, share_storage=True)
        attn(torch.randn(1, context, cfg.d_model), 0)
        x = torch.randn(1, 1, cfg.d_model)

        def step():
            h = proj(attn(x, context), x)
            return ffn(h)
        dims = ModelDims.from_config(cfg)
        work = [call_work(dims, "attn", groups=cfg.n_groups, context_len=context + 1),
                call_work(dims, "proj"), call_work(dims, "ffn", cols=cfg.ffn_dim)]
        flops, nbytes, calls = sum(w[0] for w in work), sum(w[1] for w in work), 3
    for _ in range(3):
        step()
    pace = (lambda kind: pacer.paced(kind, flops, nbytes, calls)) if pacer is not None else (
        lambda kind: contextlib.nullcontext())
    n, times, cpu0, t0 = 0, [], time.thread_time(), time.perf_counter()
    while True:
        s0 = time.perf_counter()
        with pace("calibrate"):
            step()
        times.append(time.perf_counter() - s0)
        n += 1
        el = time.perf_counter() - t0
        if el >= seconds and n >= 5:
            break
    cpu = time.thread_time() - cpu0
    med = statistics.median(times)
    return {"flops_per_s": flops * n / el, "full_speed_flops_per_s": flops * n / cpu if cpu > 0 else None,
            "iterations": n, "seconds": el, "step_median_s": med,
            "step_p95_over_median": quantile(times, 0.95) / med if med > 0 else None,
            "speed": getattr(pacer, "speed", None), "pacing": getattr(pacer, "mode", None),
            "device_step_s": pacer.clock.time_s(flops, nbytes, calls) if getattr(pacer, "clock", None) else None,
            "work": "decode layer" if cfg is not None else "gemv 256"}

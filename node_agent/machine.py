"""What ONE core of this machine does on a model's real decode blocks: its roofline.

``machine_roofline(cfg)`` measures, on the worker-thread configuration the agents use (one torch
thread), three figures of the roofline ``time = max(FLOPs / flops_per_s, bytes / bytes_per_s) +
call_s`` that ``node_agent.pacing.DeviceClock`` evaluates:

- ``flops_per_s``: a cache-resident square matmul (compute-bound, the ceiling of the roofline);
- ``bytes_per_s`` and ``call_s``: a least-squares line ``cpu_time = call_s + bytes / bytes_per_s``
  through the median CPU times of the model's own block calls — every layer's attention (all KV
  groups and one group), W_o, and FFN (all columns and a quarter) — run layer after layer as a
  decode runs them, so each call streams its weights from memory rather than reading what the
  previous call left in the cache (a layer of gpt2-small alone runs 2x faster than inside a decode
  that streams all twelve: 0.45 vs 0.9 ms here).

The per-call residuals of the fit are reported: they say how well a roofline describes this
machine for this model. Work is counted by ``testbed.partition.cost.blocks.call_work``, the numbers
the cost models use. Views of the shared state dict, nothing copied.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from node_agent.model import AttentionShard, FfnShard, ProjBlock
from testbed.core.snapshot import ModelDims
from testbed.partition.cost.blocks import call_work

CONTEXT = 32  # positions cached in the measured attention calls


def peak_flops_per_s(n: int = 384, seconds: float = 0.2) -> float:
    """A compute-bound (n x n) @ (n x n) fp32 matmul on this thread, by its CPU time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    calls, cpu0 = 0, time.thread_time()
    while time.thread_time() - cpu0 < seconds or calls < 5:
        a @ b
        calls += 1
    return 2.0 * n ** 3 * calls / (time.thread_time() - cpu0)


def _layer_calls(cfg, sd: dict, layer: int, dims: ModelDims) -> list[tuple[str, tuple, callable]]:
    """The measured calls of one layer: (label, (FLOPs, bytes), fn)."""
    G, F = cfg.n_groups, cfg.ffn_dim
    attn_all = AttentionShard(cfg, layer, list(range(G)), sd, share_storage=True)
    attn_one = AttentionShard(cfg, layer, [0], sd, share_storage=True)
    for a in (attn_all, attn_one):
        a(torch.randn(1, CONTEXT - 1, cfg.d_model), 0)  # (1, T, D) fills the cache
    proj = ProjBlock(cfg, layer, sd)
    ffn_all = FfnShard(cfg, layer, 0, F, sd, share_storage=True)
    ffn_q = FfnShard(cfg, layer, 0, max(1, F // 4), sd, share_storage=True)
    x, ho = torch.randn(1, 1, cfg.d_model), torch.randn(1, 1, cfg.q_dim)  # (1, 1, D), (1, 1, H·d)
    w = lambda kind, **kw: call_work(dims, kind, context_len=CONTEXT, **kw)  # noqa: E731
    return [("attn-all", w("attn", groups=G), lambda: attn_all(x, CONTEXT - 1)),
            ("attn-one", w("attn", groups=1), lambda: attn_one(x, CONTEXT - 1)),
            ("proj", w("proj"), lambda: proj(ho, x)),
            ("ffn-all", w("ffn", cols=F), lambda: ffn_all(x)),
            ("ffn-quarter", w("ffn", cols=max(1, F // 4)), lambda: ffn_q(x))]


def machine_roofline(cfg, sd: dict, rounds: int = 3) -> dict:
    """This machine's one-core roofline on ``cfg``'s blocks (see the module docstring)."""
    dims = ModelDims.from_config(cfg)
    layers = [_layer_calls(cfg, sd, l, dims) for l in range(cfg.n_layers)]
    samples: dict[str, list[float]] = {}
    work: dict[str, tuple] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for calls in layers:  # layer after layer, as a decode streams them
                for label, fb, fn in calls:
                    c0 = time.thread_time()
                    fn()
                    samples.setdefault(label, []).append(time.thread_time() - c0)
                    work[label] = fb
    labels = sorted(samples)
    t = np.array([np.median(samples[k]) for k in labels])  # (kinds,) median CPU seconds
    nbytes = np.array([work[k][1] for k in labels])
    slope, call_s = np.polyfit(nbytes, t, 1)
    bytes_per_s = 1.0 / slope if slope > 0 else float(nbytes.max() / t.max())
    call_s = max(0.0, float(call_s))
    peak = peak_flops_per_s()
    fit = {k: {"measured_s": float(t[i]), "fitted_s": max(work[k][0] / peak, nbytes[i] / bytes_per_s) + call_s,
               "flops": work[k][0], "bytes": float(nbytes[i])} for i, k in enumerate(labels)}
    worst = max(abs(v["fitted_s"] / v["measured_s"] - 1.0) for v in fit.values())
    return {"flops_per_s": peak, "bytes_per_s": float(bytes_per_s), "call_s": call_s,
            "fit": fit, "worst_fit_error": worst, "layers": cfg.n_layers, "rounds": rounds, "model": cfg.name}

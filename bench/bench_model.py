"""Model benchmarks, measured side by side in one run on the same threads:

1. monolithic decode-step time of our Model vs HF transformers (same weights, KV cache on both) for
   gpt2-small (random weights) and smollm2-135m — printed as ours/HF (target ≤ 1.0×);
2. per-block compute time for one decode token at a given context length vs the whole layer.

Usage: python bench/bench_model.py [--threads 2] [--context 128] [--steps 40] [--models gpt2-small smollm2-135m]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from node_agent.model import AttentionShard, FfnShard, Model, ProjBlock, ffn_combine, load_model
from node_agent.model.hf_compat import to_transformers


def _median_ms(fn, reps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


@torch.inference_mode()
def ours_decode_ms(m: Model, prompt: list[int], steps: int) -> float:
    m.forward(prompt, 0)
    pos, tok, ts = len(prompt), torch.tensor([[1]]), []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = m.forward(tok, pos)  # (1, 1, V)
        ts.append(time.perf_counter() - t0)
        tok, pos = logits[:, -1].argmax(-1, keepdim=True), pos + 1
    return 1e3 * statistics.median(ts[3:])


@torch.inference_mode()
def hf_decode_ms(hf, prompt: list[int], steps: int) -> float:
    out = hf(input_ids=torch.tensor([prompt]), use_cache=True)
    past, tok, ts = out.past_key_values, torch.tensor([[1]]), []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = hf(input_ids=tok, past_key_values=past, use_cache=True)
        ts.append(time.perf_counter() - t0)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return 1e3 * statistics.median(ts[3:])


def bench_decode(name: str, context: int, steps: int) -> None:
    m = load_model(name)
    prompt = [(7 * i + 3) % m.config.vocab_size for i in range(context)]
    hf = to_transformers(m.config, m.state_dict, attn_implementation="sdpa")
    rows = []
    for _ in range(2):  # alternate to spread drift over both
        rows.append((ours_decode_ms(m, prompt, steps), hf_decode_ms(hf, prompt, steps)))
    ours, theirs = min(r[0] for r in rows), min(r[1] for r in rows)
    print(f"{name:14s} context={context:4d}  ours {ours:7.2f} ms  HF {theirs:7.2f} ms  ratio {ours / theirs:5.2f}x")
    bench_blocks(m, context)


@torch.inference_mode()
def bench_blocks(m: Model, context: int, reps: int = 200) -> None:
    cfg, sd, l = m.config, m.state_dict, 0
    x_pre = torch.randn(1, context, cfg.d_model)  # (1, T, D)
    x = torch.randn(1, 1, cfg.d_model)  # (1, 1, D)
    one = AttentionShard(cfg, l, [0], sd)
    allg = AttentionShard(cfg, l, list(range(cfg.n_groups)), sd)
    proj = ProjBlock(cfg, l, sd)
    ffn, half = FfnShard(cfg, l, 0, cfg.ffn_dim, sd), FfnShard(cfg, l, 0, cfg.ffn_dim // 2, sd)
    bias = sd.get(f"layers.{l}.w_down.bias")
    one(x_pre, 0)
    allg(x_pre, 0)
    head_out = allg(x, context)  # (1, 1, H·d)

    def layer():
        h = proj(allg(x, context), x)
        return ffn_combine([ffn(h)], h, bias)

    t_layer = _median_ms(layer, reps)
    rows = [("head block (1 KV group)", _median_ms(lambda: one(x, context), reps)),
            (f"all {cfg.n_groups} groups, one shard", _median_ms(lambda: allg(x, context), reps)),
            ("proj block", _median_ms(lambda: proj(head_out, x), reps)),
            ("ffn block (all columns)", _median_ms(lambda: ffn(x), reps)),
            ("ffn shard (half columns)", _median_ms(lambda: half(x), reps)),
            ("whole layer", t_layer)]
    print(f"  per-block decode time, layer {l}, context {context}:")
    for label, ms in rows:
        print(f"    {label:30s} {ms * 1e3:8.1f} us   {ms / t_layer:6.1%} of layer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--models", nargs="+", default=["gpt2-small", "smollm2-135m"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}")
    for name in args.models:
        bench_decode(name, args.context, args.steps)


if __name__ == "__main__":
    main()

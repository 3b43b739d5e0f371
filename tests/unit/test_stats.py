"""testbed.run.stats against hand-computed values and an independent numerical t quantile; the
summary fold never holds NaN and classifies memory failures."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from testbed.run import stats
from testbed.run.events import TOKEN_COLUMNS, fold_summary, memory_ran_out


def _t_quantile_numeric(df: float, q: float = 0.975) -> float:
    """Quantile of Student's t by integrating its density (trapezoid, fine grid) and bisecting."""
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 40_001)
        pdf = np.exp(logc - (df + 1) / 2 * np.log1p(grid ** 2 / df))
        return 0.5 + float(np.sum((pdf[1:] + pdf[:-1]) * np.diff(grid)) / 2)

    lo, hi = 0.0, 20.0
    for _ in range(36):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("df", [1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 2.75, 3, 3.5, 4, 4.5, 5, 7, 10, 15, 20, 30, 60, 120])
def test_table_matches_numerical_quantile(df):
    assert stats.t_critical(df) == pytest.approx(_t_quantile_numeric(df), abs=2e-4)


@pytest.mark.parametrize("df", [1.1, 1.4, 1.9, 2.6, 3.2, 3.8, 4.2, 4.8, 5.5, 7.3, 12.5, 35.0, 45.0, 90.0, 500.0, 1000.0])
def test_fractional_df_interpolated_within_0_4_pct(df):
    assert stats.t_critical(df) == pytest.approx(_t_quantile_numeric(df), rel=4e-3)


def test_t_critical_limits():
    assert stats.t_critical(1e9) == pytest.approx(1.96, abs=1e-4)
    with pytest.raises(ValueError, match="degrees of freedom must be >= 1, got 0.5"):
        stats.t_critical(0.5)


def test_ci_of_known_sample_by_hand():
    # 1..5: mean 3, s = sqrt(2.5), se = s / sqrt(5) = 0.707107, t(0.975, 4) = 2.7764 -> half 1.963211
    ci = stats.mean_ci95([1, 2, 3, 4, 5])
    assert ci.n == 5 and ci.mean == 3.0
    assert ci.half_width == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), rel=1e-9)
    assert ci.half_width == pytest.approx(1.963211, abs=1e-6)
    assert (ci.low, ci.high) == pytest.approx((1.036789, 4.963211), abs=1e-6)
    # two values 10, 12: mean 11, s = sqrt(2), se = 1, t(1) = 12.7062
    ci2 = stats.mean_ci95([10.0, 12.0])
    assert (ci2.low, ci2.high) == pytest.approx((11 - 12.7062, 11 + 12.7062))


def test_ci_needs_two_finite_values():
    assert stats.mean_ci95([3.0]) is None
    assert stats.mean_ci95([3.0, float("nan"), None]) is None
    assert stats.mean_ci95([3.0, float("inf"), 5.0]).mean == 4.0  # non-finite entries dropped


def test_describe():
    d = stats.describe([4.0, 1.0, 3.0, 2.0, float("nan")])
    assert d == {"mean": 2.5, "p50": 2.5, "p95": pytest.approx(3.85), "n": 4}
    assert stats.describe([]) == {"mean": None, "p50": None, "p95": None, "n": 0}


def test_welch_significant_by_hand():
    # diff -5, var/n 0.5 each, se 1, t -5, df = 1 / (0.25/4 + 0.25/4) = 8, t_crit(8) = 2.3060
    w = stats.welch([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    assert w.verdict == stats.SIGNIFICANT
    assert (w.diff, w.t, w.df, w.t_crit) == pytest.approx((-5.0, -5.0, 8.0, 2.3060))


def test_welch_within_noise_by_hand():
    # diff -0.5, var/n 1/3 each, t = -0.5 / sqrt(2/3) = -0.6124, df 4, t_crit 2.7764
    w = stats.welch([1, 2, 3], [1.5, 2.5, 3.5])
    assert w.verdict == stats.WITHIN_NOISE
    assert w.t == pytest.approx(-0.61237, abs=1e-5) and w.df == pytest.approx(4.0)


def test_welch_deterministic_and_untestable():
    assert stats.welch([2, 2, 2], [3, 3]).verdict == stats.SIGNIFICANT
    assert stats.welch([2, 2], [2, 2, 2]).verdict == stats.WITHIN_NOISE
    w = stats.welch([1.0], [2.0, 3.0])
    assert w.verdict == stats.NOT_TESTABLE and "got 1 and 2" in w.reason
    one_sided = stats.welch([2, 2, 2], [1, 2, 3])  # zero spread on one side: df = n_b - 1
    assert one_sided.df == pytest.approx(2.0)


def _tokens(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{c: r.get(c, 0) for c in TOKEN_COLUMNS} for r in rows])


def _rows(algo: str, rep: int, lats: list[float], prompt: int = 4) -> list[dict]:
    out = [{"algorithm": algo, "repetition": rep, "token_index": 0, "context_len": prompt, "latency_s": 0.5,
            "phase": "prefill"}]
    out += [{"algorithm": algo, "repetition": rep, "token_index": i, "context_len": prompt + i, "latency_s": v,
             "phase": "decode"} for i, v in enumerate(lats, 1)]
    return out


def test_fold_summary_nan_latency_is_a_failure_never_nan():
    tokens = _tokens(_rows("a", 0, [0.1, float("nan"), 0.3]))
    events = [{"type": "algorithm_started", "algorithm": "a", "repetition": 0},
              {"type": "repetition_done", "algorithm": "a", "repetition": 0, "failed": False,
               "peak_mem_bytes": {"h1": 10, "h2": float("nan")}}]
    s = fold_summary(tokens, events, "a", "h1")
    text = json.dumps(s, allow_nan=False)  # raises on any NaN/inf
    assert "NaN" not in text
    assert s["failed"] and "non-finite latency at token 2" in s["failure"]
    assert s["mean_token_latency_s"] == pytest.approx(0.2)
    assert s["latency_ci95_s"] is None and "1 repetition(s)" in s["null_reasons"]["latency_ci95_s"]


def test_fold_summary_context_reached_where_memory_ran_out():
    tokens = _tokens(_rows("a", 0, [0.1] * 5) + _rows("a", 1, [0.1] * 3))
    events = [{"type": "algorithm_started", "algorithm": "a", "repetition": 0},
              {"type": "repetition_done", "algorithm": "a", "repetition": 0, "peak_mem_bytes": {"h2": 100}},
              {"type": "algorithm_started", "algorithm": "a", "repetition": 1},
              {"type": "algorithm_failed", "algorithm": "a", "repetition": 1, "token_index": 4,
               "reason": "OOM on h2: needs 300 bytes, limit 200"},
              {"type": "repetition_done", "algorithm": "a", "repetition": 1, "peak_mem_bytes": {"h2": 300}}]
    s = fold_summary(tokens, events, "a")
    assert s["memory_ran_out"] and s["failed"]
    # repetition 1 produced 4 tokens (prefill + 3 decode) on a 4-token prompt: context 8
    assert s["context_reached"] == {"repetition": 1, "tokens_generated": 4, "context_len": 8}
    assert s["peak_mem_bytes"] == {"h2": 300} and s["max_peak_mem_bytes"] == 300
    assert s["peak_memory"]["mean_bytes"] == 200.0 and s["peak_memory"]["ci95_bytes"]["n"] == 2
    assert [r["max_peak_mem_bytes"] for r in s["per_repetition"]] == [100, 300]
    assert [r["max_worker_peak_mem_bytes"] for r in s["per_repetition"]] == [100, 300]  # no source given


@pytest.mark.parametrize("reason, oom_event, expected", [
    ("OOM on h3: needs 1 bytes, limit 0", False, True),
    ("infeasible: 12.5 MiB short on every device", False, True),
    ("infeasible: no device may hold blocks (all down, or only the source, which is excluded)", False, False),
    ("a block is on an unreachable or stopped host (infinite latency)", False, False),
    ("agent exited", True, True),
])
def test_memory_ran_out(reason, oom_event, expected):
    assert memory_ran_out(reason, oom_event) is expected

"""Statistics over repetitions: describe a sample, a Student-t 95 % confidence interval of its mean,
and Welch's t-test between two samples at the 5 % level. Pure functions of numbers, no I/O.

scipy is not installed here, so the two-sided 95 % critical values of Student's t come from a table
(``T975``, the 0.975 quantile at integer df and a few fractional ones below 5, checked in the tests
against a numerical integration of the t density). Degrees of freedom between rows (Welch's df is
fractional) are interpolated linearly in (1/df, log t): within 0.4 % of the numerical quantile for df
from 1 to 1000 (worst, +0.33 %, just above df 1: slightly conservative), held by the tests.

Definitions (docs/experiments.md, "Statistics"):
- ``mean_ci95``: n samples (per-repetition means), mean m, sample standard deviation s (ddof 1);
  the interval is m ± t(0.975, n−1)·s/√n. Needs n ≥ 2.
- ``welch``: two samples a, b; t = (mean a − mean b)/√(s_a²/n_a + s_b²/n_b), Welch–Satterthwaite df;
  the difference is *significant* when |t| > t(0.975, df), else *within noise*. With no spread in
  either sample (a deterministic backend) the difference is significant exactly when the means
  differ. Needs n ≥ 2 on both sides, otherwise the verdict is *not testable*.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# df -> t(0.975, df); math.inf -> the normal quantile
T975: dict[float, float] = {
    1: 12.7062, 1.25: 8.0280, 1.5: 6.0167, 1.75: 4.9488, 2: 4.3027, 2.25: 3.8755, 2.5: 3.5747, 2.75: 3.3525,
    3.5: 2.9401, 4.5: 2.6589, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622,
    10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314, 16: 2.1199, 17: 2.1098,
    18: 2.1009, 19: 2.0930, 20: 2.0860, 21: 2.0796, 22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0595,
    26: 2.0555, 27: 2.0518, 28: 2.0484, 29: 2.0452, 30: 2.0423, 40: 2.0211, 50: 2.0086, 60: 2.0003,
    80: 1.9901, 100: 1.9840, 120: 1.9799, math.inf: 1.9600,
}
_DFS = sorted(T975)

SIGNIFICANT, WITHIN_NOISE, NOT_TESTABLE = "significant", "within noise", "not testable"


def t_critical(df: float) -> float:
    """Two-sided 95 % critical value of Student's t with ``df`` (≥ 1, may be fractional) degrees of freedom."""
    if not df >= 1:
        raise ValueError(f"t_critical: degrees of freedom must be >= 1, got {df}")
    if df in T975:
        return T975[df]
    hi = next(d for d in _DFS if d > df)
    lo = max(d for d in _DFS if d < df)
    x, x0 = 1.0 / df, 1.0 / lo
    x1 = 0.0 if math.isinf(hi) else 1.0 / hi
    y0, y1 = math.log(T975[lo]), math.log(T975[hi])
    return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def finite(values) -> np.ndarray:
    """The finite entries of ``values`` as a float array (None, NaN and ±inf dropped)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return arr[np.isfinite(arr)]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    half_width: float
    n: int

    def to_json(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "half_width": self.half_width,
                "n": self.n, "method": "student_t_95"}


def mean_ci95(sample) -> Interval | None:
    """Student-t 95 % interval of the mean of ``sample``; None with fewer than two finite values."""
    x = finite(sample)
    if x.size < 2:
        return None
    m = float(x.mean())
    half = t_critical(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(m, m - half, m + half, half, int(x.size))


def describe(sample) -> dict:
    """mean, p50, p95 (numpy's linear percentile) and n of the finite values; None fields when empty."""
    x = finite(sample)
    if not x.size:
        return {"mean": None, "p50": None, "p95": None, "n": 0}
    return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p95": float(np.percentile(x, 95)),
            "n": int(x.size)}


@dataclass(frozen=True)
class Welch:
    verdict: str  # SIGNIFICANT, WITHIN_NOISE or NOT_TESTABLE
    diff: float | None  # mean a - mean b
    t: float | None
    df: float | None
    t_crit: float | None
    reason: str

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "diff": self.diff, "t": self.t, "df": self.df, "t_crit": self.t_crit,
                "reason": self.reason, "test": "welch_t_5pct"}


def welch(a, b) -> Welch:
    """Welch's two-sided t-test of equal means at the 5 % level (module docstring)."""
    xa, xb = finite(a), finite(b)
    if xa.size < 2 or xb.size < 2:
        return Welch(NOT_TESTABLE, _diff(xa, xb), None, None, None,
                     f"needs >= 2 repetitions on each side, got {xa.size} and {xb.size}")
    diff = float(xa.mean() - xb.mean())
    va, vb = float(xa.var(ddof=1)) / xa.size, float(xb.var(ddof=1)) / xb.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        verdict = SIGNIFICANT if diff != 0.0 else WITHIN_NOISE
        return Welch(verdict, diff, None, None, None, "no spread across repetitions (deterministic)")
    t = diff / se
    df = (va + vb) ** 2 / ((va ** 2 / (xa.size - 1) if va else 0.0) + (vb ** 2 / (xb.size - 1) if vb else 0.0))
    crit = t_critical(max(1.0, df))
    verdict = SIGNIFICANT if abs(t) > crit else WITHIN_NOISE
    return Welch(verdict, diff, t, df, crit, f"|t| = {abs(t):.2f} {'>' if abs(t) > crit else '<='} {crit:.2f}")


def _diff(xa: np.ndarray, xb: np.ndarray) -> float | None:
    return float(xa.mean() - xb.mean()) if xa.size and xb.size else None

"""analysis.regime_points: the statistics behind the emulated-vs-simulated table."""
import pytest

from analysis.regime_points import mean_ci, welch_diff


def test_mean_ci_by_hand():
    m, h = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])  # sd 1.5811, n 5, t(4) 2.776
    assert m == 3.0 and h == pytest.approx(2.776 * 1.5811388 / 5 ** 0.5, rel=1e-3)
    assert mean_ci([2.0]) == (2.0, 0.0)


def test_welch_difference_separates_or_not():
    far = welch_diff([1.0, 1.1, 0.9, 1.0, 1.05], [2.0, 2.1, 1.9, 2.05, 2.0])
    assert far[0] == pytest.approx(-1.0, abs=0.02) and far[1] < 0.2  # significant: |diff| > half-width
    near = welch_diff([1.0, 1.3, 0.8, 1.1, 0.9], [1.05, 0.85, 1.25, 1.0, 1.1])
    assert abs(near[0]) < near[1]  # within noise
    assert welch_diff([1.0], [2.0, 3.0]) is None

"""Wilson intervals against textbook values; the cluster bootstrap is seeded and resamples whole tasks."""

import pytest

from tasks.quality.stats import bootstrap_interval, paired_difference_interval, pooled_mean, wilson_interval


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (5, 10, 0.2366, 0.7634),
        (58, 100, 0.4821, 0.6720),
        (1, 1, 0.2065, 1.0),
    ],
)
def test_wilson_interval(successes: int, n: int, low: float, high: float) -> None:
    interval = wilson_interval(successes, n)
    assert interval is not None
    assert interval[0] == pytest.approx(low, abs=1e-4) and interval[1] == pytest.approx(high, abs=1e-4)


def test_wilson_interval_edge_cases() -> None:
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match=r"within 0\.\.n"):
        wilson_interval(3, 2)


def test_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    clusters = [[(i * 7 % 40) / 39] for i in range(40)]  # 0 .. 1 in steps of 1/39, mean 0.5
    first = bootstrap_interval(clusters, seed=3)
    assert first == bootstrap_interval(clusters, seed=3)
    assert first != bootstrap_interval(clusters, seed=4)
    assert first is not None and 0.35 < first[0] < 0.5 < first[1] < 0.65
    assert bootstrap_interval([[0.25], [0.25, 0.25]]) == (0.25, 0.25)
    assert bootstrap_interval([]) is None
    assert bootstrap_interval([[], []]) is None  # the statistic is never defined


def test_bootstrap_resamples_whole_tasks() -> None:
    # One task with many lines: a resample holds it entirely or not at all, so the interval is wide.
    clusters = [[1.0] * 20, [0.0], [0.0], [0.0]]
    assert pooled_mean(clusters) == pytest.approx(20 / 23)
    interval = bootstrap_interval(clusters, seed=0)
    assert interval is not None and interval[0] == 0.0 and interval[1] > 0.9


def test_paired_difference() -> None:
    first = [[0.0], [0.5], [1.0], [0.0]]
    second = [[0.5], [1.0], [1.0], [0.5]]
    interval = paired_difference_interval(first, second, seed=1)
    assert interval is not None and 0.0 <= interval[0] <= interval[1] <= 0.5
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference_interval(first, second[:2])

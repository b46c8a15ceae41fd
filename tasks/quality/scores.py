"""Scores of held-out answers with confidence intervals: ROUGE-L F and the judge's A-D ratings.

Intervals are seeded percentile bootstraps that resample held-out tasks, where a task is one instruction:
a held-out file may test one instruction on several lines (different inputs), and those lines are drawn
together. Pure functions, no Prefect.
"""

from collections.abc import Sequence

from schemas.training import Interval, Rating
from tasks.quality.judge import RATING_SCORE, RATINGS
from tasks.quality.stats import bootstrap_interval, paired_difference_interval, pooled_mean


def task_groups(instructions: Sequence[str]) -> list[list[int]]:
    """Line indices grouped by task (the instruction, case and surrounding whitespace ignored), in first-seen
    order."""
    groups: dict[str, list[int]] = {}
    for index, text in enumerate(instructions):
        groups.setdefault(text.strip().lower(), []).append(index)
    return list(groups.values())


def clusters(values: Sequence[float | None], groups: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per-task lists of the defined values (None, e.g. an unparseable rating, is left out)."""
    return [[v for i in group if (v := values[i]) is not None] for group in groups]


def mean_interval(
    values: Sequence[float | None], groups: Sequence[Sequence[int]], seed: int, resamples: int
) -> tuple[float | None, Interval | None]:
    """Mean of the defined values and its 95% bootstrap interval over tasks."""
    per_task = clusters(values, groups)
    return pooled_mean(per_task), bootstrap_interval(per_task, resamples=resamples, seed=seed)


def acceptable(ratings: Sequence[Rating | None]) -> list[float | None]:
    """1.0 for A or B, 0.0 for C or D, None when there is no rating."""
    return [None if r is None else RATING_SCORE[r] for r in ratings]


def rating_counts(ratings: Sequence[Rating | None]) -> dict[str, int]:
    """How many answers got each rating, and how many ratings were unparseable."""
    counts: dict[str, int] = {r: sum(1 for x in ratings if x == r) for r in RATINGS}
    counts["unparseable"] = sum(1 for x in ratings if x is None)
    return counts


def difference_interval(
    first: Sequence[float | None],
    second: Sequence[float | None],
    groups: Sequence[Sequence[int]],
    seed: int,
    resamples: int,
) -> tuple[float | None, Interval | None]:
    """mean(second) - mean(first) on the same tasks, with a paired 95% bootstrap interval."""
    a, b = clusters(first, groups), clusters(second, groups)
    mean_a, mean_b = pooled_mean(a), pooled_mean(b)
    delta = None if mean_a is None or mean_b is None else mean_b - mean_a
    return delta, paired_difference_interval(a, b, resamples=resamples, seed=seed)


def format_interval(value: float | None, interval: Interval | None, percent: bool = False) -> str:
    """ "0.2345 [0.2011, 0.2702]", or "62.5% [51.0, 72.8]" with `percent`; "-" when undefined."""
    if value is None:
        return "-"
    if percent:
        text = f"{100 * value:.1f}%"
        return text if interval is None else f"{text} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
    return f"{value:.4f}" if interval is None else f"{value:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"

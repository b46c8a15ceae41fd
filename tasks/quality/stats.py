"""Confidence intervals: Wilson score intervals for audit rates, a seeded cluster bootstrap for evaluations.

Pure Python, no numpy: the samples are hundreds of items, and a seeded `random.Random` makes every interval
reproducible from its inputs.
"""

import math
import random
from collections.abc import Callable, Sequence

# Two-sided 95%: the 0.975 quantile of the standard normal.
Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion.

    Args:
        successes: Yes answers.
        n: Trials; 0 gives None (no estimate).
        z: Normal quantile (default: 95% two-sided).

    Returns:
        (low, high) within [0, 1], or None when n is 0.

    Raises:
        ValueError: When successes is negative or above n.
    """
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within 0..n, got {successes} of {n}")
    if n == 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled_mean(clusters: Sequence[Sequence[float]]) -> float | None:
    """Mean over every value of every cluster; None when there is no value."""
    values = [v for cluster in clusters for v in cluster]
    return sum(values) / len(values) if values else None


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an ascending list."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def bootstrap_interval(
    clusters: Sequence[Sequence[float]],
    statistic: Callable[[Sequence[Sequence[float]]], float | None] = pooled_mean,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic`, resampling whole clusters with replacement.

    A cluster is one held-out task: its lines (one instruction with several inputs) are not independent,
    so they are drawn together.

    Args:
        clusters: Values per task; a task with no value (e.g. every rating unparseable) is an empty list.
        statistic: Computed on each resample; resamples where it is None are skipped.
        resamples: Number of bootstrap resamples.
        seed: Seeds the resampling, so the same inputs give the same interval.
        level: Coverage of the interval.

    Returns:
        (low, high), or None when there is no cluster or the statistic is never defined.
    """
    if not clusters:
        return None
    rng = random.Random(seed)
    k = len(clusters)
    estimates = []
    for _ in range(resamples):
        value = statistic([clusters[rng.randrange(k)] for _ in range(k)])
        if value is not None:
            estimates.append(value)
    if not estimates:
        return None
    estimates.sort()
    tail = (1 - level) / 2
    return _percentile(estimates, tail), _percentile(estimates, 1 - tail)


def paired_difference_interval(
    first: Sequence[Sequence[float]],
    second: Sequence[Sequence[float]],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Bootstrap interval of mean(second) - mean(first) over the same tasks, resampled together.

    Args:
        first, second: Values per task of two models on the same tasks, in the same order.

    Raises:
        ValueError: When the two lists cover different numbers of tasks.
    """
    if len(first) != len(second):
        raise ValueError(f"paired samples differ in length: {len(first)} vs {len(second)}")
    pairs = [(tuple(a), tuple(b)) for a, b in zip(first, second, strict=True)]

    def difference(resample: Sequence[Sequence[float]]) -> float | None:
        # Each "value" here is an index into pairs, so both models see the same resampled tasks.
        chosen = [pairs[int(i[0])] for i in resample]
        a, b = pooled_mean([p[0] for p in chosen]), pooled_mean([p[1] for p in chosen])
        return None if a is None or b is None else b - a

    return bootstrap_interval([[float(i)] for i in range(len(pairs))], difference, resamples, seed, level)

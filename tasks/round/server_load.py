"""How busy a round kept the LLM servers: its HTTP requests' intervals, requests in flight, busy fraction.

Pure functions over the completion records of requests.parquet. A record is one prompt; prompts sent in one
HTTP request share its `request_id`, send and receive times. Stages may overlap (a pipelined round), so each
stage's wall time is its own first send to last receive, and the round's is that of all its requests.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from schemas.records import CompletionRecord, GenerationLoad, StageLoad


@dataclass(frozen=True)
class RequestSpan:
    """One HTTP request: when it was in flight, which stage sent it, and what it carried."""

    stage: str
    sent_at: float
    received_at: float
    prompts: int
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int | None


def request_spans(
    records: Iterable[CompletionRecord], per_prompt_tokens: bool = False, since: float | None = None
) -> list[RequestSpan]:
    """The HTTP requests behind `records`, ordered by send time.

    Args:
        records: Completion records; those without send/receive times (refused alone, or written before
            times were recorded) are skipped, and so are copies of one completion (same key).
        per_prompt_tokens: Whether each record's `prompt_tokens` is its own prompt's (the server returned
            token ids); otherwise every record of a request holds the request's total, counted once.
        since: Skip requests sent before this Unix time (completions a crashed run cached, reused by a rerun).

    Returns:
        One span per request id.
    """
    grouped: dict[str, list[CompletionRecord]] = {}
    keys: set[str] = set()
    for r in records:
        if r.sent_at is None or r.received_at is None or r.rejected is not None or r.key in keys:
            continue
        if since is not None and r.sent_at < since:
            continue
        keys.add(r.key)
        grouped.setdefault(r.request_id, []).append(r)
    spans = []
    for group in grouped.values():
        first = group[0]
        prompt_tokens = sum(r.prompt_tokens for r in group) if per_prompt_tokens else first.prompt_tokens
        spans.append(
            RequestSpan(
                stage=first.stage,
                sent_at=first.sent_at or 0.0,
                received_at=first.received_at or 0.0,
                prompts=len(group),
                prompt_tokens=prompt_tokens,
                completion_tokens=sum(r.completion_tokens for r in group),
                cached_prompt_tokens=first.cached_prompt_tokens,
            )
        )
    return sorted(spans, key=lambda s: (s.sent_at, s.received_at))


def in_flight_steps(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, int]]:
    """Requests in flight over time, as a step function.

    Args:
        intervals: (start, end) of each request.

    Returns:
        (time, requests in flight from then on) at every time the count changes, in time order; the last
        step is back to 0. Requests ending at the very time others start are counted out first.
    """
    events = sorted([(end, -1) for start, end in intervals] + [(start, 1) for start, end in intervals])
    steps: list[tuple[float, int]] = []
    count = 0
    for t, delta in events:
        count += delta
        if steps and steps[-1][0] == t:
            steps[-1] = (t, count)
        else:
            steps.append((t, count))
    return steps


def busy_fraction(intervals: Sequence[tuple[float, float]], concurrency: int) -> float:
    """Share of the intervals' span (first start to last end) with at least `concurrency` of them in flight.

    Args:
        intervals: (start, end) of each request, in any order; stages may overlap.
        concurrency: Requests the client keeps in flight at most: the server is fully fed at this count.

    Returns:
        A fraction in [0, 1]; 0 when there is no interval or the span is empty.
    """
    if not intervals:
        return 0.0
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    if span <= 0:
        return 0.0
    busy = 0.0
    steps = in_flight_steps(intervals)
    for (t, count), (t_next, _) in itertools.pairwise(steps):
        if count >= concurrency:
            busy += t_next - t
    return min(1.0, busy / span)


def _wall(spans: Sequence[RequestSpan]) -> float:
    return max(s.received_at for s in spans) - min(s.sent_at for s in spans)


def _cached(spans: Sequence[RequestSpan]) -> int | None:
    reported = [s.cached_prompt_tokens for s in spans if s.cached_prompt_tokens is not None]
    return sum(reported) if reported else None


def generation_load(
    records: Iterable[CompletionRecord],
    concurrency: int,
    per_prompt_tokens: bool = False,
    since: float | None = None,
    round_wall_s: float | None = None,
) -> GenerationLoad | None:
    """Wall time, tokens and busy fraction of a round's generation, overall and by stage.

    Args:
        records: The round's completion records (requests.parquet).
        concurrency: HTTP requests the client kept in flight at most.
        per_prompt_tokens: See `request_spans`.
        since: See `request_spans`: when the committing run opened the round.
        round_wall_s: The round's wall time, open to commit, if known.

    Returns:
        The load, or None when no request of the round was sent by this run.
    """
    spans = request_spans(records, per_prompt_tokens, since)
    if not spans:
        return None
    by_stage: dict[str, list[RequestSpan]] = {}
    for s in spans:
        by_stage.setdefault(s.stage, []).append(s)
    return GenerationLoad(
        concurrency=concurrency,
        started_at=spans[0].sent_at,
        per_prompt_tokens=per_prompt_tokens,
        round_wall_s=round_wall_s,
        wall_s=_wall(spans),
        busy_fraction=busy_fraction([(s.sent_at, s.received_at) for s in spans], concurrency),
        prompt_tokens=sum(s.prompt_tokens for s in spans),
        completion_tokens=sum(s.completion_tokens for s in spans),
        cached_prompt_tokens=_cached(spans),
        stages={
            stage: StageLoad(
                requests=len(group),
                prompts=sum(s.prompts for s in group),
                wall_s=_wall(group),
                prompt_tokens=sum(s.prompt_tokens for s in group),
                completion_tokens=sum(s.completion_tokens for s in group),
                cached_prompt_tokens=_cached(group),
            )
            for stage, group in by_stage.items()
        },
    )

"""Busy fraction, requests in flight and a round's generation load, on hand-made intervals and records."""

from typing import Any

import pytest

from schemas import CompletionRecord
from tasks.round.server_load import busy_fraction, generation_load, in_flight_steps, request_spans
from tests.support.factories import completion


def test_in_flight_steps_count_requests_over_time() -> None:
    steps = in_flight_steps([(0.0, 4.0), (1.0, 3.0), (3.0, 5.0)])
    # At 3.0 one request ends as another starts: the count stays 2.
    assert steps == [(0.0, 1), (1.0, 2), (3.0, 2), (4.0, 1), (5.0, 0)]


def test_busy_fraction_is_the_share_of_the_span_at_full_concurrency() -> None:
    # Two slots: both busy from 1 to 3 and from 3 to 4 (a hand-over at 3), one busy otherwise; span 0-5.
    intervals = [(0.0, 4.0), (1.0, 3.0), (3.0, 5.0)]
    assert busy_fraction(intervals, 2) == pytest.approx(3 / 5)
    assert busy_fraction(intervals, 1) == pytest.approx(1.0)
    assert busy_fraction(intervals, 3) == 0.0


def test_busy_fraction_counts_a_gap_between_stages_as_idle() -> None:
    # Stage one fills both slots 0-2, nothing runs 2-3, stage two fills them 3-4.
    intervals = [(0.0, 2.0), (0.0, 2.0), (3.0, 4.0), (3.0, 4.0)]
    assert busy_fraction(intervals, 2) == pytest.approx(3 / 4)


def test_busy_fraction_of_nothing_is_zero() -> None:
    assert busy_fraction([], 4) == 0.0
    assert busy_fraction([(1.0, 1.0)], 1) == 0.0


def _sent(key: str, request_id: str, stage: str, start: float, end: float, **fields: Any) -> CompletionRecord:
    return completion(
        key=key,
        request_id=request_id,
        stage=stage,
        sent_at=start,
        received_at=end,
        latency_s=end - start,
        **fields,
    )


def test_generation_load_per_stage_with_overlapping_stages() -> None:
    records = [
        # Two prompts in one request: the request's prompt tokens and cached tokens are counted once.
        _sent(
            "a",
            "r1",
            "instruction",
            10.0,
            14.0,
            prompt_tokens=100,
            completion_tokens=7,
            cached_prompt_tokens=60,
        ),
        _sent(
            "b",
            "r1",
            "instruction",
            10.0,
            14.0,
            prompt_tokens=100,
            completion_tokens=5,
            cached_prompt_tokens=60,
        ),
        # The classify stage starts before the instruction stage ends (pipelined).
        _sent("c", "r2", "classify", 12.0, 13.0, prompt_tokens=40, completion_tokens=1),
        _sent("d", "r3", "classify", 13.0, 16.0, prompt_tokens=40, completion_tokens=1),
        # Refused alone, and reused from a crashed run's cache: neither counts.
        completion(key="e", request_id="", stage="classify", rejected="prompt_too_long"),
        _sent("f", "r0", "instance", 1.0, 2.0, prompt_tokens=999, completion_tokens=999),
    ]
    load = generation_load(records, concurrency=2, since=5.0, round_wall_s=30.0)
    assert load is not None
    assert load.wall_s == pytest.approx(6.0)
    assert load.round_wall_s == 30.0
    # Two requests in flight during 12-14.
    assert load.busy_fraction == pytest.approx(2 / 6)
    assert (load.prompt_tokens, load.completion_tokens, load.cached_prompt_tokens) == (180, 14, 60)
    assert list(load.stages) == ["instruction", "classify"]
    instruction, classify = load.stages["instruction"], load.stages["classify"]
    assert (instruction.requests, instruction.prompts, instruction.wall_s) == (1, 2, pytest.approx(4.0))
    assert (classify.requests, classify.prompts, classify.wall_s) == (2, 2, pytest.approx(4.0))
    assert classify.cached_prompt_tokens is None


def test_per_prompt_tokens_are_summed_over_a_request() -> None:
    records = [
        _sent("a", "r1", "instance", 0.0, 1.0, prompt_tokens=30),
        _sent("b", "r1", "instance", 0.0, 1.0, prompt_tokens=50),
    ]
    assert [s.prompt_tokens for s in request_spans(records, per_prompt_tokens=True)] == [80]
    assert [s.prompt_tokens for s in request_spans(records)] == [30]


def test_no_request_sent_means_no_load() -> None:
    assert generation_load([completion()], concurrency=4) is None

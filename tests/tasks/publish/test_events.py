"""The data-ready decision on a real store; the event and the per-store slot on a real Prefect server."""

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tasks.publish.artifacts import store_resource_id
from tasks.publish.events import (
    DATA_READY,
    STATE_FILE,
    data_ready_due,
    decide_data_ready,
    event_id,
    finetune_history,
    last_finetuned_round,
    new_instances_since_last_finetune,
    read_state,
    record_emitted,
    should_emit,
    trained_rounds,
)
from tasks.resources.store.rounds import Store, store_root_url
from tasks.resources.store.slot import concurrency_limit_name
from tests.support import factories


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def commit_round(store: Store, instances: int) -> int:
    """Commit a round whose manifest counts `instances` instances."""
    number = factories.next_round(store)
    records = [factories.instance("i", number, i) for i in range(instances)]
    return factories.commit_round(
        store, instances=records, counts={"kept": instances, "instances": instances}
    )


def finish_finetune(store: Store, finetune_id: str, rounds: list[int], **extra: object) -> None:
    """What a fine-tune leaves when it is done: a manifest naming the rounds it trained on."""
    store.put_bytes(
        f"finetunes/{finetune_id}/manifest.json", json.dumps({"rounds": rounds, **extra}).encode()
    )


def test_trained_rounds_of_a_manifest() -> None:
    assert trained_rounds({"rounds": [1, 2, 3]}) == [1, 2, 3]
    assert trained_rounds({"rounds": [1, 2], "dry_run": True}) == []
    assert trained_rounds({"rounds": "1,2"}) == []
    assert trained_rounds({"rounds": [True, 0, 2, "3"]}) == [2]
    assert trained_rounds({}) == []


def test_new_instances_count_rounds_after_the_last_finetune(store: Store) -> None:
    assert new_instances_since_last_finetune(store) == (0, [])
    for count in (3, 4, 5):
        commit_round(store, count)
    assert new_instances_since_last_finetune(store) == (12, [1, 2, 3])
    finish_finetune(store, "ft-a", [1, 2])
    assert last_finetuned_round(store) == 2
    assert new_instances_since_last_finetune(store) == (5, [3])
    # An older rerun on fewer rounds, a dry run, an unfinished one and a corrupt one change nothing.
    finish_finetune(store, "ft-b", [1])
    finish_finetune(store, "ft-c", [1, 2, 3], dry_run=True)
    store.put_bytes("finetunes/ft-d/checkpoint.bin", b"...")
    store.put_bytes("finetunes/ft-e/manifest.json", b"{not json")
    assert new_instances_since_last_finetune(store) == (5, [3])
    # Nor do the arms of a comparison, which train on the rounds as an experiment.
    finish_finetune(store, "ft-g", [1, 2, 3], params={"purpose": "compare"}, created_at="2099-01-01T00:00:00")
    assert new_instances_since_last_finetune(store) == (5, [3])
    assert finetune_history(store).last_finished_at != "2099-01-01T00:00:00"
    finish_finetune(store, "ft-f", [1, 2, 3], params={"purpose": "standalone"})
    assert new_instances_since_last_finetune(store) == (0, [])


@pytest.mark.parametrize(
    ("count", "rounds", "after", "threshold", "state", "expected"),
    [
        (10, [1], 0, 10, None, True),  # crossing
        (9, [1], 0, 10, None, False),  # below
        (10, [1], 0, 0, None, False),  # off
        (0, [], 0, 1, None, False),  # nothing new
        (20, [1, 2], 0, 10, {"after_round": 0}, False),  # already announced for this batch
        (20, [3, 4], 2, 10, {"after_round": 0}, True),  # a fine-tune consumed the old batch: re-armed
    ],
)
def test_should_emit(
    count: int, rounds: list[int], after: int, threshold: int, state: dict[str, int] | None, expected: bool
) -> None:
    assert should_emit(count, rounds, after, threshold, state) is expected


def test_threshold_crossing_is_due_once_until_a_finetune_consumes_the_data(store: Store) -> None:
    commit_round(store, 4)
    assert data_ready_due(store, 10) is None  # below
    commit_round(store, 7)
    ready = data_ready_due(store, 10)
    assert ready is not None
    assert ready.payload() == {"store_url": store_root_url(store), "rounds": [1, 2], "new_instances": 11}
    assert data_ready_due(store, 0) is None
    record_emitted(store, ready, 10, event_id("r", ready.after_round, ready.rounds))
    state = read_state(store)
    assert state is not None and state["after_round"] == 0 and state["rounds"] == [1, 2]
    commit_round(store, 50)
    assert data_ready_due(store, 10) is None  # announced already; the fine-tune has not run yet
    finish_finetune(store, "ft-1", [1, 2, 3])
    assert data_ready_due(store, 10) is None  # consumed; nothing new yet
    commit_round(store, 10)
    again = data_ready_due(store, 10)
    assert again is not None and again.rounds == [4] and again.after_round == 3


def test_a_dry_run_finetune_answers_the_announcement_without_consuming_the_data(store: Store) -> None:
    commit_round(store, 7)
    ready = data_ready_due(store, 5)
    assert ready is not None
    record_emitted(store, ready, 5, event_id("r", ready.after_round, ready.rounds))
    commit_round(store, 1)
    decision = decide_data_ready(store, 5)
    assert decision.ready is None
    assert "8 of 5 new instances since the start" in decision.reason
    assert "already announced" in decision.reason and "no fine-tune has finished since" in decision.reason
    # The triggered fine-tune was a dry run: it trained nothing, but it answered the event.
    finish_finetune(store, "ft-dry", [1, 2], dry_run=True, created_at=datetime.now(UTC).isoformat())
    commit_round(store, 1)
    again = decide_data_ready(store, 5)
    assert again.ready is not None and again.ready.rounds == [1, 2, 3] and again.ready.after_round == 0
    assert again.reason == "9 of 5 new instances since the start, in rounds [1, 2, 3]"


def test_the_reason_when_nothing_is_due(store: Store) -> None:
    assert decide_data_ready(store, 0).reason == "data_ready_threshold is 0: data.ready is turned off"
    commit_round(store, 3)
    finish_finetune(store, "ft-real", [1], created_at=datetime.now(UTC).isoformat())
    commit_round(store, 2)
    decision = decide_data_ready(store, 10)
    assert decision.ready is None
    assert decision.reason == "2 of 10 new instances since fine-tune ft-real (round 1): below the threshold"


def test_corrupt_state_does_not_block(store: Store) -> None:
    commit_round(store, 5)
    store.put_bytes(STATE_FILE, b"\x00garbage")
    assert read_state(store) is None
    assert data_ready_due(store, 5) is not None


def test_store_identity(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store_root_url(store) == str(tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    relative = Store("./store")
    assert store_root_url(relative) == store_root_url(store)
    assert concurrency_limit_name("./store") == concurrency_limit_name(store)
    # One Prefect resource per store, however its URL is written.
    for spelling in ("./store", "store", "store/", str(tmp_path / "store")):
        assert store_resource_id(Store(spelling)) == store_resource_id(store), spelling
    assert concurrency_limit_name(Store(str(tmp_path / "other"))) != concurrency_limit_name(store)
    assert event_id("a", 0, [1, 2]) == event_id("a", 0, [1, 2]) != event_id("a", 0, [1, 2, 3])
    # An object store is announced by its URL (opening it does not connect).
    assert store_root_url(Store("s3://my-bucket/selfinstruct")) == "s3://my-bucket/selfinstruct"


# -- against a real Prefect server -----------------------------------------------------------------


def _events(resource_id: str, name: str) -> list[dict[str, object]]:
    """Events named `name` about `resource_id`, read back from the server's REST API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client.request(
            "POST",
            "/events/filter",
            json={"filter": {"event": {"name": [name]}, "resource": {"id": [resource_id]}}, "limit": 50},
        )
    return list(response.json()["events"])


@pytest.mark.slow
def test_emit_data_ready_once(prefect_server: None, store: Store) -> None:
    from prefect import flow

    from tasks.publish.events import emit_data_ready_if_due

    @flow
    def after_round(threshold: int) -> bool:
        return emit_data_ready_if_due(store, threshold)

    commit_round(store, 3)
    assert after_round(5) is False
    commit_round(store, 3)
    assert after_round(5) is True
    commit_round(store, 3)
    assert after_round(5) is False  # same batch, already announced
    resource_id = store_resource_id(store)
    deadline = time.monotonic() + 30
    while not (events := _events(resource_id, DATA_READY)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(events) == 1
    assert events[0]["payload"] == {"store_url": store_root_url(store), "rounds": [1, 2], "new_instances": 6}


@pytest.mark.slow
def test_round_slot_serializes_runs_on_one_store(prefect_server: None, store: Store, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from tasks.resources.store.slot import round_slot

    spans: dict[str, tuple[float, float]] = {}

    def hold(name: str, target: Store) -> None:
        with round_slot(target):
            start = time.monotonic()
            time.sleep(1.5)
            spans[name] = (start, time.monotonic())

    threads = [
        threading.Thread(target=hold, args=("a", store)),
        threading.Thread(target=hold, args=("b", Store(str(store.url)))),  # same store, another object
        threading.Thread(target=hold, args=("other", Store(str(tmp_path / "other")))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    (a_start, a_end), (b_start, b_end) = spans["a"], spans["b"]
    assert a_end <= b_start or b_end <= a_start  # never both inside
    other_start, _ = spans["other"]
    assert other_start < max(a_end, b_end) - 1.0  # a different store does not wait for both
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(concurrency_limit_name(store))
    assert limit.limit == 1 and limit.active_slots == 0


@pytest.mark.slow
def test_waiting_for_the_store_slot_is_bounded_and_says_why(prefect_server: None, store: Store) -> None:
    from tasks.resources.store.slot import round_slot

    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with round_slot(store):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(120)
        with pytest.raises(TimeoutError) as raised, round_slot(store, timeout_seconds=3):
            pytest.fail("entered a slot that another run holds")
        message = str(raised.value)
        assert message.startswith("gave up after 3 s waiting for the store slot selfinstruct-store-")
        assert "1 of 1 slots taken" in message
    finally:
        release.set()
        thread.join(60)
    with round_slot(store, timeout_seconds=30):  # free again once the holder left
        pass

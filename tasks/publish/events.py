"""When a store has enough new data for a fine-tune: the decision, and the event that announces it.

Prefect triggers count events but cannot compare payload values, so the "enough new instances" decision is
made here and announced with one `selfinstruct.data.ready` event; the `finetune` deployment's trigger reacts
to that event. A small state file in the store (state/data_ready.json) makes the crossing of the threshold
announce itself exactly once until a fine-tune consumes the data (writes a manifest naming later rounds).
"""

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.publish.artifacts import store_resource_id
from tasks.resources.store.files import StoreError
from tasks.resources.store.layout import FINETUNES
from tasks.resources.store.rounds import Store, store_root_url

DATA_READY = "selfinstruct.data.ready"
STATE_FILE = "state/data_ready.json"
# Fixed namespace so that the same data state of the same store always maps to the same event id.
EVENT_NAMESPACE = uuid.UUID("5e1f1257-7c1a-4b8e-9d7e-0d6a7a2f3b11")


@dataclass(frozen=True)
class DataReady:
    """What a `selfinstruct.data.ready` event announces."""

    store_url: str
    rounds: list[int]
    new_instances: int
    after_round: int  # newest round a fine-tune has trained on (0: none yet)

    def payload(self) -> dict[str, Any]:
        """The event payload; the finetune trigger renders store_url and rounds into its parameters."""
        return {"store_url": self.store_url, "rounds": self.rounds, "new_instances": self.new_instances}


# -- pure: reading what the store holds ------------------------------------------------------------


def is_compare_arm(manifest: dict[str, Any]) -> bool:
    """Whether a fine-tune manifest is an arm of the compare flow (an experiment, not the pipeline's)."""
    params = manifest.get("params")
    return isinstance(params, dict) and params.get("purpose") == "compare"


def trained_rounds(manifest: dict[str, Any]) -> list[int]:
    """Rounds a fine-tune manifest says it trained on; none for a dry run or a malformed manifest."""
    if manifest.get("dry_run") is True:  # a dry run trained nothing, so it consumed nothing
        return []
    rounds = manifest.get("rounds")
    if not isinstance(rounds, list):
        return []
    return [r for r in rounds if isinstance(r, int) and not isinstance(r, bool) and r >= 1]


@dataclass(frozen=True)
class FinetuneHistory:
    """What the finished fine-tunes of a store say, as far as data.ready is concerned."""

    last_round: int = 0  # newest round any real fine-tune trained on (0: none)
    last_id: str | None = None  # the fine-tune that trained on it
    last_finished_at: str | None = None  # ISO time of the newest finished fine-tune, dry runs included


def finetune_history(store: Store) -> FinetuneHistory:
    """Read every finished fine-tune manifest of the store once.

    Fine-tunes without a manifest (running or crashed) are ignored, like uncommitted rounds, and so are the
    arms of a seeds-only vs seeds + rounds comparison: an experiment neither consumes the data nor answers
    an announcement. `last_round` is the maximum over all real fine-tunes, not only the most recent one, so a
    rerun on old rounds does not re-announce data that an earlier fine-tune already trained on.
    """
    last_round, last_id, finished = 0, None, None
    for finetune_id in store.list_names(FINETUNES):
        relative = f"{FINETUNES}/{finetune_id}/manifest.json"
        try:
            if not store.exists(relative):
                continue
            manifest = json.loads(store.get_bytes(relative))
        except (StoreError, ValueError, OSError):
            continue  # an id the store refuses or a half-written file: not a finished fine-tune
        if not isinstance(manifest, dict) or is_compare_arm(manifest):
            continue
        created = manifest.get("created_at")
        if isinstance(created, str) and (finished is None or created > finished):
            finished = created
        newest = max(trained_rounds(manifest), default=0)
        if newest > last_round:
            last_round, last_id = newest, finetune_id
    return FinetuneHistory(last_round, last_id, finished)


def last_finetuned_round(store: Store) -> int:
    """Newest round any finished, non-dry-run fine-tune of the store trained on; 0 when none has."""
    return finetune_history(store).last_round


def new_instances_since_last_finetune(store: Store) -> tuple[int, list[int]]:
    """Instances committed after the newest fine-tuned round, and the rounds that hold them.

    Counts come from the round manifests, so no Parquet file is read.

    Returns:
        (number of new instances, ascending list of the committed rounds after the last fine-tuned one)
    """
    return _new_since(store, last_finetuned_round(store))


def _new_since(store: Store, after: int) -> tuple[int, list[int]]:
    rounds = [n for n in store.committed_rounds() if n > after]
    count = sum(store.read_manifest(n).counts.get("instances", 0) for n in rounds)
    return count, rounds


# -- pure: the decision ----------------------------------------------------------------------------


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def answered(state: dict[str, Any] | None, last_finished_at: str | None) -> bool:
    """True when a fine-tune (a dry run included) finished after the recorded announcement.

    A dry run consumes no data, but it did answer the event: without this, a store whose only fine-tunes
    are dry runs would never be announced again.
    """
    emitted = _parse_time((state or {}).get("emitted_at"))
    finished = _parse_time(last_finished_at)
    return emitted is not None and finished is not None and finished > emitted


def should_emit(
    new_instances: int,
    rounds: list[int],
    after_round: int,
    threshold: int,
    state: dict[str, Any] | None,
    last_finished_at: str | None = None,
) -> bool:
    """True when the threshold is crossed and this batch of data was not announced yet (or was answered).

    Args:
        new_instances: Instances committed since the last fine-tune.
        rounds: The rounds holding them.
        after_round: Newest round a fine-tune trained on (identifies the batch of data being accumulated).
        threshold: Instances needed; 0 turns the event off.
        state: The stored state of the last announcement, or None.
        last_finished_at: When the newest fine-tune (dry runs included) finished, ISO 8601.
    """
    if threshold <= 0 or not rounds or new_instances < threshold:
        return False
    if state is None or state.get("after_round") != after_round:
        return True
    return answered(state, last_finished_at)


def event_id(resource_id: str, after_round: int, rounds: list[int]) -> uuid.UUID:
    """A deterministic event id for one data state, so a retried emission is deduplicated by Prefect."""
    return uuid.uuid5(EVENT_NAMESPACE, f"{resource_id}:{after_round}:{rounds[-1] if rounds else 0}")


def read_state(store: Store) -> dict[str, Any] | None:
    """The last announcement recorded in the store, or None (never announced, or unreadable)."""
    if not store.exists(STATE_FILE):
        return None
    try:
        state = json.loads(store.get_bytes(STATE_FILE))
    except ValueError:
        return None  # a corrupt state file must not block announcements forever
    return state if isinstance(state, dict) else None


@dataclass(frozen=True)
class Decision:
    """Whether to announce data now, and in words why (or why not), for the run's log."""

    ready: DataReady | None
    reason: str


def decide_data_ready(store: Store, threshold: int) -> Decision:
    """What to announce now, with the reason either way."""
    if threshold <= 0:
        return Decision(None, "data_ready_threshold is 0: data.ready is turned off")
    history = finetune_history(store)
    count, rounds = _new_since(store, history.last_round)
    since = f"fine-tune {history.last_id} (round {history.last_round})" if history.last_id else "the start"
    state = read_state(store)
    if should_emit(count, rounds, history.last_round, threshold, state, history.last_finished_at):
        ready = DataReady(store_root_url(store), rounds, count, history.last_round)
        return Decision(ready, f"{count} of {threshold} new instances since {since}, in rounds {rounds}")
    if count < threshold or not rounds:
        return Decision(None, f"{count} of {threshold} new instances since {since}: below the threshold")
    assert state is not None  # should_emit is true without a state once the threshold is crossed
    return Decision(
        None,
        f"{count} of {threshold} new instances since {since}, but data.ready was already announced at "
        f"{state.get('emitted_at')} (rounds {state.get('rounds')}) and no fine-tune has finished since",
    )


def data_ready_due(store: Store, threshold: int) -> DataReady | None:
    """What to announce now, or None when nothing is due."""
    return decide_data_ready(store, threshold).ready


def record_emitted(store: Store, ready: DataReady, threshold: int, emitted_id: uuid.UUID) -> None:
    """Remember the announcement so later rounds of the same batch of data do not repeat it."""
    state = {
        "after_round": ready.after_round,
        "rounds": ready.rounds,
        "new_instances": ready.new_instances,
        "threshold": threshold,
        "event_id": str(emitted_id),
        "emitted_at": datetime.now(UTC).isoformat(),
    }
    store.put_bytes(STATE_FILE, json.dumps(state, indent=2).encode())


# -- Prefect ---------------------------------------------------------------------------------------


@task(name="emit-data-ready", cache_policy=NO_CACHE)
def emit_data_ready_if_due(store: Store, threshold: int) -> bool:
    """Emit `selfinstruct.data.ready` when `threshold` new instances exist since the last fine-tune.

    Call it after a round commits, inside `slot.round_slot(store)`, so two rounds of one store cannot both
    decide to announce. The event is emitted before the state is recorded: a crash in between repeats the
    announcement once (same event id, deduplicated by Prefect within 30 minutes), never loses it.

    Args:
        store: The round store.
        threshold: Instances needed (RoundParams.data_ready_threshold); 0 turns the event off.

    Returns:
        True when the event was emitted by this call.
    """
    from prefect.events import emit_event

    logger = get_run_logger()
    decision = decide_data_ready(store, threshold)
    ready = decision.ready
    if ready is None:
        logger.info("%s not emitted: %s", DATA_READY, decision.reason)
        return False
    resource_id = store_resource_id(store)
    emitted_id = event_id(resource_id, ready.after_round, ready.rounds)
    event = emit_event(
        event=DATA_READY,
        resource={
            "prefect.resource.id": resource_id,
            "prefect.resource.name": ready.store_url,
            "selfinstruct.store": ready.store_url,
        },
        payload=ready.payload(),
        id=emitted_id,
    )
    if event is None:  # no events client (no API configured): nothing was sent, so record nothing
        logger.warning("could not emit %s: no Prefect events client", DATA_READY)
        return False
    record_emitted(store, ready, threshold, emitted_id)
    logger.info("%s emitted: %s", DATA_READY, decision.reason)
    return True

"""When a store has enough new data for a fine-tune, and one bootstrap round at a time per store.

Prefect triggers count events but cannot compare payload values, so the "enough new instances" decision is
made here and announced with one `selfinstruct.data.ready` event; the `finetune` deployment's trigger reacts
to that event. A small state file in the store (state/data_ready.json) makes the crossing of the threshold
announce itself exactly once until a fine-tune consumes the data (writes a manifest naming later rounds).
"""

import contextlib
import hashlib
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.artifacts import store_resource_id
from tasks.redact import redact_url
from tasks.store import FINETUNES, Store, StoreError

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


def store_root_url(store: Store) -> str:
    """The store's root as an absolute, credential-free URL that a worker elsewhere can open.

    A relative local root ("./data") would mean something else in a flow run started by a worker in
    another working directory, so local stores are announced by their absolute path.
    """
    return redact_url(store.location_of("state").removesuffix("/state"))


def trained_rounds(manifest: dict[str, Any]) -> list[int]:
    """Rounds a fine-tune manifest says it trained on; none for a dry run or a malformed manifest."""
    if manifest.get("dry_run") is True:  # a dry run trained nothing, so it consumed nothing
        return []
    rounds = manifest.get("rounds")
    if not isinstance(rounds, list):
        return []
    return [r for r in rounds if isinstance(r, int) and not isinstance(r, bool) and r >= 1]


def last_finetuned_round(store: Store) -> int:
    """Newest round any finished fine-tune of the store trained on; 0 when none has.

    Fine-tunes without a manifest (running or crashed) are ignored, like uncommitted rounds. The maximum
    over all fine-tunes, not only the most recent one, so a rerun on old rounds does not re-announce data
    that an earlier fine-tune already trained on.
    """
    newest = 0
    for finetune_id in store.list_names(FINETUNES):
        relative = f"{FINETUNES}/{finetune_id}/manifest.json"
        try:
            if not store.exists(relative):
                continue
            manifest = json.loads(store.get_bytes(relative))
        except (StoreError, ValueError, OSError):
            continue  # an id the store refuses or a half-written file: not a finished fine-tune
        if isinstance(manifest, dict):
            newest = max([newest, *trained_rounds(manifest)])
    return newest


def new_instances_since_last_finetune(store: Store) -> tuple[int, list[int]]:
    """Instances committed after the newest fine-tuned round, and the rounds that hold them.

    Counts come from the round manifests, so no Parquet file is read.

    Returns:
        (number of new instances, ascending list of the committed rounds after the last fine-tuned one)
    """
    after = last_finetuned_round(store)
    rounds = [n for n in store.committed_rounds() if n > after]
    count = sum(store.read_manifest(n).counts.get("instances", 0) for n in rounds)
    return count, rounds


# -- pure: the decision ----------------------------------------------------------------------------


def should_emit(
    new_instances: int, rounds: list[int], after_round: int, threshold: int, state: dict[str, Any] | None
) -> bool:
    """True when the threshold is crossed and this batch of data (since `after_round`) was not announced yet.

    Args:
        new_instances: Instances committed since the last fine-tune.
        rounds: The rounds holding them.
        after_round: Newest round a fine-tune trained on (identifies the batch of data being accumulated).
        threshold: Instances needed; 0 turns the event off.
        state: The stored state of the last announcement, or None.
    """
    if threshold <= 0 or not rounds or new_instances < threshold:
        return False
    return state is None or state.get("after_round") != after_round


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


def data_ready_due(store: Store, threshold: int) -> DataReady | None:
    """What to announce now, or None when nothing is due."""
    if threshold <= 0:
        return None
    after = last_finetuned_round(store)
    count, rounds = new_instances_since_last_finetune(store)
    if not should_emit(count, rounds, after, threshold, read_state(store)):
        return None
    return DataReady(store_url=store_root_url(store), rounds=rounds, new_instances=count, after_round=after)


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

    Call it after a round commits, inside `round_slot(store)`, so two rounds of one store cannot both
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
    ready = data_ready_due(store, threshold)
    if ready is None:
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
    logger.info(
        "%s: %d new instances in rounds %s (threshold %d)",
        DATA_READY,
        ready.new_instances,
        ready.rounds,
        threshold,
    )
    return True


def concurrency_limit_name(store: Store | str) -> str:
    """Name of the global concurrency limit that serializes the rounds of one store.

    Derived from the absolute root, so "./data" and its absolute path share one limit.
    """
    root = store_root_url(store if isinstance(store, Store) else Store(store))
    return f"selfinstruct-store-{hashlib.sha256(root.encode()).hexdigest()[:12]}"


def ensure_concurrency_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit `name` with `limit` slots unless it exists.

    An existing limit is left as it is, so an operator can raise it or deactivate it in the UI.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # Another run may create it between our read and create.
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


@contextmanager
def round_slot(store: Store | str, timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold the store's one slot for the duration: a second run on the same store waits here.

    This keeps runs from failing on each other's round claims; the store's exclusive claim remains the
    last line of defense (e.g. against a run started outside Prefect). The slot is a leased global
    concurrency limit, renewed while held and freed by the server if the holder dies.

    Args:
        store: The store (or its URL) whose rounds are serialized.
        timeout_seconds: Give up waiting after this long (TimeoutError); None waits indefinitely.
    """
    from prefect.concurrency.sync import concurrency

    name = concurrency_limit_name(store)
    ensure_concurrency_limit(name)
    # strict: if the limit vanished between creation and acquisition, fail rather than run unguarded.
    # The shortest lease the server allows (60 s): a killed run's rerun waits about that long, not 5 min.
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True, lease_duration=60):
        yield

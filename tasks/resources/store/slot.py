"""The store slot: one bootstrap round at a time per store, as a Prefect global concurrency limit.

Two runs on one store would fail on each other's round claims; the slot makes the second wait instead. The
limit is named after the store's absolute root, so every spelling of one store's URL shares it. Prefect is
imported only when a slot is used, so the rest of the store needs no Prefect.
"""

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tasks.resources.store.rounds import Store, store_root_url


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


def slot_holders(name: str) -> str:
    """Who holds the global concurrency limit `name` right now, in words (for the waiting run's log)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    state = "active" if limit.active else "INACTIVE (runs do not wait for it)"
    return f"{limit.active_slots} of {limit.limit} slots taken, limit {state}"


@contextmanager
def round_slot(store: Store | str, timeout_seconds: float | None = 3 * 3600) -> Iterator[None]:
    """Hold the store's one slot for the duration: a second run on the same store waits here.

    This keeps runs from failing on each other's round claims; the store's exclusive claim remains the
    last line of defense (e.g. against a run started outside Prefect). The slot is a leased global
    concurrency limit, renewed while held and freed by the server if the holder dies (the local stack keeps
    leases on disk, so a server restart does not lose them).

    Args:
        store: The store (or its URL) whose rounds are serialized.
        timeout_seconds: Give up waiting after this long (TimeoutError naming the limit); None waits forever.
    """
    from prefect.concurrency.sync import concurrency

    logger = _logger()
    name = concurrency_limit_name(store)
    ensure_concurrency_limit(name)
    logger.info(
        "waiting for the store slot %s (%s); gives up after %s",
        name,
        slot_holders(name),
        "never" if timeout_seconds is None else f"{timeout_seconds:.0f} s",
    )
    started = time.monotonic()
    acquired = False
    try:
        # strict: if the limit vanished between creation and acquisition, fail rather than run unguarded.
        # The shortest lease the server allows (60 s): a killed run's slot comes back about a minute later.
        with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True, lease_duration=60):
            acquired = True
            logger.info("holding the store slot %s (waited %.0f s)", name, time.monotonic() - started)
            yield
    except TimeoutError:
        if acquired:  # a timeout inside the round, not while waiting for the slot
            raise
        raise TimeoutError(
            f"gave up after {timeout_seconds:.0f} s waiting for the store slot {name} "
            f"({slot_holders(name)}): another round of this store is running, or a dead run's slot "
            "has not been released yet"
        ) from None


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)

"""Round claims: which run may write an uncommitted round, under a lease renewed while it works.

A claim is a create-if-absent file `claim-NNNN.json` in the round's folder naming the run, its host and pid,
and when its lease expires. The newest claim counts. A claim whose lease has expired (its holder died or hung,
on any host), whose process is gone on this host, or that is unreadable is stale and may be taken over by
writing the next claim file. While a round is worked on, a `ClaimLease` thread renews its lease.
"""

import contextlib
import json
import os
import re
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from tasks.resources.redact import redact_url
from tasks.resources.store.files import StoreError, StoreFiles
from tasks.resources.store.layout import MANIFEST, round_dir, round_file

DEFAULT_LEASE_S = 180.0


class RoundClaimedError(StoreError):
    """Another live run holds the round this run would write."""


def lease_expiry(claim: dict[str, Any]) -> datetime | None:
    """When a claim's lease runs out; claims written before leases existed get the default lease."""
    try:
        if "lease_expires_at" in claim:
            expires = datetime.fromisoformat(str(claim["lease_expires_at"]))
        else:
            expires = datetime.fromisoformat(str(claim["claimed_at"])) + timedelta(seconds=DEFAULT_LEASE_S)
    except (KeyError, ValueError, TypeError):
        return None
    return expires if expires.tzinfo else expires.replace(tzinfo=UTC)


class RoundClaims:
    """The claims on the rounds of one store."""

    def __init__(self, files: StoreFiles) -> None:
        self.files = files

    def _committed(self, number: int) -> bool:
        return self.files.exists(round_file(self.files.root, number, MANIFEST))

    def claim_files(self, number: int) -> list[str]:
        """Paths of round `number`'s claim files, oldest first (the last one counts)."""
        names = self.files.ls(round_dir(self.files.root, number))
        return sorted(n for n in names if re.search(r"/claim-\d{4}\.json$", n))

    def _read_claim(self, path: str) -> dict[str, Any] | None:
        """A claim file's content, or None when it is unreadable (empty, truncated, not JSON)."""
        try:
            claim = json.loads(self.files.read(path))
        except (OSError, ValueError):
            return None
        return claim if isinstance(claim, dict) else None

    def is_stale(self, claim: dict[str, Any] | None) -> bool:
        """True when a claim no longer protects its round: unreadable, its lease expired, or (on this
        host) its process is gone. The lease is what counts across hosts."""
        if claim is None:
            return True
        if claim.get("host") == socket.gethostname():
            try:
                os.kill(int(claim["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError, TypeError):
                pass
        expires = lease_expiry(claim)
        return expires is None or expires <= datetime.now(UTC)

    def _description(self, number: int, claim: dict[str, Any]) -> str:
        expires = lease_expiry(claim)
        until = expires.isoformat(timespec="seconds") if expires else "?"
        return (
            f"round {number} of store {redact_url(self.files.url)} is being written by run "
            f"{claim.get('run_id')} (pid {claim.get('pid')} on {claim.get('host')}, lease renewed until "
            f"{until})"
        )

    def claim(self, number: int, run_id: str, lease_s: float, *, renew: bool = True) -> int:
        """Claim round `number` for `run_id` under a lease (see `Store.claim_next_round`).

        Returns:
            `number`, now held by `run_id`.

        Raises:
            RoundClaimedError: When a live run holds the round.
        """
        claims = self.claim_files(number)
        attempt = 1
        if claims:
            current = self._read_claim(claims[-1])
            if current is not None and current.get("run_id") == run_id:
                self.renew(number, run_id, lease_s)
                if renew:
                    self._start_lease(number, run_id, lease_s)
                return number
            if not self.is_stale(current):
                raise RoundClaimedError(
                    f"{self._description(number, current or {})}; wait for it to finish, or run "
                    f"`selfinstruct unlock --round {number}` once its lease has expired"
                )
            attempt = int(re.search(r"claim-(\d{4})\.json$", claims[-1]).group(1)) + 1  # type: ignore[union-attr]
        if attempt > 9999:
            raise StoreError(f"round {number} has been claimed 9999 times; clean it with `verify --clean`")
        now = datetime.now(UTC)
        claim = {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "claimed_at": now.isoformat(),
            "attempt": attempt,
            "lease_s": lease_s,
            "lease_expires_at": (now + timedelta(seconds=lease_s)).isoformat(),
        }
        path = round_file(self.files.root, number, f"claim-{attempt:04d}.json")
        if not self.files.exclusive_write(path, json.dumps(claim).encode()):
            raise RoundClaimedError(
                f"round {number} of store {redact_url(self.files.url)} was just claimed by another run"
            )
        if renew:
            self._start_lease(number, run_id, lease_s)
        return number

    def renew(self, number: int, run_id: str, lease_s: float, *, expire_now: bool = False) -> bool:
        """Push the lease of `run_id`'s claim on round `number` to now + `lease_s` (or to now, releasing it).

        Returns:
            False when the newest claim is no longer `run_id`'s (another run took the round over).
        """
        claims = self.claim_files(number)
        current = self._read_claim(claims[-1]) if claims else None
        if current is None or current.get("run_id") != run_id:
            return False
        now = datetime.now(UTC)
        current["lease_s"] = lease_s
        current["lease_expires_at"] = (now if expire_now else now + timedelta(seconds=lease_s)).isoformat()
        self.files.replace(claims[-1], json.dumps(current).encode())
        return True

    def _start_lease(self, number: int, run_id: str, lease_s: float) -> None:
        with _LEASES_LOCK:
            previous = _LEASES.pop((self.files.root, number), None)
            _LEASES[(self.files.root, number)] = ClaimLease(self, number, run_id, lease_s).start()
        if previous is not None:
            previous.stop()

    def end(self, number: int, *, release: bool = True) -> None:
        """Stop renewing the claim on round `number`; with `release`, expire it now so a rerun need not wait.

        The commit calls it without `release`; a round that ends without a commit calls it with (through
        `end_run_claims`).
        """
        with _LEASES_LOCK:
            lease = _LEASES.pop((self.files.root, number), None)
        if lease is None:
            return
        lease.stop()
        if release and not self._committed(number):
            with contextlib.suppress(Exception):  # best effort: an expired lease frees the round anyway
                self.renew(number, lease.run_id, lease.lease_s, expire_now=True)

    def is_live(self, number: int) -> bool:
        """True when an uncommitted round's newest claim belongs to a run that may still be writing it."""
        claims = self.claim_files(number)
        if not claims:
            return False
        return not self.is_stale(self._read_claim(claims[-1]))

    def holds(self, number: int, run_id: str) -> bool:
        """True when the newest claim of round `number` is `run_id`'s."""
        claims = self.claim_files(number)
        if not claims:
            return False
        claim = self._read_claim(claims[-1])
        return claim is not None and claim.get("run_id") == run_id

    def unlock(self, number: int) -> list[str]:
        """Remove the claims of an uncommitted round whose lease has expired (for operators).

        Returns:
            The names of the claim files removed.

        Raises:
            StoreError: When the round is committed or has no claim.
            RoundClaimedError: When its lease is still live.
        """
        if self._committed(number):
            raise StoreError(f"round {number} is committed; it has no claim to lift")
        claims = self.claim_files(number)
        if not claims:
            raise StoreError(f"round {number} of store {redact_url(self.files.url)} has no claim")
        current = self._read_claim(claims[-1])
        if not self.is_stale(current):
            raise RoundClaimedError(f"{self._description(number, current or {})}; not unlocking")
        for path in claims:
            self.files.rm(path)
        return [path.rsplit("/", 1)[-1] for path in claims]


def end_run_claims(run_id: str) -> None:
    """Stop and release every claim lease this process renews for `run_id` (a flow run that failed)."""
    with _LEASES_LOCK:
        mine = [lease for lease in _LEASES.values() if lease.run_id == run_id]
    for lease in mine:
        lease.claims.end(lease.number)


class ClaimLease:
    """A daemon thread that renews one round claim's lease every third of the lease, until stopped.

    It stops by itself when the claim is no longer its run's (taken over after an expiry); a renewal that
    fails (an S3 outage) is retried at the next tick, and the commit's own claim check decides in the end.
    """

    def __init__(self, claims: RoundClaims, number: int, run_id: str, lease_s: float) -> None:
        self.claims = claims
        self.number = number
        self.run_id = run_id
        self.lease_s = lease_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"claim-lease-{number}", daemon=True)

    def start(self) -> "ClaimLease":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.claims.renew(self.number, self.run_id, self.lease_s):
                    self.lost = True
                    return
            except FileNotFoundError:
                self.lost = True
                return
            except Exception:
                continue

    def stop(self) -> None:
        """Stop renewing (waits for a renewal in progress)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


# The leases this process renews, by (store root, round); module state because a lease outlives the task
# that claimed the round and ends in the flow's commit or its failure hook.
_LEASES: dict[tuple[str, int], ClaimLease] = {}
_LEASES_LOCK = threading.Lock()

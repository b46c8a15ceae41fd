"""Round claims expire by lease, not by host (finding 2 of issue 15): a dead holder on another host frees
the round once its lease runs out, a live holder keeps it by renewing, a flow-run retry reuses its claim,
and `selfinstruct unlock` lifts an expired claim but refuses a live one.

Leases here are 1-2 s; every wait polls a condition with a deadline.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from schemas import Settings
from selfinstruct.cli import app
from tasks.resources.processes import poll_until
from tasks.resources.store.claims import RoundClaimedError
from tasks.resources.store.rounds import Store

runner = CliRunner()


def _store(path: Path, lease_s: float = 1.0) -> Store:
    return Store(str(path), Settings(store_url=str(path), claim_lease_s=lease_s))


def _claim_of_a_dead_pod(store: Store, number: int, lease_s: float) -> Path:
    """A claim written by a worker pod that was killed: another host, a pid that means nothing here."""
    folder = Path(store.round_dir(number))
    folder.mkdir(parents=True)
    now = datetime.now(UTC)
    claim = {
        "run_id": "run-on-pod-1",
        "host": "worker-pod-1",
        "pid": 1,
        "claimed_at": now.isoformat(),
        "attempt": 1,
        "lease_s": lease_s,
        "lease_expires_at": (now + timedelta(seconds=lease_s)).isoformat(),
    }
    path = folder / "claim-0001.json"
    path.write_text(json.dumps(claim))
    return path


def _claims(store: Store, run_id: str) -> bool:
    try:
        store.claim_next_round(run_id, renew=False)
    except RoundClaimedError:
        return False
    return True


def test_claim_of_a_dead_host_expires_with_its_lease(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _claim_of_a_dead_pod(store, 1, lease_s=2)
    with pytest.raises(RoundClaimedError, match="worker-pod-1"):
        store.claim_next_round("run-b", renew=False)
    poll_until(lambda: _claims(store, "run-b"), 30, "run-b's claim", 0.1)
    assert store.holds_claim(1, "run-b")


def test_a_live_holder_keeps_its_round_by_renewing(tmp_path: Path) -> None:
    holder = _store(tmp_path, lease_s=1)
    assert holder.claim_next_round("run-a") == 1
    first_expiry = json.loads((Path(holder.round_dir(1)) / "claim-0001.json").read_text())["lease_expires_at"]
    try:
        # Wait until the first lease has run out twice over: only renewals keep the claim live.
        limit = datetime.fromisoformat(first_expiry) + timedelta(seconds=1)
        poll_until(lambda: datetime.now(UTC) > limit, 30, "the lease limit", 0.1)
        assert holder.round_is_live(1)
        with pytest.raises(RoundClaimedError, match="run-a"):
            _store(tmp_path).claim_next_round("run-b", renew=False)
    finally:
        holder.end_claim(1)
    # Released at the end of the round: the next run takes the round at once.
    assert not holder.round_is_live(1)
    assert _store(tmp_path).claim_next_round("run-b", renew=False) == 1


def test_a_retry_of_the_same_flow_run_reuses_its_claim(tmp_path: Path) -> None:
    store = _store(tmp_path, lease_s=60)
    assert store.claim_next_round("run-a", renew=False) == 1
    assert store.claim_next_round("run-a", renew=False) == 1
    assert sorted(p.name for p in Path(store.round_dir(1)).glob("claim-*.json")) == ["claim-0001.json"]


def test_unlock_refuses_a_live_lease_and_lifts_an_expired_one(tmp_path: Path) -> None:
    store = _store(tmp_path)
    claim = _claim_of_a_dead_pod(store, 1, lease_s=2)
    args = ["unlock", "--round", "1", "--store", str(tmp_path)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert refused.output.startswith("error: ") and "worker-pod-1" in refused.output
    assert claim.exists()

    def unlocked() -> bool:
        result = runner.invoke(app, args)
        return result.exit_code == 0 and "round 1 unlocked" in result.output

    poll_until(unlocked, 30, "the round to unlock", 0.1)
    assert not claim.exists()
    assert store.claim_next_round("run-b", renew=False) == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [("none", "has no claim"), ("committed", "is committed")],
)
def test_unlock_of_a_round_without_a_claim(tmp_path: Path, setup: str, message: str) -> None:
    folder = Path(_store(tmp_path).round_dir(1))
    folder.mkdir(parents=True)
    if setup == "committed":
        (folder / "manifest.json").write_text("{}")
    result = runner.invoke(app, ["unlock", "--round", "1", "--store", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output


def test_an_unreadable_claim_is_stale(tmp_path: Path) -> None:
    store = _store(tmp_path, lease_s=60)
    folder = Path(store.round_dir(1))
    folder.mkdir(parents=True)
    (folder / "claim-0001.json").write_bytes(b"")
    assert not store.round_is_live(1)
    assert store.claim_next_round("run-b", renew=False) == 1
    assert store.holds_claim(1, "run-b")

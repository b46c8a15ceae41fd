"""Faults injected into real processes on loopback: after each one the store is sound and the rerun finishes.

Three kinds: an LLM server that fails in every way a server can (in-process flow, real HTTP), an S3
endpoint (moto, its own process) frozen in the middle of a commit, and the CLI process SIGKILLed at
seeded random points of a round. `RELIABILITY_SEED` replays another draw of the random points.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
import s3fs
from typer.testing import CliRunner

import tasks.resources.store.claims
from flows.bootstrap import bootstrap_round
from schemas import BootstrapConfig, RoundParams, Settings
from selfinstruct.cli import app
from tasks.resources.llm.protocol import LLMError
from tasks.resources.store.files import StoreFiles
from tasks.resources.store.rounds import Store
from tests.support.checks import assert_store_sound
from tests.support.fake_openai import FaultConfig
from tests.support.model_like import ModelLikeFake
from tests.support.processes import MotoProcess, cli_env, moto_bucket, run_cli

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("RELIABILITY_SEED", "20261122"))
PROMPTS = 8


def _params(store_url: str, llm_url: str) -> RoundParams:
    # No store slot: the claim is what these tests exercise, and a killed holder's slot would stay taken.
    return RoundParams(
        store_url=store_url,
        llm_urls=[llm_url],
        config=BootstrapConfig(prompts_per_round=PROMPTS),
        store_slot=False,
    )


@pytest.fixture
def claims_of_an_exited_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Round claims written in-process name a process that has exited, as a failed CLI run's claim does.

    In-process runs share the test's pid, which is alive, so a rerun would rightly take the failed run's
    claim for a live one (so would a retry of the flow in the same process).
    """
    exited = subprocess.Popen(["true"])
    exited.wait()
    monkeypatch.setattr(
        tasks.resources.store.claims, "os", SimpleNamespace(getpid=lambda: exited.pid, kill=os.kill)
    )


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small HTTP requests (so faults land everywhere), and a 2 s timeout so a hang costs 2 s."""
    monkeypatch.setenv("SELFINSTRUCT_LLM_BATCH_SIZE", "2")
    monkeypatch.setenv("SELFINSTRUCT_LLM_CONCURRENCY", "2")
    monkeypatch.setenv("SELFINSTRUCT_LLM_TIMEOUT_S", "2")


# -- the LLM server -------------------------------------------------------------------------------------


def test_flaky_llm_server_round_completes(prefect_server: None, small_batches: None, tmp_path: Path) -> None:
    """500, 429, hangs past the timeout, closed connections, malformed JSON, missing choices: retried;
    empty and cut-off texts: kept as data and rejected with a reason. The round commits once, sound."""
    # The script puts every fault in the first requests; then ~30% of requests fail at random.
    script: deque[Any] = deque(
        ["500", None, "429", "empty", "hang", "length", "close", None, "malformed", "drop_choice"]
    )
    faults = FaultConfig(
        p_500=0.05,
        p_429=0.05,
        p_hang=0.02,
        p_close=0.04,
        p_malformed=0.04,
        p_empty=0.04,
        p_length=0.04,
        p_drop_choice=0.03,
        retry_after_s=0.2,
        hang_s=30,
        script=script,
    )
    store_url = str(tmp_path / "store")
    with ModelLikeFake(latency_s=0.02, faults=faults, rng_seed=SEED) as fake:
        summary = bootstrap_round(_params(store_url, fake.url))
    store = Store(store_url)
    assert summary["round"] == 1 and store.committed_rounds() == [1]
    report = assert_store_sound(store)
    assert report.instructions > 0
    assert {"500", "429", "hang", "close", "malformed", "empty", "length", "drop_choice"} <= set(
        fake.faults_injected
    )
    requests = store.read_table(1, "requests").to_pylist()
    assert "" in {r["text"] for r in requests} and "length" in {r["finish_reason"] for r in requests}
    reasons = set(store.read_table(1, "rejected").column("reason").to_pylist())
    assert reasons and all(reasons)
    print(f"\nflaky LLM: {fake.requests} requests, faults {dict(fake.faults_injected)}")


def test_400_fails_fast_with_the_servers_message(
    prefect_server: None, small_batches: None, claims_of_an_exited_process: None, tmp_path: Path
) -> None:
    """A 4xx is the request's fault: no retry (neither the client's nor Prefect's 10 s task retry). A 400 for
    a batch is sent once more prompt by prompt, to lose only a prompt the server cannot take (issue 17); when
    every prompt is refused alone too, the round fails."""
    store_url = str(tmp_path / "store")
    faults = FaultConfig(p_400=1.0)
    with ModelLikeFake(latency_s=0.05, faults=faults) as fake:
        start = time.monotonic()
        with pytest.raises(LLMError, match="this is the fake server's 400 message"):
            bootstrap_round(_params(store_url, fake.url))
        assert time.monotonic() - start < 8
        sent = [tuple(body["prompt"]) for body in fake.bodies]
        # Each batch once, then each of its prompts once alone: no request was repeated.
        assert fake.faults_injected["400"] >= 3 and len(sent) == len(set(sent))
        faults.p_400 = 0.0
        store = Store(store_url)
        assert store.committed_rounds() == [] and store.uncommitted_rounds() == [1]
        assert_store_sound(store)
        assert bootstrap_round(_params(store_url, fake.url))["round"] == 1
    assert store.committed_rounds() == [1]
    assert_store_sound(store)


# -- the S3 endpoint ------------------------------------------------------------------------------------


@pytest.fixture
def moto_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MotoProcess, str]]:
    """A moto S3 process with a bucket, SELFINSTRUCT_* pointing at it, and S3 timeouts of 1 s.

    Short timeouts make a frozen endpoint fail a read in seconds: one attempt per botocore call, two per
    s3fs call (s3fs retries timeouts itself).
    """
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)
    with moto_bucket(monkeypatch, "reliability", connect_s=1, read_s=1, write_s=30) as moto:
        yield moto, "s3://reliability/pause"


def _s3_store(url: str) -> Store:
    return Store(url, Settings(store_url=url))


def test_s3_frozen_mid_commit_then_resumed(
    prefect_server: None,
    claims_of_an_exited_process: None,
    moto_s3: tuple[MotoProcess, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Freeze the endpoint after k of the round's six files (seeded k). The commit fails on its next request
    (a HEAD that times out), a reader sees an error (never a partial round), and once the endpoint resumes
    the round is absent until a rerun commits it, from cached completions only."""
    moto, store_url = moto_s3
    files_before_freeze = random.Random(SEED).randint(1, 5)
    original = Store.write_table
    written = 0

    def write_table(self: Store, *args: Any, **kwargs: Any) -> Any:
        nonlocal written
        if written == files_before_freeze:
            moto.pause()
        written += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Store, "write_table", write_table)
    with ModelLikeFake() as fake:
        with pytest.raises(Exception):  # noqa: B017 - whatever the S3 client raises on a dead endpoint
            bootstrap_round(_params(store_url, fake.url))
        with pytest.raises(Exception):  # noqa: B017
            _s3_store(store_url).committed_rounds()
        moto.resume()
        time.sleep(1)  # let the resumed server finish the requests it had accepted while frozen
        store = _s3_store(store_url)
        assert store.committed_rounds() == [] and store.uncommitted_rounds() == [1]
        assert_store_sound(store)

        monkeypatch.setattr(Store, "write_table", original)
        requests_before = fake.requests
        assert bootstrap_round(_params(store_url, fake.url))["round"] == 1
        assert fake.requests == requests_before  # every completion came from the store's cache
    assert store.committed_rounds() == [1]
    assert_store_sound(store)
    print(f"\nS3 frozen after {files_before_freeze} of 6 files; rerun committed round 1")


def test_s3_frozen_during_the_manifest_write(
    prefect_server: None,
    claims_of_an_exited_process: None,
    moto_s3: tuple[MotoProcess, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Freeze the endpoint as the manifest PUT goes out. The PUT waits the outage out: aiobotocore sends
    `Expect: 100-continue` and aiohttp waits for the server's "100 Continue" with no read timeout. A reader
    during the outage gets an error, never a partial round; the round then commits exactly once."""
    moto, store_url = moto_s3
    original = StoreFiles.exclusive_write
    timers: list[threading.Timer] = []
    reader_saw: list[object] = []

    def read_then_resume() -> None:
        try:
            reader_saw.append(_s3_store(store_url).committed_rounds())
        except Exception as error:
            reader_saw.append(type(error).__name__)
        moto.resume()

    def exclusive_write(self: StoreFiles, path: str, data: bytes) -> bool:
        if path.endswith("/manifest.json"):
            moto.pause()
            timers.append(threading.Timer(0.5, read_then_resume))
            timers[-1].start()
        return original(self, path, data)

    monkeypatch.setattr(StoreFiles, "exclusive_write", exclusive_write)
    with ModelLikeFake() as fake:
        try:
            assert bootstrap_round(_params(store_url, fake.url))["round"] == 1
        finally:
            for timer in timers:
                timer.join()
        assert len(reader_saw) == 1 and isinstance(reader_saw[0], str), reader_saw
        store = _s3_store(store_url)
        assert store.committed_rounds() == [1]
        assert_store_sound(store)
        monkeypatch.setattr(StoreFiles, "exclusive_write", original)
        assert bootstrap_round(_params(store_url, fake.url))["round"] == 2
    assert_store_sound(store)
    print(f"\nmanifest PUT frozen: waited it out; a reader meanwhile got {reader_saw[0]}")


# -- the flow process -----------------------------------------------------------------------------------

# Runs the CLI in a process that SIGKILLs itself at an exact point of the round, named by
# RELIABILITY_KILL_AT: "<stage>:k" once k HTTP batches of a stage are answered and persisted, "dedup" in the
# middle of ROUGE-L dedup, "commit:k" before the k-th of the round's six files, "manifest" just before the
# manifest write, "committed" just after it.
KILLER = r"""
import os, signal, sys
import tasks.round.records
import tasks.resources.store.completions, tasks.resources.store.files, tasks.resources.store.rounds

point, _, k = os.environ["RELIABILITY_KILL_AT"].partition(":")
k = int(k or 0)
calls = 0

def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if point in ("instruction", "classify", "instance"):
    put_many = tasks.resources.store.completions.StoreCompletionCache.put_many
    def counted_put(self, records):
        global calls
        put_many(self, records)
        calls += bool(records) and records[0].stage == point
        if calls == k:
            die()
    tasks.resources.store.completions.StoreCompletionCache.put_many = counted_put
elif point == "dedup":
    tasks.round.records.deduplicate = die
elif point == "commit":
    write_table = tasks.resources.store.rounds.Store.write_table
    def counted_write(self, *args, **kwargs):
        global calls
        calls += 1
        if calls == k:
            die()
        return write_table(self, *args, **kwargs)
    tasks.resources.store.rounds.Store.write_table = counted_write
elif point in ("manifest", "committed"):
    exclusive_write = tasks.resources.store.files.StoreFiles.exclusive_write
    def around_manifest(self, path, data):
        if path.endswith("/manifest.json") and point == "manifest":
            die()
        written = exclusive_write(self, path, data)
        if path.endswith("/manifest.json"):
            die()
        return written
    tasks.resources.store.files.StoreFiles.exclusive_write = around_manifest

from selfinstruct.cli import main
sys.argv = ["selfinstruct", *sys.argv[1:]]
main()
"""


def _kill_points(rng: random.Random) -> list[tuple[str, list[int]]]:
    """(kill point, committed rounds expected after it), in the order a round passes them."""
    return [
        (f"instruction:{rng.randint(1, PROMPTS // 2 - 1)}", []),  # batches of 2 prompts
        ("dedup", []),
        (f"classify:{rng.randint(1, 6)}", []),  # ~12 batches: most of the ~24 instructions are kept
        (f"instance:{rng.randint(1, 6)}", []),
        (f"commit:{rng.randint(1, 6)}", []),
        ("manifest", []),
        ("", [1]),  # a clean rerun completes round 1
        ("committed", [1, 2]),  # round 2 killed just after its manifest: committed, only its report missing
    ]


def _cached_prompts(store_dir: Path) -> set[str]:
    """Prompts whose completions the store's rounds have persisted, committed or not."""
    return {
        row["prompt"]
        for part in store_dir.glob("rounds/round=*/completions/*.parquet")
        for row in pq.read_table(part, columns=["prompt"]).to_pylist()
    }


def test_flow_process_killed_at_random_points(prefect_server: None, tmp_path: Path) -> None:
    """SIGKILL the CLI in generation, dedup, classification, instances, between commit files and around
    the manifest; after every kill the store verifies and shows no partial round, and the rerun finishes
    the round without asking the server again for what was already answered."""
    from prefect.settings import PREFECT_API_URL

    store_url = str(tmp_path / "store")
    store = Store(store_url)
    env = cli_env(
        str(PREFECT_API_URL.value()),
        SELFINSTRUCT_LLM_BATCH_SIZE="2",
        SELFINSTRUCT_LLM_CONCURRENCY="2",
        SELFINSTRUCT_LLM_TIMEOUT_S="5",
    )
    args = ["run", "--store", store_url, "--prompts", str(PROMPTS), "--no-store-slot"]
    log = []
    with ModelLikeFake(latency_s=0.05) as fake:
        args += ["--llm-url", fake.url]
        for point, expected in _kill_points(random.Random(SEED)):
            cached = _cached_prompts(tmp_path / "store")
            bodies_before = len(fake.bodies)
            code, output = run_cli(*args, env={**env, "RELIABILITY_KILL_AT": point}, script=KILLER)
            assert code == (-9 if point else 0), output[-3000:]
            assert store.committed_rounds() == expected, point
            assert_store_sound(store)
            assert _cached_prompts(tmp_path / "store") >= cached  # nothing persisted is ever lost
            sent = [p for body in list(fake.bodies)[bodies_before:] for p in body["prompt"]]
            assert not set(sent) & cached, f"{point}: a persisted completion was requested again"
            log.append(f"{point or 'clean rerun'}: {len(sent)} prompts sent")
            if not point:
                # Everything was answered and persisted before the kill at the manifest: the rerun sends
                # only the CLI's one-token preflight.
                assert len(sent) == 1, output[-3000:]
    result = CliRunner().invoke(app, ["verify", "--store", store_url])
    assert result.exit_code == 0 and "2 committed rounds" in result.output, result.output
    print(f"\nseed {SEED}: " + "; ".join(log))

"""A round killed during generation is invisible, and its rerun requests only the missing completions."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.resources.store.rounds import Store
from tests.support.fake_openai import FakeOpenAI

pytestmark = pytest.mark.slow

PROMPTS = 24


def _run_cli(store_url: str, llm_url: str, api_url: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=api_url,
        SELFINSTRUCT_LLM_BATCH_SIZE="2",
        SELFINSTRUCT_LLM_CONCURRENCY="2",
        SELFINSTRUCT_LLM_MAX_RETRIES="0",
    )
    # No store slot: a killed run's slot is freed by the Prefect server's lease repossessor after 60 s,
    # a service the test harness does not run. The store's round claim is what this test exercises.
    command = [sys.executable, "-m", "selfinstruct", "run", "--store", store_url, "--llm-url", llm_url]
    command.append("--no-store-slot")
    return subprocess.Popen(
        [*command, "--prompts", str(PROMPTS)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _prompts(fake: FakeOpenAI, start: int, max_tokens: int | None = None) -> list[str]:
    """Prompts the server received from body number `start` on (instruction generation: max_tokens 1024)."""
    bodies = list(fake.bodies)[start:]
    return [p for body in bodies if max_tokens in (None, body.get("max_tokens")) for p in body["prompt"]]


def test_killed_round_is_redone_without_paying_twice(prefect_server: None, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    api_url = str(PREFECT_API_URL.value())
    store_url = str(tmp_path / "store")
    with FakeOpenAI(latency_s=1.0) as fake:
        first = _run_cli(store_url, fake.url, api_url)
        # Kill it once the first batches are persisted (answers take 1 s, so later ones are still out).
        completions_dir = Path(store_url) / "rounds" / "round=00001" / "completions"
        deadline = time.monotonic() + 240
        while (
            not list(completions_dir.glob("*.parquet"))
            and time.monotonic() < deadline
            and first.poll() is None
        ):
            time.sleep(0.05)
        assert first.poll() is None, first.stdout.read().decode() if first.stdout else ""
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        received_before = len(fake.bodies)

        store = Store(store_url)
        assert store.committed_rounds() == []
        assert store.uncommitted_rounds() == [1]
        assert Path(store.round_dir(1)) / "completions" == completions_dir
        parts = completions_dir.glob("*.parquet")
        persisted = [row for part in parts for row in pq.read_table(part).to_pylist()]
        # Killed mid-generation, some batches persisted (later stages' too: the stages overlap).
        cached = {row["prompt"] for row in persisted if row["stage"] == "instruction"}
        assert 0 < len(cached) < PROMPTS

        status = subprocess.run(
            [sys.executable, "-m", "selfinstruct", "status", "--store", store_url],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "no committed rounds" in status.stdout

        second = _run_cli(store_url, fake.url, api_url)
        output, _ = second.communicate(timeout=300)
        assert second.returncode == 0, output.decode()

    assert store.committed_rounds() == [1]
    sent = _prompts(fake, received_before)
    assert not set(sent) & {row["prompt"] for row in persisted}, "a persisted completion was requested again"
    assert len(_prompts(fake, received_before, max_tokens=1024)) == PROMPTS - len(cached)
    # The server load counts what the committing run sent, not the completions it reused.
    load = store.read_manifest(1).load
    assert load is not None
    assert load.stages["instruction"].prompts == len(_prompts(fake, received_before, max_tokens=1024))
    requests = store.read_table(1, "requests").to_pylist()
    assert {r["prompt"] for r in requests if r["stage"] == "instruction"} >= cached

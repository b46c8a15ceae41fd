"""Soak: 20 small rounds through the CLI against a flaky LLM server, with the CLI SIGKILLed a few times.

The figures are printed (run with -s). `python benchmarks/soak.py` runs this test and records them, with the
machine, in benchmarks/SOAK.md (SOAK_FIGURES names the file); the suite itself never writes a tracked file.
"""

from __future__ import annotations

import os
import platform
import random
import signal
import subprocess
import time
from collections import Counter, deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from selfinstruct.cli import app
from tasks.resources.store.rounds import Store
from tests.support.checks import assert_store_sound
from tests.support.fake_openai import FaultConfig
from tests.support.model_like import ModelLikeFake
from tests.support.processes import cli_command, cli_env

# Minutes long: the suite leaves it out (`-m 'not soak'` in pyproject.toml); benchmarks/soak.py runs it.
pytestmark = [pytest.mark.slow, pytest.mark.soak]

SEED = int(os.environ.get("RELIABILITY_SEED", "20261122"))
ROUNDS = 20
PROMPTS = 3
KILLS = 3
TIME_LIMIT_S = 240
RETRIED_FAULTS = ("500", "429", "hang", "close", "malformed", "drop_choice")
# max_tokens of each stage's requests (BootstrapConfig defaults), to name where a kill landed.
STAGE_BY_MAX_TOKENS = {
    1: "the preflight check",
    1024: "instruction generation",
    3: "classification",
    300: "instance generation",
}


def _faults() -> FaultConfig:
    """~18% of requests fail; the script makes sure every kind shows up at least once."""
    script: deque[Any] = deque(
        ["500", None, "429", None, "hang", "empty", None, "close", "length", None, "malformed", "drop_choice"]
    )
    return FaultConfig(
        p_500=0.04,
        p_429=0.03,
        p_hang=0.01,
        p_close=0.02,
        p_malformed=0.02,
        p_empty=0.02,
        p_length=0.02,
        p_drop_choice=0.02,
        retry_after_s=0.1,
        hang_s=30,
        script=script,
    )


def _reused_completions(store: Store, fake: ModelLikeFake, phase_starts: list[datetime]) -> int:
    """Committed completions that a killed process got from the server and a later one reused."""
    answered_in: dict[str, set[int]] = {}
    for phase, prompt in fake.answered_prompts:
        answered_in.setdefault(prompt, set()).add(phase)
    reused = 0
    for number in store.committed_rounds():
        created = store.read_manifest(number).created_at
        committer = max(i for i, start in enumerate(phase_starts) if start <= created)
        for prompt in store.read_table(number, "requests").column("prompt").to_pylist():
            phases = answered_in.get(prompt, set())
            reused += bool(phases) and committer not in phases
    return reused


def _write_soak_md(figures: dict[str, str], target: Path) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [
        "# Soak test figures",
        "",
        "Written by `python benchmarks/soak.py` (it runs `tests/reliability/test_soak.py`).",
        "",
        f"Machine: {machine}, {platform.system()} {platform.release()}; seed {SEED}.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in figures.items()),
        "",
    ]
    target.write_text("\n".join(lines))


def test_soak_twenty_rounds_with_faults_and_kills(prefect_server: None, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    rng = random.Random(SEED)
    store_url = str(tmp_path / "store")
    store = Store(store_url)
    env = cli_env(
        str(PREFECT_API_URL.value()),
        SELFINSTRUCT_LLM_BATCH_SIZE="2",
        SELFINSTRUCT_LLM_CONCURRENCY="2",
        SELFINSTRUCT_LLM_TIMEOUT_S="2",
    )
    # Kill after the server has seen this many requests: ~14 requests a round, so within the first ~12.
    kill_at = deque(sorted(rng.sample(range(15, 170), KILLS)))
    kills: list[str] = []
    phase_starts: list[datetime] = []
    start = time.monotonic()
    with ModelLikeFake(latency_s=0.02, faults=_faults(), rng_seed=SEED) as fake:
        while len(store.committed_rounds()) < ROUNDS:
            assert time.monotonic() - start < TIME_LIMIT_S, "soak ran past its time limit"
            remaining = ROUNDS - len(store.committed_rounds())
            fake.phase = len(phase_starts)
            phase_starts.append(datetime.now(UTC))
            log = tmp_path / f"cli-{fake.phase}.log"
            args = ["run", "--store", store_url, "--llm-url", fake.url, "--rounds", str(remaining)]
            args += ["--prompts", str(PROMPTS), "--no-store-slot"]
            with log.open("wb") as output:
                process = subprocess.Popen(
                    cli_command(*args), env=env, stdout=output, stderr=subprocess.STDOUT
                )
                try:
                    while process.poll() is None and time.monotonic() - start < TIME_LIMIT_S:
                        if kill_at and fake.requests >= kill_at[0]:
                            kill_at.popleft()
                            stage = STAGE_BY_MAX_TOKENS.get(int(fake.bodies[-1].get("max_tokens") or 0), "?")
                            os.kill(process.pid, signal.SIGKILL)
                            process.wait()
                            kills.append(f"round {len(store.committed_rounds()) + 1}, in {stage}")
                            break
                        time.sleep(0.02)
                finally:
                    if process.poll() is None:
                        process.kill()
                        process.wait()
            assert process.returncode in (0, -signal.SIGKILL), log.read_text()[-3000:]
            assert_store_sound(store)
        elapsed = time.monotonic() - start

    report = assert_store_sound(store)
    result = CliRunner().invoke(app, ["verify", "--store", store_url])
    assert result.exit_code == 0 and f"{ROUNDS} committed rounds" in result.output, result.output
    assert store.committed_rounds() == list(range(1, ROUNDS + 1))
    assert len(kills) == KILLS
    retried = sum(fake.faults_injected[f] for f in RETRIED_FAULTS)
    committed_completions = sum(store.read_manifest(n).files["requests.parquet"].rows for n in range(1, 21))
    faults = Counter(fake.faults_injected)
    figures = {
        "rounds committed": f"{ROUNDS} ({PROMPTS} prompts each), verified",
        "instructions in the pool (seeds excluded)": str(report.instructions),
        "CLI processes": f"{len(phase_starts)} ({len(kills)} SIGKILLed: {'; '.join(kills)})",
        "HTTP requests to the LLM server": f"{fake.requests} ({len(phase_starts)} of them preflight checks)",
        "faults injected": ", ".join(f"{name}: {count}" for name, count in sorted(faults.items())),
        "requests retried (500/429/hang/close/malformed/missing choice)": str(retried),
        "prompts sent / completions committed": f"{fake.prompts} / {committed_completions}",
        "completions reused after a kill": str(_reused_completions(store, fake, phase_starts)),
        "wall time": f"{elapsed:.0f} s",
    }
    print("\nsoak:\n" + "\n".join(f"  {name}: {value}" for name, value in figures.items()))
    if os.environ.get("SOAK_FIGURES"):
        _write_soak_md(figures, Path(os.environ["SOAK_FIGURES"]))

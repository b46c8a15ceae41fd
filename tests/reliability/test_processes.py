"""Prefect is configured before it is imported, and the CLI leaves no process behind (findings 1 and 5 of
issue 15).

The CLI runs as its own process here, in Prefect's ephemeral mode (no PREFECT_API_URL), as a new user's
first `selfinstruct run` does, with HOME pointed at an empty folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tasks.resources.processes import poll_until
from tests.support.model_like import ModelLikeFake
from tests.support.processes import ROOT

RECORD_PREFECT_SETTINGS = r"""
import json, os, sys

class RecordFirstPrefectImport:
    def find_spec(self, name, path=None, target=None):
        if name == "prefect" and not os.path.exists(os.environ["RECORD"]):
            keys = ("PREFECT_HOME", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                    "PREFECT_SERVER_ANALYTICS_ENABLED")
            with open(os.environ["RECORD"], "w") as handle:
                json.dump({key: os.environ.get(key) for key in keys}, handle)
        return None

sys.meta_path.insert(0, RecordFirstPrefectImport())
from selfinstruct.cli import main
sys.argv = ["selfinstruct", *sys.argv[1:]]
main()
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A new user's environment: no Prefect or selfinstruct settings, an empty home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SELFINSTRUCT_"))}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), **extra)
    return env


@pytest.mark.parametrize("command", ["audit", "report"])
def test_prefect_settings_are_applied_before_prefect_is_imported(tmp_path: Path, command: str) -> None:
    # Both import Prefect, then find no round in an empty store. (`run` refused in its LLM preflight once
    # served here, but the LLM client no longer imports Prefect, so a refused run never reaches it.)
    store = tmp_path / "store"
    record = tmp_path / "record.json"
    store.mkdir()
    args = [command, "--store", str(store)]
    done = subprocess.run(
        [sys.executable, "-c", RECORD_PREFECT_SETTINGS, *args],
        env=_env(tmp_path, RECORD=str(record)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert record.exists(), "the command did not import Prefect: the check proves nothing"
    seen = json.loads(record.read_text())
    assert seen["PREFECT_HOME"] == str(store.resolve() / "prefect")
    assert int(seen["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 300
    assert seen["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert not (tmp_path / "home" / ".prefect").exists()


def _start_round(tmp_path: Path, fake: ModelLikeFake) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / "cli.log"
    command = [sys.executable, "-m", "selfinstruct", "run", "--store", str(tmp_path / "store")]
    command += ["--llm-url", fake.url, "--prompts", "16", "--no-store-slot"]
    process = subprocess.Popen(
        command,
        env=_env(tmp_path, SELFINSTRUCT_LLM_BATCH_SIZE="1", SELFINSTRUCT_LLM_CONCURRENCY="1"),
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    # The preflight sends one completion; a second means the round is generating (Prefect's server is up).
    poll_until(lambda: fake.requests >= 3 or process.poll() is not None, 400, "the round to start", 0.2)
    assert process.poll() is None, log.read_text()[-3000:]
    return process, log


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _all_gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


@pytest.mark.slow
def test_sigkill_mid_round_leaves_no_process_behind(tmp_path: Path) -> None:
    with ModelLikeFake(latency_s=1.0) as fake:
        process, _log = _start_round(tmp_path, fake)
        children = _descendants(process.pid)
        assert any("uvicorn" in " ".join(p.cmdline()) for p in children), [p.cmdline() for p in children]
        process.kill()
        process.wait()
        poll_until(lambda: _all_gone(children), 60, "the CLI's child processes to end", 0.2)


@pytest.mark.slow
def test_sigterm_cancels_the_round_with_one_clear_line(tmp_path: Path) -> None:
    with ModelLikeFake(latency_s=1.0) as fake:
        process, log = _start_round(tmp_path, fake)
        children = _descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        poll_until(lambda: process.poll() is not None, 60, "the CLI to exit after SIGTERM", 0.2)
        poll_until(lambda: _all_gone(children), 60, "the CLI's child processes to end", 0.2)
    output = log.read_text()
    # 143 from the cancel, or SIGALRM from its backstop when the machine is too loaded for the grace timer
    assert process.returncode in (128 + signal.SIGTERM, -signal.SIGALRM), output[-3000:]
    assert "error: SIGTERM: cancelling; the round is not committed (a rerun resumes it)" in output
    # Prefect's own log of the task runs cancelled with the round may carry tracebacks (known, not ours).

"""Driving a local stack from outside, as its user does: `selfinstruct stack ...` in a clean environment,
and which round of its store is mid-way. Shared by tests/deployments/test_stack.py and benchmarks/recovery.py.
"""

import os
import subprocess
from pathlib import Path

from tasks.resources.store.rounds import Store
from tests.support.processes import ROOT, cli_command


def stack_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run `selfinstruct ARGS` from the repository root to the end, output captured.

    The caller's PREFECT_ and SELFINSTRUCT_ variables are dropped (the stack sets its own); a worker it
    starts looks for new runs every 2 s, so runs start soon after they are created.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SELFINSTRUCT_"))}
    env |= {"PREFECT_WORKER_QUERY_SECONDS": "2", "COLUMNS": "200"}
    return subprocess.run(
        cli_command(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def round_in_progress(store: Store) -> int | None:
    """An uncommitted round that has already persisted completions (so it is mid-round), or None."""
    for number in store.uncommitted_rounds():
        if list(Path(store.location(number), "completions").glob("*.parquet")):
            return int(number)
    return None

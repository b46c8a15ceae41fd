"""Prefect for a benchmark process: a throwaway PREFECT_HOME (removed at exit), offline, quiet, its own
ephemeral API with time to start.

Prefect reads its settings once, when it is first imported: a benchmark calls `use_throwaway_prefect_home`
before it imports anything that imports Prefect.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def use_throwaway_prefect_home(prefix: str, startup_timeout_s: int) -> Path:
    """Point this process's Prefect at a new temporary home and an ephemeral API; returns the home."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(startup_timeout_s)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ.pop("PREFECT_API_URL", None)
    return home

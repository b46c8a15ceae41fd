"""Test-wide setup: Prefect state in a temporary home, and the real-component fixtures."""

import os
import tempfile

# Prefect reads these when its settings are first built: keep its database out of the user's home,
# give the API server time to start on 2 cores, and stay offline.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="selfinstruct-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
os.environ.pop("PREFECT_API_URL", None)
for name in list(os.environ):
    if name.startswith("SELFINSTRUCT_"):
        del os.environ[name]

pytest_plugins = [
    "tests.support.s3",
    "tests.support.prefect",
    "tests.support.llm_fixtures",
]

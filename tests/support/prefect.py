"""A real Prefect API server for flow tests (Prefect's own test harness, started once per session)."""

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """Run the session's flows against a temporary Prefect server with its own database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield

"""A commit to a frozen S3 endpoint fails within a known time instead of waiting the outage out (finding 9 of
issue 15), and the rerun completes once the endpoint is back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flows.bootstrap import bootstrap_round
from schemas import BootstrapConfig, RoundParams, Settings
from tasks.resources.store.files import StoreError, StoreFiles
from tasks.resources.store.rounds import Store
from tests.support.checks import assert_store_sound
from tests.support.model_like import ModelLikeFake
from tests.support.processes import MotoProcess, moto_bucket

pytestmark = pytest.mark.slow

OUTAGE_S = 120  # far longer than the write timeout; the endpoint is resumed early once the commit has failed


@pytest.fixture
def frozen_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MotoProcess, str]]:
    with moto_bucket(monkeypatch, "frozen", connect_s=2, read_s=2, write_s=5) as moto:
        yield moto, "s3://frozen/store"


def test_commit_to_a_frozen_endpoint_fails_in_bounded_time_and_the_rerun_completes(
    prefect_server: None, frozen_endpoint: tuple[MotoProcess, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    moto, store_url = frozen_endpoint
    original = StoreFiles.exclusive_write
    resume = threading.Timer(OUTAGE_S, moto.resume)

    def freeze_at_the_manifest(self: StoreFiles, path: str, data: bytes) -> bool:
        if path.endswith("/manifest.json") and not resume.is_alive():
            moto.pause()
            resume.start()
        return original(self, path, data)

    monkeypatch.setattr(StoreFiles, "exclusive_write", freeze_at_the_manifest)
    params = RoundParams(
        store_url=store_url, config=BootstrapConfig(prompts_per_round=4), store_slot=False, llm_urls=[]
    )
    try:
        with ModelLikeFake() as fake:
            params = params.model_copy(update={"llm_urls": [fake.url]})
            with pytest.raises(StoreError, match="no answer to a write within 5s"):
                bootstrap_round(params)
            # Failed while the endpoint was still frozen: the wait was bounded by the write timeout.
            assert resume.is_alive()
            resume.cancel()
            moto.resume()
            store = Store(store_url, Settings(store_url=store_url))
            # The frozen PUT may land once the endpoint answers again: the round is then committed by it.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not store.committed_rounds():
                time.sleep(0.5)
            committed_before = store.committed_rounds()
            monkeypatch.setattr(StoreFiles, "exclusive_write", original)
            summary: dict[str, Any] = bootstrap_round(params)
        assert summary["round"] == len(committed_before) + 1
        assert store.committed_rounds() == list(range(1, summary["round"] + 1))
        assert_store_sound(store)
    finally:
        resume.cancel()
        moto.resume()

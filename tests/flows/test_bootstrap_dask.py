"""A round scored on a Dask cluster commits exactly what the single-process engine commits."""

from pathlib import Path

import pytest

from flows.bootstrap import bootstrap_round
from schemas import BootstrapConfig, RoundParams
from tasks.resources.store.rounds import Store
from tests.support.fake_openai import FakeOpenAI

pytestmark = pytest.mark.slow


def _round(store_url: str, llm_url: str) -> list[dict[str, object]]:
    params = RoundParams(
        store_url=store_url, llm_urls=[llm_url], config=BootstrapConfig(prompts_per_round=6), store_slot=False
    )
    bootstrap_round(params)
    store = Store(store_url)
    columns = ["id", "instruction", "max_rouge", "most_similar", "avg_similarity"]
    return store.read_table(1, "instructions").select(columns).to_pylist() + [
        {"rejected": r}
        for r in store.read_table(1, "rejected").select(["reason", "text", "max_rouge"]).to_pylist()
    ]


def test_dask_scoring_commits_the_same_round(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import LocalCluster

    # The fake server's completions depend only on prompt and seed, so both runs see the same candidates.
    with FakeOpenAI() as fake:
        local = _round(str(tmp_path / "local"), fake.url)
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
        ) as cluster:
            monkeypatch.setenv("SELFINSTRUCT_DASK_ADDRESS", cluster.scheduler_address)
            sharded = _round(str(tmp_path / "dask"), fake.url)
    assert any("rejected" in row for row in local)  # the fake's echoes are near-duplicates: dedup had work
    assert sharded == local

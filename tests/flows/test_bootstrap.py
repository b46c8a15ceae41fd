"""Bootstrap rounds end to end: a real Prefect server, a real LLM server on loopback, a real store."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.bootstrap import bootstrap_round
from schemas import BootstrapConfig, RoundParams, SamplingParams
from selfinstruct.cli import app
from tasks.resources.store.rounds import Store

pytestmark = pytest.mark.slow


def _small_config() -> BootstrapConfig:
    """A round small enough for 2 CPU cores: few prompts, short completions."""
    return BootstrapConfig(
        prompts_per_round=4,
        instruction_sampling=SamplingParams(
            temperature=0.7,
            top_p=0.5,
            max_tokens=160,
            presence_penalty=2.0,
            stop=("\n\n", "\n16", "16.", "16 ."),
        ),
        instance_sampling=SamplingParams(
            temperature=0.0, top_p=1.0, max_tokens=160, presence_penalty=0.0, stop=("Example 4", "Task:")
        ),
        max_instances=3,
    )


def test_two_rounds_on_the_embedded_model(prefect_server: None, embedded_llm: str, tmp_path: Path) -> None:
    store_url = str(tmp_path / "store")
    params = RoundParams(store_url=store_url, llm_urls=[embedded_llm], config=_small_config())

    first = bootstrap_round(params)
    store = Store(store_url)
    assert first["round"] == 1
    assert store.committed_rounds() == [1]
    manifest = store.read_manifest(1)
    instructions = store.read_table(1, "instructions")
    instances = store.read_table(1, "instances")
    rejected = store.read_table(1, "rejected")
    assert manifest.counts["kept"] == instructions.num_rows >= 1
    assert manifest.counts["instances"] == instances.num_rows >= 1
    assert sum(v for k, v in manifest.counts.items() if k.startswith("rejected:")) == rejected.num_rows
    assert None not in instructions.column("is_classification").to_pylist()
    assert all(r for r in rejected.column("reason").to_pylist())
    for name, entry in manifest.files.items():
        assert store.file_checksum(1, name) == entry.sha256
    requests = store.read_table(1, "requests")
    assert set(requests.column("stage").to_pylist()) >= {"instruction", "classify", "instance"}
    assert manifest.config.pipelined  # the default: the stages overlapped
    verified = CliRunner().invoke(app, ["verify", "--store", store_url])
    assert verified.exit_code == 0, verified.output
    # How busy the round kept the server, from the requests' send and receive times.
    load = manifest.load
    assert load is not None and load.concurrency >= 1 and 0.0 <= load.busy_fraction <= 1.0
    assert list(load.stages) == ["instruction", "classify", "instance"]
    assert load.completion_tokens == sum(s.completion_tokens for s in load.stages.values()) >= 1
    sent = {r for r in requests.column("request_id").to_pylist() if r}  # "": refused without a request
    assert sum(s.requests for s in load.stages.values()) == len(sent)
    assert load.round_wall_s is not None and load.round_wall_s >= load.wall_s > 0

    second = bootstrap_round(params)
    assert second["round"] == 2
    manifest2 = store.read_manifest(2)
    # Round 2 was deduplicated against the seeds plus round 1's instructions.
    assert manifest2.pool_size_before == manifest.pool_size_before + manifest.counts["kept"]
    index = store.read_table(2, "pool_index")
    assert index.column("id").to_pylist() == store.read_table(2, "instructions").column("id").to_pylist()

    # The Prefect API holds the round's artifacts under stable keys, with the manifest's counts.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.publish.artifacts import COUNTS_KEY, PROGRESS_KEY, SAMPLES_KEY

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[COUNTS_KEY, SAMPLES_KEY, PROGRESS_KEY])
            )
        )
    by_key: dict[str, list[object]] = {}
    for artifact in artifacts:
        by_key.setdefault(str(artifact.key), []).append(artifact)
    assert len(by_key[COUNTS_KEY]) == 2 and len(by_key[SAMPLES_KEY]) == 2 and len(by_key[PROGRESS_KEY]) >= 2
    latest = max(by_key[COUNTS_KEY], key=lambda a: a.created)  # type: ignore[attr-defined]
    rows = json.loads(latest.data) if isinstance(latest.data, str) else latest.data  # type: ignore[attr-defined]
    from tasks.publish.artifacts import counts_rows

    assert rows == counts_rows(manifest2.counts)


def test_a_round_through_the_chat_endpoint(prefect_server: None, embedded_llm: str, tmp_path: Path) -> None:
    from tasks.resources.llm.cache import completion_key

    small = _small_config()
    short = {"max_tokens": 48}
    config = small.model_copy(
        update={
            "prompts_per_round": 1,
            "max_instances": 1,
            "instruction_sampling": small.instruction_sampling.model_copy(update=short),
            "instance_sampling": small.instance_sampling.model_copy(update=short),
        }
    )
    store_url = str(tmp_path / "store")
    params = RoundParams(store_url=store_url, llm_urls=[embedded_llm], llm_api="chat", config=config)

    assert bootstrap_round(params)["round"] == 1
    requests = Store(store_url).read_table(1, "requests").to_pylist()
    # One prompt per HTTP request, and every cache key says which api answered it.
    assert len({r["request_id"] for r in requests}) == len(requests) >= 1
    first = next(r for r in requests if r["stage"] == "instruction")
    expected = completion_key(
        first["model"], first["prompt"], config.instruction_sampling, first["seed"], api="chat"
    )
    assert first["key"] == expected

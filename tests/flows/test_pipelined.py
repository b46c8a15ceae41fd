"""The pipelined round commits exactly what the staged round commits, for the same seed and server answers.

The server is the model-like fake in vLLM mode: its answers are a pure function of (prompt, seed), so the
order requests arrive in changes nothing, and it returns token ids, so every record's token counts are its
own whatever batch carried it. A random delay per request makes batches return out of order.
"""

import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from typer.testing import CliRunner

from flows.bootstrap import bootstrap_round
from schemas import BootstrapConfig, RoundParams
from selfinstruct.cli import app
from tasks.resources.store.rounds import Store
from tests.support.fake_vllm import VLLMMode
from tests.support.model_like import ModelLikeFake

pytestmark = pytest.mark.slow

MODEL = "fake-model"
# Differ between any two runs of a round, staged or not: the HTTP request's id and its clock.
PER_RUN_COLUMNS = ("request_id", "latency_s", "sent_at", "received_at")


def _round(store_url: str, llm_url: str, pipelined: bool, prompts: int = 24) -> tuple[int, UUID]:
    params = RoundParams(
        store_url=store_url,
        llm_urls=[llm_url],
        config=BootstrapConfig(prompts_per_round=prompts, model=MODEL, pipelined=pipelined),
        store_slot=False,
    )
    state = bootstrap_round(params, return_state=True)
    summary = state.result()
    assert isinstance(summary, dict)
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    return int(summary["round"]), flow_run_id


def _rows(store: Store, name: str) -> list[dict[str, Any]]:
    rows = store.read_table(1, name.removesuffix(".parquet")).to_pylist()
    if name == "requests.parquet":
        rows = [{k: v for k, v in row.items() if k not in PER_RUN_COLUMNS} for row in rows]
    return rows


def _manifest(store: Store) -> dict[str, Any]:
    """The manifest without what differs between runs: run id, time, the execution mode, the server load
    (timings), and the checksum and size of requests.parquet (its per-run columns)."""
    manifest = store.read_manifest(1).model_dump(mode="json", exclude={"run_id", "created_at", "load"})
    del manifest["config"]["pipelined"]
    manifest["files"]["requests.parquet"] = manifest["files"]["requests.parquet"]["rows"]
    return manifest


def _stage_order(bodies: list[dict[str, Any]]) -> list[str]:
    """The stage of each request the server received, in arrival order (told apart by max_tokens)."""
    config = BootstrapConfig()
    stages = {
        config.instruction_sampling.max_tokens: "instruction",
        config.classify_sampling.max_tokens: "classify",
        config.instance_sampling.max_tokens: "instance",
    }
    return [stages[body["max_tokens"]] for body in bodies if body["max_tokens"] in stages]


def _task_run_names(flow_run_id: UUID, expected: set[str]) -> set[str]:
    """Names of the flow run's task runs, once the `expected` prefixes are all there (the API records task
    runs from events, a moment after they ran)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200
            )
            names = {str(run.name) for run in runs}
            if all(any(n.startswith(e) for n in names) for e in expected) or time.monotonic() > deadline:
                return names
            time.sleep(0.5)


def test_pipelined_round_commits_the_staged_round(
    prefect_server: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Small batches, several in flight: 12 instruction chunks, returning out of order.
    monkeypatch.setenv("SELFINSTRUCT_LLM_BATCH_SIZE", "2")
    monkeypatch.setenv("SELFINSTRUCT_LLM_CONCURRENCY", "4")
    staged_store, pipelined_store = Store(str(tmp_path / "staged")), Store(str(tmp_path / "pipelined"))
    with ModelLikeFake(jitter_s=0.2, vllm=VLLMMode(), models=(MODEL,), rng_seed=7) as fake:
        assert _round(staged_store.url, fake.url, pipelined=False)[0] == 1
        staged_order = _stage_order(list(fake.bodies))
        fake.bodies.clear()
        number, flow_run_id = _round(pipelined_store.url, fake.url, pipelined=True)
        pipelined_order = _stage_order(list(fake.bodies))
    assert number == 1

    # Staged, every instruction request precedes the first classification; pipelined, classification starts
    # while instructions are still being generated.
    last_instruction = max(i for i, stage in enumerate(staged_order) if stage == "instruction")
    assert last_instruction < staged_order.index("classify")
    last_instruction = max(i for i, stage in enumerate(pipelined_order) if stage == "instruction")
    assert pipelined_order.index("classify") < last_instruction

    manifest = _manifest(staged_store)
    assert manifest == _manifest(pipelined_store)
    assert manifest["counts"]["kept"] > 10 and manifest["counts"]["instances"] > 10
    assert any(name.startswith("rejected:dedup:") for name in manifest["counts"])
    for name in manifest["files"]:
        assert _rows(staged_store, name) == _rows(pipelined_store, name), name

    # The Prefect view: each stage's chunks are task runs named by the stage, beside the round's steps.
    chunks = {f"{stage}-chunk-000" for stage in ("instructions", "dedup", "classification", "instances")}
    steps = {"open-round", "plan-instruction-prompts", "parse-and-filter-instances", "commit-round"}
    names = _task_run_names(flow_run_id, chunks | steps)
    assert chunks <= names
    for step in steps:
        assert any(name.startswith(step) for name in names), (step, sorted(names))

    result = CliRunner().invoke(app, ["verify", "--store", pipelined_store.url])
    assert result.exit_code == 0, result.output


def _prompts_per_request(store: Store, stage: str) -> list[int]:
    """How many prompts each HTTP request of `stage` carried, in the order they were sent."""
    rows = [r for r in store.read_table(1, "requests").to_pylist() if r["stage"] == stage]
    sent = {r["request_id"]: r["sent_at"] for r in rows}
    counts = {rid: sum(1 for r in rows if r["request_id"] == rid) for rid in sent}
    return [counts[rid] for rid in sorted(sent, key=sent.__getitem__)]


def test_the_rounds_tail_goes_out_in_smaller_requests(
    prefect_server: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """When the last requests of a round cannot fill the client's slots at full batch size, the pipelined
    round splits them so that every slot works; the staged round sends full batches and one remainder."""
    monkeypatch.setenv("SELFINSTRUCT_LLM_BATCH_SIZE", "8")
    monkeypatch.setenv("SELFINSTRUCT_LLM_CONCURRENCY", "4")
    staged, pipelined = Store(str(tmp_path / "staged")), Store(str(tmp_path / "pipelined"))
    with ModelLikeFake(vllm=VLLMMode(), models=(MODEL,), rng_seed=7) as fake:
        _round(staged.url, fake.url, pipelined=False, prompts=16)
        _round(pipelined.url, fake.url, pipelined=True, prompts=16)
    assert _manifest(staged) == _manifest(pipelined)
    staged_sizes = _prompts_per_request(staged, "instance")
    assert sum(1 for n in staged_sizes if n < 8) <= 1, staged_sizes
    instances = sum(staged_sizes)
    assert instances > 8, staged_sizes  # more than one full batch: the tail has something to split
    # The last requests: each at most a quarter (the slots) of what was left, and enough to fill the slots.
    tail = _prompts_per_request(pipelined, "instance")[-4:]
    assert sum(1 for n in tail if n < 8) == 4 and max(tail) <= -(-instances // 4), tail

"""The finetune and evaluate flows and their CLI commands, on a real Prefect server and the embedded model."""

import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.evaluate import evaluate
from flows.finetune import finetune
from schemas.training import EvaluateParams, EvaluationResult, FinetuneManifest, FinetuneParams
from selfinstruct.cli import app
from tasks.publish.artifacts import store_resource_id, store_root_url
from tasks.resources.store.rounds import Store
from tasks.training.announce import FINETUNE_COMPLETED, METRICS_KEY
from tasks.training.evaluate import TABLE_KEY
from tasks.training.registry import latest_finetune
from tests.support.factories import TRAIN_KNOBS, two_round_store, write_heldout

pytestmark = pytest.mark.slow


def _events(resource_id: str) -> list[dict[str, Any]]:
    """finetune.completed events about `resource_id`, read back from the server, waiting up to 30 s."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            response = client.request(
                "POST",
                "/events/filter",
                json={
                    "filter": {"event": {"name": [FINETUNE_COMPLETED]}, "resource": {"id": [resource_id]}},
                    "limit": 10,
                },
            )
        events = list(response.json()["events"])
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def _latest_table(key: str) -> list[dict[str, Any]]:
    """Rows of the newest table artifact under `key`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    newest = max(artifacts, key=lambda a: a.created)  # type: ignore[arg-type,return-value]
    data = newest.data
    return list(json.loads(data) if isinstance(data, str) else data)  # type: ignore[arg-type]


def test_finetune_then_evaluate(prefect_server: None, tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    knobs = {**TRAIN_KNOBS, "max_steps": 6}
    summary = finetune(FinetuneParams(store_url=store.url, **knobs))

    finetune_id = str(summary["finetune_id"])
    assert summary["rounds"] == [1, 2] and summary["dry_run"] is False
    assert summary["eval_loss_after"] < summary["eval_loss_before"]  # type: ignore[operator]
    manifest = FinetuneManifest.model_validate_json(store.get_bytes(f"finetunes/{finetune_id}/manifest.json"))
    assert manifest.metrics is not None and manifest.metrics.steps == 6
    assert store.exists(f"finetunes/{finetune_id}/adapter/adapter_model.safetensors")
    assert latest_finetune(store) == finetune_id

    rows = {row["metric"]: row["value"] for row in _latest_table(METRICS_KEY)}
    assert rows["steps"] == 6 and rows["train rows"] == manifest.rows["train"]
    events = _events(f"{store_resource_id(store)}.finetune.{finetune_id}")
    assert len(events) == 1
    assert events[0]["payload"]["rounds"] == [1, 2] and events[0]["payload"]["store_url"] == store_root_url(
        store
    )
    assert events[0]["resource"]["selfinstruct.dry-run"] == "false"
    assert events[0]["resource"]["selfinstruct.finetune.purpose"] == "standalone"  # the evaluate trigger's

    heldout = write_heldout(tmp_path / "heldout.jsonl")
    params = EvaluateParams(
        store_url=store.url, heldout_path=str(heldout), limit=3, max_new_tokens=12, torch_threads=1
    )
    evaluation = evaluate(params)
    assert evaluation["finetune_id"] == finetune_id  # the newest trained fine-tune by default
    result = EvaluationResult.model_validate_json(
        store.get_bytes(f"evaluations/{evaluation['evaluation_id']}/result.json")
    )
    assert result.base.tasks == result.finetuned.tasks == 3 and len(result.answers) == 3
    # The embedded model judged every answer (a 135M judge may answer off-format: counted, not guessed).
    assert result.judge_model is not None and result.finetuned.ratings is not None
    assert sum(result.finetuned.ratings.values()) == 3 and result.base.rouge_l_f_ci is not None
    assert all(a.finetuned_judge_answer is not None for a in result.answers)
    table = _latest_table(TABLE_KEY)
    assert [row["model"].split(" ")[0] for row in table] == ["base", "finetuned"]
    assert table[1]["rouge_l_f"] == pytest.approx(result.finetuned.rouge_l_f, abs=1e-4)


def test_dry_run_flow_and_cli(prefect_server: None, tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    runner = CliRunner()

    result = runner.invoke(app, ["finetune", "--rounds", "2", "--dry-run", "--store", store.url])
    assert result.exit_code == 0, result.output
    assert "(dry run)" in " ".join(result.output.split())  # rich wraps at the runner's 80 columns
    (finetune_id,) = store.list_names("finetunes")
    manifest = FinetuneManifest.model_validate_json(store.get_bytes(f"finetunes/{finetune_id}/manifest.json"))
    assert (
        manifest.dry_run
        and manifest.rounds == [2]
        and manifest.files
        == [
            "dataset/README.md",
            "dataset/data/train-00000-of-00001.parquet",
            "dataset/data/validation-00000-of-00001.parquet",
        ]
    )
    events = _events(f"{store_resource_id(Store(store.url))}.finetune.{finetune_id}")
    assert events and events[0]["resource"]["selfinstruct.dry-run"] == "true"

    no_adapter = runner.invoke(app, ["evaluate", "--store", store.url])
    assert no_adapter.exit_code != 0 and "no trained fine-tune" in no_adapter.output
    bad_rounds = runner.invoke(app, ["finetune", "--rounds", "5:9", "--store", store.url])
    assert bad_rounds.exit_code != 0 and "no committed round in that range" in bad_rounds.output
    (tmp_path / "empty").mkdir()  # an empty store; a missing one is refused before it is read
    empty = runner.invoke(app, ["finetune", "--store", str(tmp_path / "empty")])
    assert empty.exit_code != 0 and "no committed rounds" in empty.output

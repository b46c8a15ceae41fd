"""What a finished fine-tune announces: the finetune.completed event's labels, read by the triggers.

The `evaluate` deployment's trigger (deployments/prefect.yaml) is matched against each event here with the
Prefect server's own resource matcher, so a compare arm (evaluated by the compare flow itself) and a dry run
are shown not to start an evaluation, and a trained fine-tune of any other purpose is.
"""

from pathlib import Path
from typing import Any

import yaml

from schemas.training import CompareParams, FinetuneManifest, FinetuneMetrics, FinetuneParams
from tasks.resources.store.rounds import Store
from tasks.training.announce import FINETUNE_COMPLETED, PURPOSE_LABEL, finetune_event, metrics_rows
from tasks.training.compare import arm_params
from tasks.training.data import upload_training_data
from tasks.training.registry import new_finetune_id, write_manifest
from tasks.training.train import TrainedAdapter
from tests.support.factories import two_round_store

PREFECT_FILE = Path(__file__).resolve().parents[3] / "deployments" / "prefect.yaml"
METRICS = FinetuneMetrics(
    steps=1,
    train_loss_first=2.0,
    train_loss_last=1.5,
    train_loss_curve=[],
    eval_loss_before=2.1,
    eval_loss_after=1.9,
    train_runtime_s=0.1,
    device="cpu",
    precision="float32",
    trainable_parameters=8,
)


def _finished(store: Store, params: FinetuneParams) -> FinetuneManifest:
    """A fine-tune recorded in the store as training would record it (the adapter itself is not needed)."""
    finetune_id = new_finetune_id()
    data = upload_training_data(store, finetune_id, params)
    trained = None if params.dry_run else TrainedAdapter(metrics=METRICS, files=[])
    return write_manifest(store, params, data, trained)


def _starts_evaluation(event: dict[str, Any]) -> bool:
    """Whether the `evaluate` deployment's trigger fires on `event`, as the Prefect server decides it."""
    from prefect.server.events.schemas.events import Resource, ResourceSpecification

    spec = yaml.safe_load(PREFECT_FILE.read_text())
    (trigger,) = next(d for d in spec["deployments"] if d["name"] == "evaluate")["triggers"]
    match = ResourceSpecification(trigger["match"]).matches(Resource(event["resource"]))
    return event["event"] in trigger["expect"] and match


def test_compare_arms_and_dry_runs_do_not_start_an_evaluation(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    standalone = finetune_event(store, _finished(store, FinetuneParams(store_url=store.url)))
    assert standalone["event"] == FINETUNE_COMPLETED
    assert standalone["resource"][PURPOSE_LABEL] == "standalone" == standalone["payload"]["purpose"]
    assert standalone["resource"]["selfinstruct.dry-run"] == "false"
    assert _starts_evaluation(standalone)

    arms = arm_params(CompareParams(store_url=store.url, finetune=FinetuneParams(rounds=[1, 2])))
    for arm, params in arms.items():
        event = finetune_event(store, _finished(store, params))
        assert event["resource"][PURPOSE_LABEL] == "compare", arm
        assert event["resource"]["selfinstruct.dry-run"] == "false", arm
        assert not _starts_evaluation(event), arm

    dry = finetune_event(store, _finished(store, FinetuneParams(store_url=store.url, dry_run=True)))
    assert dry["resource"][PURPOSE_LABEL] == "standalone" and not _starts_evaluation(dry)


def test_metrics_table_of_a_trained_fine_tune(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    manifest = _finished(store, FinetuneParams(store_url=store.url, rounds=[2], include_seeds=True))
    rows = {row["metric"]: row["value"] for row in metrics_rows(manifest)}
    assert rows["rounds"] == "2 + seeds" and rows["steps"] == 1 and rows["device"] == "cpu"
    assert rows["validation loss after"] == 1.9 and rows["train rows"] == manifest.rows["train"]

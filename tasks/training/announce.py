"""What a finished fine-tune publishes to Prefect: a table artifact of its metrics and the
`selfinstruct.finetune.completed` event, which the `evaluate` deployment's trigger reacts to.

The event's resource carries `selfinstruct.dry-run` and `selfinstruct.finetune.purpose` as labels, because
a trigger can match labels but not payload values: a dry run has no adapter to evaluate, and an arm of the
compare flow ("compare") is evaluated by that flow itself, so the trigger starts an evaluation only for a
trained fine-tune of purpose "standalone" (deployments/prefect.yaml).
"""

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas.training import FinetuneManifest
from tasks.publish.artifacts import store_resource_id
from tasks.resources.redact import redact_url
from tasks.resources.secrets import run_settings
from tasks.resources.store.rounds import Store, open_store, store_root_url
from tasks.training.export import format_rounds

FINETUNE_COMPLETED = "selfinstruct.finetune.completed"
METRICS_KEY = "selfinstruct-finetune-metrics"
PURPOSE_LABEL = "selfinstruct.finetune.purpose"


def metrics_rows(manifest: FinetuneManifest) -> list[dict[str, str | int | float | None]]:
    """Rows of the fine-tune's table artifact: one metric per row."""
    metrics = manifest.metrics
    rows: list[dict[str, str | int | float | None]] = [
        {
            "metric": "rounds",
            "value": format_rounds(manifest.rounds) + (" + seeds" if manifest.include_seeds else ""),
        },
        {"metric": "train rows", "value": manifest.rows["train"]},
        {"metric": "validation rows", "value": manifest.rows["validation"]},
        {"metric": "duplicates dropped", "value": manifest.export.duplicates},
        {"metric": "dataset fingerprint", "value": manifest.dataset_fingerprint},
        {"metric": "base model", "value": manifest.base_model},
    ]
    if metrics is not None:
        rows += [
            {"metric": "steps", "value": metrics.steps},
            {"metric": "train loss (first step)", "value": metrics.train_loss_first},
            {"metric": "train loss (last step)", "value": metrics.train_loss_last},
            {"metric": "validation loss before", "value": metrics.eval_loss_before},
            {"metric": "validation loss after", "value": metrics.eval_loss_after},
            {"metric": "train runtime (s)", "value": metrics.train_runtime_s},
            {"metric": "device", "value": metrics.device},
        ]
    return rows


def finetune_event(store: Store, manifest: FinetuneManifest) -> dict[str, Any]:
    """Keyword arguments of `emit_event` announcing a finished fine-tune."""
    metrics = manifest.metrics
    return {
        "event": FINETUNE_COMPLETED,
        "resource": {
            "prefect.resource.id": f"{store_resource_id(store)}.finetune.{manifest.finetune_id}",
            "prefect.resource.name": f"fine-tune {manifest.finetune_id}",
            "selfinstruct.store": store_root_url(store),
            "selfinstruct.finetune": manifest.finetune_id,
            "selfinstruct.dry-run": str(manifest.dry_run).lower(),
            PURPOSE_LABEL: manifest.params.purpose,
        },
        "payload": {
            "finetune_id": manifest.finetune_id,
            "store_url": store_root_url(store),
            "rounds": manifest.rounds,
            "rows": manifest.rows,
            "dry_run": manifest.dry_run,
            "purpose": manifest.params.purpose,
            "eval_loss_before": metrics.eval_loss_before if metrics else None,
            "eval_loss_after": metrics.eval_loss_after if metrics else None,
        },
    }


@task(name="publish-finetune", cache_policy=NO_CACHE)
def publish_finetune_task(store_url: str | None, manifest: FinetuneManifest) -> None:
    """Table artifact of the fine-tune's metrics, and the selfinstruct.finetune.completed event."""
    from prefect.artifacts import create_table_artifact
    from prefect.events import emit_event

    store = open_store(store_url, run_settings())
    create_table_artifact(
        table=metrics_rows(manifest),
        key=METRICS_KEY,
        description=f"Fine-tune {manifest.finetune_id} of {redact_url(store.url)}"
        + (" (dry run: not trained)" if manifest.dry_run else ""),
    )
    emit_event(**finetune_event(store, manifest))

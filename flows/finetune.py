"""Fine-tune a small model on committed rounds, as a Prefect flow."""

from prefect import flow, get_run_logger

from schemas.training import FinetuneParams
from tasks.publish.artifacts import name_flow_run
from tasks.training.announce import publish_finetune_task
from tasks.training.data import prepare_data_task
from tasks.training.register import register_task
from tasks.training.registry import new_finetune_id, write_manifest_task
from tasks.training.train import train_task


@flow(name="finetune")
def finetune(params: FinetuneParams | None = None) -> dict[str, object]:
    """Build the training data from committed rounds, train a LoRA adapter, and record it in the store.

    With `dry_run` the data and the manifest are written but nothing is trained. Emits
    `selfinstruct.finetune.completed` and a table artifact of the metrics.

    Args:
        params: Store, rounds, base model and training knobs.

    Returns:
        The fine-tune id, its rounds, row counts and losses.
    """
    params = params or FinetuneParams()
    finetune_id = new_finetune_id()
    name_flow_run(f"finetune-{finetune_id}")
    data = prepare_data_task(params, finetune_id)
    trained = None if params.dry_run else train_task(params, finetune_id, data.fingerprint)
    manifest = write_manifest_task(params, data, trained)
    if params.vllm_url and not params.dry_run:
        register_task(params, finetune_id)
    publish_finetune_task(params.store_url, manifest)
    get_run_logger().info("fine-tune %s finished%s", finetune_id, " (dry run)" if params.dry_run else "")
    return {
        "finetune_id": finetune_id,
        "dry_run": params.dry_run,
        "rounds": manifest.rounds,
        "rows": manifest.rows,
        "dataset_fingerprint": manifest.dataset_fingerprint,
        "eval_loss_before": trained.metrics.eval_loss_before if trained else None,
        "eval_loss_after": trained.metrics.eval_loss_after if trained else None,
    }

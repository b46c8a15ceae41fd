"""Evaluate a fine-tune against its base model on the held-out tasks, as a Prefect flow."""

from prefect import flow

from schemas.training import EvaluateParams
from tasks.publish.artifacts import name_flow_run
from tasks.training.evaluate import evaluate_task, publish_evaluation_task, resolve_finetune_task


@flow(name="evaluate")
def evaluate(params: EvaluateParams | None = None) -> dict[str, object]:
    """Answer the held-out tasks with the base model and with a fine-tune, and compare ROUGE-L F.

    Writes evaluations/<id>/result.json and a table artifact (base vs fine-tuned).

    Args:
        params: Store, fine-tune (default: the newest trained one), task limit and decoding length.

    Returns:
        The evaluation id, where its result is, and both models' scores.
    """
    params = params or EvaluateParams()
    finetune_id = resolve_finetune_task(params)
    name_flow_run(f"evaluate-{finetune_id}")
    result = evaluate_task(params, finetune_id)
    location = publish_evaluation_task(params.store_url, result)
    return {
        "evaluation_id": result.evaluation_id,
        "finetune_id": finetune_id,
        "location": location,
        "base": result.base.model_dump(),
        "finetuned": result.finetuned.model_dump(),
        "judge_model": result.judge_model,
    }

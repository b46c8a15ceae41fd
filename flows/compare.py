"""The ablation as a Prefect flow: fine-tune on the seeds only and on seeds + rounds, evaluate both the same
way, and compare them on the same held-out tasks."""

from prefect import flow

from flows.evaluate import evaluate
from flows.finetune import finetune
from schemas.training import CompareParams
from tasks.training.compare import ARMS, arm_params, compare_task, evaluate_params


@flow(name="compare")
def compare(params: CompareParams | None = None) -> dict[str, object]:
    """Train both arms with the same knobs (same base, steps, seed and batch size), evaluate both on the same
    held-out tasks (ROUGE-L F and judged ratings), and store one comparison with paired intervals.

    Args:
        params: Store, the shared training knobs (their `rounds` feed the seeds + rounds arm) and the
            shared evaluation settings.

    Returns:
        The comparison id, both fine-tunes and evaluations, and the comparison itself.
    """
    params = params or CompareParams()
    arms = arm_params(params)
    finetunes = {arm: str(finetune(arms[arm])["finetune_id"]) for arm in ARMS}
    evaluations = {
        arm: str(evaluate(evaluate_params(params, finetunes[arm]))["evaluation_id"]) for arm in ARMS
    }
    result = compare_task(params, finetunes, evaluations)
    return {
        "comparison_id": result.comparison_id,
        "finetunes": finetunes,
        "evaluations": evaluations,
        "result": result.model_dump(mode="json"),
    }

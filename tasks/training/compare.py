"""The ablation: a fine-tune on the seeds only vs one on the seeds and the committed rounds.

Both arms share every training knob (so the same budget of optimizer steps and examples seen) and are
evaluated the same way on the same held-out tasks; the comparison pairs their answers task by task.
"""

from datetime import UTC, datetime
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas.training import (
    CompareParams,
    ComparisonResult,
    Difference,
    EvaluateParams,
    EvaluationResult,
    FinetuneParams,
)
from tasks.quality.judge import RATING_SCORE
from tasks.quality.scores import difference_interval, format_interval, task_groups
from tasks.resources.redact import redact_url
from tasks.resources.store.rounds import Store, open_store
from tasks.training.answers import load_heldout
from tasks.training.evaluate import EVALUATIONS, RESULT_FILE, score_columns
from tasks.training.registry import read_finetune_manifest

COMPARISON_FILE = "comparison.json"
TABLE_KEY = "selfinstruct-comparison"
ARMS = ("seeds_only", "seeds_and_rounds")


# -- pure -------------------------------------------------------------------------------------------------


def arm_params(params: CompareParams) -> dict[str, FinetuneParams]:
    """The fine-tune of each arm: the shared knobs, seeds in both, rounds only in the second.

    Both are of purpose "compare": this flow evaluates them itself, so the `evaluate` deployment's trigger on
    `selfinstruct.finetune.completed` must not evaluate them again (see tasks/training/announce.py).
    """
    shared = params.finetune.model_copy(
        update={"store_url": params.store_url, "include_seeds": True, "dry_run": False, "purpose": "compare"}
    )
    return {
        "seeds_only": shared.model_copy(update={"rounds": []}),
        "seeds_and_rounds": shared,
    }


def evaluate_params(params: CompareParams, finetune_id: str) -> EvaluateParams:
    """The evaluation of one arm: the shared settings, this arm's fine-tune."""
    return params.evaluate.model_copy(update={"store_url": params.store_url, "finetune_id": finetune_id})


def compare_results(
    first: EvaluationResult, second: EvaluationResult, instructions: list[str]
) -> list[Difference]:
    """seeds + rounds minus seeds only, per metric, with paired intervals over the same tasks.

    Args:
        first: Evaluation of the seeds-only arm.
        second: Evaluation of the seeds + rounds arm.
        instructions: The held-out instruction of each answer, in answer order (groups lines into tasks).

    Raises:
        ValueError: When the two were not measured the same way or on the same tasks.
    """
    if first.comparison_key != second.comparison_key:
        raise ValueError("the two evaluations were measured differently (comparison keys differ)")
    if [a.id for a in first.answers] != [a.id for a in second.answers]:
        raise ValueError("the two evaluations answered different held-out tasks")
    groups = task_groups(instructions)
    seed, resamples = second.bootstrap_seed, second.bootstrap_resamples
    differences = []
    value, interval = difference_interval(
        [a.finetuned_rouge_l_f for a in first.answers],
        [a.finetuned_rouge_l_f for a in second.answers],
        groups,
        seed,
        resamples,
    )
    differences.append(Difference(metric="rouge_l_f", value=value, ci=interval))
    if first.judge_model is not None and second.judge_model is not None:
        value, interval = difference_interval(
            [None if a.finetuned_rating is None else RATING_SCORE[a.finetuned_rating] for a in first.answers],
            [
                None if a.finetuned_rating is None else RATING_SCORE[a.finetuned_rating]
                for a in second.answers
            ],
            groups,
            seed,
            resamples,
        )
        differences.append(Difference(metric="judged_acceptable_share", value=value, ci=interval))
    return differences


def comparison_rows(result: ComparisonResult) -> list[dict[str, str | float | int]]:
    """The comparison table: base, seeds only, seeds + rounds, and the difference of the last two."""
    labels = {
        "base": f"base ({result.base_model})",
        "seeds_only": f"seeds only ({result.train_rows['seeds_only']} rows)",
        "seeds_and_rounds": f"seeds + rounds {result.rounds} ({result.train_rows['seeds_and_rounds']} rows)",
    }
    rows: list[dict[str, str | float | int]] = [
        {"model": labels[name], **score_columns(scores), "tasks": scores.tasks}
        for name, scores in (
            ("base", result.base),
            ("seeds_only", result.seeds_only),
            ("seeds_and_rounds", result.seeds_and_rounds),
        )
    ]
    cells = {d.metric: d for d in result.differences}
    rouge = cells.get("rouge_l_f")
    judged = cells.get("judged_acceptable_share")
    rows.append(
        {
            "model": "difference (seeds + rounds - seeds only)",
            "rouge_l_f [95% CI]": format_interval(rouge.value, rouge.ci) if rouge else "-",
            "judged A or B [95% CI]": format_interval(judged.value, judged.ci, True) if judged else "-",
            "ratings A/B/C/D/unparseable": "",
            "tasks": result.seeds_only.tasks,
        }
    )
    return rows


# -- store and Prefect ------------------------------------------------------------------------------------


def read_evaluation(store: Store, evaluation_id: str) -> EvaluationResult:
    """A stored evaluation result."""
    return EvaluationResult.model_validate_json(
        store.get_bytes(f"{EVALUATIONS}/{evaluation_id}/{RESULT_FILE}")
    )


def build_comparison(
    store: Store, params: CompareParams, finetunes: dict[str, str], evaluations: dict[str, str]
) -> ComparisonResult:
    """Read both arms' evaluations and fine-tunes, pair them, and store the comparison.

    Raises:
        ValueError: When the evaluations are not comparable.
        tasks.training.models.FinetuneError: When a fine-tune is unknown.
    """
    first, second = (read_evaluation(store, evaluations[arm]) for arm in ARMS)
    heldout = params.evaluate.heldout_path
    tasks, sha256 = load_heldout(Path(heldout) if heldout else None, params.evaluate.limit)
    if sha256 != second.heldout_sha256:
        raise ValueError("the held-out file changed while the arms were evaluated")
    by_id = {t.id: t.instruction for t in tasks}
    instructions = [by_id[a.id] for a in second.answers]
    manifests = {arm: read_finetune_manifest(store, finetunes[arm]) for arm in ARMS}
    now = datetime.now(UTC)
    result = ComparisonResult(
        comparison_id=f"compare-{now.strftime('%Y%m%dT%H%M%S')}-{second.comparison_key[:6]}",
        created_at=now,
        store=redact_url(store.url),
        base_model=second.base_model,
        comparison_key=second.comparison_key,
        heldout=second.heldout,
        rounds=manifests["seeds_and_rounds"].rounds,
        finetunes=finetunes,
        evaluations=evaluations,
        train_rows={arm: manifests[arm].rows.get("train", 0) for arm in ARMS},
        judge_model=second.judge_model,
        base=second.base,
        seeds_only=first.finetuned,
        seeds_and_rounds=second.finetuned,
        differences=compare_results(first, second, instructions),
    )
    store.put_bytes(
        f"{EVALUATIONS}/{result.comparison_id}/{COMPARISON_FILE}", result.model_dump_json(indent=2).encode()
    )
    return result


@task(name="compare-arms", cache_policy=NO_CACHE)
def compare_task(
    params: CompareParams, finetunes: dict[str, str], evaluations: dict[str, str]
) -> ComparisonResult:
    """Pair the two arms' evaluations, store the comparison and publish its table artifact."""
    from prefect.artifacts import create_table_artifact

    store = open_store(params.store_url)
    result = build_comparison(store, params, finetunes, evaluations)
    location = store.location_of(f"{EVALUATIONS}/{result.comparison_id}/{COMPARISON_FILE}")
    create_table_artifact(
        table=comparison_rows(result),
        key=TABLE_KEY,
        description=f"Seeds only vs seeds + rounds {result.rounds}: same base, steps, seed and batch; "
        f"{result.base.tasks} held-out tasks of {result.heldout}; 95% bootstrap intervals over tasks "
        f"(seed {params.evaluate.bootstrap_seed}); {redact_url(location)}",
    )
    for difference in result.differences:
        get_run_logger().info(
            "seeds + rounds - seeds only, %s: %s",
            difference.metric,
            format_interval(difference.value, difference.ci),
        )
    return result

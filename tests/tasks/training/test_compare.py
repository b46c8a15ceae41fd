"""The seeds-only ablation: arm parameters, paired differences, the table, and the flow on CPU."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from schemas.training import (
    AnswerScores,
    CompareParams,
    ComparisonResult,
    Difference,
    EvaluateParams,
    EvaluationResult,
    FinetuneParams,
    Rating,
    TaskAnswers,
)
from tasks.training.compare import arm_params, compare_results, comparison_rows, evaluate_params


def test_arms_share_every_knob_but_the_data() -> None:
    params = CompareParams(
        store_url="/s",
        finetune=FinetuneParams(rounds=[1, 2], max_steps=7, lr=1e-3, batch_size=3, seed=9, dry_run=True),
        evaluate=EvaluateParams(limit=5, judge=False),
    )
    arms = arm_params(params)
    assert arms["seeds_only"].rounds == [] and arms["seeds_and_rounds"].rounds == [1, 2]
    for arm in arms.values():
        assert arm.include_seeds and not arm.dry_run and arm.store_url == "/s" and arm.purpose == "compare"
    drop = {"rounds"}
    assert arms["seeds_only"].model_dump(exclude=drop) == arms["seeds_and_rounds"].model_dump(exclude=drop)
    evaluation = evaluate_params(params, "ft-1")
    assert (evaluation.finetune_id, evaluation.store_url, evaluation.limit) == ("ft-1", "/s", 5)


def _result(rouge: list[float], ratings: list[Rating | None], key: str = "k") -> EvaluationResult:
    scores = AnswerScores(rouge_l_f=0.0, empty_share=0.0, degenerate_share=0.0, tasks=len(rouge))
    return EvaluationResult(
        evaluation_id="e",
        finetune_id="f",
        created_at=datetime.now(UTC),
        comparison_key=key,
        heldout="h.jsonl",
        heldout_sha256="0",
        base_model="m",
        settings={},
        base=scores,
        finetuned=scores,
        answers=[
            TaskAnswers(
                id=f"t{i}",
                reference="r",
                base="",
                finetuned="",
                base_rouge_l_f=0.0,
                finetuned_rouge_l_f=value,
                base_quality="ok",
                finetuned_quality="ok",
                finetuned_rating=rating,
            )
            for i, (value, rating) in enumerate(zip(rouge, ratings, strict=True))
        ],
        judge_model="j",
        bootstrap_resamples=300,
    )


def test_paired_differences() -> None:
    first = _result([0.0, 0.5, 0.5, 0.0], ["D", "C", None, "B"])
    second = _result([0.5, 0.5, 1.0, 0.5], ["A", "B", "A", "B"])
    rouge, judged = compare_results(first, second, ["a", "b", "c", "d"])
    assert rouge.metric == "rouge_l_f" and rouge.value == pytest.approx(0.375)
    assert rouge.ci is not None and 0.0 < rouge.ci[0] <= rouge.ci[1] <= 0.5
    # first: 1 acceptable of 3 parseable; second: 4 of 4
    assert judged.metric == "judged_acceptable_share" and judged.value == pytest.approx(1 - 1 / 3)
    with pytest.raises(ValueError, match="measured differently"):
        compare_results(first, _result([0.0] * 4, [None] * 4, key="other"), ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="different held-out tasks"):
        compare_results(first, _result([0.0] * 3, [None] * 3), ["a", "b", "c"])


def test_comparison_table() -> None:
    scores = AnswerScores(
        rouge_l_f=0.25,
        empty_share=0.0,
        degenerate_share=0.0,
        tasks=4,
        rouge_l_f_ci=(0.1, 0.4),
        ratings={"A": 1, "B": 1, "C": 1, "D": 0, "unparseable": 1},
        acceptable_share=2 / 3,
        acceptable_ci=(0.2, 1.0),
    )
    result = ComparisonResult(
        comparison_id="c",
        created_at=datetime.now(UTC),
        store="/s",
        base_model="m",
        comparison_key="k",
        heldout="h.jsonl",
        rounds=[1, 2],
        finetunes={"seeds_only": "f1", "seeds_and_rounds": "f2"},
        evaluations={"seeds_only": "e1", "seeds_and_rounds": "e2"},
        train_rows={"seeds_only": 150, "seeds_and_rounds": 400},
        judge_model="j",
        base=scores,
        seeds_only=scores,
        seeds_and_rounds=scores,
        differences=[Difference(metric="rouge_l_f", value=0.0, ci=(-0.05, 0.05))],
    )
    rows = comparison_rows(result)
    assert [r["model"] for r in rows] == [
        "base (m)",
        "seeds only (150 rows)",
        "seeds + rounds [1, 2] (400 rows)",
        "difference (seeds + rounds - seeds only)",
    ]
    assert rows[1] == {
        "model": "seeds only (150 rows)",
        "rouge_l_f [95% CI]": "0.2500 [0.1000, 0.4000]",
        "judged A or B [95% CI]": "66.7% [20.0, 100.0]",
        "ratings A/B/C/D/unparseable": "1/1/1/0/1",
        "tasks": 4,
    }
    assert (
        rows[3]["rouge_l_f [95% CI]"] == "0.0000 [-0.0500, 0.0500]"
        and rows[3]["judged A or B [95% CI]"] == "-"
    )


@pytest.mark.slow
def test_compare_flow_on_cpu(prefect_server: None, tmp_path: Path, fake_openai: Any) -> None:
    from flows.compare import compare
    from tasks.resources.store.rounds import Store
    from tasks.training.registry import read_finetune_manifest
    from tests.support.factories import commit_tasks

    store = Store(str(tmp_path / "store"))
    for start in (0, 6):
        commit_tasks(
            store,
            [(f"Repeat the word number {n}.", False, [(f"w{n}", f"w{n}")]) for n in range(start, start + 6)],
        )
    judge = fake_openai(responder=lambda prompt: " B")
    heldout = tmp_path / "heldout.jsonl"
    lines = [
        ("h0", "Repeat the word.", "cat", "cat"),
        ("h1", "Repeat the word.", "dog", "dog"),
        ("h2", "Name a color.", "", "red"),
    ]
    heldout.write_text(
        "".join(
            json.dumps(
                {
                    "id": task_id,
                    "name": task_id,
                    "instruction": instruction,
                    "instances": [{"input": input_text, "output": output}],
                    "is_classification": False,
                }
            )
            + "\n"
            for task_id, instruction, input_text, output in lines
        )
    )
    params = CompareParams(
        store_url=store.url,
        finetune=FinetuneParams(
            max_steps=2,
            batch_size=4,
            lora_r=4,
            lora_alpha=8,
            max_length=64,
            validation_fraction=0.0,
            torch_threads=1,
        ),
        evaluate=EvaluateParams(
            heldout_path=str(heldout),
            max_new_tokens=4,
            torch_threads=1,
            judge_urls=[judge.url],
            bootstrap_resamples=50,
        ),
    )
    summary = compare(params)
    result = ComparisonResult.model_validate(summary["result"])
    assert result.rounds == [1, 2] and set(result.finetunes) == {"seeds_only", "seeds_and_rounds"}
    assert result.train_rows["seeds_and_rounds"] > result.train_rows["seeds_only"] > 0
    assert (
        result.seeds_only.ratings
        == result.seeds_and_rounds.ratings
        == {"A": 0, "B": 3, "C": 0, "D": 0, "unparseable": 0}
    )
    assert [d.metric for d in result.differences] == ["rouge_l_f", "judged_acceptable_share"]
    assert result.differences[1].value == 0.0
    assert store.exists(f"evaluations/{result.comparison_id}/comparison.json")
    # Both arms are marked as compare arms, so the evaluate deployment's trigger leaves them to this flow.
    assert {read_finetune_manifest(store, f).params.purpose for f in result.finetunes.values()} == {"compare"}

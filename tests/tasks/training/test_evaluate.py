"""Held-out evaluation: answer quality, ROUGE-L, intervals, the judge, a real base-vs-adapter run on CPU."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from schemas.training import EvaluateParams, EvaluationResult, FinetuneMetrics, FinetuneParams
from tasks.publish.progress import ProgressUpdate, showing
from tasks.resources.store.rounds import Store
from tasks.training.answers import load_heldout
from tasks.training.data import DataSummary, upload_training_data
from tasks.training.evaluate import (
    answer_quality,
    comparison_key,
    evaluate_finetune,
    resolve_finetune_task,
    rouge_l_f,
    summarize,
)
from tasks.training.models import FinetuneError, load_base_model
from tasks.training.registry import new_finetune_id, write_manifest
from tasks.training.train import TrainedAdapter
from tests.support.factories import HELDOUT, two_round_store, write_heldout


@pytest.mark.parametrize(
    ("text", "quality"),
    [
        ("", "empty"),
        (" \n ", "empty"),
        ("?!...", "degenerate"),
        ("the the the the the the the the the", "degenerate"),
        ("I like it. I like it. I like it. I like it. I like it.", "degenerate"),
        ("Answer: 4\nAnswer: 4\nAnswer: 4\nAnswer: 4", "degenerate"),
        ("negative", "ok"),
        ("The largest planet in the solar system is Jupiter, a gas giant.", "ok"),
    ],
)
def test_answer_quality(text: str, quality: str) -> None:
    assert answer_quality(text) == quality


def test_rouge_l_f_is_rouge_scores() -> None:
    scores = rouge_l_f(["Jupiter", "the planet Jupiter", "", "Swam."], ["Jupiter", "Jupiter", "swam", "swam"])
    assert scores[0] == 1.0 and scores[3] == 1.0  # case and punctuation do not count
    assert scores[1] == pytest.approx(0.5)  # P = 1/3, R = 1: F = 2PR/(P+R)
    assert scores[2] == 0.0
    summary = summarize(scores, ["ok", "ok", "empty", "ok"])
    assert summary.rouge_l_f == pytest.approx(0.625) and summary.empty_share == 0.25 and summary.tasks == 4


def test_comparison_key_covers_settings_not_the_finetune() -> None:
    params = EvaluateParams(finetune_id="ft-a", limit=10)
    key = comparison_key("abc", params)
    assert (
        comparison_key("abc", params.model_copy(update={"finetune_id": "ft-b", "store_url": "s3://b/x"}))
        == key
    )
    assert comparison_key("abc", params.model_copy(update={"max_new_tokens": 32})) != key
    assert comparison_key("abd", params) != key


def store_with_untrained_adapter(root: Path) -> tuple[Store, str]:
    """A finished fine-tune whose adapter is freshly initialized: LoRA's B is zero, so it equals the base."""
    from peft import LoraConfig, get_peft_model

    store = two_round_store(root / "store")
    params = FinetuneParams(store_url=store.url, max_steps=1)
    finetune_id = new_finetune_id()
    data: DataSummary = upload_training_data(store, finetune_id, params)
    model, tokenizer = load_base_model(None)
    adapter = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    folder = root / "adapter"
    adapter.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    files = [f"adapter/{name}" for name in store.put_tree(folder, f"finetunes/{finetune_id}/adapter")]
    metrics = FinetuneMetrics(
        steps=0,
        train_loss_first=None,
        train_loss_last=None,
        train_loss_curve=[],
        eval_loss_before=None,
        eval_loss_after=None,
        train_runtime_s=0.0,
        device="cpu",
        precision="float32",
        trainable_parameters=0,
    )
    write_manifest(store, params, data, TrainedAdapter(metrics=metrics, files=files))
    return store, finetune_id


def test_evaluation_of_an_identity_adapter_matches_the_base(tmp_path: Path) -> None:
    store, finetune_id = store_with_untrained_adapter(tmp_path)
    params = EvaluateParams(
        store_url=store.url,
        heldout_path=str(write_heldout(tmp_path / "heldout.jsonl")),
        max_new_tokens=12,
        batch_size=3,
        torch_threads=1,
    )
    assert resolve_finetune_task.fn(params) == finetune_id
    lines: list[str] = []
    updates: list[ProgressUpdate] = []
    started = datetime.now(UTC)
    with showing(updates.append):
        result = evaluate_finetune(store, finetune_id, params, log=lines.append)
    assert lines == ["base: answered 4 held-out tasks", "finetuned: answered 4 held-out tasks"]
    # The terminal display hears tasks answered per model, batch by batch (batch_size 3 of 4 tasks).
    assert [(u.key, u.done, u.total, u.unit) for u in updates] == [
        ("evaluate base", 3, 4, "tasks"),
        ("evaluate base", 4, 4, "tasks"),
        ("evaluate finetuned", 3, 4, "tasks"),
        ("evaluate finetuned", 4, 4, "tasks"),
    ]

    assert [a.id for a in result.answers] == [f"heldout_task_{i}" for i in range(4)]
    assert [a.base for a in result.answers] == [a.finetuned for a in result.answers]
    assert result.base == result.finetuned and result.base.tasks == 4
    assert any(a.base for a in result.answers)  # the model does answer something
    for answer in result.answers:
        assert answer.base_rouge_l_f == pytest.approx(
            rouge_l_f([answer.base], [answer.reference])[0], abs=1e-6
        )
    assert result.created_at >= started and result.heldout == "heldout.jsonl"
    assert result.settings == {
        "limit": None,
        "max_new_tokens": 12,
        "prompt_format": "template",
        "template": "task_input_output",
    }

    stored = EvaluationResult.model_validate_json(
        store.get_bytes(f"evaluations/{result.evaluation_id}/result.json")
    )
    assert stored == result
    assert result.evaluation_id.startswith(f"{finetune_id}--")


def test_evaluation_refuses_dry_runs_and_unknown_fine_tunes(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    with pytest.raises(FinetuneError, match="no trained fine-tune"):
        resolve_finetune_task.fn(EvaluateParams(store_url=store.url))
    params = FinetuneParams(store_url=store.url, dry_run=True)
    dry_id = new_finetune_id()
    write_manifest(store, params, upload_training_data(store, dry_id, params), None)
    with pytest.raises(FinetuneError, match="no trained fine-tune"):
        resolve_finetune_task.fn(EvaluateParams(store_url=store.url))
    with pytest.raises(FinetuneError, match="is a dry run"):
        evaluate_finetune(store, dry_id, EvaluateParams(store_url=store.url))
    with pytest.raises(FinetuneError, match="is a dry run"):
        resolve_finetune_task.fn(EvaluateParams(store_url=store.url, finetune_id=dry_id))
    with pytest.raises(FinetuneError, match="no finished fine-tune 'ft-x'"):
        resolve_finetune_task.fn(EvaluateParams(store_url=store.url, finetune_id="ft-x"))


# -- held-out files with repeated instructions, intervals, and the judge ---------------------------------


def write_repeated_heldout(path: Path) -> Path:
    """HELDOUT plus a second line for the first instruction, with another input."""
    write_heldout(path)
    extra = {
        "id": "heldout_task_4",
        "name": "task_0_again",
        "instruction": HELDOUT[0][0],
        "instances": [{"input": "7", "output": "positive"}],
        "is_classification": True,
    }
    with path.open("a") as handle:
        handle.write(json.dumps(extra) + "\n")
    return path


def test_heldout_accepts_one_instruction_with_several_inputs(tmp_path: Path) -> None:
    from tasks.round.seeds import SeedFileError, load_seeds

    path = write_repeated_heldout(tmp_path / "heldout.jsonl")
    tasks, _ = load_heldout(path)
    assert [t.id for t in tasks][-1] == "heldout_task_4" and tasks[0].instruction == tasks[4].instruction
    with pytest.raises(SeedFileError, match=r":5: field 'instruction': duplicate of line 1$"):
        load_seeds(path)  # a seed file still refuses it: the pool must not hold one instruction twice
    same = json.loads(path.read_text().splitlines()[0]) | {"id": "heldout_task_5"}
    with path.open("a") as handle:
        handle.write(json.dumps(same) + "\n")
    with pytest.raises(
        SeedFileError, match=r":6: field 'instruction': duplicate of line 1 with the same inputs"
    ):
        load_heldout(path)


def test_intervals_resample_tasks_not_lines() -> None:
    from tasks.quality.scores import task_groups

    groups = task_groups(["Add.", "Sub.", " add. ", "Mul."])
    assert groups == [[0, 2], [1], [3]]
    summary = summarize([1.0, 0.0, 1.0, 0.5], ["ok"] * 4, groups, seed=0, resamples=200)
    assert summary.rouge_l_f == 0.625 and summary.rouge_l_f_ci is not None
    low, high = summary.rouge_l_f_ci
    assert 0.0 <= low < 0.625 < high <= 1.0
    assert summary == summarize([1.0, 0.0, 1.0, 0.5], ["ok"] * 4, groups, seed=0, resamples=200)


def rating_judge(prompt: str) -> str:
    """A scripted judge: A for an exact answer, C for any other non-empty one, gibberish for an empty one."""
    item = prompt.rsplit("\nInstruction: ", 1)[1]
    reference = item.split("\nReference answer: ", 1)[1].split("\n", 1)[0]
    response = item.split("\nResponse: ", 1)[1].removesuffix("\nRating:")
    if not response:
        return " I cannot say."
    return " A" if response.strip().lower() == reference.lower() else " C\n"


def test_judged_evaluation_with_repeated_instructions(tmp_path: Path, fake_openai: Any) -> None:
    from functools import partial

    from schemas import Settings
    from tasks.quality.judge import RATING_SAMPLING, judge_completions

    judge_server = fake_openai(responder=rating_judge)
    store, finetune_id = store_with_untrained_adapter(tmp_path)
    params = EvaluateParams(
        store_url=store.url,
        heldout_path=str(write_repeated_heldout(tmp_path / "heldout.jsonl")),
        max_new_tokens=8,
        batch_size=5,
        torch_threads=1,
        bootstrap_resamples=200,
    )
    judge = partial(
        judge_completions,
        sampling=RATING_SAMPLING,
        settings=Settings(),
        urls=[judge_server.url],
        model="judge",
    )
    result = evaluate_finetune(store, finetune_id, params, judge=judge, judge_model="judge")

    assert len(result.answers) == 5 and result.judge_model == "judge"
    assert result.judge_prompt_version is not None and len(result.judge_prompt_version) == 64
    expected = [
        None if not a.base else ("A" if a.base.strip().lower() == a.reference.lower() else "C")
        for a in result.answers
    ]
    assert [a.base_rating for a in result.answers] == expected
    assert all(a.base_judge_answer is not None for a in result.answers)
    counts = result.base.ratings
    assert counts is not None and sum(counts.values()) == 5
    assert counts["unparseable"] == expected.count(None) and counts["B"] == counts["D"] == 0
    parsed = [r for r in expected if r is not None]
    if parsed:
        assert result.base.acceptable_share == pytest.approx(parsed.count("A") / len(parsed))
        assert result.base.acceptable_ci is not None
    assert result.base.rouge_l_f_ci is not None and result.base == result.finetuned  # identity adapter
    assert len(judge_server.bodies) >= 1 and {b["model"] for b in judge_server.bodies} == {"judge"}

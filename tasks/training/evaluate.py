"""Held-out evaluation: the base model and base + adapter answer unseen tasks; ROUGE-L F against references.

ROUGE-L F is the metric of SuperNI (which Self-Instruct reports on), computed with rouge-score's own
RougeScorer(["rougeL"]). The answers come from answers.py (greedy), so a result depends only on the held-out
file, the adapter and the settings; `comparison_key` hashes those settings and the file so results of
different fine-tunes can be put side by side only when they were measured the same way.
"""

import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas.training import AnswerScores, EvaluateParams, EvaluationResult, Rating, TaskAnswers
from tasks.quality.judge import RATING_TEMPLATE, build_rating_prompt, parse_rating, prompt_version
from tasks.quality.scores import acceptable, format_interval, mean_interval, rating_counts, task_groups
from tasks.resources.redact import redact_url
from tasks.resources.secrets import run_settings
from tasks.resources.store.layout import FINETUNES
from tasks.resources.store.rounds import Store, open_store
from tasks.training.answers import (
    DEFAULT_HELDOUT,
    HeldoutPrompt,
    answered_progress,
    build_prompts,
    generate_answers,
    load_finetuned,
    load_heldout,
)
from tasks.training.models import FinetuneError, load_base_model, set_torch_threads
from tasks.training.registry import finetune_to_evaluate, read_finetune_manifest

EVALUATIONS = "evaluations"
RESULT_FILE = "result.json"
TABLE_KEY = "selfinstruct-evaluation"
Quality = Literal["ok", "empty", "degenerate"]
# A judge: rating prompts in, the judge's raw completions out (tasks.quality.judge.judge_completions, bound).
JudgeFn = Callable[[list[str]], list[str]]
_WORD = re.compile(r"\w+")


# -- pure: scoring --------------------------------------------------------------------------------------


def answer_quality(text: str) -> Quality:
    """ "empty" (nothing but whitespace), "degenerate" (no words, or repeating itself), else "ok".

    Repetition: in an answer of 8 or more words, fewer than half of its word 3-grams are distinct, or a
    line of 3 or more lines is repeated for half of them: the loops small models fall into.
    """
    if not text.strip():
        return "empty"
    words = _WORD.findall(text.lower())
    if not words:
        return "degenerate"
    if len(words) >= 8:
        grams = list(zip(words, words[1:], words[2:], strict=False))
        if len(set(grams)) / len(grams) < 0.5:
            return "degenerate"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) >= 3 and len(set(lines)) <= len(lines) / 2:
        return "degenerate"
    return "ok"


def rouge_l_f(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F of each prediction against its reference (rouge-score, no stemming, as in Self-Instruct)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    return [
        scorer.score(reference, prediction)["rougeL"].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def summarize(
    scores: Sequence[float],
    qualities: Sequence[Quality],
    groups: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    resamples: int = 1000,
) -> AnswerScores:
    """Mean ROUGE-L F with its 95% bootstrap interval over tasks, and the shares of empty and degenerate
    answers.

    Args:
        scores, qualities: One per answer.
        groups: Answer indices per task (`scores.task_groups`); None = every answer its own task.
        seed, resamples: Of the bootstrap.
    """
    n = len(scores)
    groups = groups if groups is not None else [[i] for i in range(n)]
    _, interval = mean_interval(list(scores), groups, seed, resamples)
    return AnswerScores(
        rouge_l_f=round(sum(scores) / n, 6) if n else 0.0,
        empty_share=round(sum(q == "empty" for q in qualities) / n, 6) if n else 0.0,
        degenerate_share=round(sum(q == "degenerate" for q in qualities) / n, 6) if n else 0.0,
        tasks=n,
        rouge_l_f_ci=(round(interval[0], 6), round(interval[1], 6)) if interval else None,
    )


def with_ratings(
    scores: AnswerScores,
    ratings: Sequence[Rating | None],
    groups: Sequence[Sequence[int]],
    seed: int = 0,
    resamples: int = 1000,
) -> AnswerScores:
    """`scores` plus the rating counts and the share rated acceptable (A or B) with its interval."""
    share, interval = mean_interval(acceptable(ratings), groups, seed, resamples)
    return scores.model_copy(
        update={
            "ratings": rating_counts(ratings),
            "acceptable_share": None if share is None else round(share, 6),
            "acceptable_ci": (round(interval[0], 6), round(interval[1], 6)) if interval else None,
        }
    )


def rate_answers(
    prompts: Sequence[HeldoutPrompt], answers: Sequence[str], judge: JudgeFn
) -> tuple[list[Rating | None], list[str]]:
    """Ratings A-D of `answers` to the held-out `prompts` by `judge` (None where unparseable), and the
    judge's raw answers."""
    requests = [
        build_rating_prompt(p.instruction, p.input, p.reference, answer)
        for p, answer in zip(prompts, answers, strict=True)
    ]
    raw = judge(requests)
    return [parse_rating(text).rating for text in raw], raw


def comparison_key(heldout_sha256: str, params: EvaluateParams) -> str:
    """sha256 of the held-out file and every setting that changes scores (not the fine-tune or the store)."""
    settings = {
        "heldout": heldout_sha256,
        "limit": params.limit,
        "max_new_tokens": params.max_new_tokens,
        "prompt_format": params.prompt_format,
        "template": params.template if params.prompt_format == "template" else None,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def evaluation_id(finetune_id: str, key: str) -> str:
    """Store id of an evaluation: the same fine-tune measured the same way always lands in the same place."""
    return f"{finetune_id}--{key[:10]}"


# -- the evaluation -------------------------------------------------------------------------------------


def evaluate_finetune(
    store: Store,
    finetune_id: str,
    params: EvaluateParams,
    log: Any = None,
    judge: JudgeFn | None = None,
    judge_model: str | None = None,
) -> EvaluationResult:
    """Answer the held-out tasks with the base model and with the fine-tune; score and store the result.

    Args:
        store: The store holding finetunes/<finetune_id>/.
        finetune_id: A finished, trained fine-tune.
        params: Held-out file, limit, decoding and prompt settings.
        log: Called with progress lines, when given.
        judge: Rates every answer A-D when given (prompts in, raw completions out).
        judge_model: The judge's name, recorded with the result.

    Returns:
        The result, also written to evaluations/<evaluation id>/result.json.

    Raises:
        FinetuneError: When the fine-tune is unknown, unfinished or a dry run.
    """
    manifest = read_finetune_manifest(store, finetune_id)
    if manifest.dry_run:
        raise FinetuneError(f"fine-tune {finetune_id} is a dry run: it has no adapter to evaluate")
    base_spec = manifest.params.base_model
    heldout_path = Path(params.heldout_path) if params.heldout_path else DEFAULT_HELDOUT
    tasks, heldout_sha256 = load_heldout(heldout_path, params.limit)
    set_torch_threads(params.torch_threads)

    answers: dict[str, list[str]] = {}
    prompts: list[HeldoutPrompt] = []
    with tempfile.TemporaryDirectory(prefix="selfinstruct-eval-") as folder:
        adapter_dir = Path(folder) / "adapter"
        store.get_tree(f"{FINETUNES}/{finetune_id}/adapter", adapter_dir)
        for name in ("base", "finetuned"):
            model, tokenizer = (
                load_base_model(base_spec) if name == "base" else load_finetuned(base_spec, adapter_dir)
            )
            prompts = build_prompts(tasks, params.prompt_format, params.template, tokenizer)
            answers[name] = generate_answers(
                model,
                tokenizer,
                [p.prompt for p in prompts],
                params.max_new_tokens,
                params.batch_size,
                answered_progress(f"evaluate {name}"),
            )
            del model  # one copy of the weights at a time
            if log is not None:
                log(f"{name}: answered {len(prompts)} held-out tasks")

    references = [p.reference for p in prompts]
    scores = {name: rouge_l_f(texts, references) for name, texts in answers.items()}
    qualities = {name: [answer_quality(t) for t in texts] for name, texts in answers.items()}
    groups = task_groups([p.instruction for p in prompts])
    seed, resamples = params.bootstrap_seed, params.bootstrap_resamples
    summaries = {name: summarize(scores[name], qualities[name], groups, seed, resamples) for name in answers}
    ratings: dict[str, list[Rating | None]] = {name: [None] * len(prompts) for name in answers}
    raw: dict[str, list[str | None]] = {name: [None] * len(prompts) for name in answers}
    if judge is not None:
        for name, texts in answers.items():
            ratings[name], judged = rate_answers(prompts, texts, judge)
            raw[name] = list(judged)
            summaries[name] = with_ratings(summaries[name], ratings[name], groups, seed, resamples)
            if log is not None:
                log(f"{name}: judge rated {len(judged)} answers: {summaries[name].ratings}")
    key = comparison_key(heldout_sha256, params)
    result = EvaluationResult(
        evaluation_id=evaluation_id(finetune_id, key),
        finetune_id=finetune_id,
        created_at=datetime.now(UTC),
        comparison_key=key,
        heldout=heldout_path.name,
        heldout_sha256=heldout_sha256,
        base_model=manifest.base_model,
        settings={
            "limit": params.limit,
            "max_new_tokens": params.max_new_tokens,
            "prompt_format": params.prompt_format,
            "template": params.template if params.prompt_format == "template" else None,
        },
        base=summaries["base"],
        finetuned=summaries["finetuned"],
        answers=[
            TaskAnswers(
                id=p.id,
                reference=p.reference,
                base=answers["base"][i],
                finetuned=answers["finetuned"][i],
                base_rouge_l_f=round(scores["base"][i], 6),
                finetuned_rouge_l_f=round(scores["finetuned"][i], 6),
                base_quality=qualities["base"][i],
                finetuned_quality=qualities["finetuned"][i],
                base_rating=ratings["base"][i],
                finetuned_rating=ratings["finetuned"][i],
                base_judge_answer=raw["base"][i],
                finetuned_judge_answer=raw["finetuned"][i],
            )
            for i, p in enumerate(prompts)
        ],
        judge_model=judge_model if judge is not None else None,
        judge_prompt_version=prompt_version(RATING_TEMPLATE) if judge is not None else None,
        bootstrap_seed=seed,
        bootstrap_resamples=resamples,
    )
    store.put_bytes(
        f"{EVALUATIONS}/{result.evaluation_id}/{RESULT_FILE}", result.model_dump_json(indent=2).encode()
    )
    return result


def score_columns(scores: AnswerScores) -> dict[str, str | float | int]:
    """ROUGE-L F and the judged acceptable share, each with its 95% interval, as table cells."""
    return {
        "rouge_l_f [95% CI]": format_interval(scores.rouge_l_f, scores.rouge_l_f_ci),
        "judged A or B [95% CI]": format_interval(scores.acceptable_share, scores.acceptable_ci, True),
        "ratings A/B/C/D/unparseable": "-"
        if scores.ratings is None
        else "/".join(str(scores.ratings[k]) for k in ("A", "B", "C", "D", "unparseable")),
    }


def comparison_rows(result: EvaluationResult) -> list[dict[str, str | float | int]]:
    """Rows of the evaluation's table artifact: base vs fine-tuned."""
    return [
        {
            "model": label,
            "rouge_l_f": round(scores.rouge_l_f, 4),
            **score_columns(scores),
            "empty_share": round(scores.empty_share, 4),
            "degenerate_share": round(scores.degenerate_share, 4),
            "tasks": scores.tasks,
        }
        for label, scores in (
            (f"base ({result.base_model})", result.base),
            (f"finetuned ({result.finetune_id})", result.finetuned),
        )
    ]


# -- Prefect tasks --------------------------------------------------------------------------------------


@task(name="resolve-finetune", cache_policy=NO_CACHE)
def resolve_finetune_task(params: EvaluateParams) -> str:
    """The fine-tune to evaluate: the one asked for, else the newest trained one."""
    store = open_store(params.store_url, run_settings())
    found = finetune_to_evaluate(store, params.finetune_id)  # fails clearly when unknown or a dry run
    if found is None:
        raise FinetuneError(f"store {redact_url(store.url)} has no trained fine-tune to evaluate")
    return found


@task(name="evaluate-heldout", cache_policy=NO_CACHE)
def evaluate_task(params: EvaluateParams, finetune_id: str) -> EvaluationResult:
    """Run the held-out evaluation of one fine-tune and store its result; with `params.judge`, the judge
    server given, or Settings', or an embedded one started for the duration, rates every answer."""
    from contextlib import AbstractContextManager, nullcontext
    from functools import partial

    from tasks.quality.judge import RATING_SAMPLING, judge_completions
    from tasks.resources.servers.endpoints import llm_endpoints

    logger = get_run_logger()
    settings = run_settings()
    store = open_store(params.store_url, settings)
    # An embedded judge keeps its files under the store, as the bootstrap's embedded server does.
    settings = settings.model_copy(update={"store_url": params.store_url or settings.store_url})
    model = params.judge_model or settings.model
    endpoints: AbstractContextManager[list[str]] = (
        llm_endpoints(params.judge_urls, settings) if params.judge else nullcontext([])
    )
    with endpoints as urls:
        judge = (
            partial(judge_completions, sampling=RATING_SAMPLING, settings=settings, urls=urls, model=model)
            if params.judge
            else None
        )
        result = evaluate_finetune(
            store, finetune_id, params, log=logger.info, judge=judge, judge_model=model
        )
    logger.info(
        "%s: ROUGE-L F base %.4f -> fine-tuned %.4f on %d tasks",
        finetune_id,
        result.base.rouge_l_f,
        result.finetuned.rouge_l_f,
        result.base.tasks,
    )
    if result.judge_model is not None:
        logger.info(
            "%s: judged A or B: base %s -> fine-tuned %s",
            finetune_id,
            format_interval(result.base.acceptable_share, result.base.acceptable_ci, True),
            format_interval(result.finetuned.acceptable_share, result.finetuned.acceptable_ci, True),
        )
    return result


@task(name="publish-evaluation", cache_policy=NO_CACHE)
def publish_evaluation_task(store_url: str | None, result: EvaluationResult) -> str:
    """Table artifact comparing base and fine-tuned; returns the result's store location."""
    from prefect.artifacts import create_table_artifact

    store = open_store(store_url, run_settings())
    location = store.location_of(f"{EVALUATIONS}/{result.evaluation_id}/{RESULT_FILE}")
    create_table_artifact(
        table=comparison_rows(result),
        key=TABLE_KEY,
        description=f"Held-out ROUGE-L F and judged A-D ratings ({result.judge_model or 'not judged'}) of "
        f"{result.finetune_id} vs its base on {result.base.tasks} tasks of {result.heldout}, 95% bootstrap "
        f"intervals over tasks (seed {result.bootstrap_seed}); comparison key {result.comparison_key[:10]}; "
        f"{redact_url(location)}",
    )
    return location

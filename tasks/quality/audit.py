"""Quality audit of a committed round: a seeded sample judged on the three questions of section 3.3.

Pure functions first (sampling, rates, rows), then store I/O, then thin Prefect tasks. The audit is written
beside the round (audits/round=NNNNN/), never into it: rounds stay immutable.
"""

import hashlib
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas import Settings
from schemas.audit import QUESTIONS, AuditManifest, AuditParams, AuditRecord, RateEstimate
from tasks.quality.judge import (
    AUDIT_SAMPLING,
    AUDIT_TEMPLATE,
    build_audit_prompt,
    judge_completions,
    parse_audit_answer,
    prompt_version,
)
from tasks.quality.stats import wilson_interval
from tasks.resources.redact import redact_url
from tasks.resources.store.files import StoreError
from tasks.resources.store.rounds import Store, open_store

AUDITS = "audits"
TABLE_KEY = "selfinstruct-round-audit"
AUDIT_SCHEMA = pa.schema(
    [
        ("instruction_id", pa.string()),
        ("instance_index", pa.int32()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("judge_answer", pa.string()),
        ("parse_error", pa.string()),
        ("valid_instruction", pa.bool_()),
        ("appropriate_input", pa.bool_()),
        ("correct_output", pa.bool_()),
    ]
)
QUESTION_TEXT = {
    "valid_instruction": "the instruction describes a valid task",
    "appropriate_input": "the input is appropriate for the instruction",
    "correct_output": "the output is a correct and acceptable response",
    "all_three": "all three fields are valid",
}


@dataclass(frozen=True)
class AuditItem:
    """One sampled instruction with the one instance chosen for it."""

    instruction_id: str
    instance_index: int
    instruction: str
    input: str
    output: str


# -- pure -------------------------------------------------------------------------------------------------


def sample_items(
    instructions: Sequence[dict[str, Any]], instances: Sequence[dict[str, Any]], size: int, seed: int
) -> list[AuditItem]:
    """A seeded sample of `size` instructions (all when fewer), with one random instance each.

    Instructions are ordered by id before sampling and instances by index, so the sample depends only on
    the round's content and the seed, not on row order. Instructions without an instance are skipped.

    Args:
        instructions: Rows of the round's instructions.parquet (id, instruction).
        instances: Rows of its instances.parquet (instruction_id, index, input, output).
        size: Instructions wanted.
        seed: Seeds both choices.

    Returns:
        The items, in sampling order.
    """
    by_instruction: dict[str, list[dict[str, Any]]] = {}
    for row in instances:
        by_instruction.setdefault(row["instruction_id"], []).append(row)
    candidates = sorted((r for r in instructions if by_instruction.get(r["id"])), key=lambda r: r["id"])
    rng = random.Random(seed)
    chosen = rng.sample(candidates, min(size, len(candidates)))
    items = []
    for row in chosen:
        options = sorted(by_instruction[row["id"]], key=lambda r: r["index"])
        instance = options[rng.randrange(len(options))]
        items.append(
            AuditItem(
                instruction_id=row["id"],
                instance_index=int(instance["index"]),
                instruction=row["instruction"],
                input=instance["input"] or "",
                output=instance["output"] or "",
            )
        )
    return items


def judge_records(items: Sequence[AuditItem], answers: Sequence[str]) -> list[AuditRecord]:
    """Pair each item with the judge's raw answer and its strict reading."""
    records = []
    for item, answer in zip(items, answers, strict=True):
        verdict = parse_audit_answer(answer)
        records.append(
            AuditRecord(
                instruction_id=item.instruction_id,
                instance_index=item.instance_index,
                instruction=item.instruction,
                input=item.input,
                output=item.output,
                judge_answer=answer,
                parse_error=verdict.error,
                valid_instruction=verdict.valid_instruction,
                appropriate_input=verdict.appropriate_input,
                correct_output=verdict.correct_output,
            )
        )
    return records


def audit_rates(records: Sequence[AuditRecord]) -> list[RateEstimate]:
    """Share of yes per question over the parseable answers, with 95% Wilson intervals.

    "all_three" is the paper's "all fields are valid": yes to every question.
    """
    parsed = [r for r in records if r.parse_error is None]
    yes = {
        "valid_instruction": sum(bool(r.valid_instruction) for r in parsed),
        "appropriate_input": sum(bool(r.appropriate_input) for r in parsed),
        "correct_output": sum(bool(r.correct_output) for r in parsed),
        "all_three": sum(
            bool(r.valid_instruction and r.appropriate_input and r.correct_output) for r in parsed
        ),
    }
    rates = []
    for question in QUESTIONS:
        interval = wilson_interval(yes[question], len(parsed))
        rates.append(
            RateEstimate(
                question=question,
                yes=yes[question],
                n=len(parsed),
                rate=yes[question] / len(parsed) if parsed else None,
                ci_low=interval[0] if interval else None,
                ci_high=interval[1] if interval else None,
            )
        )
    return rates


def audit_id(round_run_id: str, params: AuditParams, judge_model: str, version: str) -> str:
    """Deterministic id: the same round audited the same way (sample, seed, judge, prompt) lands in one place.

    A rerun (a retried deployment run) therefore replaces its own audit instead of adding a second one.
    """
    key = json.dumps(
        [round_run_id, params.sample, params.seed, judge_model, version, params.max_tokens], sort_keys=True
    )
    return "audit-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def rate_rows(manifest: AuditManifest) -> list[dict[str, str | int | float | None]]:
    """Rows of the audit's table artifact: one per question, rate and 95% interval in percent."""

    def percent(value: float | None) -> float | None:
        return None if value is None else round(100 * value, 1)

    return [
        {
            "question": QUESTION_TEXT[r.question],
            "yes": r.yes,
            "judged": r.n,
            "rate_%": percent(r.rate),
            "ci95_low_%": percent(r.ci_low),
            "ci95_high_%": percent(r.ci_high),
        }
        for r in manifest.rates
    ] + [
        {
            "question": "unparseable judge answers",
            "yes": manifest.unparseable,
            "judged": manifest.sampled,
            "rate_%": percent(manifest.unparseable / manifest.sampled) if manifest.sampled else None,
            "ci95_low_%": None,
            "ci95_high_%": None,
        }
    ]


def format_rate(rate: RateEstimate) -> str:
    """ "58.0% [51.1, 64.6]" (or "-" when nothing was judged)."""
    if rate.rate is None or rate.ci_low is None or rate.ci_high is None:
        return "-"
    return f"{100 * rate.rate:.1f}% [{100 * rate.ci_low:.1f}, {100 * rate.ci_high:.1f}]"


# -- store ------------------------------------------------------------------------------------------------


def audit_folder(number: int) -> str:
    """audits/round=NNNNN, relative to the store root."""
    return f"{AUDITS}/round={number:05d}"


def resolve_round(store: Store, number: int | None) -> int:
    """The round to audit: the one asked for, else the newest committed one.

    Raises:
        StoreError: When the store has no committed round or `number` is not committed.
    """
    committed = store.committed_rounds()
    if number is None:
        if not committed:
            raise StoreError(f"store {redact_url(store.url)} has no committed round to audit")
        return committed[-1]
    if number not in committed:
        raise StoreError(f"round {number} of store {redact_url(store.url)} is not committed")
    return number


def write_audit(store: Store, manifest: AuditManifest, records: Sequence[AuditRecord]) -> AuditManifest:
    """Write the Parquet file, then the manifest (last: it marks the audit as complete).

    Returns:
        The manifest with the file's checksum filled in.
    """
    table = pa.Table.from_pylist([r.model_dump() for r in records], schema=AUDIT_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = buffer.getvalue()
    folder = audit_folder(manifest.round)
    store.put_bytes(f"{folder}/{manifest.file}", data)
    manifest = manifest.model_copy(update={"sha256": hashlib.sha256(data).hexdigest()})
    store.put_bytes(f"{folder}/{manifest.audit_id}.json", manifest.model_dump_json(indent=2).encode())
    return manifest


def read_audits(store: Store, number: int) -> list[AuditManifest]:
    """Complete audits of a round (those with a manifest), oldest first."""
    folder = audit_folder(number)
    manifests = []
    for name in store.list_names(folder):
        if name.startswith("audit-") and name.endswith(".json"):
            try:
                manifests.append(AuditManifest.model_validate_json(store.get_bytes(f"{folder}/{name}")))
            except ValueError:
                continue  # a manifest from another version or a damaged file is not an audit we can show
    return sorted(manifests, key=lambda m: m.created_at)


def read_audit_records(store: Store, manifest: AuditManifest) -> list[AuditRecord]:
    """The judged rows of an audit."""
    data = store.get_bytes(f"{audit_folder(manifest.round)}/{manifest.file}")
    return [AuditRecord.model_validate(row) for row in pq.read_table(io.BytesIO(data)).to_pylist()]


# -- the audit --------------------------------------------------------------------------------------------


def run_audit(store: Store, params: AuditParams, settings: Settings, urls: list[str]) -> AuditManifest:
    """Sample, judge, score and store the audit of one round.

    Args:
        store: The store.
        params: Round, sample size, seed and judge.
        settings: Client settings; the judge model defaults to `settings.model`.
        urls: The judge's base URLs.

    Returns:
        The written manifest.

    Raises:
        StoreError: When the round is not committed.
        tasks.resources.llm.protocol.LLMError: When the judge fails for good.
    """
    number = resolve_round(store, params.round)
    round_manifest = store.read_manifest(number)
    instructions = store.read_table(number, "instructions").to_pylist()
    items = sample_items(
        instructions, store.read_table(number, "instances").to_pylist(), params.sample, params.seed
    )
    judge_model = params.judge_model or settings.model
    version = prompt_version(AUDIT_TEMPLATE)
    sampling = AUDIT_SAMPLING.model_copy(update={"max_tokens": params.max_tokens})
    prompts = [build_audit_prompt(i.instruction, i.input, i.output) for i in items]
    answers = judge_completions(prompts, sampling, settings, urls, judge_model, seed=params.seed)
    records = judge_records(items, answers)
    identifier = audit_id(round_manifest.run_id, params, judge_model, version)
    manifest = AuditManifest(
        audit_id=identifier,
        round=number,
        created_at=datetime.now(UTC),
        store=redact_url(store.url),
        judge_model=judge_model,
        judge_urls=[redact_url(u) for u in urls],
        prompt_version=version,
        prompt_files=[f"tasks/prompts/{AUDIT_TEMPLATE}.txt"],
        sample_seed=params.seed,
        sample_requested=params.sample,
        sampled=len(records),
        instructions_in_round=len(instructions),
        unparseable=sum(r.parse_error is not None for r in records),
        rates=audit_rates(records),
        file=f"{identifier}.parquet",
        sha256="",
    )
    return write_audit(store, manifest, records)


# -- Prefect ----------------------------------------------------------------------------------------------


@task(name="audit-round", cache_policy=NO_CACHE)
def audit_task(params: AuditParams) -> AuditManifest:
    """Judge a sample of a committed round and store the audit beside it (the judge server given, or
    Settings', or an embedded one started for the duration)."""
    from tasks.resources.servers.endpoints import llm_endpoints

    logger = get_run_logger()
    settings = Settings()
    # An embedded judge keeps its files under the store, as the bootstrap's embedded server does.
    settings = settings.model_copy(update={"store_url": params.store_url or settings.store_url})
    store = Store(settings.store_url, settings)
    with llm_endpoints(params.judge_urls, settings) as urls:
        manifest = run_audit(store, params, settings, urls)
    logger.info(
        "round %d audit %s: %d judged by %s, %d unparseable; %s",
        manifest.round,
        manifest.audit_id,
        manifest.sampled,
        manifest.judge_model,
        manifest.unparseable,
        "; ".join(f"{r.question} {format_rate(r)}" for r in manifest.rates),
    )
    return manifest


@task(name="publish-audit", cache_policy=NO_CACHE)
def publish_audit_task(store_url: str | None, manifest: AuditManifest) -> str:
    """Table artifact of the three rates with 95% intervals; returns the manifest's store location."""
    from prefect.artifacts import create_table_artifact

    store = open_store(store_url)
    location = store.location_of(f"{audit_folder(manifest.round)}/{manifest.audit_id}.json")
    create_table_artifact(
        table=rate_rows(manifest),
        key=TABLE_KEY,
        description=f"Round {manifest.round} audit: {manifest.sampled} instances judged by "
        f"{manifest.judge_model} (prompt {manifest.prompt_version[:10]}, seed {manifest.sample_seed}); "
        f"Wilson 95% intervals; {redact_url(location)}",
    )
    return location

"""Committing a round: its counts, and its Parquet files written before the manifest that makes it exist."""

import time
from collections import Counter
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from schemas import (
    BootstrapConfig,
    CompletionRecord,
    InstanceRecord,
    InstructionRecord,
    RejectionRecord,
    RoundManifest,
)
from tasks.resources.store.records import records_to_table
from tasks.resources.store.rounds import Store
from tasks.round.pool import INDEX_FILE, VOCAB_FILE, IndexDelta
from tasks.round.server_load import generation_load


def round_counts(
    prompts: int,
    candidates_parsed: int,
    instructions: list[InstructionRecord],
    instances: list[InstanceRecord],
    rejected: list[RejectionRecord],
) -> dict[str, int]:
    """The counts a round reports everywhere (manifest, artifacts, CLI), derived from its records."""
    counts: dict[str, int] = {
        "prompts": prompts,
        "generated": candidates_parsed,
        "kept": len(instructions),
        "classification": sum(1 for r in instructions if r.is_classification),
        "instances": len(instances),
    }
    by_reason = Counter(f"rejected:{r.stage}:{r.reason}" for r in rejected)
    counts.update(sorted(by_reason.items()))
    return counts


@dataclass(frozen=True)
class RoundRecords:
    """The records a round's stages produce, in the order the commit writes them."""

    prompts: int
    candidates_parsed: int
    instructions: list[InstructionRecord]
    instances: list[InstanceRecord]
    rejected: list[RejectionRecord]
    completions: list[CompletionRecord]

    def records(self) -> dict[str, Any]:
        """The fields above by name (shallow: the lists are shared, not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(RoundRecords)}


@dataclass(frozen=True)
class RoundResult(RoundRecords):
    """Everything a round commits: its records, the round's identity, and how it generated."""

    number: int
    run_id: str
    model: str
    seeds_sha256: str
    pool_size_before: int
    concurrency: int | None = None
    per_prompt_tokens: bool = False


def write_round(
    store: Store,
    result: RoundResult,
    delta: IndexDelta,
    config: BootstrapConfig,
    opened_at: float | None = None,
) -> RoundManifest:
    """Write the round's files, then its manifest last.

    Args:
        store: The round store; the run holds the claim of `result.number`.
        result: The round's records and counts.
        delta: What dedup added to the pool index; only the finally accepted instructions are written.
        config: The round's config, recorded in the manifest.

    Returns:
        The committed manifest.
    """
    number = result.number
    entries, vocab = delta.kept(r.id for r in result.instructions)
    files = {
        f"{name}.parquet": store.write_table(number, name, records_to_table(records, name))
        for name, records in (
            ("instructions", result.instructions),
            ("instances", result.instances),
            ("rejected", result.rejected),
            ("requests", result.completions),
        )
    }
    files.update(
        {
            f"{INDEX_FILE}.parquet": store.write_table(number, INDEX_FILE, entries),
            f"{VOCAB_FILE}.parquet": store.write_table(number, VOCAB_FILE, vocab),
        }
    )
    manifest = RoundManifest(
        round=number,
        run_id=result.run_id,
        created_at=datetime.now(UTC),
        model=result.model,
        seeds_sha256=result.seeds_sha256,
        pool_size_before=result.pool_size_before,
        counts=round_counts(
            result.prompts, result.candidates_parsed, result.instructions, result.instances, result.rejected
        ),
        config=config,
        files=files,
        load=None
        if result.concurrency is None
        else generation_load(
            result.completions,
            result.concurrency,
            result.per_prompt_tokens,
            since=opened_at,
            round_wall_s=None if opened_at is None else max(0.0, time.time() - opened_at),
        ),
    )
    store.commit(manifest)
    return manifest

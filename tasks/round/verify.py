"""Store verification: every committed round matches its manifest, and the pool has no duplicates."""

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from schemas import SeedTask
from tasks.resources.store.records import ADDED_COLUMNS, ARROW_SCHEMAS
from tasks.resources.store.rounds import Store
from tasks.round.pool import INDEX_FILE, VOCAB_FILE


@dataclass
class VerifyReport:
    """What `verify` found: problems make the command exit non-zero; dangling rounds are reported."""

    rounds_checked: int = 0
    instructions: int = 0
    problems: list[str] = field(default_factory=list)
    dangling: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


ROUND_FILES = frozenset(
    f"{name}.parquet"
    for name in ("instructions", "instances", "rejected", "requests", INDEX_FILE, VOCAB_FILE)
)


def _check_counts(number: int, counts: dict[str, int], tables: dict[str, pa.Table]) -> list[str]:
    """Every count of a manifest against what its files hold; returns the disagreements."""
    instructions, instances = tables["instructions"], tables["instances"]
    rejected, requests = tables["rejected"], tables["requests"]
    stages = Counter(requests.column("stage").to_pylist())
    by_reason = Counter(
        f"rejected:{stage}:{reason}"
        for stage, reason in zip(
            rejected.column("stage").to_pylist(), rejected.column("reason").to_pylist(), strict=True
        )
    )
    parsed_then_dropped = sum(
        v
        for k, v in by_reason.items()
        if k.startswith("rejected:dedup:")
        or (k.startswith("rejected:instruction:") and k != "rejected:instruction:unparseable")
    )
    expected = {
        "prompts": stages["instruction"],
        "generated": parsed_then_dropped + stages["classify"],
        "kept": instructions.num_rows,
        "classification": sum(bool(v) for v in instructions.column("is_classification").to_pylist()),
        "instances": instances.num_rows,
        **by_reason,
    }
    problems = []
    for key in sorted(set(expected) | set(counts)):
        if key.startswith("rejected:") or key in counts:
            if counts.get(key, 0) != expected.get(key, 0):
                problems.append(
                    f"round {number}: count {key}={counts.get(key, 0)} "
                    f"but the files give {expected.get(key, 0)}"
                )
        else:
            problems.append(f"round {number}: count {key} is missing from the manifest")
    ids = set(instructions.column("id").to_pylist())
    with_instances = set(instances.column("instruction_id").to_pylist())
    if with_instances - ids:
        problems.append(f"round {number}: instances of {len(with_instances - ids)} unknown instructions")
    if ids - with_instances:
        problems.append(f"round {number}: {len(ids - with_instances)} instructions have no instance")
    for name, table in tables.items():
        if "round" in table.column_names and set(table.column("round").to_pylist()) - {number}:
            problems.append(f"round {number}: {name}.parquet has rows of another round")
    return problems


def _expected_schema(schema: pa.Schema, stem: str) -> bool:
    """The file's schema is today's, or today's without the columns added since it was written."""
    expected = ARROW_SCHEMAS[stem]
    if schema.equals(expected, check_metadata=False):
        return True
    older = pa.schema([f for f in expected if f.name not in ADDED_COLUMNS.get(stem, ())])
    return schema.equals(older, check_metadata=False)


def _check_round(store: Store, number: int, report: VerifyReport) -> list[tuple[str, str]]:
    """Check one committed round; returns its (id, instruction) pairs."""
    try:
        manifest = store.read_manifest(number)
    except Exception as error:  # a manifest that does not parse is itself the finding
        report.problems.append(f"round {number}: manifest unreadable: {str(error)[:200]}")
        return []
    if manifest.round != number:
        report.problems.append(f"round {number}: manifest says round {manifest.round}")
    listed = set(manifest.files)
    for name in sorted(ROUND_FILES - listed):
        report.problems.append(f"round {number}: {name} is not in the manifest")
    for name in sorted(listed - ROUND_FILES):
        report.problems.append(f"round {number}: the manifest lists {name}, which no round has")
    tables: dict[str, pa.Table] = {}
    for name, entry in sorted(manifest.files.items()):
        if name not in ROUND_FILES:
            continue
        try:
            checksum = store.file_checksum(number, name)
        except FileNotFoundError:
            report.problems.append(f"round {number}: {name} is missing")
            continue
        if checksum != entry.sha256:
            report.problems.append(f"round {number}: {name} checksum differs from the manifest")
            continue
        stem = name.removesuffix(".parquet")
        table = store.read_table(number, stem)
        if table.num_rows != entry.rows:
            report.problems.append(
                f"round {number}: {name} has {table.num_rows} rows, manifest says {entry.rows}"
            )
        if stem in ARROW_SCHEMAS and not _expected_schema(table.schema, stem):
            report.problems.append(f"round {number}: {name} does not have the expected schema")
            continue
        tables[stem] = table
    if all(name in tables for name in ("instructions", "instances", "rejected", "requests")):
        report.problems.extend(_check_counts(number, dict(manifest.counts), tables))
    if "instructions" not in tables:
        return []
    instructions = tables["instructions"]
    return list(
        zip(
            instructions.column("id").to_pylist(), instructions.column("instruction").to_pylist(), strict=True
        )
    )


def verify_store(store: Store, seeds: list[SeedTask]) -> VerifyReport:
    """Check every committed round, pool-wide uniqueness of ids and instructions, gaps and dangling rounds.

    Args:
        store: The store to check.
        seeds: The seed tasks the pool starts from.

    Returns:
        The findings. A round missing between committed ones is a problem (a gap); uncommitted rounds after
        the last committed one are `dangling` (a crashed or running round, which a rerun resumes).
    """
    report = VerifyReport()
    seen_ids: dict[str, str] = {t.id: "seeds" for t in seeds}
    seen_texts: dict[str, str] = {_normalized(t.instruction): "seeds" for t in seeds}
    committed = store.committed_rounds()
    for number in committed:
        report.rounds_checked += 1
        for instruction_id, text in _check_round(store, number, report):
            report.instructions += 1
            where = f"round {number}"
            if instruction_id in seen_ids:
                report.problems.append(f"{where}: id {instruction_id} already in {seen_ids[instruction_id]}")
            key = _normalized(text)
            if key in seen_texts:
                report.problems.append(
                    f"{where}: instruction {instruction_id} duplicates one in {seen_texts[key]}"
                )
            seen_ids[instruction_id] = where
            seen_texts[key] = where
    last = committed[-1] if committed else 0
    for number in sorted(set(range(1, last + 1)) - set(committed)):
        report.problems.append(
            f"round {number} is not committed but rounds after it are (a gap): its manifest is missing; "
            "nothing is removed"
        )
    report.dangling = [n for n in store.uncommitted_rounds() if n > last]
    return report


def quarantine_dangling(store: Store, numbers: list[int]) -> list[tuple[int, str]]:
    """Move uncommitted rounds after the last committed one, whose claim is stale, to the quarantine area.

    Never touches a round that has committed rounds after it, a committed round or a live round.

    Returns:
        (round, where it now is) for each round moved.
    """
    committed = store.committed_rounds()
    last = committed[-1] if committed else 0
    moved = []
    for number in numbers:
        if number <= last or number in committed or store.round_is_live(number):
            continue
        moved.append((number, store.quarantine_round(number)))
    return moved

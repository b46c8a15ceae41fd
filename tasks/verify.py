"""Store verification: every committed round matches its manifest, and the pool has no duplicates."""

from dataclasses import dataclass, field

import pyarrow as pa

from schemas import SeedTask
from tasks.store import ADDED_COLUMNS, ARROW_SCHEMAS, MANIFEST, Store


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
        report.problems.append(f"round {number}: manifest unreadable: {error}")
        return []
    if manifest.round != number:
        report.problems.append(f"round {number}: manifest says round {manifest.round}")
    intact = set()
    for name, entry in manifest.files.items():
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
        intact.add(name)
    counts = dict(manifest.counts)
    counts["rejected"] = sum(v for k, v in counts.items() if k.startswith("rejected:"))
    for key, file_name in (("kept", "instructions"), ("instances", "instances"), ("rejected", "rejected")):
        listed = manifest.files.get(f"{file_name}.parquet")
        if listed is not None and counts.get(key) != listed.rows:
            report.problems.append(
                f"round {number}: count {key}={counts.get(key)} but {file_name} has {listed.rows} rows"
            )
    if "instructions.parquet" not in intact:
        return []
    instructions: pa.Table = store.read_table(number, "instructions")
    return list(
        zip(
            instructions.column("id").to_pylist(), instructions.column("instruction").to_pylist(), strict=True
        )
    )


def verify_store(store: Store, seeds: list[SeedTask]) -> VerifyReport:
    """Check every committed round, pool-wide uniqueness of ids and instructions, and dangling rounds.

    Args:
        store: The store to check.
        seeds: The seed tasks the pool starts from.

    Returns:
        The findings.
    """
    report = VerifyReport()
    seen_ids: dict[str, str] = {t.id: "seeds" for t in seeds}
    seen_texts: dict[str, str] = {_normalized(t.instruction): "seeds" for t in seeds}
    for number in store.committed_rounds():
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
    report.dangling = store.uncommitted_rounds()
    return report


def clean_dangling(store: Store, numbers: list[int]) -> list[int]:
    """Remove uncommitted round folders whose claim is stale; returns those removed."""
    removed = []
    for number in numbers:
        if store.fs.exists(f"{store.round_dir(number)}/{MANIFEST}") or store.round_is_live(number):
            continue
        store.fs.rm(store.round_dir(number), recursive=True)
        removed.append(number)
    return removed

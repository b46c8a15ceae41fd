"""A Hugging Face dataset folder from committed rounds: Parquet shards per split and a dataset card.

`datasets.load_dataset(folder)` loads it as it is, and `huggingface_hub` can upload it unchanged:

    folder/README.md                                  dataset card (card.py): YAML header and lineage
    folder/data/train-00000-of-00001.parquet          shards of `shard_rows` rows at most
    folder/data/validation-00000-of-00001.parquet     instructions disjoint from train's (seeded split)

Each row carries the example (id, instruction, input, output, is_classification, round; round 0 = seed) and
the prompt/completion pair that `selfinstruct finetune` trains on, rendered with the seeded templates of
export.py. The fine-tune builds its data with `build_dataset_folder` too, so the folder a user inspects
is the folder a model was trained on; `fingerprint` identifies its data files.

Building is pure up to `write_dataset_folder`; `build_dataset_folder` reads the store and writes the folder.
"""

import hashlib
import io
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.training import ExportStats
from tasks.resources.redact import redact_url
from tasks.resources.store.rounds import Store
from tasks.training.export import (
    Example,
    ExportError,
    format_rounds,
    prepare_examples,
    read_round_tables,
    split_by_instruction,
    to_rows,
)

SPLITS = ("train", "validation")
DATA_DIR = "data"
CARD_FILE = "README.md"
# One owner of the columns: the example's fields as the jsonl export writes them, then the sft pair.
COLUMNS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("input", pa.string(), nullable=False),
        pa.field("output", pa.string(), nullable=False),
        pa.field("is_classification", pa.bool_()),
        pa.field("round", pa.int64(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("completion", pa.string(), nullable=False),
    ]
)
COLUMN_DOCS = {
    "id": "`<instruction id>#<instance index>`; seed tasks keep their seed id",
    "instruction": "the task, as generated (or as written, for seeds)",
    "input": "the instance's input; empty when the instruction stands alone",
    "output": "the instance's output",
    "is_classification": "whether the model judged the task a classification task (null: not asked)",
    "round": "bootstrap round that produced it; 0 for seed tasks",
    "prompt": "the training prompt: instruction and input rendered with one of the sft_*.txt templates",
    "completion": "the training target (equal to `output`)",
}
# Files an earlier export leaves, which a new export may replace; anything else in the folder is refused.
_OWN_ENTRIES = frozenset({CARD_FILE, DATA_DIR})


@dataclass(frozen=True)
class DatasetSpec:
    """What goes into a dataset folder, and how it is split (the fine-tune fills it from its params)."""

    rounds: list[int] | None = None
    include_seeds: bool = False
    seeds_path: Path | None = None
    max_instances: int = 5
    seed: int = 42
    validation_fraction: float = 0.1
    validation_max_instructions: int | None = 1000
    shard_rows: int = 100_000


@dataclass(frozen=True)
class BuiltSplits:
    """The split tables of a dataset, before anything is written."""

    tables: dict[str, pa.Table]
    instructions: dict[str, int]
    rounds: list[int]
    stats: ExportStats
    seeds_sha256: str | None


@dataclass(frozen=True)
class DatasetFolder:
    """A written dataset folder: small enough to pass between Prefect tasks."""

    path: Path
    rows: dict[str, int]
    files: dict[str, str]  # path relative to the folder -> sha256, data files and card
    fingerprint: str
    rounds: list[int]
    stats: ExportStats
    seeds_sha256: str | None
    card: str = field(repr=False, default="")


def dataset_rows(examples: Sequence[Example], seed: int) -> list[dict[str, Any]]:
    """Rows of the dataset's columns: the jsonl fields of each example and its sft prompt/completion."""
    plain = to_rows(examples, "jsonl", seed)
    paired = to_rows(examples, "sft", seed)
    return [{**row, **pair} for row, pair in zip(plain, paired, strict=True)]


def split_tables(
    examples: Sequence[Example], spec: DatasetSpec
) -> tuple[dict[str, pa.Table], dict[str, int]]:
    """Train and validation tables (a split without rows is left out), and instructions per split."""
    parts = dict(
        zip(
            SPLITS,
            split_by_instruction(
                examples, spec.validation_fraction, spec.seed, spec.validation_max_instructions
            ),
            strict=True,
        )
    )
    tables = {
        name: pa.Table.from_pylist(dataset_rows(part, spec.seed), schema=COLUMNS)
        for name, part in parts.items()
        if part
    }
    return tables, {name: len({e.instruction for e in part}) for name, part in parts.items() if part}


def shard_names(split: str, rows: int, shard_rows: int) -> list[str]:
    """File names of a split's shards, as the Hub names them: data/train-00000-of-00002.parquet, ..."""
    count = max(1, -(-rows // shard_rows))
    return [f"{DATA_DIR}/{split}-{i:05d}-of-{count:05d}.parquet" for i in range(count)]


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes (zstd; the same table gives the same bytes with the same pyarrow)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def shards(tables: dict[str, pa.Table], shard_rows: int) -> dict[str, bytes]:
    """Every data file of the folder: relative path -> Parquet bytes."""
    files: dict[str, bytes] = {}
    for split, table in tables.items():
        for i, name in enumerate(shard_names(split, table.num_rows, shard_rows)):
            files[name] = parquet_bytes(table.slice(i * shard_rows, shard_rows))
    return files


def fingerprint(data_files: dict[str, bytes]) -> str:
    """sha256 over the data files' names and checksums: equal data, equal fingerprint (the card aside)."""
    lines = "".join(
        f"{name} {hashlib.sha256(data).hexdigest()}\n" for name, data in sorted(data_files.items())
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def fingerprint_of_folder(folder: Path) -> str:
    """The `fingerprint` of the data files found in a dataset folder."""
    return fingerprint(
        {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted((folder / DATA_DIR).glob("*"))}
    )


# -- I/O ------------------------------------------------------------------------------------------------


def chosen_rounds(store: Store, rounds: Sequence[int] | None) -> list[int]:
    """The committed rounds to use: all when `rounds` is None.

    Raises:
        ExportError: When the store has no committed rounds or a requested round is not committed.
    """
    committed = store.committed_rounds()
    if not committed:
        raise ExportError(f"store {redact_url(store.url)} has no committed rounds")
    if rounds is None:
        return committed
    missing = sorted(set(rounds) - set(committed))
    if missing:
        raise ExportError(
            f"rounds {format_rounds(missing)} are not committed (committed: {format_rounds(committed)})"
        )
    return sorted(set(rounds))


def build_splits(store: Store, spec: DatasetSpec) -> BuiltSplits:
    """Read the chosen committed rounds (and seeds) and build the split tables.

    Raises:
        ExportError: When a round is not committed or the rounds hold no usable instances.
        tasks.round.seeds.SeedFileError: When the seed file is invalid.
    """
    from tasks.round.seeds import load_seeds

    rounds = chosen_rounds(store, spec.rounds)
    seed_tasks, seeds_sha256 = load_seeds(spec.seeds_path) if spec.include_seeds else (None, None)
    instructions, instances = read_round_tables(store, rounds)
    examples, stats = prepare_examples(instructions, instances, seed_tasks, spec.max_instances, spec.seed)
    if not examples:
        raise ExportError(f"rounds {format_rounds(rounds)} hold no usable instances; nothing written")
    tables, per_split = split_tables(examples, spec)
    return BuiltSplits(tables, per_split, rounds, stats, seeds_sha256)


def check_target(folder: Path) -> None:
    """Refuse a target named like a data file, a file, or a folder holding anything but an earlier export.

    Raises:
        ExportError: With the reason, before anything is written.
    """
    if folder.suffix.lower() in (".json", ".jsonl", ".parquet"):
        raise ExportError(
            f"{folder}: --format hf writes a folder; give a folder name, not a {folder.suffix} file"
        )
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder}: is a file; the dataset needs a folder")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in _OWN_ENTRIES)
        data = folder / DATA_DIR
        if data.is_dir():
            foreign += sorted(
                f"{DATA_DIR}/{p.name}" for p in data.iterdir() if not (p.is_file() and p.suffix == ".parquet")
            )
        if foreign:
            raise ExportError(
                f"{folder}: not empty ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                "give a new or empty folder, or one an earlier export wrote"
            )


def write_dataset_folder(built: BuiltSplits, card: str, folder: Path, shard_rows: int) -> DatasetFolder:
    """Write the shards and the card into `folder`, replacing an earlier export there as one step.

    Everything is written into a sibling temporary folder first, so a failure leaves `folder` as it was.
    """
    check_target(folder)
    data = shards(built.tables, shard_rows)
    card_bytes = card.encode("utf-8")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for name, content in [*data.items(), (CARD_FILE, card_bytes)]:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(content)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = {name: hashlib.sha256(content).hexdigest() for name, content in data.items()}
    files[CARD_FILE] = hashlib.sha256(card_bytes).hexdigest()
    return DatasetFolder(
        path=folder,
        rows={name: table.num_rows for name, table in built.tables.items()},
        files=dict(sorted(files.items())),
        fingerprint=fingerprint(data),
        rounds=built.rounds,
        stats=built.stats,
        seeds_sha256=built.seeds_sha256,
        card=card,
    )


def build_dataset_folder(
    store: Store, spec: DatasetSpec, folder: Path, license_id: str | None = None
) -> DatasetFolder:
    """The whole export: splits from the store, the card from the rounds' lineage, the folder written.

    Args:
        store: The round store.
        spec: Rounds, seeds, cap, seed and split.
        folder: Where the dataset goes (created; an earlier export there is replaced).
        license_id: The card's license; None = derived from the seeds (see tasks/training/card.py).

    Raises:
        ExportError: When the target or the rounds cannot be used; nothing is written then.
    """
    from tasks.training.card import read_lineage, render_card

    check_target(folder)
    built = build_splits(store, spec)
    card = render_card(built, spec, read_lineage(store, built.rounds), license_id)
    return write_dataset_folder(built, card, folder, spec.shard_rows)


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload a dataset folder to the Hugging Face Hub as a dataset repository; returns its URL.

    A thin call of `huggingface_hub` (token from `hf auth login` or HF_TOKEN); not exercised by the tests,
    which have no network.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset")
    return f"https://huggingface.co/datasets/{repo_id}"

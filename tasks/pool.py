"""The instruction pool: seed tasks plus the instructions of every committed round, with its ROUGE-L index."""

from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa

from schemas import SeedTask
from tasks.dedup import PoolIndex
from tasks.store import Store

INDEX_FILE = "pool_index"
VOCAB_FILE = "pool_vocab"


@dataclass
class Pool:
    """What new instructions are sampled from and deduplicated against."""

    seeds: list[SeedTask]
    machine: list[tuple[str, str]]  # (id, instruction) of committed machine-generated instructions
    index: PoolIndex
    rounds: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Number of instructions in the pool."""
        return len(self.index)

    def seed_pairs(self) -> list[tuple[str, str]]:
        """(id, instruction) of the seed tasks."""
        return [(task.id, task.instruction) for task in self.seeds]


def load_pool(store: Store, seeds: list[SeedTask], tokenizer: Literal["rouge", "multilingual"]) -> Pool:
    """Build the pool from the seeds and the committed rounds' stored token index (not re-tokenized).

    Args:
        store: The round store.
        seeds: Seed tasks of this run.
        tokenizer: ROUGE-L tokenizer the index uses.

    Returns:
        The pool, its index holding seeds first, then each committed round in order.
    """
    index = PoolIndex.empty(tokenizer)
    index.add([t.id for t in seeds], [t.instruction for t in seeds])
    machine: list[tuple[str, str]] = []
    rounds = store.committed_rounds()
    for number in rounds:
        entries = store.read_table(number, INDEX_FILE)
        vocab = store.read_table(number, VOCAB_FILE)
        if store.read_manifest(number).config.tokenizer == tokenizer:
            index.load(entries, vocab)
        else:  # the stored ids belong to another tokenizer's vocabulary
            index.add(entries.column("id").to_pylist(), entries.column("text").to_pylist())
        machine.extend(zip(entries.column("id").to_pylist(), entries.column("text").to_pylist(), strict=True))
    return Pool(seeds=seeds, machine=machine, index=index, rounds=rounds)


def round_index_tables(
    index: PoolIndex, start: int, vocab_start: int, kept_ids: set[str]
) -> tuple[pa.Table, pa.Table]:
    """The index rows a round adds: only its finally accepted instructions, and the vocabulary it grew."""
    entries, vocab = index.export(start, vocab_start)
    mask = pa.array([value in kept_ids for value in entries.column("id").to_pylist()], type=pa.bool_())
    return entries.filter(mask), vocab

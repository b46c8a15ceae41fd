"""The instruction pool: seed tasks plus the instructions of every committed round, with its ROUGE-L index."""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa

from schemas import SeedTask
from tasks.resources.store.rounds import Store
from tasks.round.dedup.index import PoolIndex

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


def load_pool(
    store: Store,
    seeds: list[SeedTask],
    tokenizer: Literal["rouge", "multilingual"],
    rounds: list[int] | None = None,
) -> Pool:
    """Build the pool from the seeds and the committed rounds' stored token index (not re-tokenized).

    Args:
        store: The round store.
        seeds: Seed tasks of this run.
        tokenizer: ROUGE-L tokenizer the index uses.
        rounds: The committed rounds to load, ascending (default: all), so that the steps of one round that
            each load the pool see the same one.

    Returns:
        The pool, its index holding seeds first, then each committed round in order.
    """
    index = PoolIndex.empty(tokenizer)
    index.add([t.id for t in seeds], [t.instruction for t in seeds])
    machine: list[tuple[str, str]] = []
    rounds = store.committed_rounds() if rounds is None else rounds
    for number in rounds:
        entries = store.read_table(number, INDEX_FILE)
        vocab = store.read_table(number, VOCAB_FILE)
        if store.read_manifest(number).config.tokenizer == tokenizer:
            index.load(entries, vocab)
        else:  # the stored ids belong to another tokenizer's vocabulary
            index.add(entries.column("id").to_pylist(), entries.column("text").to_pylist())
        machine.extend(zip(entries.column("id").to_pylist(), entries.column("text").to_pylist(), strict=True))
    return Pool(seeds=seeds, machine=machine, index=index, rounds=rounds)


def pool_size(store: Store, seed_count: int, rounds: list[int]) -> int:
    """Instructions in the pool of `seed_count` seeds and `rounds`, from the manifests (nothing loaded)."""
    return seed_count + sum(store.read_manifest(n).files[f"{INDEX_FILE}.parquet"].rows for n in rounds)


@dataclass(frozen=True)
class IndexDelta:
    """What a round's dedup added to the pool index: its entries and the vocabulary they grew.

    A small value handed from the dedup step to the commit step, which writes it (`kept`).
    """

    entries: pa.Table
    vocab: pa.Table

    @classmethod
    def since(cls, index: PoolIndex, start: int, vocab_start: int) -> "IndexDelta":
        """The entries from position `start` and the tokens from id `vocab_start` of `index`."""
        entries, vocab = index.export(start, vocab_start)
        return cls(entries, vocab)

    def kept(self, kept_ids: Iterable[str]) -> tuple[pa.Table, pa.Table]:
        """A round's index files: entries of its finally accepted instructions only, and the vocabulary."""
        wanted = set(kept_ids)
        ids = self.entries.column("id").to_pylist()
        mask = pa.array([value in wanted for value in ids], type=pa.bool_())
        return self.entries.filter(mask), self.vocab

"""The pool index: instructions as token-id sequences under an append-only vocabulary, stored and reloaded.

Token ids are kept as strings of code points (one per token) so that rapidfuzz's bit-parallel LCS compares
whole matrices of sequences in C. For scoring, the pool is cut into fixed blocks of positions (`Block`);
inside a block instructions are ordered by token count, so that for one candidate F rises with the LCS inside
each run of equal counts (see `tasks.round.dedup.score`). The index exports what a round added as Arrow tables
and loads them back on the next run without tokenizing again.
"""

import hashlib
import itertools
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tasks.round.dedup.tokens import Tokenizer, tokenize

BLOCK_SIZE = 8192  # pool positions per block: the unit of caching, threading and Dask sharding

# Token ids are stored as strings of code points (one per token) and compared as such by rapidfuzz. The UTF-16
# surrogate range is skipped so that every sequence stays encodable (export/load go through UTF-32).
_SURROGATES = 0xD800
_SURROGATE_GAP = 0x800
# For scoring, the 256 most frequent tokens get code points below 256: rapidfuzz looks those up in a flat
# table and every other character in a hash map, about three times slower on instruction text.
_HOT = 256
_MAX_VOCAB = sys.maxunicode + 1 - _SURROGATE_GAP - _HOT

_VOCAB_META_TOKENIZER = b"selfinstruct.dedup.tokenizer"
_VOCAB_META_PREFIX = b"selfinstruct.dedup.vocab_prefix"


def _code_point(token_id: int) -> str:
    if token_id >= _MAX_VOCAB:
        raise OverflowError(
            f"vocabulary exceeds {_MAX_VOCAB} tokens, the code point space used for token ids"
        )
    return chr(token_id + _SURROGATE_GAP if token_id >= _SURROGATES else token_id)


def _to_code_points(values: np.ndarray) -> np.ndarray:
    return np.where(values >= _SURROGATES, values + _SURROGATE_GAP, values)


def _join(seqs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, token ids) of id strings, without a Python loop over tokens."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs)), out=offsets[1:])
    points = np.frombuffer("".join(seqs).encode("utf-32-le"), dtype="<u4").astype(np.int64)
    return offsets, np.where(points >= _SURROGATES + _SURROGATE_GAP, points - _SURROGATE_GAP, points)


def _split(offsets: np.ndarray, code_points: np.ndarray) -> list[str]:
    joined = code_points.astype("<u4").tobytes().decode("utf-32-le")
    return [joined[a:b] for a, b in itertools.pairwise(offsets.tolist())]


def _scoring_table(hot_ids: np.ndarray, size: int) -> np.ndarray:
    """Token id -> scoring code point: hot ids by rank below 256, the rest above in id order."""
    table = _to_code_points(np.arange(_HOT, _HOT + size, dtype=np.int64))
    table[hot_ids[hot_ids < size]] = np.arange(len(hot_ids))[hot_ids < size]
    return table


def _vocab_digest(tokens: Sequence[str]) -> str:
    return hashlib.blake2b("\x00".join(tokens).encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Block:
    """One block of pool positions, ordered by (token count, position) for scoring."""

    start: int
    positions: np.ndarray  # global positions in scoring order
    seqs: list[str]  # token sequences in scoring order
    lens: np.ndarray  # token counts in scoring order (non-decreasing)
    group_starts: np.ndarray  # where each run of equal token counts begins
    group_sizes: np.ndarray
    group_lens: np.ndarray  # the token count of each run
    by_position: np.ndarray  # scoring-order index of positions start, start+1, ...

    @classmethod
    def build(cls, start: int, seqs: Sequence[str], lens: np.ndarray) -> "Block":
        order = np.argsort(lens, kind="stable")
        sorted_lens = lens[order]
        group_starts = np.flatnonzero(np.r_[True, sorted_lens[1:] != sorted_lens[:-1]]).astype(np.intp)
        by_position = np.empty_like(order)
        by_position[order] = np.arange(len(order))
        return cls(
            start=start,
            positions=order.astype(np.int64) + start,
            seqs=[seqs[i] for i in order],
            lens=sorted_lens,
            group_starts=group_starts,
            group_sizes=np.diff(np.r_[group_starts, len(order)]),
            group_lens=sorted_lens[group_starts],
            by_position=by_position,
        )


class PoolIndex:
    """The instructions compared against, with their token ids under an append-only vocabulary.

    Token ids are assigned in order of first appearance and never change, so a round's entries can be stored
    as id lists next to the vocabulary it grew (`export`) and appended on the next run without tokenizing
    again (`load`).

    Consistency of ids across runs: `export(start, vocab_start)` stores, in the vocabulary table's schema
    metadata, the tokenizer and a digest of the vocabulary prefix `[0, vocab_start)` its ids build on. `load`
    compares that digest with the current vocabulary. When they agree (the usual case: the same seeds were
    added and the same rounds loaded in the same order) stored ids below `vocab_start` mean the same tokens
    here, and the table's new tokens are mapped onto current ids (appended when unknown, an identity map in
    the usual case) with one vectorized remap of the stored ids. When they differ (the seeds were edited, a
    round was skipped, or the metadata was lost), the stored ids cannot be interpreted, and `load` tokenizes
    the stored texts instead, which is always correct and only slower.

    Attributes:
        tokenizer: "rouge" (exactly rouge_score's) or "multilingual".
        ids: Instruction ids; `ids[i]` is pool position i.
        texts: Instruction texts by position.
    """

    def __init__(self, tokenizer: Tokenizer = "rouge") -> None:
        """An empty index; prefer `PoolIndex.empty`."""
        tokenize("", tokenizer)  # reject an unknown tokenizer name now rather than at the first add
        self.tokenizer: Tokenizer = tokenizer
        self.ids: list[str] = []
        self.texts: list[str] = []
        self._seqs: list[str] = []  # token ids as code-point strings, by position
        self._lens: list[int] = []
        self._vocab: dict[str, int] = {}
        self._tokens: list[str] = []  # token by id
        self._chars: list[str] = []  # code-point string by id
        self._blocks: dict[int, Block] = {}  # scoring blocks by number, in the current scoring alphabet
        self._hot = np.zeros(0, dtype=np.int64)  # token ids with code points below 256 when scoring
        self._hot_basis = 0  # pool size when the hot tokens were chosen

    @classmethod
    def empty(cls, tokenizer: Tokenizer = "rouge") -> "PoolIndex":
        """A new index with no instructions and an empty vocabulary."""
        return cls(tokenizer)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens seen so far; the next new token gets this id."""
        return len(self._tokens)

    @property
    def longest(self) -> int:
        """Token count of the longest instruction in the index (0 when empty)."""
        return max(self._lens, default=0)

    def token_ids(self, position: int) -> list[int]:
        """Token ids of the instruction at `position`."""
        return _join([self._seqs[position]])[1].tolist()

    def _new_token(self, token: str) -> int:
        token_id = len(self._tokens)
        self._chars.append(_code_point(token_id))
        self._vocab[token] = token_id
        self._tokens.append(token)
        return token_id

    def _append(self, ids: Sequence[str], texts: Sequence[str], seqs: Sequence[str]) -> None:
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        self.ids.extend(ids)
        self.texts.extend(texts)
        self._seqs.extend(seqs)
        self._lens.extend(len(s) for s in seqs)

    def add(self, ids: list[str], texts: list[str]) -> None:
        """Append instructions, tokenizing them; unseen tokens get the next ids.

        Args:
            ids: Instruction ids, one per text.
            texts: Instruction texts.
        """
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        vocab, chars = self._vocab, self._chars
        seqs = []
        for text in texts:
            seqs.append(
                "".join(
                    [
                        chars[vocab[t]] if t in vocab else chars[self._new_token(t)]
                        for t in tokenize(text, self.tokenizer)
                    ]
                )
            )
        self._append(ids, texts, seqs)

    def encode(self, texts: Sequence[str]) -> list[str]:
        """Token sequences of texts not (yet) in the index, leaving the vocabulary untouched.

        Tokens the vocabulary lacks get provisional ids above it, shared between the texts of this call, so
        that candidates can be compared with each other before any of them is kept.
        """
        vocab, chars = self._vocab, self._chars
        extra: dict[str, str] = {}
        seqs = []
        for text in texts:
            parts = []
            for token in tokenize(text, self.tokenizer):
                if token in vocab:
                    parts.append(chars[vocab[token]])
                else:
                    if token not in extra:
                        extra[token] = _code_point(len(chars) + len(extra))
                    parts.append(extra[token])
            seqs.append("".join(parts))
        return seqs

    def export(self, start: int, vocab_start: int) -> tuple[pa.Table, pa.Table]:
        """What the index gained since (`start`, `vocab_start`), as tables for the store.

        Args:
            start: First position to export (the pool size before the round).
            vocab_start: First token id to export (the vocabulary size before the round).

        Returns:
            (entries, vocab): entries has `id`, `text`, `token_ids` (list<int32>) for positions >= start;
            vocab has `token`, `token_id` (int32) for ids >= vocab_start, and carries the tokenizer and a
            digest of the vocabulary prefix in its schema metadata (see the class docstring).
        """
        if not 0 <= start <= len(self) or not 0 <= vocab_start <= self.vocab_size:
            raise ValueError(f"export({start}, {vocab_start}) outside 0..{len(self)}, 0..{self.vocab_size}")
        offsets, flat = _join(self._seqs[start:])
        token_ids = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32()))
        entries = pa.table(
            {
                "id": pa.array(self.ids[start:], pa.string()),
                "text": pa.array(self.texts[start:], pa.string()),
                "token_ids": token_ids,
            }
        )
        metadata = {
            _VOCAB_META_TOKENIZER: self.tokenizer.encode(),
            _VOCAB_META_PREFIX: f"{vocab_start}:{_vocab_digest(self._tokens[:vocab_start])}".encode(),
        }
        vocab = pa.table(
            {
                "token": pa.array(self._tokens[vocab_start:], pa.string()),
                "token_id": pa.array(np.arange(vocab_start, self.vocab_size), pa.int32()),
            }
        ).replace_schema_metadata(metadata)
        return entries, vocab

    def load(self, entries: pa.Table, vocab: pa.Table) -> None:
        """Append stored entries and the vocabulary they grew, without tokenizing (see the class docstring).

        Args:
            entries: An `export` entries table (rows may have been filtered out since).
            vocab: The `export` vocabulary table of the same round.

        Raises:
            ValueError: When the tables were made with another tokenizer or reference unknown token ids.
        """
        metadata = vocab.schema.metadata or {}
        stored_tokenizer = metadata.get(_VOCAB_META_TOKENIZER)
        if stored_tokenizer is not None and stored_tokenizer.decode() != self.tokenizer:
            raise ValueError(
                f"stored index uses tokenizer {stored_tokenizer.decode()!r}, not {self.tokenizer!r}"
            )
        ids = entries.column("id").to_pylist()
        texts = entries.column("text").to_pylist()
        prefix = metadata.get(_VOCAB_META_PREFIX, b"").decode()
        prefix_len_text, _, digest = prefix.partition(":")
        prefix_len = int(prefix_len_text) if prefix_len_text.isdigit() else -1
        if (
            prefix_len < 0
            or prefix_len > self.vocab_size
            or _vocab_digest(self._tokens[:prefix_len]) != digest
        ):
            warnings.warn(
                "stored token ids build on another vocabulary (or carry no digest); re-tokenizing the texts",
                stacklevel=2,
            )
            self.add(ids, texts)
            return
        remap = self._remap(prefix_len, vocab)
        token_ids = entries.column("token_ids").combine_chunks()
        offsets = token_ids.offsets.to_numpy().astype(np.int64)
        flat = token_ids.values.to_numpy().astype(np.int64)[offsets[0] : offsets[-1]]
        if flat.size and (flat.min() < 0 or flat.max() >= len(remap)):
            raise ValueError(f"stored token ids outside 0..{len(remap) - 1}")
        if not np.array_equal(remap, np.arange(len(remap))):
            flat = remap[flat]
        self._append(ids, texts, _split(offsets - offsets[0], _to_code_points(flat)))

    def _remap(self, prefix_len: int, vocab: pa.Table) -> np.ndarray:
        """Stored id -> current id, appending tokens this index has not seen."""
        tokens = vocab.column("token").to_pylist()
        stored = vocab.column("token_id").to_numpy().astype(np.int64)
        if len(stored) and (stored.min() < prefix_len or len(np.unique(stored)) != len(stored)):
            raise ValueError("vocabulary table ids overlap the prefix they extend or repeat")
        remap = np.arange(
            prefix_len + (int(stored.max()) + 1 - prefix_len if len(stored) else 0), dtype=np.int64
        )
        for token, token_id in zip(tokens, stored.tolist(), strict=True):
            current = self._vocab.get(token)
            remap[token_id] = self._new_token(token) if current is None else current
        return remap

    def _choose_hot_tokens(self) -> None:
        """Pick the pool's most frequent tokens for the fast code points; cached blocks become stale."""
        counts = np.bincount(_join(self._seqs)[1], minlength=self.vocab_size)
        ranked = np.argsort(-counts, kind="stable")[:_HOT]
        self._hot = ranked[counts[ranked] > 0]
        self._hot_basis = len(self)
        self._blocks.clear()

    def scoring_view(self, texts: Sequence[str]) -> tuple[list[Block], list[str]]:
        """The pool as blocks and `texts` as token sequences, both in the scoring alphabet.

        Full blocks are cached; the last partial one is rebuilt as it grows. The hot tokens are chosen again
        whenever the pool has doubled, which keeps the rebuilding amortized and the alphabet fit to the text.
        LCS is the same under any one-to-one relabeling of tokens: this choice changes speed, never results.
        """
        if len(self) >= 2 * self._hot_basis:
            self._choose_hot_tokens()
        offsets, flat = _join(self.encode(texts))
        table = _scoring_table(self._hot, max(self.vocab_size, int(flat.max(initial=-1)) + 1))
        candidates = _split(offsets, table[flat])
        blocks = []
        for number, start in enumerate(range(0, len(self), BLOCK_SIZE)):
            stop = min(start + BLOCK_SIZE, len(self))
            block = self._blocks.get(number)
            if block is None or len(block.seqs) != stop - start:
                block_offsets, block_flat = _join(self._seqs[start:stop])
                seqs = _split(block_offsets, table[block_flat])
                block = Block.build(start, seqs, np.array(self._lens[start:stop], np.int64))
                self._blocks[number] = block
            blocks.append(block)
        return blocks, candidates

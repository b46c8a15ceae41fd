"""ROUGE-L near-duplicate filtering of new instructions against the pool (section 2.3 of the paper).

Self-Instruct keeps a candidate only when its ROUGE-L F against every instruction already in the pool is at
most 0.7, and candidates join the pool one by one, so a batch is deduplicated greedily in order. This module
reproduces `rouge_score`'s decisions bit for bit, far faster:

* Tokens are exactly those of `RougeScorer(["rougeL"], use_stemmer=False)` (or a multilingual variant),
  mapped once to integer ids through an append-only vocabulary and kept as strings of code points, so that
  rapidfuzz's bit-parallel LCS compares whole matrices of token sequences in C on all cores.
* F is rouge_score's own float formula, `P = L/len(prediction)`, `R = L/len(target)`, `F = 2*P*R/(P+R)`,
  evaluated in float64 in the same operation order. The candidate is the target and the pool instruction the
  prediction, as in Self-Instruct's `rouge_scorer._score_lcs(new_instruction_tokens, pool_tokens)`. (The
  formula is symmetric in floating point too: `2*P` is exact and `*`, `+` commute, so the order never
  changes a bit; the tests check it for every length up to 150.)
* The pool is cut into fixed blocks of positions; inside a block instructions are ordered by token count, so
  that for one candidate F rises with the LCS inside each run of equal counts. Maxima, top-k and sums are then
  taken on the small integer LCS matrix per run; F is evaluated only for the few pairs that can reach a row's
  top k. Blocks are scored independently (threads, or shards on a Dask cluster) and merged: top k by
  (F, position), and the mean from exact integer LCS sums, so no layout changes a single bit.
* Candidates kept earlier in the same call are scored like one more block, chunk by chunk; only the maxima
  within a chunk are walked one candidate at a time.

Only the pure functions live here; `tasks.round.records` joins its decisions into records.
"""

import hashlib
import itertools
import os
import re
import sys
import unicodedata
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
import pyarrow as pa
from rapidfuzz.distance import LCSseq
from rapidfuzz.process import cdist

Tokenizer = Literal["rouge", "multilingual"]

DEFAULT_THRESHOLD = 0.7
BLOCK_SIZE = 8192  # pool positions per block: the unit of caching, threading and Dask sharding
_ROW_CHUNK = 64  # candidates per tile: a 64 x 8192 LCS tile of uint8 stays in L2 cache
_INTRA_CHUNK = 256  # candidates scored at once against the ones kept earlier in the same call

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


# -- tokenizers ----------------------------------------------------------------------------------------------

_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """Tokens exactly as rouge_score's default tokenizer without stemming makes them.

    rouge_score lowercases with `str.lower` (so a few non-ASCII letters such as the Kelvin sign become ASCII),
    replaces each run of characters outside [a-z0-9] by a space, splits, and drops empty strings; the maximal
    runs of [a-z0-9] in the lowercased text are the same list.

    Args:
        text: Any text.

    Returns:
        The tokens, in order.
    """
    return _ROUGE_TOKEN.findall(text.lower())


# Scripts written without spaces between words: each character is one token.
_CJK_RANGES = (
    "\u1100-\u11ff"  # Hangul Jamo
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3130-\u318f"  # Hangul compatibility Jamo
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\ua960-\ua97f"  # Hangul Jamo extended A
    "\uac00-\ud7ff"  # Hangul syllables, Jamo extended B
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0003134f"  # CJK extensions B-G
)


@cache
def _multilingual_pattern() -> re.Pattern[str]:
    # Python's \w misses combining marks, which sit inside words of Devanagari, Thai, Arabic...; build their
    # class once (planes 0-1 hold every script's marks, plane 14 the variation selectors).
    starts: list[int] = []
    ends: list[int] = []
    for code in range(0x20000):
        if unicodedata.category(chr(code))[0] == "M":
            if ends and ends[-1] == code - 1:
                ends[-1] = code
            else:
                starts.append(code)
                ends.append(code)
    marks = "".join(f"{chr(a)}-{chr(b)}" for a, b in zip(starts, ends, strict=True)) + "\U000e0100-\U000e01ef"
    return re.compile(rf"(?=\w)[{_CJK_RANGES}]|(?:[^\W_{_CJK_RANGES}]|[{marks}])+")


def multilingual_tokenize(text: str) -> list[str]:
    """Tokens for text in any script: NFKC, casefolded; Han, kana and Hangul one character per token.

    Letters and digits of every script (with their combining marks) form words; anything else, including the
    underscore, separates them, as punctuation does in rouge_score's tokenizer.

    Args:
        text: Any text.

    Returns:
        The tokens, in order.
    """
    return _multilingual_pattern().findall(unicodedata.normalize("NFKC", text).casefold())


def tokenize(text: str, tokenizer: Tokenizer = "rouge") -> list[str]:
    """Tokens of `text` under the named tokenizer (see `rouge_tokenize`, `multilingual_tokenize`)."""
    if tokenizer == "rouge":
        return rouge_tokenize(text)
    if tokenizer == "multilingual":
        return multilingual_tokenize(text)
    raise ValueError(f"unknown tokenizer {tokenizer!r}; expected 'rouge' or 'multilingual'")


# -- F-measure -----------------------------------------------------------------------------------------------


def rouge_l_fmeasure(
    lcs: np.ndarray | int, target_len: np.ndarray | int, prediction_len: np.ndarray | int
) -> np.ndarray:
    """rouge_score's ROUGE-L F for LCS lengths, bit for bit, broadcasting over arrays.

    Args:
        lcs: LCS lengths (integers).
        target_len: Token counts of the targets (our candidates).
        prediction_len: Token counts of the predictions (pool instructions).

    Returns:
        float64 F; 0.0 wherever the LCS is 0, including empty token lists, as rouge_score returns.
    """
    lcs = np.asarray(lcs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / prediction_len
        recall = lcs / target_len
        # Same operations, same order as rouge_score.scoring.fmeasure: (2 * P) * R / (P + R).
        f = 2 * precision * recall / (precision + recall)
    return np.where(lcs > 0, f, 0.0)


# -- the pool index ------------------------------------------------------------------------------------------


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
class _Block:
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
    def build(cls, start: int, seqs: Sequence[str], lens: np.ndarray) -> "_Block":
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
        self._blocks: dict[int, _Block] = {}  # scoring blocks by number, in the current scoring alphabet
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

    def scoring_view(self, texts: Sequence[str]) -> tuple[list[_Block], list[str]]:
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
                block = _Block.build(start, seqs, np.array(self._lens[start:stop], np.int64))
                self._blocks[number] = block
            blocks.append(block)
        return blocks, candidates


# -- scoring candidates against blocks of the pool -----------------------------------------------------------


@dataclass(frozen=True)
class _Candidates:
    seqs: list[str]
    lens: np.ndarray


@dataclass(frozen=True)
class _BlockScores:
    """Per candidate: the block's top k (position, F), padded with (-1, -1.0); LCS sums by token count."""

    top_pos: np.ndarray  # (candidates, k) int64
    top_f: np.ndarray  # (candidates, k) float64
    lcs_sums: np.ndarray | None  # (candidates, groups) int64, for the mean; None without lineage
    group_lens: np.ndarray


def _lcs_dtype(max_len: int) -> type[np.integer]:
    # uint8 halves the LCS matrix traffic; 255 stays free as the "no element qualifies" sentinel.
    return np.uint8 if max_len < 255 else np.int32


def _first_reaching(target: np.ndarray, m: np.ndarray, n: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Smallest LCS in [1, high] whose F reaches `target` (the caller guarantees `high` does)."""
    # F is within a few ulps of 2L/(m+n), so this estimate is at most two below the answer.
    lcs = np.clip(np.floor(target * (m + n) / 2) - 1, 1, high).astype(np.int64)
    while True:
        short = (rouge_l_fmeasure(lcs, m, n) < target) & (lcs < high)
        if not short.any():
            return lcs
        lcs += short


def _score_tile(cands: _Candidates, rows: slice, block: _Block, k: int, with_sums: bool) -> _BlockScores:
    """Top k (F descending, position ascending) of candidates[rows] in one block, plus LCS sums."""
    seqs, m = cands.seqs[rows], cands.lens[rows]
    count = len(seqs)
    dtype = _lcs_dtype(max(int(m.max(initial=0)), int(block.group_lens[-1])))
    lcs = cdist(seqs, block.seqs, scorer=LCSseq.similarity, dtype=dtype, workers=1)
    m_col = m[:, None]
    group_max = np.maximum.reduceat(lcs, block.group_starts, axis=1).astype(np.int64)
    group_f = rouge_l_fmeasure(group_max, m_col, block.group_lens[None, :])
    groups = group_f.shape[1]
    # Every run contributes its maximum, so the k-th largest run maximum bounds the row's k-th largest F
    # from below; only elements reaching it can be in the top k. Zero F is handled apart: ties at 0 are many.
    floor_f = np.partition(group_f, groups - k, axis=1)[:, groups - k] if groups >= k else np.zeros(count)
    floor_f = np.maximum(floor_f, np.nextafter(0.0, 1.0))
    reaching = group_f >= floor_f[:, None]
    min_lcs = np.full(group_f.shape, np.iinfo(dtype).max, dtype=np.int64)
    if reaching.any():
        r, g = np.nonzero(reaching)
        min_lcs[r, g] = _first_reaching(floor_f[r], m[r], block.group_lens[g], group_max[r, g])
    hits_r, hits_c = np.nonzero(lcs >= np.repeat(min_lcs.astype(dtype), block.group_sizes, axis=1))
    hits_f = rouge_l_fmeasure(lcs[hits_r, hits_c], m[hits_r], block.lens[hits_c])
    hits_pos = block.positions[hits_c]
    order = np.lexsort((hits_pos, -hits_f, hits_r))
    hits_r, hits_f, hits_pos = hits_r[order], hits_f[order], hits_pos[order]
    row_start = np.searchsorted(hits_r, np.arange(count + 1))
    rank = np.arange(len(hits_r)) - row_start[hits_r]
    top_pos = np.full((count, k), -1, dtype=np.int64)
    top_f = np.full((count, k), -1.0)
    first = rank < k
    top_pos[hits_r[first], rank[first]] = hits_pos[first]
    top_f[hits_r[first], rank[first]] = hits_f[first]
    for row in np.flatnonzero(np.diff(row_start) < k):
        _fill_zeros(top_pos[row], top_f[row], int(row_start[row + 1] - row_start[row]), lcs[row], block)
    sums = np.add.reduceat(lcs, block.group_starts, axis=1, dtype=np.int64) if with_sums else None
    return _BlockScores(top_pos, top_f, sums, block.group_lens)


def _fill_zeros(top_pos: np.ndarray, top_f: np.ndarray, filled: int, lcs: np.ndarray, block: _Block) -> None:
    """Complete a row's top k with the lowest positions whose F is 0 (they rank after every positive F)."""
    zero = lcs[block.by_position] == 0
    positions = np.flatnonzero(zero)[: len(top_pos) - filled] + block.start
    top_pos[filled : filled + len(positions)] = positions
    top_f[filled : filled + len(positions)] = 0.0


def _concat_tiles(tiles: Sequence[_BlockScores]) -> _BlockScores:
    sums = [t.lcs_sums for t in tiles]
    return _BlockScores(
        np.concatenate([t.top_pos for t in tiles]),
        np.concatenate([t.top_f for t in tiles]),
        None if sums[0] is None else np.concatenate(sums),  # type: ignore[arg-type]
        tiles[0].group_lens,
    )


def _row_chunks(count: int) -> list[slice]:
    return [slice(a, min(a + _ROW_CHUNK, count)) for a in range(0, count, _ROW_CHUNK)]


def _score_block(cands: _Candidates, block: _Block, k: int, with_sums: bool) -> _BlockScores:
    """All candidates against one block (the unit a Dask worker runs)."""
    return _concat_tiles(
        [_score_tile(cands, rows, block, k, with_sums) for rows in _row_chunks(len(cands.seqs))]
    )


def _score_blocks_local(
    cands: _Candidates, blocks: list[_Block], k: int, with_sums: bool, executor: ThreadPoolExecutor | None
) -> list[_BlockScores]:
    chunks = _row_chunks(len(cands.seqs))
    jobs = [(block, rows) for block in blocks for rows in chunks]

    def run(job: tuple[_Block, slice]) -> _BlockScores:
        return _score_tile(cands, job[1], job[0], k, with_sums)

    # rapidfuzz and numpy release the GIL for the heavy loops, so threads use every core.
    tiles = (
        list(executor.map(run, jobs)) if executor is not None and len(jobs) > 1 else [run(j) for j in jobs]
    )
    return [_concat_tiles(tiles[i : i + len(chunks)]) for i in range(0, len(tiles), len(chunks))]


def _score_blocks_dask(
    address: str, cands: _Candidates, blocks: list[_Block], k: int, with_sums: bool
) -> list[_BlockScores]:
    # A plain distributed.Client keeps this function usable outside a flow; Prefect's DaskTaskRunner would tie
    # it to a flow run and add task-run overhead per block for nothing.
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        # hash=False: content hashing of big payloads costs time and nothing is reused across calls.
        cands_future = client.scatter(cands, broadcast=True, hash=False)
        shards = client.scatter(blocks, hash=False)  # spreads the pool's blocks over the workers
        futures = [
            client.submit(_score_block, cands_future, shard, k, with_sums, pure=False) for shard in shards
        ]
        return list(client.gather(futures))


def _merge(results: Sequence[_BlockScores], count: int, k: int, width: int, with_sums: bool) -> _BlockScores:
    """One top k per candidate over several blocks, and LCS sums by token count 0..width-1."""
    sums = np.zeros((count, width), dtype=np.int64) if with_sums else None
    if not results:
        return _BlockScores(
            np.full((count, k), -1, np.int64), np.full((count, k), -1.0), sums, np.arange(width)
        )
    pos = np.concatenate([r.top_pos for r in results], axis=1)
    f = np.concatenate([r.top_f for r in results], axis=1)
    rows = np.repeat(np.arange(count), pos.shape[1])
    order = np.lexsort((pos.ravel(), -f.ravel(), rows)).reshape(count, -1)[:, :k]
    for r in results:
        if sums is not None and r.lcs_sums is not None:
            sums[:, r.group_lens] += r.lcs_sums  # integers: the order of blocks cannot change the mean
    return _BlockScores(pos.ravel()[order], f.ravel()[order], sums, np.arange(width))


def _rows(scores: _BlockScores, rows: slice) -> _BlockScores:
    sums = None if scores.lcs_sums is None else scores.lcs_sums[rows]
    return _BlockScores(scores.top_pos[rows], scores.top_f[rows], sums, scores.group_lens)


# -- greedy decisions ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The verdict on one candidate.

    Attributes:
        keep: False when some compared instruction has ROUGE-L F strictly above the threshold.
        max_score: The highest F against the pool and the candidates kept before it (0.0 if none).
        most_similar: Pool position (`index.texts[i]`) of the lowest-positioned instruction reaching
            `max_score`; candidates kept earlier in the same call have positions too. None if none compared.
        top_k: Up to k (position, F), F descending then position ascending; empty without lineage.
        mean_score: Mean F over everything compared (0.0 if nothing); None without lineage. It is computed
            from exact per-length LCS sums as the mean of 2L/(m+n), which equals rouge_score's F algebraically
            and may differ from averaging rouge_score's floats in the last bits.
    """

    keep: bool
    max_score: float
    most_similar: int | None
    top_k: list[tuple[int, float]]
    mean_score: float | None


def _resolve_workers(workers: int) -> int:
    if workers == -1:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be -1 (all cores) or >= 1, not {workers}")
    return workers


def _mean_f(lcs_by_len: np.ndarray, target_len: np.ndarray, compared: np.ndarray) -> np.ndarray:
    """Mean of 2L/(m+n) per row from exact LCS sums by token count n, whatever the order pairs came in."""
    lengths = np.arange(lcs_by_len.shape[1])
    terms = np.zeros(lcs_by_len.shape)
    np.divide(2 * lcs_by_len, target_len[:, None] + lengths[None, :], out=terms, where=lcs_by_len > 0)
    means = np.zeros(len(lcs_by_len))
    np.divide(terms.sum(axis=1), compared, out=means, where=compared > 0)
    return means


def _greedy(
    cands: _Candidates,
    pool: _BlockScores,
    pool_size: int,
    threshold: float,
    top_k: int,
    lineage: bool,
    threads: int,
    executor: ThreadPoolExecutor | None,
) -> list[Decision]:
    """Walk the candidates in order, each compared with the pool and the candidates kept before it.

    Candidates go in chunks: those kept in earlier chunks are scored like one more pool block, and only the
    maxima inside a chunk are walked one candidate at a time; lineage is then gathered for the whole chunk.
    """
    count = len(cands.seqs)
    k = pool.top_pos.shape[1]
    width = len(pool.group_lens)
    kept: list[int] = []  # candidate indices kept so far; kept[t] gets position pool_size + t
    decisions: list[Decision] = []
    for a in range(0, count, _INTRA_CHUNK):
        rows = slice(a, min(a + _INTRA_CHUNK, count))
        chunk = _Candidates(cands.seqs[rows], cands.lens[rows])
        before = _rows(pool, rows)
        if kept:
            kept_block = _Block.build(pool_size, [cands.seqs[j] for j in kept], cands.lens[kept])
            kept_scores = _score_blocks_local(chunk, [kept_block], k, lineage, executor)
            before = _merge([before, *kept_scores], len(chunk.seqs), k, width, lineage)
        first_position = pool_size + len(kept)
        inside = cdist(chunk.seqs, chunk.seqs, scorer=LCSseq.similarity, dtype=np.int32, workers=threads)
        f_inside = rouge_l_fmeasure(inside, chunk.lens[:, None], chunk.lens[None, :])
        keep, best_f, best_pos = _walk(f_inside, before, first_position, threshold)
        compared = np.full(len(keep), len(kept) + pool_size)
        if lineage:
            tops, means = _chunk_lineage(
                chunk, before, inside, f_inside, keep, first_position, compared, top_k
            )
        for row in range(len(keep)):
            position = best_pos[row] if best_pos[row] >= 0 else None
            lineage_of_row = (tops[row], float(means[row])) if lineage else ([], None)
            decisions.append(Decision(bool(keep[row]), best_f[row], position, *lineage_of_row))
        kept.extend((a + np.flatnonzero(keep)).tolist())
    return decisions


def _walk(
    f_inside: np.ndarray, before: _BlockScores, first_position: int, threshold: float
) -> tuple[np.ndarray, list[float], list[int]]:
    """The sequential part: keep, max F and its position per candidate of a chunk, in order."""
    count = len(f_inside)
    keep = np.zeros(count, dtype=bool)
    best_f: list[float] = before.top_f[:, 0].tolist()
    best_pos: list[int] = before.top_pos[:, 0].tolist()
    kept_columns = np.zeros(count, dtype=np.intp)
    kept_count = 0
    for row in range(count):
        if kept_count:
            scores = f_inside[row, kept_columns[:kept_count]]
            j = int(scores.argmax())
            if best_pos[row] < 0 or scores[j] > best_f[row]:  # on a tie the lower position, from before, wins
                best_f[row], best_pos[row] = float(scores[j]), first_position + j
        if best_pos[row] < 0:
            best_f[row] = 0.0
        if not best_f[row] > threshold:
            keep[row] = True
            kept_columns[kept_count] = row
            kept_count += 1
    return keep, best_f, best_pos


def _chunk_lineage(
    chunk: _Candidates,
    before: _BlockScores,
    inside: np.ndarray,
    f_inside: np.ndarray,
    keep: np.ndarray,
    first_position: int,
    compared: np.ndarray,
    top_k: int,
) -> tuple[list[list[tuple[int, float]]], np.ndarray]:
    """Top k and mean F per candidate of a chunk, once its decisions are known."""
    count = len(keep)
    kept = np.flatnonzero(keep)
    earlier_kept = kept[None, :] < np.arange(count)[:, None]  # [row, t]: kept[t] comes before row
    f_kept = np.where(earlier_kept, f_inside[:, kept], -1.0)
    # Kept candidates' positions rise with their column, so a stable sort breaks ties by position.
    best = np.argsort(-f_kept, axis=1, kind="stable")[:, :top_k]
    f_all = np.concatenate([before.top_f, np.take_along_axis(f_kept, best, axis=1)], axis=1)
    pos_all = np.concatenate([before.top_pos, first_position + best], axis=1)
    rows = np.repeat(np.arange(count), f_all.shape[1])
    order = np.lexsort((pos_all.ravel(), -f_all.ravel(), rows)).reshape(count, -1)[:, :top_k]
    top_f, top_pos = f_all.ravel()[order].tolist(), pos_all.ravel()[order].tolist()
    tops = [
        [(p, f) for p, f in zip(pos_row, f_row, strict=True) if f >= 0.0]
        for pos_row, f_row in zip(top_pos, top_f, strict=True)
    ]
    assert before.lcs_sums is not None
    width = before.lcs_sums.shape[1]
    one_hot = (chunk.lens[kept, None] == np.arange(width)[None, :]).astype(np.float64)
    # Float products and sums of these small integers are exact, so the LCS sums stay exact integers.
    lcs_kept = np.where(earlier_kept, inside[:, kept], 0).astype(np.float64)
    by_len = before.lcs_sums + (lcs_kept @ one_hot).astype(np.int64)
    return tops, _mean_f(by_len, chunk.lens, compared + earlier_kept.sum(axis=1))


def deduplicate(
    candidate_ids: list[str],
    candidates: list[str],
    index: PoolIndex,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    top_k: int = 10,
    lineage: bool = True,
    workers: int = -1,
    dask_address: str | None = None,
) -> list[Decision]:
    """Self-Instruct's ROUGE-L filter: drop candidates with F above `threshold` to an earlier instruction.

    Candidates are judged in order against the whole pool plus the candidates kept before them, and kept ones
    are appended to `index` in order (this mutates it). Decisions are exactly those of rouge_score's
    `_score_lcs(candidate_tokens, pool_tokens).fmeasure > threshold`.

    Args:
        candidate_ids: Ids the kept candidates get in the index.
        candidates: Candidate instruction texts.
        index: The pool; grows by the kept candidates.
        threshold: Reject when the maximum F is strictly above this.
        top_k: Most similar instructions to report per candidate (lineage only).
        lineage: Also report top_k and the mean F (costs a little more than the decision alone).
        workers: Threads for scoring; -1 uses every core this process may run on.
        dask_address: Scheduler address of a Dask cluster to score pool shards on (decisions identical).

    Returns:
        One `Decision` per candidate, in order.
    """
    if len(candidate_ids) != len(candidates):
        raise ValueError(f"{len(candidate_ids)} candidate ids but {len(candidates)} candidates")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, not {top_k}")
    threads = _resolve_workers(workers)
    if not candidates:
        return []
    k = max(top_k, 1) if lineage else 1
    blocks, seqs = index.scoring_view(candidates)
    cands = _Candidates(seqs, np.array([len(s) for s in seqs], dtype=np.int64))
    width = max(index.longest, int(cands.lens.max(initial=0))) + 1
    with ExitStack() as stack:
        executor = stack.enter_context(ThreadPoolExecutor(max_workers=threads)) if threads > 1 else None
        if dask_address is not None and blocks:
            results = _score_blocks_dask(dask_address, cands, blocks, k, lineage)
        else:
            results = _score_blocks_local(cands, blocks, k, lineage, executor)
        pool = _merge(results, len(seqs), k, width, lineage)
        decisions = _greedy(cands, pool, len(index), threshold, top_k, lineage, threads, executor)
    kept = [i for i, decision in enumerate(decisions) if decision.keep]
    index.add([candidate_ids[i] for i in kept], [candidates[i] for i in kept])
    return decisions


def rouge_l_scores(
    targets: Sequence[str], predictions: Sequence[str], tokenizer: Tokenizer = "rouge"
) -> np.ndarray:
    """The full matrix of rouge_score ROUGE-L F, `scorer.score(target, prediction).fmeasure`, bit for bit.

    Args:
        targets: Row texts (candidates).
        predictions: Column texts (pool instructions).
        tokenizer: "rouge" or "multilingual".

    Returns:
        float64 array of shape (len(targets), len(predictions)).
    """
    index = PoolIndex.empty(tokenizer)
    index.add([""] * len(predictions), list(predictions))
    rows, cols = index.encode(targets), index.encode(predictions)
    m = np.array([len(s) for s in rows], dtype=np.int64)
    n = np.array([len(s) for s in cols], dtype=np.int64)
    lcs = cdist(rows, cols, scorer=LCSseq.similarity, dtype=np.int32, workers=-1)
    return rouge_l_fmeasure(lcs, m[:, None], n[None, :])

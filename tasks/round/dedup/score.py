"""Scoring candidates against blocks of the pool: each candidate's top k by ROUGE-L F and exact LCS sums.

F is rouge_score's own float formula, `P = L/len(prediction)`, `R = L/len(target)`, `F = 2*P*R/(P+R)`,
evaluated in float64 in the same operation order. The candidate is the target and the pool instruction the
prediction, as in Self-Instruct's `rouge_scorer._score_lcs(new_instruction_tokens, pool_tokens)`. (The formula
is symmetric in floating point too: `2*P` is exact and `*`, `+` commute, so the order never changes a bit; the
tests check it for every length up to 150.)

Inside a block instructions run in order of token count (`index.Block`), so for one candidate
F rises with the LCS inside each run of equal counts: maxima, top k and sums are taken on the small integer
LCS matrix per run, and F is evaluated only for the few pairs that can reach a row's top k. Blocks are scored
independently (threads, or shards on a Dask cluster) and merged: top k by (F, position), and the mean from
exact integer LCS sums, so no layout changes a single bit.
"""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from rapidfuzz.distance import LCSseq
from rapidfuzz.process import cdist

from tasks.round.dedup.index import Block, PoolIndex
from tasks.round.dedup.tokens import Tokenizer

_ROW_CHUNK = 64  # candidates per tile: a 64 x 8192 LCS tile of uint8 stays in L2 cache


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


@dataclass(frozen=True)
class Candidates:
    """Candidate token sequences in the scoring alphabet, and their token counts."""

    seqs: list[str]
    lens: np.ndarray


@dataclass(frozen=True)
class BlockScores:
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


def _score_tile(cands: Candidates, rows: slice, block: Block, k: int, with_sums: bool) -> BlockScores:
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
    return BlockScores(top_pos, top_f, sums, block.group_lens)


def _fill_zeros(top_pos: np.ndarray, top_f: np.ndarray, filled: int, lcs: np.ndarray, block: Block) -> None:
    """Complete a row's top k with the lowest positions whose F is 0 (they rank after every positive F)."""
    zero = lcs[block.by_position] == 0
    positions = np.flatnonzero(zero)[: len(top_pos) - filled] + block.start
    top_pos[filled : filled + len(positions)] = positions
    top_f[filled : filled + len(positions)] = 0.0


def _concat_tiles(tiles: Sequence[BlockScores]) -> BlockScores:
    sums = [t.lcs_sums for t in tiles]
    return BlockScores(
        np.concatenate([t.top_pos for t in tiles]),
        np.concatenate([t.top_f for t in tiles]),
        None if sums[0] is None else np.concatenate(sums),  # type: ignore[arg-type]
        tiles[0].group_lens,
    )


def _row_chunks(count: int) -> list[slice]:
    return [slice(a, min(a + _ROW_CHUNK, count)) for a in range(0, count, _ROW_CHUNK)]


def score_block(cands: Candidates, block: Block, k: int, with_sums: bool) -> BlockScores:
    """All candidates against one block (the unit a Dask worker runs)."""
    return _concat_tiles(
        [_score_tile(cands, rows, block, k, with_sums) for rows in _row_chunks(len(cands.seqs))]
    )


def score_blocks_local(
    cands: Candidates, blocks: list[Block], k: int, with_sums: bool, executor: ThreadPoolExecutor | None
) -> list[BlockScores]:
    """Every block's scores, tiles of candidates x block run on `executor`'s threads (in line if None)."""
    chunks = _row_chunks(len(cands.seqs))
    jobs = [(block, rows) for block in blocks for rows in chunks]

    def run(job: tuple[Block, slice]) -> BlockScores:
        return _score_tile(cands, job[1], job[0], k, with_sums)

    # rapidfuzz and numpy release the GIL for the heavy loops, so threads use every core.
    tiles = (
        list(executor.map(run, jobs)) if executor is not None and len(jobs) > 1 else [run(j) for j in jobs]
    )
    return [_concat_tiles(tiles[i : i + len(chunks)]) for i in range(0, len(tiles), len(chunks))]


def score_blocks_dask(
    address: str, cands: Candidates, blocks: list[Block], k: int, with_sums: bool
) -> list[BlockScores]:
    """Every block's scores, the blocks spread as shards over the Dask cluster at `address`."""
    # A plain distributed.Client keeps this function usable outside a flow; Prefect's DaskTaskRunner would tie
    # it to a flow run and add task-run overhead per block for nothing.
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        # hash=False: content hashing of big payloads costs time and nothing is reused across calls.
        cands_future = client.scatter(cands, broadcast=True, hash=False)
        shards = client.scatter(blocks, hash=False)  # spreads the pool's blocks over the workers
        futures = [
            client.submit(score_block, cands_future, shard, k, with_sums, pure=False) for shard in shards
        ]
        return list(client.gather(futures))


def merge(results: Sequence[BlockScores], count: int, k: int, width: int, with_sums: bool) -> BlockScores:
    """One top k per candidate over several blocks, and LCS sums by token count 0..width-1."""
    sums = np.zeros((count, width), dtype=np.int64) if with_sums else None
    if not results:
        return BlockScores(
            np.full((count, k), -1, np.int64), np.full((count, k), -1.0), sums, np.arange(width)
        )
    pos = np.concatenate([r.top_pos for r in results], axis=1)
    f = np.concatenate([r.top_f for r in results], axis=1)
    rows = np.repeat(np.arange(count), pos.shape[1])
    order = np.lexsort((pos.ravel(), -f.ravel(), rows)).reshape(count, -1)[:, :k]
    for r in results:
        if sums is not None and r.lcs_sums is not None:
            sums[:, r.group_lens] += r.lcs_sums  # integers: the order of blocks cannot change the mean
    return BlockScores(pos.ravel()[order], f.ravel()[order], sums, np.arange(width))


def take_rows(scores: BlockScores, rows: slice) -> BlockScores:
    """The scores of some candidates only."""
    sums = None if scores.lcs_sums is None else scores.lcs_sums[rows]
    return BlockScores(scores.top_pos[rows], scores.top_f[rows], sums, scores.group_lens)


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

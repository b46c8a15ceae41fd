"""Self-Instruct's greedy ROUGE-L filter: keep a candidate only when no earlier instruction has F > 0.7.

Candidates join the pool one by one, so a batch is judged in order against the pool and the candidates kept
before it. The pool is scored in blocks (`tasks.round.dedup.score`); candidates kept earlier in the same call
are scored like one more block, chunk by chunk, and only the maxima within a chunk are walked one candidate at
a time. The Prefect task that calls `deduplicate` lives in `tasks.round.steps`.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
from rapidfuzz.distance import LCSseq
from rapidfuzz.process import cdist

from tasks.round.dedup.index import Block, PoolIndex
from tasks.round.dedup.score import (
    BlockScores,
    Candidates,
    merge,
    rouge_l_fmeasure,
    score_blocks_dask,
    score_blocks_local,
    take_rows,
)

DEFAULT_THRESHOLD = 0.7
_INTRA_CHUNK = 256  # candidates scored at once against the ones kept earlier in the same call


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
    cands: Candidates,
    pool: BlockScores,
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
        chunk = Candidates(cands.seqs[rows], cands.lens[rows])
        before = take_rows(pool, rows)
        if kept:
            kept_block = Block.build(pool_size, [cands.seqs[j] for j in kept], cands.lens[kept])
            kept_scores = score_blocks_local(chunk, [kept_block], k, lineage, executor)
            before = merge([before, *kept_scores], len(chunk.seqs), k, width, lineage)
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
    f_inside: np.ndarray, before: BlockScores, first_position: int, threshold: float
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
    chunk: Candidates,
    before: BlockScores,
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
    cands = Candidates(seqs, np.array([len(s) for s in seqs], dtype=np.int64))
    width = max(index.longest, int(cands.lens.max(initial=0))) + 1
    with ExitStack() as stack:
        executor = stack.enter_context(ThreadPoolExecutor(max_workers=threads)) if threads > 1 else None
        if dask_address is not None and blocks:
            results = score_blocks_dask(dask_address, cands, blocks, k, lineage)
        else:
            results = score_blocks_local(cands, blocks, k, lineage, executor)
        pool = merge(results, len(seqs), k, width, lineage)
        decisions = _greedy(cands, pool, len(index), threshold, top_k, lineage, threads, executor)
    kept = [i for i, decision in enumerate(decisions) if decision.keep]
    index.add([candidate_ids[i] for i in kept], [candidates[i] for i in kept])
    return decisions

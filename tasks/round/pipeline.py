"""A round's LLM stages, pipelined: each stage starts on what the one before has finished, so the servers do
not idle at the barriers between stages.

Instruction prompts go out in chunks; as chunks return (in any order) they are parsed, filtered and
deduplicated strictly in prompt order (a reorder buffer holds a chunk until every earlier one is in), which is
Self-Instruct's greedy order: each candidate is compared with the pool and every earlier accepted one.
Accepted instructions go to classification at once and classified ones to instance generation, while later
instruction chunks are still generating. Every chunk is a task run named by its stage
(`instructions-chunk-000`, `dedup-chunk-000`, `classification-chunk-000`, `instances-chunk-000`); all chunks
share one HTTP client, so at most `llm_concurrency` requests are in flight in total. The outputs are put in
the staged order at the end, so the committed round is the staged one's, row for row.
"""

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from schemas import (
    BootstrapConfig,
    CompletionRecord,
    InstructionRecord,
    RejectionRecord,
    SamplingParams,
    Settings,
)
from tasks.resources.llm.batch import CompletionRequest, ProgressCallback
from tasks.resources.llm.chunks import GenerationSession, generate_chunk
from tasks.resources.task_inputs import as_is
from tasks.round.pool import IndexDelta, Pool
from tasks.round.records import (
    Candidate,
    PromptPlan,
    apply_classification,
    classify_requests,
    collect_candidates,
    dedup_candidates,
    instance_requests,
    instruction_requests,
    parsed_count,
)
from tasks.round.stages import (
    CLASSIFICATION,
    INSTANCES,
    INSTRUCTIONS,
    Generation,
    StageOutputs,
    report_instances,
    report_kept,
)
from tasks.round.steps import (
    RoundContext,
    collect_instances_task,
    load_round_pool,
    plan_instruction_prompts_task,
)

# A large round's instruction prompts go out in about this many chunks (see `_Pipeline.chunk_size`).
INSTRUCTION_CHUNKS = 8


class RoundDedup:
    """A round's pool, deduplicated against one slice of candidates after another, in prompt order.

    Consecutive slices decide exactly as one call on all of them (see `dedup_candidates`). Unlike the other
    steps' inputs this holds the live pool, so the pipeline runs one dedup task run at a time.
    """

    def __init__(self, pool: Pool, ctx: RoundContext, config: BootstrapConfig, settings: Settings) -> None:
        self.pool = pool
        self._ctx, self._config, self._dask = ctx, config, settings.dask_address
        self._start, self._vocab_start = len(pool.index), pool.index.vocab_size
        self._numbered = 0

    def next_slice(
        self, candidates: list[Candidate]
    ) -> tuple[list[InstructionRecord], list[RejectionRecord]]:
        """Accepted instructions and rejections of the next candidates; the accepted join the pool."""
        decided = dedup_candidates(
            candidates,
            self.pool,
            self._config,
            self._ctx.number,
            self._ctx.model,
            self._dask,
            first_candidate=self._numbered,
        )
        self._numbered += len(candidates)
        return decided

    def delta(self) -> IndexDelta:
        """What the slices so far added to the pool index."""
        return IndexDelta.since(self.pool.index, self._start, self._vocab_start)


@dataclass(frozen=True)
class InstructionSlice:
    """What parse, filter and dedup made of one chunk of instruction completions."""

    candidates: list[Candidate]
    filtered: list[RejectionRecord]
    accepted: list[InstructionRecord]
    rejected: list[RejectionRecord]


@task(name="parse-filter-dedup", cache_policy=NO_CACHE)
def filter_and_dedup_task(
    plans: list[PromptPlan],
    completions: list[CompletionRecord],
    dedup: RoundDedup,
    config: BootstrapConfig,
    round_number: int,
) -> InstructionSlice:
    """Parse and filter one chunk of instruction completions, then deduplicate its candidates in order."""
    candidates, filtered = collect_candidates(plans, completions, config, round_number)
    accepted, rejected = dedup.next_slice(candidates)
    return InstructionSlice(candidates, filtered, accepted, rejected)


@dataclass
class _Stage:
    """One LLM stage of the pipeline: its queue of requests, its chunks in flight, and their progress."""

    name: str
    sampling: SamplingParams
    on_progress: ProgressCallback  # called from the pipeline's thread only (it may call Prefect's API)
    # (what each request is for: a prompt index or an instruction record, the request), in arrival order
    queue: deque[tuple[Any, CompletionRequest]] = field(default_factory=deque)
    in_flight: int = 0
    chunks: int = 0  # chunks submitted so far: the next one's number
    total: int = 0  # requests queued so far
    _progress: dict[int, tuple[int, int]] = field(default_factory=dict)  # chunk -> (requests done, tokens)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def enqueue(self, items: list[tuple[Any, CompletionRequest]]) -> None:
        """Queue requests for the stage's next chunks."""
        self.queue.extend(items)
        self.total += len(items)

    def take(self, count: int) -> list[tuple[Any, CompletionRequest]]:
        """The next `count` queued requests, in queue order."""
        return [self.queue.popleft() for _ in range(count)]

    def chunk_progress(self, chunk: int) -> ProgressCallback:
        """A chunk's `on_progress`; it only records, since it runs on the session's event loop."""

        def record(done: int, _total: int, tokens: int = 0) -> None:
            with self._lock:
                seen_done, seen_tokens = self._progress.get(chunk, (0, 0))
                self._progress[chunk] = (max(seen_done, done), max(seen_tokens, tokens))

        return record

    def report(self) -> None:
        """Show the stage's progress (requests done of those queued so far, tokens generated)."""
        with self._lock:
            done = sum(d for d, _ in self._progress.values())
            tokens = sum(t for _, t in self._progress.values())
        self.on_progress(done, self.total, tokens)


class _Pipeline:
    """The state of one pipelined round between its first request and its last answer."""

    def __init__(
        self,
        ctx: RoundContext,
        config: BootstrapConfig,
        settings: Settings,
        generation: Generation,
        plans: list[PromptPlan],
    ) -> None:
        self.ctx = ctx
        self.config = config
        self.settings = settings
        self.generation = generation
        self.plans = plans
        self.llm = generation.settings.model_copy(update={"model": generation.model})
        batches_per_chunk = max(1, self.llm.llm_concurrency // 4)
        self.batch = self.llm.llm_batch_size
        # Chunks of a quarter of what the client keeps in flight: small enough that dedup and the later stages
        # start early. A large round's chunks are larger, so that its instruction prompts make about
        # `INSTRUCTION_CHUNKS` chunks: every chunk is a task run, and each task run cost ~30 ms of CPU between
        # this process and the Prefect API server; at 2,000 prompts the API server alone took 7 of the 19 s
        # of generation on two cores, which the client and the LLM server then lacked (busy 84-88% instead
        # of 90%, benchmarks/round.py (b)).
        per_round = self.batch * -(-len(plans) // (INSTRUCTION_CHUNKS * self.batch))
        self.chunk_size = max(self.batch * batches_per_chunk, per_round)
        # Chunks in flight per stage: twice (one more than) what fills the client, so that the client always
        # has requests queued while this thread handles answers and submits; the instruction prompts,
        # all known up front, keep three times that. Shallower queues ran dry whenever this thread was busy
        # (busy 83% instead of 90-93% in benchmarks/round.py (b)). Every chunk in flight holds a thread.
        self.limit = 2 * (-(-self.llm.llm_concurrency // batches_per_chunk) + 1)
        self.instruction_limit = 3 * self.limit
        stages = [
            (INSTRUCTIONS, config.instruction_sampling),
            (CLASSIFICATION, config.classify_sampling),
            (INSTANCES, config.instance_sampling),
        ]
        self.instructions, self.classification, self.instances = (
            _Stage(name, sampling, generation.on_progress(ctx.number, name)) for name, sampling in stages
        )
        self.instructions.enqueue(list(enumerate(instruction_requests(plans, config, ctx.number))))
        self.futures: dict[PrefectFuture[list[CompletionRecord]], tuple[_Stage, list[Any]]] = {}
        self.arrived: dict[int, tuple[list[int], list[CompletionRecord]]] = {}  # by first prompt index
        self.next_prompt = 0
        # Instruction completions next in prompt order, waiting for the dedup task run in flight (at most one:
        # each decides against the pool as the ones before left it).
        self.to_dedup: tuple[list[int], list[CompletionRecord]] = ([], [])
        self.deduplicating: tuple[PrefectFuture[InstructionSlice], list[CompletionRecord]] | None = None
        self.new: list[CompletionRecord] = []  # instruction completions, in prompt order
        self.slices: list[InstructionSlice] = []
        self.answers: dict[str, CompletionRecord] = {}  # by instruction id
        self.outputs: dict[str, CompletionRecord] = {}
        self._dedup: RoundDedup | None = None

    def run(self) -> None:
        """Submit chunks as work becomes available until every stage is done."""
        runner: ThreadPoolTaskRunner[Any] = ThreadPoolTaskRunner(
            max_workers=2 * self.limit + self.instruction_limit + 1
        )
        with GenerationSession(self.llm, self.generation.urls) as session, runner:
            try:
                while True:
                    self._submit(session, runner)
                    self._submit_dedup(runner)
                    waiting: list[PrefectFuture[Any]] = list(self.futures)
                    if self.deduplicating is not None:
                        waiting.append(self.deduplicating[0])
                    if not waiting:
                        return
                    future = next(as_completed(waiting))
                    if self.deduplicating is not None and future is self.deduplicating[0]:
                        self._deduplicated(future.result(), self.deduplicating[1])
                        self.deduplicating = None
                        continue
                    stage, items = self.futures.pop(future)
                    stage.in_flight -= 1
                    self._arrive(stage, items, future.result())
            except BaseException:
                # A chunk failed for good (or the flow is being cancelled): stop the chunks still running.
                session.cancel_all()
                for pending in self.futures:
                    pending.wait()
                if self.deduplicating is not None:
                    self.deduplicating[0].wait()
                raise

    def _submit(self, session: GenerationSession, runner: ThreadPoolTaskRunner[Any]) -> None:
        for stage in (self.instances, self.classification, self.instructions):
            limit = self.instruction_limit if stage is self.instructions else self.limit
            while stage.in_flight < limit and (count := self._next_chunk(stage)):
                batch = self._batch_size(stage, count)
                items = stage.take(count)
                parameters = {
                    "requests": as_is([request for _, request in items]),
                    "params": stage.sampling,
                    "settings": self.llm
                    if batch == self.batch
                    else self.llm.model_copy(update={"llm_batch_size": batch}),
                    "base_urls": self.generation.urls,
                    "cache": self.generation.cache,
                    "session": session,
                    "on_progress": stage.chunk_progress(stage.chunks),
                }
                named = generate_chunk.with_options(task_run_name=f"{stage.name}-chunk-{stage.chunks:03d}")
                self.futures[runner.submit(named, parameters=parameters)] = (stage, [i for i, _ in items])
                stage.chunks += 1
                stage.in_flight += 1

    def _next_chunk(self, stage: _Stage) -> int:
        """Requests to send as the stage's next chunk: whole batches while its upstream still produces."""
        waiting = len(stage.queue)
        if self._upstream_busy(stage):
            waiting -= waiting % self.batch
        return min(waiting, self.chunk_size)

    def _batch_size(self, stage: _Stage, count: int) -> int:
        """Prompts per request for a chunk of `count`: the configured batch, except when work is short.

        When nothing upstream will add to the stage and what is queued cannot fill the client's slots at full
        batch size (the round's tail, or the whole of a round that small), the requests go out smaller, one
        slot each, so the servers work on all of them at once instead of idling while a few full batches
        finish. Completions are cached by prompt, so how prompts are grouped into requests changes no record.
        """
        queued = sum(len(s.queue) for s in (self.instructions, self.classification, self.instances))
        if self._upstream_busy(stage) or queued >= self.batch * self.llm.llm_concurrency:
            return self.batch
        return max(1, -(-count // self.llm.llm_concurrency))

    def _upstream_busy(self, stage: _Stage) -> bool:
        if stage is self.instructions:
            return False
        if stage is self.classification and (self.to_dedup[0] or self.deduplicating is not None):
            return True
        upstream = self.instructions if stage is self.classification else self.classification
        return bool(upstream.queue) or upstream.in_flight > 0 or self._upstream_busy(upstream)

    def _arrive(self, stage: _Stage, items: list[Any], records: list[CompletionRecord]) -> None:
        stage.report()
        if stage is self.instructions:
            self.arrived[items[0]] = (items, records)
            # Every chunk that is now next in prompt order waits for the next dedup task run, which takes all
            # of them: when dedup falls behind, fewer and larger task runs let it catch up.
            prompts, ready = self.to_dedup
            while self.next_prompt in self.arrived:
                chunk_prompts, chunk_records = self.arrived.pop(self.next_prompt)
                prompts += chunk_prompts
                ready += chunk_records
                self.next_prompt = chunk_prompts[-1] + 1
        elif stage is self.classification:
            self.answers.update((r.id, c) for r, c in zip(items, records, strict=True))
            classified, _ = apply_classification(items, records, self.ctx.number)
            requests = instance_requests(classified, self.config, self.ctx.number)
            self.instances.enqueue(list(zip(classified, requests, strict=True)))
        else:
            self.outputs.update((r.id, c) for r, c in zip(items, records, strict=True))

    def _submit_dedup(self, runner: ThreadPoolTaskRunner[Any]) -> None:
        """Start parse, filter and dedup of the completions next in prompt order, unless one is running.

        It runs in a task-run thread of its own: for the 0.2-0.7 s it takes at 2,000 prompts this thread
        goes on feeding classification and instance chunks to the client (done here, the client's queue ran
        dry and busy fell to 37% for that second, benchmarks/round.py (b)).
        """
        prompts, records = self.to_dedup
        if self.deduplicating is not None or not prompts:
            return
        self.to_dedup = ([], [])
        named = filter_and_dedup_task.with_options(task_run_name=f"dedup-chunk-{len(self.slices):03d}")
        parameters = {
            "plans": as_is([self.plans[i] for i in prompts]),
            "completions": as_is(records),
            "dedup": self.dedup(),
            "config": self.config,
            "round_number": self.ctx.number,
        }
        self.deduplicating = (runner.submit(named, parameters=parameters), records)

    def _deduplicated(self, piece: InstructionSlice, records: list[CompletionRecord]) -> None:
        """Keep a dedup task run's slice and queue its accepted instructions for classification."""
        self.slices.append(piece)
        self.new.extend(records)
        requests = classify_requests(piece.accepted, self.config, self.ctx.number)
        self.classification.enqueue(list(zip(piece.accepted, requests, strict=True)))
        report_kept(self.ctx.number, sum(len(s.accepted) for s in self.slices))

    def dedup(self) -> RoundDedup:
        """The round's dedup state, its pool loaded on first use (while the first chunks generate)."""
        if self._dedup is None:
            pool = load_round_pool(self.ctx, self.config, self.settings)
            self._dedup = RoundDedup(pool, self.ctx, self.config, self.settings)
        return self._dedup

    def outputs_in_staged_order(self) -> StageOutputs:
        """The round's outputs, ordered exactly as the staged execution orders them."""
        number = self.ctx.number
        candidates = [c for s in self.slices for c in s.candidates]
        filtered = [r for s in self.slices for r in s.filtered]
        accepted = [r for s in self.slices for r in s.accepted]
        answers = [self.answers[r.id] for r in accepted]
        classified, unanswered = apply_classification(accepted, answers, number)
        outputs = [self.outputs[r.id] for r in classified]
        instructions, instances, unusable = collect_instances_task(
            as_is(classified), as_is(outputs), self.config, number
        )
        report_instances(number, len(instructions), len(instances))
        return StageOutputs(
            prompts=len(self.plans),
            candidates_parsed=parsed_count(candidates, filtered),
            instructions=instructions,
            instances=instances,
            rejected=filtered + [r for s in self.slices for r in s.rejected] + unanswered + unusable,
            completions=self.new + answers + outputs,
            delta=self.dedup().delta(),
        )


def run_pipelined(
    ctx: RoundContext, config: BootstrapConfig, settings: Settings, generation: Generation
) -> StageOutputs:
    """Run the round's stages overlapped (see the module docstring); the outputs equal `run_staged`'s.

    Args:
        ctx: The open round.
        config: The round's knobs.
        settings: Store settings (the pool is loaded from the store).
        generation: How to reach the servers.

    Returns:
        The round's outputs, in commit order.
    """
    plans = plan_instruction_prompts_task(ctx, config, settings)
    pipeline = _Pipeline(ctx, config, settings, generation, plans)
    pipeline.run()
    return pipeline.outputs_in_staged_order()

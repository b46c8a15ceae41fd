"""Generation inside a Prefect flow: one task run per chunk of requests, the chunks sharing one client on a
private event loop, and their progress relayed to the caller's callback from a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.task_runners import ThreadPoolTaskRunner

from schemas import CompletionRecord, SamplingParams, Settings
from tasks.resources.llm.batch import CompletionRequest, ProgressCallback, generate
from tasks.resources.llm.cache import CompletionCache
from tasks.resources.llm.client import OpenAICompletionClient
from tasks.resources.task_inputs import as_is

T = TypeVar("T")

log = logging.getLogger(__name__)


class GenerationSession:
    """One event loop in a background thread holding one client, shared by the chunk tasks of a round.

    Sharing it lets the chunks overlap: the next chunk's batches start as soon as HTTP slots free up, so the
    servers never idle at chunk boundaries, while the client keeps at most `llm_concurrency` requests in
    flight in total.

    Prefect's async tasks cannot replace this thread: Prefect 3.8's ThreadPoolTaskRunner runs each async task
    run under its own `asyncio.run` in a worker thread (task_runners.py `submit`), so two chunks would hold
    two event loops, and a client (its connections, its in-flight cap) belongs to one loop.
    """

    def __init__(self, settings: Settings, base_urls: list[str]) -> None:
        """Start the loop and create the client in it.

        Args:
            settings: Client settings; `llm_concurrency` batches become the client's global in-flight cap.
            base_urls: The servers.
        """
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llm-session", daemon=True)
        self._thread.start()

        # The cap counts HTTP requests: a chat batch is one request per prompt, so it counts its prompts.
        cap = settings.llm_concurrency * (settings.llm_batch_size if settings.llm_api == "chat" else 1)

        async def make() -> OpenAICompletionClient:
            return OpenAICompletionClient.from_settings(settings, base_urls, max_in_flight=cap)

        self.client = self.run(make())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the session's loop and wait for its result (callable from any thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def cancel_all(self) -> None:
        """Cancel everything running on the loop; the threads waiting in `run` get CancelledError."""

        def cancel() -> None:
            for t in asyncio.all_tasks(self._loop):
                t.cancel()

        self._loop.call_soon_threadsafe(cancel)

    def close(self) -> None:
        """Close the client and stop the loop thread."""
        with contextlib.suppress(Exception):
            self.run(self.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> GenerationSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@task(
    name="generate-chunk",
    # No task-level retries: the HTTP client is the one retry layer (see the docstring).
    # Inputs hold a cache object and an API key: never hash or persist them; the completion cache does the
    # caching that matters.
    cache_policy=NO_CACHE,
)
def generate_chunk(
    requests: list[CompletionRequest],
    params: SamplingParams,
    settings: Settings,
    base_urls: list[str],
    cache: CompletionCache | None,
    session: GenerationSession | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[CompletionRecord]:
    """Prefect task: `generate` on one chunk of requests.

    Retries: one layer, the HTTP client's. Each HTTP request is retried up to `settings.llm_max_retries`
    times with backoff on transient faults (connection errors, timeouts, 408/429/5xx, malformed answers),
    honouring Retry-After; a 4xx is never retried. This task itself does not retry (a task retry would
    multiply the attempts); a round that still fails is rerun, and reuses every completion already cached.

    Args:
        requests: The chunk.
        params: Decoding parameters.
        settings: Batch size, concurrency and client settings.
        base_urls: The servers (used when no session is given).
        cache: Completion cache, or None.
        session: Shared loop and client of the round; None runs a private loop and client.
        on_progress: Called as `(done, total, tokens)` for this chunk.

    Returns:
        One record per request, in order.
    """
    start = time.perf_counter()

    async def run(client: OpenAICompletionClient) -> list[CompletionRecord]:
        return await generate(
            client,
            requests,
            params,
            cache,
            settings.llm_batch_size,
            settings.llm_concurrency,
            on_progress,
        )

    if session is not None:
        records = session.run(run(session.client))
    else:

        async def private() -> list[CompletionRecord]:
            client = OpenAICompletionClient.from_settings(settings, base_urls)
            try:
                return await run(client)
            finally:
                await client.aclose()

        records = asyncio.run(private())
    _task_logger().info("%d completions in %.1fs", len(records), time.perf_counter() - start)
    return records


def _task_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    # Outside a task run (`generate_chunk.fn(...)` in tests) there is no run logger.
    try:
        return get_run_logger()
    except MissingContextError:
        return log


class _ProgressRelay:
    """Delivers progress from the session's event loop to the caller's callback on a thread of its own.

    The callback may call Prefect's API (a progress artifact): in the loop thread that would block every
    request in flight, and Prefect's sync/async dispatch would hand back an un-awaited coroutine. Updates that
    arrive while the callback is busy are coalesced: only the latest count matters.
    """

    def __init__(self, callback: ProgressCallback, n_chunks: int, total: int) -> None:
        self._callback = callback
        self._chunk_done = [0] * n_chunks
        self._chunk_tokens = [0] * n_chunks
        self._total = total
        self._latest: tuple[int, int, int] | None = None
        self._closing = False
        self._wake = threading.Condition()
        # The caller's context carries Prefect's flow run and API settings into the relay thread.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._deliver,), name="llm-progress", daemon=True
        )
        self._thread.start()

    def for_chunk(self, index: int) -> ProgressCallback:
        """The `on_progress` of one chunk; reports the sum over all chunks."""

        def report(done: int, _total: int, tokens: int = 0) -> None:
            with self._wake:
                # Max, not assignment: a retried task run reports its chunk from zero again.
                self._chunk_done[index] = max(self._chunk_done[index], done)
                self._chunk_tokens[index] = max(self._chunk_tokens[index], tokens)
                self._latest = (sum(self._chunk_done), self._total, sum(self._chunk_tokens))
                self._wake.notify()

        return report

    def close(self) -> None:
        """Deliver the last update and stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def _deliver(self) -> None:
        while True:
            with self._wake:
                while self._latest is None and not self._closing:
                    self._wake.wait()
                latest, self._latest = self._latest, None
                if latest is None:
                    return
            try:
                self._callback(*latest)
            except Exception:  # a broken progress display must not fail the round
                log.exception("progress callback failed")


# Chunk task runs in flight at once: two are enough for the next chunk to fill the HTTP slots that the
# current chunk's last batches leave free.
_CHUNKS_IN_FLIGHT = 2


def generate_in_tasks(
    requests: list[CompletionRequest],
    params: SamplingParams,
    settings: Settings,
    base_urls: list[str],
    cache: CompletionCache | None,
    chunk_size: int | None = None,
    on_progress: ProgressCallback | None = None,
    model: str | None = None,
    stage: str = "generate",
) -> list[CompletionRecord]:
    """Complete requests from inside a Prefect flow, as one task run per chunk, named `<stage>-chunk-NNN`.

    The chunks share one client (one event loop thread), so at most `settings.llm_concurrency` HTTP requests
    are in flight in total, and two chunk task runs overlap so that the servers stay busy across chunk
    boundaries. The task runs go to a private thread-pool runner, whatever runner the flow itself uses.

    Args:
        requests: What to complete.
        params: Decoding parameters.
        settings: Model, API key, batch size, concurrency, timeout, retries.
        base_urls: The servers.
        cache: Completion cache, or None.
        chunk_size: Requests per task run; default `llm_batch_size * llm_concurrency`, so the number of task
            runs grows with the number of batches, not prompts.
        on_progress: Called as `(done, total, tokens)` over all requests, from a relay thread.
        model: Model name to use instead of `settings.model` (a round's `BootstrapConfig.model`).
        stage: What the requests are for (instructions, classification, instances): names the task runs.

    Returns:
        One record per request, in request order.
    """
    if model:
        settings = settings.model_copy(update={"model": model})
    size = chunk_size or settings.llm_batch_size * settings.llm_concurrency
    chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
    if not chunks:
        return []
    relay = _ProgressRelay(on_progress, len(chunks), len(requests)) if on_progress is not None else None
    results: list[list[CompletionRecord]] = []
    runner: ThreadPoolTaskRunner[Any] = ThreadPoolTaskRunner(max_workers=_CHUNKS_IN_FLIGHT)
    with GenerationSession(settings, base_urls) as session, runner:
        pending: deque[Any] = deque()
        next_chunk = 0
        try:
            while next_chunk < len(chunks) or pending:
                while next_chunk < len(chunks) and len(pending) < _CHUNKS_IN_FLIGHT:
                    parameters = {
                        "requests": as_is(chunks[next_chunk]),
                        "params": params,
                        "settings": settings,
                        "base_urls": base_urls,
                        "cache": cache,
                        "session": session,
                        "on_progress": relay.for_chunk(next_chunk) if relay is not None else None,
                    }
                    named = generate_chunk.with_options(task_run_name=f"{stage}-chunk-{next_chunk:03d}")
                    pending.append(runner.submit(named, parameters=parameters))
                    next_chunk += 1
                results.append(pending.popleft().result())
        except BaseException:
            # One chunk failed for good (or the flow is being cancelled): stop the overlapping chunk too.
            session.cancel_all()
            for future in pending:
                future.wait()
            raise
        finally:
            if relay is not None:
                relay.close()
    return [r for chunk in results for r in chunk]

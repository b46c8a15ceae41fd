"""tasks.resources.llm (protocol, cache, client, batch, chunks) against the real embedded llama.cpp server,
and the fake for faults on demand."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from schemas import CompletionRecord, SamplingParams, Settings
from tasks.resources.llm.batch import CompletionRequest, generate
from tasks.resources.llm.cache import CompletionKeys, MemoryCache, completion_key
from tasks.resources.llm.chunks import GenerationSession, generate_chunk, generate_in_tasks
from tasks.resources.llm.client import OpenAICompletionClient
from tasks.resources.llm.protocol import LLMError, request_body
from tasks.resources.servers.embedded import EmbeddedServer
from tests.support.fake_openai import FakeOpenAI, FaultConfig, fake_completion

T = TypeVar("T")
FakeFactory = Callable[..., FakeOpenAI]

PARAMS = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=50, presence_penalty=0.0)
GREEDY_SHORT = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=6, presence_penalty=0.0)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def fast_client(urls: list[str], **kwargs: Any) -> OpenAICompletionClient:
    """A client whose retries take milliseconds, so fault tests stay fast."""
    options: dict[str, Any] = {"timeout_s": 2.0, "max_retries": 5, "backoff_s": 0.01} | kwargs
    return OpenAICompletionClient(urls, "fake-model", **options)


def requests_for_prompts(prompts: list[str], seed: int | None = 7) -> list[CompletionRequest]:
    return [CompletionRequest(p, "instruction", seed) for p in prompts]


def requests_for(n: int, seed: int | None = 1, stage: Any = "instruction") -> list[CompletionRequest]:
    return [CompletionRequest(f"Task number {i}:", stage, seed) for i in range(n)]


def expected_text(prompt: str, seed: int | None, params: SamplingParams = PARAMS) -> str:
    return fake_completion(prompt, seed, params.max_tokens, list(params.stop))[0]


async def generate_with(client: OpenAICompletionClient, *args: Any, **kwargs: Any) -> list[CompletionRecord]:
    try:
        return await generate(client, *args, **kwargs)
    finally:
        await client.aclose()


class DictCache(MemoryCache):
    """The in-memory cache, counting its puts."""

    def __init__(self) -> None:
        super().__init__()
        self.puts: list[int] = []

    def put_many(self, records: list[CompletionRecord]) -> None:
        self.puts.append(len(records))
        super().put_many(records)


# -- cache keys -----------------------------------------------------------------------------------------


def test_completion_key_is_sha256_hex_and_depends_on_every_input() -> None:
    key = completion_key("m", "p", PARAMS, 1, api="completions")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == completion_key("m", "p", SamplingParams(**PARAMS.model_dump()), 1, api="completions")
    variants = {
        completion_key("m2", "p", PARAMS, 1, api="completions"),
        completion_key("m", "p2", PARAMS, 1, api="completions"),
        completion_key("m", "p", PARAMS, 2, api="completions"),
        completion_key("m", "p", PARAMS, None, api="completions"),
        completion_key("m", "p", PARAMS.model_copy(update={"temperature": 0.5}), 1, api="completions"),
        completion_key("m", "p", PARAMS.model_copy(update={"stop": ("\n",)}), 1, api="completions"),
        completion_key("m", "p", PARAMS, 1, api="chat"),
    }
    assert key not in variants and len(variants) == 7


@pytest.mark.parametrize("prompt", ["p", 'a "quoted"\nline\\', "日本語 ☃ \x00", ""])
def test_completion_key_is_the_sha256_of_the_sorted_canonical_json(prompt: str) -> None:
    payload = {
        "v": 3,
        "model": "m",
        "prompt": prompt,
        "params": PARAMS.model_dump(mode="json"),
        "seed": None,
        "api": "chat",
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert completion_key("m", prompt, PARAMS, None, api="chat") == expected
    keys = CompletionKeys("m", PARAMS, api="chat")
    assert [keys(prompt, None), keys(prompt, 1)] == [
        expected,
        completion_key("m", prompt, PARAMS, 1, api="chat"),
    ]


@settings(max_examples=50, deadline=None)
@given(st.text(), st.text())
def test_completion_key_separates_prompts(a: str, b: str) -> None:
    same = completion_key("m", a, PARAMS, 0, api="chat") == completion_key("m", b, PARAMS, 0, api="chat")
    assert same == (a == b)


# -- the real embedded server ---------------------------------------------------------------------------


def test_list_of_prompts_on_the_real_server_comes_back_in_order(embedded_llm: str) -> None:
    prompts = ["List three fruits:\n1.", "The capital of France is", "def add(a, b):\n"]

    async def scenario() -> tuple[list[CompletionRecord], list[CompletionRecord]]:
        client = OpenAICompletionClient([embedded_llm], "smollm2-135m-instruct")
        try:
            batch = await client.complete(prompts, GREEDY_SHORT, 7, "instruction")
            singles = [(await client.complete([p], GREEDY_SHORT, 7, "instruction"))[0] for p in prompts]
            return batch, singles
        finally:
            await client.aclose()

    batch, singles = run(scenario())
    # Greedy decoding: each prompt's completion in the batch is the one it gets alone.
    assert [r.text for r in batch] == [r.text for r in singles]
    assert [r.prompt for r in batch] == prompts
    assert len({r.request_id for r in batch}) == 1
    first = batch[0]
    assert first.base_url == embedded_llm and first.seed == 7 and first.latency_s > 0
    assert first.key == completion_key(
        "smollm2-135m-instruct", prompts[0], GREEDY_SHORT, 7, api="completions"
    )
    assert all(r.prompt_tokens > 0 for r in batch)
    assert sum(r.completion_tokens for r in batch) > 0
    assert all(r.finish_reason in ("stop", "length") for r in batch)


def test_real_server_request_records_its_times_and_cached_prompt_tokens(tmp_path: Path) -> None:
    """On one slot, the second of two identical prompts finds the first's tokens in the prompt cache."""
    prompt = "Write a short list of three everyday tasks that a helpful assistant could do for a student:\n1."

    async def scenario(url: str) -> list[CompletionRecord]:
        client = OpenAICompletionClient([url], "smollm2-135m-instruct")
        try:
            return [(await client.complete([prompt], GREEDY_SHORT, 7, "instruction"))[0] for _ in range(2)]
        finally:
            await client.aclose()

    with EmbeddedServer(parallel=1, ctx_per_slot=512, cache_dir=tmp_path) as server:
        first, second = run(scenario(server.url))
    for record in (first, second):
        assert record.sent_at is not None and record.received_at is not None
        assert record.sent_at <= record.received_at
    assert first.received_at is not None and second.sent_at is not None
    assert first.received_at <= second.sent_at
    assert second.cached_prompt_tokens is not None and second.cached_prompt_tokens > 0
    assert second.cached_prompt_tokens <= second.prompt_tokens


def test_real_server_rejection_fails_fast_with_its_message(embedded_llm: str) -> None:
    too_long = "hello " * 2500  # more tokens than a slot's 2048-token context

    async def scenario() -> None:
        client = OpenAICompletionClient([embedded_llm], "smollm2-135m-instruct", backoff_s=5)
        try:
            await client.complete([too_long], GREEDY_SHORT, None, "instruction")
        finally:
            await client.aclose()

    start = time.perf_counter()
    with pytest.raises(LLMError, match="exceeds the available context size") as info:
        run(scenario())
    assert not info.value.retryable
    assert time.perf_counter() - start < 5  # no backoff: a 400 is not retried


def test_chat_on_the_real_server_sends_each_prompt_alone(embedded_llm: str) -> None:
    prompts = ["Name a fruit.", "hello " * 2500, "Name a colour."]  # the middle one overflows a slot

    async def scenario() -> tuple[list[CompletionRecord], list[str]]:
        client = OpenAICompletionClient([embedded_llm], "smollm2-135m-instruct", api="chat")
        try:
            records = await generate(client, requests_for_prompts(prompts), GREEDY_SHORT, None, 3, 1)
        finally:
            await client.aclose()
        async with httpx.AsyncClient(timeout=60) as http:  # the same requests, parsed by hand
            direct = []
            for p in (prompts[0], prompts[2]):
                body = request_body("chat", "smollm2-135m-instruct", [p], GREEDY_SHORT, 7, False)
                answer = (await http.post(f"{embedded_llm}/chat/completions", json=body)).json()
                direct.append(answer["choices"][0]["message"]["content"])
        return records, direct

    records, direct = run(scenario())
    assert [r.prompt for r in records] == prompts
    assert [records[0].text, records[2].text] == direct and all(direct)
    assert records[1].rejected == "prompt_too_long" and records[0].rejected is None
    assert records[0].request_id != records[2].request_id  # one prompt per HTTP request
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in (records[0], records[2]))
    assert records[0].key == completion_key("smollm2-135m-instruct", prompts[0], GREEDY_SHORT, 7, api="chat")


def test_chat_faults_are_retried_and_usage_is_exact(fake_openai: FakeFactory) -> None:
    fake = fake_openai(faults=FaultConfig(script=deque(["500", "malformed", "drop_choice"])))
    client = fast_client([fake.url], api="chat")
    records = run(generate_with(client, requests_for(3), PARAMS, None, batch_size=3, concurrency=1))
    assert [r.text for r in records] == [expected_text(f"Task number {i}:", 1) for i in range(3)]
    assert [r.completion_tokens for r in records] == [len(r.text.split()) for r in records]
    assert fake.paths == {"/v1/chat/completions": 6} and sum(fake.faults_injected.values()) == 3
    assert all(len(b["messages"]) == 1 and "prompt" not in b for b in fake.bodies)


def test_chat_sessions_count_a_batch_as_its_requests(fake_openai: FakeFactory) -> None:
    fake = fake_openai(latency_s=0.05)
    settings = Settings(model="fake-model", llm_batch_size=3, llm_concurrency=2, llm_api="chat")
    with GenerationSession(settings, [fake.url]) as session:
        records = generate_chunk.fn(requests_for(12), PARAMS, settings, [fake.url], None, session)
    assert [r.text for r in records] == [expected_text(f"Task number {i}:", 1) for i in range(12)]
    assert fake.requests == 12 and fake.max_in_flight == 6


# -- faults from the fake -------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "429", "hang", "close", "malformed", "drop_choice"])
def test_each_transient_fault_is_retried(fake_openai: FakeFactory, fault: Any) -> None:
    fake = fake_openai(faults=FaultConfig(script=deque([fault, fault])))
    client = fast_client([fake.url], timeout_s=0.3)
    records = run(generate_with(client, requests_for(3), PARAMS, None, batch_size=3, concurrency=1))
    assert [r.text for r in records] == [expected_text(f"Task number {i}:", 1) for i in range(3)]
    assert fake.requests == 3 and fake.faults_injected[fault] == 2


def test_a_round_completes_on_a_flaky_server(fake_openai: FakeFactory) -> None:
    faults = FaultConfig(
        p_500=0.1, p_429=0.1, p_close=0.05, p_malformed=0.05, p_hang=0.03, p_drop_choice=0.05
    )
    fake = fake_openai(latency_s=0.01, faults=faults, shuffle_choices=True, rng_seed=3)
    client = fast_client([fake.url], timeout_s=0.3, max_retries=20)
    requests = requests_for(200)
    records = run(generate_with(client, requests, PARAMS, None, batch_size=4, concurrency=8))
    assert [r.text for r in records] == [expected_text(r.prompt, 1) for r in requests]
    assert sum(fake.faults_injected.values()) > 5


def test_client_errors_fail_fast_with_the_server_message(fake_openai: FakeFactory) -> None:
    """A 400 is never retried as such; the batch is sent once more prompt by prompt (to find a prompt the
    server cannot take), and when every prompt is refused alone for no prompt-specific reason, it fails."""
    fake = fake_openai(faults=FaultConfig(p_400=1.0, error_message_400="max_tokens is too large"))
    client = fast_client([fake.url], backoff_s=5)
    with pytest.raises(LLMError, match=r"HTTP 400.*max_tokens is too large") as info:
        run(generate_with(client, requests_for(8), PARAMS, None, batch_size=8, concurrency=1))
    assert not info.value.retryable and fake.requests == 1 + 8
    single = fake_openai(faults=FaultConfig(p_400=1.0))
    with pytest.raises(LLMError, match=r"HTTP 400"):
        run(generate_with(fast_client([single.url]), requests_for(1), PARAMS, None, 1, 1))
    assert single.requests == 1


def test_unknown_model_is_a_clear_error(fake_openai: FakeFactory) -> None:
    fake = fake_openai(models=("served-model",))
    client = fast_client([fake.url])
    with pytest.raises(LLMError, match="The model `fake-model` does not exist"):
        run(generate_with(client, requests_for(2), PARAMS, None, batch_size=2, concurrency=1))


def test_exhausted_retries_raise_a_retryable_error(fake_openai: FakeFactory) -> None:
    fake = fake_openai(faults=FaultConfig(p_500=1.0))
    client = fast_client([fake.url], max_retries=3)
    with pytest.raises(LLMError, match=r"after 4 attempts.*HTTP 500") as info:
        run(generate_with(client, requests_for(2), PARAMS, None, batch_size=2, concurrency=1))
    assert info.value.retryable and fake.requests == 4


def test_retry_after_is_honoured(fake_openai: FakeFactory) -> None:
    fake = fake_openai(faults=FaultConfig(script=deque(["429"]), retry_after_s=0.5))
    client = fast_client([fake.url])
    start = time.perf_counter()
    run(generate_with(client, requests_for(1), PARAMS, None, batch_size=1, concurrency=1))
    assert time.perf_counter() - start >= 0.5


def test_empty_and_cut_off_completions_are_recorded_not_retried(fake_openai: FakeFactory) -> None:
    fake = fake_openai(faults=FaultConfig(script=deque(["empty", "length"])))
    client = fast_client([fake.url])
    records = run(generate_with(client, requests_for(2), PARAMS, None, batch_size=1, concurrency=1))
    assert [(r.text, r.finish_reason) for r in records] == [("", "stop"), (" 1. cut off mid", "length")]
    assert fake.requests == 2


def test_choices_are_matched_by_index_and_usage_recorded(fake_openai: FakeFactory) -> None:
    fake = fake_openai(shuffle_choices=True, per_choice_usage=True)
    client = fast_client([fake.url])
    requests = requests_for(8, seed=None)
    records = run(generate_with(client, requests, PARAMS, None, batch_size=8, concurrency=1))
    assert [r.text for r in records] == [expected_text(r.prompt, None) for r in requests]
    assert [r.completion_tokens for r in records] == [len(r.text.split()) for r in records]
    assert {r.prompt_tokens for r in records} == {3 * 8}  # the request's prompt tokens, on every record


def test_request_total_usage_is_split_over_the_choices(fake_openai: FakeFactory) -> None:
    fake = fake_openai()
    client = fast_client([fake.url])
    records = run(generate_with(client, requests_for(3), PARAMS, None, batch_size=3, concurrency=1))
    total = sum(len(expected_text(r.prompt, 1).split()) for r in records)
    assert sum(r.completion_tokens for r in records) == total
    assert max(r.completion_tokens for r in records) - min(r.completion_tokens for r in records) <= 1


# -- dispatch and concurrency ---------------------------------------------------------------------------


def test_least_loaded_dispatch_favours_the_faster_server(fake_openai: FakeFactory) -> None:
    slow, fast = fake_openai(latency_s=0.5), fake_openai(latency_s=0.02)
    client = fast_client([slow.url, fast.url])
    run(generate_with(client, requests_for(40), PARAMS, None, batch_size=1, concurrency=2))
    assert slow.requests >= 1 and fast.requests >= 1
    # Round-robin would send 20 to each; the fast server frees its slot ~25 times per slow answer.
    assert fast.requests > 5 * slow.requests


def test_concurrency_bounds_requests_in_flight(fake_openai: FakeFactory) -> None:
    fake = fake_openai(latency_s=0.05)
    client = fast_client([fake.url])
    run(generate_with(client, requests_for(60), PARAMS, None, batch_size=2, concurrency=5))
    assert fake.max_in_flight == 5 and fake.requests == 30


def test_client_wide_in_flight_cap_spans_generate_calls(fake_openai: FakeFactory) -> None:
    fake = fake_openai(latency_s=0.05)

    async def scenario() -> None:
        client = fast_client([fake.url], max_in_flight=3)
        try:
            await asyncio.gather(
                *(generate(client, requests_for(12, seed=s), PARAMS, None, 1, 4) for s in range(3))
            )
        finally:
            await client.aclose()

    run(scenario())
    assert fake.max_in_flight == 3 and fake.requests == 36


def test_batches_carry_one_seed_and_duplicates_are_sent_once(fake_openai: FakeFactory) -> None:
    fake = fake_openai()
    client = fast_client([fake.url])
    requests = [*requests_for(3, seed=1), *requests_for(2, seed=2), *requests_for(3, seed=1)]
    records = run(generate_with(client, requests, PARAMS, None, batch_size=8, concurrency=1))
    assert sorted((b["seed"], len(b["prompt"])) for b in fake.bodies) == [(1, 3), (2, 2)]
    assert [r.text for r in records] == [expected_text(r.prompt, r.seed) for r in requests]
    assert records[0] == records[5]


def test_progress_reaches_the_total(fake_openai: FakeFactory) -> None:
    fake = fake_openai()
    seen: list[tuple[int, int, int]] = []
    client = fast_client([fake.url])
    records = run(
        generate_with(
            client, requests_for(10), PARAMS, None, 3, 2, on_progress=lambda d, t, k: seen.append((d, t, k))
        )
    )
    assert seen[0] == (0, 10, 0) and seen[-1] == (10, 10, sum(r.completion_tokens for r in records))
    assert seen[-1][2] > 0  # tokens the server generated, for a tokens/s display
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    assert [k for _, _, k in seen] == sorted(k for _, _, k in seen)


# -- the completion cache -------------------------------------------------------------------------------


def test_second_round_is_served_from_the_cache(fake_openai: FakeFactory) -> None:
    fake = fake_openai()
    cache = DictCache()
    requests = requests_for(10)
    first = run(generate_with(fast_client([fake.url]), requests, PARAMS, cache, 4, 2))
    assert fake.requests == 3 and sorted(cache.puts) == [2, 4, 4]
    again = run(generate_with(fast_client([fake.url]), requests, PARAMS, cache, 4, 2))
    assert again == first and fake.requests == 3


def test_partially_cached_round_sends_only_the_missing_prompts(fake_openai: FakeFactory) -> None:
    fake = fake_openai()
    cache = DictCache()
    requests = requests_for(10)
    run(generate_with(fast_client([fake.url]), requests[:6], PARAMS, cache, 4, 2))
    sent_before = fake.prompts
    records = run(generate_with(fast_client([fake.url]), requests, PARAMS, cache, 4, 2))
    assert fake.prompts - sent_before == 4
    assert [r.prompt for r in records] == [r.prompt for r in requests]


def test_cached_record_takes_the_requesting_stage(fake_openai: FakeFactory) -> None:
    fake = fake_openai()
    cache = DictCache()
    run(generate_with(fast_client([fake.url]), requests_for(2, stage="classify"), PARAMS, cache, 2, 1))
    records = run(
        generate_with(fast_client([fake.url]), requests_for(2, stage="instance"), PARAMS, cache, 2, 1)
    )
    assert {r.stage for r in records} == {"instance"} and fake.requests == 1


def test_finished_batches_stay_cached_when_the_round_fails(fake_openai: FakeFactory) -> None:
    fake = fake_openai(faults=FaultConfig(script=deque([None]), p_400=1.0))
    cache = DictCache()
    with pytest.raises(LLMError):
        run(generate_with(fast_client([fake.url]), requests_for(4), PARAMS, cache, 2, 1))
    assert len(cache.records) == 2


# -- credentials ----------------------------------------------------------------------------------------


def test_api_key_is_sent_as_bearer_and_kept_out_of_records(fake_openai: FakeFactory) -> None:
    fake = fake_openai(api_key="sk-right-key")
    client = fast_client([fake.url], api_key=SecretStr("sk-right-key"))
    records = run(generate_with(client, requests_for(2), PARAMS, None, 2, 1))
    assert fake.authorization == ["Bearer sk-right-key"]
    assert all("sk-right-key" not in r.model_dump_json() for r in records)


def test_api_key_is_absent_from_errors(fake_openai: FakeFactory) -> None:
    fake = fake_openai(api_key="sk-right-key")
    client = fast_client([fake.url], api_key=SecretStr("sk-wrong-key"))
    with pytest.raises(LLMError, match=r"HTTP 401.*Incorrect API key") as info:
        run(generate_with(client, requests_for(2), PARAMS, None, 2, 1))
    assert "sk-wrong-key" not in str(info.value) and "sk-wrong-key" not in repr(info.value)


def test_url_credentials_are_stripped_from_records_and_errors(fake_openai: FakeFactory) -> None:
    fake = fake_openai(faults=FaultConfig(script=deque([None, "500", "500"])))
    url = fake.url.replace("http://", "http://user:url-secret@")
    records = run(generate_with(fast_client([url], max_retries=1), requests_for(1), PARAMS, None, 1, 1))
    assert records[0].base_url == fake.url
    with pytest.raises(LLMError) as info:
        run(generate_with(fast_client([url], max_retries=1), requests_for(1, seed=9), PARAMS, None, 1, 1))
    assert "url-secret" not in str(info.value)


# -- the Prefect task body ------------------------------------------------------------------------------


def test_generate_chunk_runs_without_the_engine(fake_openai: FakeFactory) -> None:
    fake = fake_openai()
    settings = Settings(model="fake-model", llm_batch_size=4, llm_concurrency=2)
    records = generate_chunk.fn(requests_for(10), PARAMS, settings, [fake.url], None)
    assert [r.prompt for r in records] == [f"Task number {i}:" for i in range(10)]
    assert fake.requests == 3


@pytest.mark.slow
def test_generate_in_tasks_runs_one_task_per_chunk(prefect_server: None, fake_openai: FakeFactory) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    fake = fake_openai(latency_s=0.05)
    settings = Settings(model="fake-model", llm_batch_size=2, llm_concurrency=3)
    cache = DictCache()
    requests = requests_for(20)

    progress: list[tuple[int, int, bool]] = []

    def on_progress(done: int, total: int, tokens: int) -> None:
        # Progress arrives off the event loop, so that it may call Prefect's sync API (artifacts).
        try:
            asyncio.get_running_loop()
            in_loop = True
        except RuntimeError:
            in_loop = False
        progress.append((done, total, in_loop))

    @flow
    def round_flow() -> tuple[str, list[CompletionRecord]]:
        from prefect.runtime import flow_run

        records = generate_in_tasks(requests, PARAMS, settings, [fake.url], cache, on_progress=on_progress)
        return str(flow_run.id), records

    flow_run_id, records = round_flow()
    assert [r.text for r in records] == [expected_text(r.prompt, 1) for r in requests]
    assert fake.max_in_flight == 3 and fake.requests == 10 and len(cache.puts) == 10
    assert progress[-1] == (20, 20, False) and not any(in_loop for _, _, in_loop in progress)

    async def task_run_names() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=100,
            )
            return [r.name for r in runs]

    names = run(task_run_names())
    assert len(names) == 4 and all(n.startswith("generate-chunk") for n in names)  # 20 prompts / chunks of 6

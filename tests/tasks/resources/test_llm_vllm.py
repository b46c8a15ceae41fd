"""The client, the config and the sizing against the vLLM stand-in (tests/support/fake_openai.py `VLLMMode`).

Each numbered finding of issue 17 has a test here (or in test_llm_server.py / test_register.py / the round
tests) that failed before the fix. vLLM itself cannot run here (CUDA-only wheel); the stand-in copies the
behaviour of vLLM 0.33.0's server read from its source.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx
import pytest
import typer
from pydantic import ValidationError

from schemas import BootstrapConfig, CompletionRecord, SamplingParams, Settings
from selfinstruct.cli import check_llm_servers
from tasks.resources.llm.batch import CompletionRequest, generate
from tasks.resources.llm.cache import MemoryCache, completion_key
from tasks.resources.llm.client import OpenAICompletionClient
from tasks.resources.llm.protocol import LLMError, rejection_reason
from tasks.resources.llm.sizing import parse_vllm_metrics, plan_throughput, size_for_servers
from tests.support.fake_openai import FakeOpenAI, FaultConfig
from tests.support.fake_vllm import VLLM_SAMPLING_DEFAULTS, VLLMMode, words

T = TypeVar("T")
FakeFactory = Callable[..., FakeOpenAI]
PARAMS = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=50, presence_penalty=0.0)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def client_for(fake: FakeOpenAI, **kwargs: Any) -> OpenAICompletionClient:
    options: dict[str, Any] = {"timeout_s": 5.0, "max_retries": 3, "backoff_s": 0.01} | kwargs
    return OpenAICompletionClient([fake.url], "fake-model", **options)


async def generate_with(client: OpenAICompletionClient, *args: Any, **kwargs: Any) -> list[CompletionRecord]:
    try:
        return await generate(client, *args, **kwargs)
    finally:
        await client.aclose()


def requests_for(prompts: list[str], seed: int | None = 1) -> list[CompletionRequest]:
    return [CompletionRequest(p, "instruction", seed) for p in prompts]


def post(fake: FakeOpenAI, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{fake.url.removesuffix('/v1')}{path}", json=body, timeout=5)


# -- the stand-in speaks like vLLM ----------------------------------------------------------------------


def test_stand_in_refuses_more_than_four_stop_strings_with_vllms_error_body(fake_openai: FakeFactory) -> None:
    fake = fake_openai(vllm=VLLMMode())
    body = {"model": "fake-model", "prompt": ["a"], "stop": ["1", "2", "3", "4", "5"]}
    answer = post(fake, "/v1/completions", body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400
    assert error["param"] == "body.stop" and "at most 4 items" in error["message"]
    assert post(fake, "/v1/completions", body | {"stop": ["1", "2", "3", "4"]}).status_code == 200


def test_stand_in_context_limit_refuses_the_whole_batch_and_clamps_max_tokens(
    fake_openai: FakeFactory,
) -> None:
    fake = fake_openai(vllm=VLLMMode(max_model_len=10))
    long_prompt = " ".join(["w"] * 11)
    answer = post(fake, "/v1/completions", {"model": "fake-model", "prompt": ["short", long_prompt]})
    assert (
        answer.status_code == 400
        and "maximum context length is 10 tokens" in answer.json()["error"]["message"]
    )
    answer = post(
        fake, "/v1/completions", {"model": "fake-model", "prompt": ["a b c d e f g"], "max_tokens": 9}
    )
    assert answer.status_code == 200  # 7 + 9 > 10: vLLM clamps max_tokens to the 3 tokens left
    assert answer.json()["choices"][0]["finish_reason"] == "length"
    assert len(words(answer.json()["choices"][0]["text"])) == 3
    too_many = post(fake, "/v1/completions", {"model": "fake-model", "prompt": ["a"], "max_tokens": 11})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"


def test_stand_in_answers_503_over_its_queue_limit(fake_openai: FakeFactory) -> None:
    # vLLM admits a request while unfinished sequences + its n stay within the limit: the first request's
    # 3 prompts leave no room for a second request (3 + 1 > 3).
    fake = fake_openai(latency_s=0.5, vllm=VLLMMode(max_num_queued_reqs=3))

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=5) as http:
            calls = [
                http.post(f"{fake.url}/completions", json={"model": "fake-model", "prompt": ["a", "b", "c"]})
                for _ in range(2)
            ]
            return sorted(r.status_code for r in await asyncio.gather(*calls))

    assert run(burst()) == [200, 503]
    assert fake.refused[503] == 1


def test_stand_in_keeps_prompt_order_and_one_usage_and_returns_token_ids(fake_openai: FakeFactory) -> None:
    fake = fake_openai(vllm=VLLMMode())
    body = {"model": "fake-model", "prompt": ["one two", "three"], "n": 2, "return_token_ids": True}
    data = post(fake, "/v1/completions", body).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert all("usage" not in c for c in data["choices"]) and data["usage"]["prompt_tokens"] == 3
    assert [len(c["prompt_token_ids"]) for c in data["choices"]] == [2, 2, 1, 1]
    assert all(len(c["token_ids"]) == len(words(c["text"])) for c in data["choices"])
    with pytest.raises(ValueError, match="prompt order"):
        FakeOpenAI(shuffle_choices=True, vllm=VLLMMode())


def test_stand_in_serves_only_its_names_and_mounts_lora_loading_only_when_allowed(
    fake_openai: FakeFactory, tmp_path: Any
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    closed = fake_openai(vllm=VLLMMode(), models=("base",))
    assert post(closed, "/v1/completions", {"model": "other", "prompt": "a"}).status_code == 404
    assert (
        post(closed, "/v1/load_lora_adapter", {"lora_name": "ft", "lora_path": str(adapter)}).status_code
        == 404
    )

    fake = fake_openai(vllm=VLLMMode(runtime_lora_updating=True), models=("base",))
    load = {"lora_name": "ft", "lora_path": str(adapter)}
    assert post(fake, "/v1/load_lora_adapter", load).status_code == 200
    again = post(fake, "/v1/load_lora_adapter", load)
    assert again.status_code == 400 and "has already been loaded" in again.json()["error"]["message"]
    assert post(fake, "/v1/completions", {"model": "ft", "prompt": "a"}).status_code == 200
    (adapter / "adapter_config.json").write_text('{"r": 32}')
    too_big = post(fake, "/v1/load_lora_adapter", {"lora_name": "ft32", "lora_path": str(adapter)})
    assert (
        too_big.status_code == 500 and "greater than max_lora_rank 16" in too_big.json()["error"]["message"]
    )


# -- finding 3: stop strings within vLLM's limit ---------------------------------------------------------


def test_config_allows_at_most_four_stop_strings() -> None:
    with pytest.raises(ValidationError, match="at most 4 items"):
        SamplingParams(stop=("a", "b", "c", "d", "e"))
    with pytest.raises(ValidationError):
        BootstrapConfig.model_validate({"instance_sampling": {"stop": ["1", "2", "3", "4", "5"]}})
    assert len(BootstrapConfig().instruction_sampling.stop) <= 4


def test_preflight_sends_the_rounds_stop_strings(fake_openai: FakeFactory) -> None:
    fake = fake_openai(vllm=VLLMMode(max_stop_strings=2))
    with pytest.raises(typer.Exit):
        check_llm_servers([fake.url], "fake-model", Settings(), ("x", "y", "z"))
    assert fake.refused[400] == 1
    check_llm_servers([fake.url], "fake-model", Settings(), ("x", "y"))


def test_preflight_names_the_served_models_on_a_404(
    fake_openai: FakeFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = fake_openai(vllm=VLLMMode(), models=("smollm2-135m-instruct",))
    with pytest.raises(typer.Exit):
        check_llm_servers([fake.url], "HuggingFaceTB/SmolLM2-135M-Instruct", Settings())
    assert "it serves: smollm2-135m-instruct" in capsys.readouterr().err.replace("\n", "")


# -- finding 5: one prompt that does not fit loses only itself ------------------------------------------


def test_a_prompt_over_the_context_is_rejected_alone_and_the_rest_complete(fake_openai: FakeFactory) -> None:
    fake = fake_openai(vllm=VLLMMode(max_model_len=60))
    prompts = ["Task one:", " ".join(["long"] * 61), "Task three:", "Task four:"]
    cache = MemoryCache()
    records = run(generate_with(client_for(fake), requests_for(prompts), PARAMS, cache, 4, 1))
    assert [r.rejected for r in records] == [None, "prompt_too_long", None, None]
    assert all(r.text for i, r in enumerate(records) if i != 1) and records[1].text == ""
    assert fake.requests == 1 + 4  # the batch, then each prompt alone
    assert len(cache.records) == 3  # a refused prompt is not cached: a later run may serve it


def test_a_request_wide_400_still_fails_the_batch(fake_openai: FakeFactory) -> None:
    fake = fake_openai(vllm=VLLMMode(max_stop_strings=1))
    params = PARAMS.model_copy(update={"stop": ("x", "y")})
    with pytest.raises(LLMError, match="at most 1 items") as info:
        run(generate_with(client_for(fake), requests_for(["a", "b"]), params, None, 2, 1))
    assert not info.value.retryable and info.value.status == 400


def test_rejection_reasons_from_vllm_and_llama_cpp_messages() -> None:
    assert rejection_reason("This model's maximum context length is 2048 tokens. However, ...") == (
        "prompt_too_long"
    )
    assert rejection_reason("The decoder prompt (length 9) ... is longer than the maximum model length of 9.")
    assert rejection_reason("the request exceeds the available context size, try increasing it")
    assert rejection_reason("1 validation error: stop") is None


# -- finding 6: the model's generation config cannot change the sampling ---------------------------------


def test_every_sampling_field_is_sent_so_the_models_generation_config_does_not_apply(
    fake_openai: FakeFactory,
) -> None:
    fake = fake_openai(
        vllm=VLLMMode(generation_config={"top_k": 20, "min_p": 0.1, "repetition_penalty": 1.3})
    )
    run(generate_with(client_for(fake), requests_for(["a"]), PARAMS, None, 1, 1))
    applied = fake.effective_sampling[-1]
    assert set(applied) == set(VLLM_SAMPLING_DEFAULTS)
    assert applied == {name: getattr(PARAMS, name) for name in VLLM_SAMPLING_DEFAULTS}


def test_every_sampling_field_is_part_of_the_cache_key() -> None:
    base = completion_key("m", "p", PARAMS, 1, api="completions")
    for change in ({"top_k": 40}, {"min_p": 0.05}, {"repetition_penalty": 1.1}, {"stop": ("x",)}):
        assert completion_key("m", "p", PARAMS.model_copy(update=change), 1, api="completions") != base


# -- finding 7: throughput sized to the server ----------------------------------------------------------


def test_metrics_are_read_from_the_stand_ins_gauges(fake_openai: FakeFactory) -> None:
    fake = fake_openai(vllm=VLLMMode())
    page = httpx.get(f"{fake.url.removesuffix('/v1')}/metrics", timeout=5).text
    assert parse_vllm_metrics(page) is not None
    two_engines = (
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 4.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
    )
    loads = parse_vllm_metrics(two_engines)
    assert loads is not None and (loads.running, loads.waiting) == (7, 2)
    assert parse_vllm_metrics("# no vllm here\nprocess_cpu_seconds_total 1.0\n") is None


def test_plan_fills_one_large_gpu() -> None:
    batch, concurrency = plan_throughput(1024, servers=1)
    assert batch * concurrency >= 1024 * 1.25 and batch <= 64
    assert plan_throughput(1024, servers=1, busy=1000)[1] < concurrency
    assert plan_throughput(256, servers=2)[1] >= 8


def test_settings_are_sized_from_a_vllm_server_only(fake_openai: FakeFactory) -> None:
    vllm = fake_openai(vllm=VLLMMode())
    sized = size_for_servers(Settings(), [vllm.url])
    assert (sized.llm_batch_size, sized.llm_concurrency) == plan_throughput(1024, 1)
    assert sized.llm_token_ids
    other = fake_openai()
    assert size_for_servers(Settings(), [other.url]) == Settings()
    explicit = size_for_servers(Settings(llm_batch_size=8, llm_concurrency=4), [vllm.url])
    assert (explicit.llm_batch_size, explicit.llm_concurrency, explicit.llm_token_ids) == (8, 4, True)


def test_sized_generation_keeps_the_servers_sequences_busy_without_503s(fake_openai: FakeFactory) -> None:
    limits = VLLMMode(max_num_seqs=64, max_num_queued_reqs=100)
    default = fake_openai(latency_s=0.05, vllm=limits)
    settings = Settings()
    requests = requests_for([f"p{i}" for i in range(400)])
    run(
        generate_with(
            client_for(default), requests, PARAMS, None, settings.llm_batch_size, settings.llm_concurrency
        )
    )
    # The defaults (8 prompts x 4 requests) keep at most half of what this server runs at once.
    assert default.max_unfinished <= 32 < limits.max_num_seqs

    fake = fake_openai(latency_s=0.05, vllm=limits)
    sized = size_for_servers(Settings(llm_server_max_seqs=64), [fake.url])
    client = client_for(fake, max_in_flight=sized.llm_concurrency)
    run(generate_with(client, requests, PARAMS, None, sized.llm_batch_size, sized.llm_concurrency))
    assert fake.max_unfinished > limits.max_num_seqs and fake.refused[503] == 0


# -- finding 8: 501 is not transient; exact token counts -------------------------------------------------


def test_501_is_not_retried(fake_openai: FakeFactory) -> None:
    fake = fake_openai(faults=FaultConfig(script=deque(["501"])))
    with pytest.raises(LLMError, match="HTTP 501") as info:
        run(generate_with(client_for(fake), requests_for(["a"]), PARAMS, None, 1, 1))
    assert not info.value.retryable and fake.requests == 1


def test_token_ids_give_exact_per_prompt_token_counts(fake_openai: FakeFactory) -> None:
    fake = fake_openai(vllm=VLLMMode())
    prompts = ["one", "two words here", "three more words here"]
    records = run(generate_with(client_for(fake, token_ids=True), requests_for(prompts), PARAMS, None, 3, 1))
    assert fake.bodies[-1]["return_token_ids"] is True
    assert [r.prompt_tokens for r in records] == [len(words(p)) for p in prompts]
    assert [r.completion_tokens for r in records] == [len(words(r.text)) for r in records]
    assert len({r.completion_tokens for r in records}) > 1  # not one total spread evenly

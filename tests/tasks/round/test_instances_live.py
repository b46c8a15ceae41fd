"""Both instance-generation paths against the real embedded model: output-first and input-first."""

import asyncio

import pytest

from schemas import BootstrapConfig
from tasks.resources.llm.batch import CompletionRequest, generate
from tasks.resources.llm.client import OpenAICompletionClient
from tasks.round.classify import build_classify_prompt, parse_classification
from tasks.round.instances import build_instance_prompt, parse_instances

pytestmark = pytest.mark.slow

CLASSIFICATION = (
    "Decide whether the customer review is positive or negative. Answer with positive or negative."
)
GENERATION = "Write a short thank-you note to a neighbour who watered your plants."


def _complete(url: str, prompts: list[str], stage: str, params: object) -> list[tuple[str, str | None]]:
    async def run() -> list[tuple[str, str | None]]:
        client = OpenAICompletionClient([url], model="smollm2-135m-instruct")
        try:
            requests = [CompletionRequest(prompt=p, stage=stage, seed=7) for p in prompts]  # type: ignore[arg-type]
            records = await generate(client, requests, params, None, batch_size=2, concurrency=2)  # type: ignore[arg-type]
        finally:
            await client.aclose()
        return [(r.text, r.finish_reason) for r in records]

    return asyncio.run(run())


def test_output_first_and_input_first_on_the_embedded_model(embedded_llm: str) -> None:
    config = BootstrapConfig()
    answers = _complete(
        embedded_llm,
        [build_classify_prompt(CLASSIFICATION), build_classify_prompt(GENERATION)],
        "classify",
        config.classify_sampling,
    )
    assert all(isinstance(parse_classification(text), bool) for text, _ in answers)

    prompts = [build_instance_prompt(CLASSIFICATION, True, 3), build_instance_prompt(GENERATION, False, 3)]
    assert "Class label:" in prompts[0] and "Class label:" not in prompts[1]
    params = config.instance_sampling.model_copy(update={"max_tokens": 200})
    (labels_text, labels_finish), (io_text, io_finish) = _complete(embedded_llm, prompts, "instance", params)
    output_first = parse_instances(labels_text, True, labels_finish)
    input_first = parse_instances(io_text, False, io_finish)
    # Greedy decoding on the shipped model: both paths yield usable (input, output) pairs.
    assert output_first and all(output for _, output in output_first)
    assert input_first and all(output for _, output in input_first)

"""Rounds against the vLLM stand-in: a prompt over the context, sizing, generating with an adapter."""

import json
from pathlib import Path
from typing import Any

import pytest

from flows.bootstrap import bootstrap_round
from schemas import BootstrapConfig, RoundParams, Settings
from tasks.resources.store.rounds import Store
from tasks.round.pool import load_pool
from tasks.round.records import plan_instruction_prompts
from tasks.round.seeds import load_seeds
from tasks.round.steps import generation_model
from tasks.training.register import register_with_vllm
from tests.support.fake_vllm import VLLMMode, words
from tests.support.model_like import ModelLikeFake

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SERVED = Settings().model  # what `llm serve --engine vllm` serves the default model as


def _config(seed: int) -> BootstrapConfig:
    # max_tokens under the small test context: vLLM refuses any request asking for more than max_model_len.
    defaults = BootstrapConfig()
    return BootstrapConfig(
        prompts_per_round=6,
        seed=seed,
        instruction_sampling=defaults.instruction_sampling.model_copy(update={"max_tokens": 64}),
        instance_sampling=defaults.instance_sampling.model_copy(update={"max_tokens": 64}),
    )


LONG_SEED = "seed_task_0"
CONTEXT = 900  # above every classify and instance prompt, below an instruction prompt that shows LONG_SEED


def _seeds_with_one_long_task(folder: Path) -> Path:
    """40 of the shipped seeds, the first one padded to over CONTEXT words."""
    lines = (ROOT / "seeds" / "seed_tasks.jsonl").read_text().splitlines()[:40]
    first = json.loads(lines[0])
    assert first["id"] == LONG_SEED
    first["instruction"] += " " + " ".join(["detail"] * CONTEXT)
    path = folder / "seeds.jsonl"
    path.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    return path


def _one_prompt_too_long(store_url: str, seeds_path: Path) -> BootstrapConfig:
    """A config whose round-1 instruction prompts show the long seed in exactly one prompt."""
    seeds, _ = load_seeds(seeds_path)
    pool = load_pool(Store(store_url), seeds, "rouge")
    for seed in range(42, 242):
        plans = plan_instruction_prompts(pool, _config(seed), 1)
        if sum(LONG_SEED in p.in_context_ids for p in plans) == 1:
            return _config(seed)
    raise AssertionError("no seed shows the long task in exactly one prompt")


def test_a_prompt_over_the_context_is_rejected_and_the_round_goes_on(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 5: vLLM refuses the whole batch; the round sends each prompt alone and loses only that one."""
    # One request in flight: the six instruction prompts go out as one batch (with more slots than
    # requests, a round this small sends its prompts one a slot, and there would be no batch to refuse).
    monkeypatch.setenv("SELFINSTRUCT_LLM_BATCH_SIZE", "8")
    monkeypatch.setenv("SELFINSTRUCT_LLM_CONCURRENCY", "1")
    store_url = str(tmp_path / "store")
    seeds_path = _seeds_with_one_long_task(tmp_path)
    config = _one_prompt_too_long(store_url, seeds_path)
    params = RoundParams(store_url=store_url, seeds_path=str(seeds_path), config=config)
    with ModelLikeFake(vllm=VLLMMode(max_model_len=CONTEXT), models=(SERVED,)) as fake:
        summary = bootstrap_round(params.model_copy(update={"llm_urls": [fake.url]}))
    assert fake.refused[400] == 2  # the batch, then the prompt alone
    store = Store(store_url)
    assert store.committed_rounds() == [summary["round"]] == [1]
    rejected = store.read_table(1, "rejected").to_pylist()
    too_long = [r for r in rejected if r["reason"] == "prompt_too_long"]
    assert [r["stage"] for r in too_long] == ["instruction"]
    counts: Any = summary["counts"]
    assert counts["rejected:instruction:prompt_too_long"] == 1 and counts["kept"] >= 1
    requests = store.read_table(1, "requests").to_pylist()
    refused = [r for r in requests if r["rejected"]]
    assert [r["key"] for r in refused] == [too_long[0]["request_key"]]
    # Sized to vLLM: token ids were asked for, so every answered prompt carries its own exact count.
    answered = [r for r in requests if not r["rejected"]]
    assert all(r["prompt_tokens"] == len(words(r["prompt"])) for r in answered)


def test_a_round_generates_with_a_registered_adapter(prefect_server: None, tmp_path: Path) -> None:
    """Item 4: `adapter=<finetune id>` sends the adapter's name, which vLLM serves once it is registered."""
    store_url = str(tmp_path / "store")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    mode = VLLMMode(runtime_lora_updating=True)
    with ModelLikeFake(vllm=mode, models=(SERVED,)) as fake:
        register_with_vllm(fake.url, "ft-20261202-000000-abcd", str(adapter))
        config = BootstrapConfig(prompts_per_round=3, adapter="ft-20261202-000000-abcd")
        bootstrap_round(RoundParams(store_url=store_url, llm_urls=[fake.url], config=config))
        assert {b["model"] for b in fake.bodies} == {"ft-20261202-000000-abcd"}
    assert Store(store_url).read_manifest(1).model == "ft-20261202-000000-abcd"


def test_latest_adapter_needs_a_trained_finetune(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    settings = Settings()
    assert generation_model(BootstrapConfig(), settings, store) == settings.model
    assert generation_model(BootstrapConfig(model="m", adapter="ft-1"), settings, store) == "ft-1"
    with pytest.raises(ValueError, match="no trained fine-tune yet"):
        generation_model(BootstrapConfig(adapter="latest"), settings, store)

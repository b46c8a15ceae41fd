"""Registering an adapter with a vLLM server (a fake speaking vLLM's LoRA endpoints on 127.0.0.1)."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.training import FinetuneParams
from tasks.training.models import FinetuneError
from tasks.training.register import register_with_vllm
from tests.support.fake_openai import FakeOpenAI
from tests.support.fake_vllm import VLLMMode


def _adapter(folder: Path, rank: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return str(folder)


def test_register_with_vllm_is_idempotent(tmp_path: Path) -> None:
    """Finding 1: a retried registration gets vLLM's 400 "already been loaded", which is success."""
    with FakeOpenAI(vllm=VLLMMode(runtime_lora_updating=True), api_key="secret") as fake:
        register_with_vllm(fake.url, "ft-a", _adapter(tmp_path / "a", 8), api_key="secret")
        register_with_vllm(
            fake.url.removesuffix("/v1"), "ft-a", _adapter(tmp_path / "a", 8), api_key="secret"
        )
        assert fake.adapters == {"ft-a": str(tmp_path / "a")}
        with pytest.raises(FinetuneError, match=r"refused adapter ft-b: 500.*greater than max_lora_rank 16"):
            register_with_vllm(fake.url, "ft-b", _adapter(tmp_path / "b", 32), api_key="secret")
        with pytest.raises(FinetuneError, match=r"refused adapter ft-c: 404.*No adapter found"):
            register_with_vllm(fake.url, "ft-c", str(tmp_path / "missing"), api_key="secret")
    with pytest.raises(FinetuneError, match=r"vLLM at http://127\.0\.0\.1:1/v1"):
        register_with_vllm("http://127.0.0.1:1", "ft-c", "/x", timeout_s=2)


def test_register_with_a_vllm_without_runtime_lora_says_how_to_start_it(tmp_path: Path) -> None:
    with (
        FakeOpenAI(vllm=VLLMMode(runtime_lora_updating=False)) as fake,
        pytest.raises(FinetuneError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=true"),
    ):
        register_with_vllm(fake.url, "ft-a", _adapter(tmp_path / "a", 8))


def test_lora_rank_is_checked_against_the_servers_limit_before_training() -> None:
    """Finding 4: vLLM refuses an adapter above its --max-lora-rank; find out before training, not after."""
    with pytest.raises(ValidationError, match=r"lora_r=32 is above the vLLM server's max LoRA rank \(16\)"):
        FinetuneParams(vllm_url="http://127.0.0.1:8000/v1", lora_r=32)
    assert FinetuneParams(vllm_url="http://127.0.0.1:8000/v1", lora_r=32, vllm_max_lora_rank=64).lora_r == 32
    assert FinetuneParams(lora_r=32).lora_r == 32  # nothing to register with, nothing to check

"""Pytest fixtures for LLM servers: the real embedded llama.cpp server, and the fault-injecting fake."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.resources.servers.embedded import EmbeddedServer
from tests.support.fake_openai import FakeOpenAI

FakeFactory = Callable[..., FakeOpenAI]


@pytest.fixture(scope="session")
def embedded_llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real embedded server (SmolLM2-135M, 4 slots of 2048 tokens), shared by the whole session.

    Yields:
        Its base URL, e.g. "http://127.0.0.1:41234/v1".
    """
    cache_dir: Path = tmp_path_factory.mktemp("models")
    with EmbeddedServer(parallel=4, ctx_per_slot=2048, cache_dir=cache_dir) as server:
        yield server.url


@pytest.fixture
def fake_openai() -> Iterator[FakeFactory]:
    """Factory of started fake OpenAI servers: `fake_openai(latency_s=0.1, faults=FaultConfig(...))`.

    Every server it made is stopped when the test ends.
    """
    started: list[FakeOpenAI] = []

    def make(**kwargs: Any) -> FakeOpenAI:
        fake = FakeOpenAI(**kwargs)
        fake.start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()

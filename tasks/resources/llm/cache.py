"""What identifies a finished completion for caching: its key, and the protocol of a completion cache."""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring  # json.dumps(str, ensure_ascii=False), without the encoder setup
from typing import Protocol

from schemas import CompletionRecord, SamplingParams
from schemas.settings import LLMApi

# Bump when the meaning of a cached completion changes (e.g. what the request body carries).
# 2: top_k, min_p and repetition_penalty are sent with every request.
# 3: the api (completions or chat) is part of the key: a chat model's answer to a prompt as a user message is
#    not its continuation of the same text. (Every completion cached under version 2 is sent again.)
_KEY_VERSION = 3


class CompletionCache(Protocol):
    """Where finished completions are kept so that a rerun sends only what is missing."""

    def get_many(self, keys: list[str]) -> dict[str, CompletionRecord]:
        """Return the records found for `keys` (missing keys are absent from the result)."""
        ...

    def put_many(self, records: list[CompletionRecord]) -> None:
        """Store records; called from the event loop as soon as each HTTP batch returns, so keep it quick."""
        ...


class MemoryCache:
    """A `CompletionCache` in memory: for one process's work that need not survive it (tests, benchmarks)."""

    def __init__(self) -> None:
        self.records: dict[str, CompletionRecord] = {}

    def get_many(self, keys: list[str]) -> dict[str, CompletionRecord]:
        """The records kept for `keys`."""
        return {k: self.records[k] for k in keys if k in self.records}

    def put_many(self, records: list[CompletionRecord]) -> None:
        """Keep `records`, a later one replacing an earlier one with the same key."""
        self.records.update((r.key, r) for r in records)


def completion_key(model: str, prompt: str, params: SamplingParams, seed: int | None, *, api: LLMApi) -> str:
    """Cache key of a completion: sha256 hex of a canonical JSON of everything that determines it.

    Args:
        model: Model name sent to the server.
        prompt: Prompt text.
        params: Decoding parameters.
        seed: Sampling seed, or None.
        api: The endpoint that completes it ("completions" or "chat").

    Returns:
        64 lowercase hex characters; equal inputs give equal keys across processes and Python versions.
    """
    return CompletionKeys(model, params, api=api)(prompt, seed)


class CompletionKeys:
    """`completion_key` for many prompts of one model, params and api.

    The canonical JSON is `{"api":..,"model":..,"params":..,"prompt":..,"seed":..,"v":..}` (keys sorted, no
    spaces, not ASCII-escaped): everything around the prompt is encoded once per seed, not once per prompt,
    which made the key the client's largest own cost per request (~85 us each, two per prompt).
    """

    def __init__(self, model: str, params: SamplingParams, *, api: LLMApi) -> None:
        self._head = _canonical({"api": api, "model": model, "params": params.model_dump(mode="json")})
        self._tails: dict[int | None, str] = {}

    def __call__(self, prompt: str, seed: int | None) -> str:
        """The key of `prompt` sampled with `seed`."""
        tail = self._tails.get(seed)
        if tail is None:
            tail = self._tails[seed] = _canonical({"seed": seed, "v": _KEY_VERSION})
        canonical = f'{self._head[:-1]},"prompt":{encode_basestring(prompt)},{tail[1:]}'
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

"""The HTTP client of OpenAI-compatible servers: one request per call, spread over the servers, retried with
backoff on transient faults, and the preflight check of a server before a round writes anything."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
from pydantic import SecretStr

from schemas import CompletionRecord, SamplingParams, Settings
from schemas.records import Stage
from schemas.settings import LLMApi
from tasks.resources.llm.cache import CompletionKeys, completion_key
from tasks.resources.llm.protocol import (
    ENDPOINTS,
    MAX_ERROR_CHARS,
    RETRY_STATUSES,
    Answer,
    LLMError,
    TransientError,
    choice_text,
    context_length,
    encodable,
    error_text,
    is_transient,
    match_choices,
    models_answer,
    request_body,
    retry_after,
    served_models_hint,
    token_counts,
)
from tasks.resources.llm.slots import StageSlots
from tasks.resources.redact import redact_url

log = logging.getLogger(__name__)

# Idle connections are dropped after this: below the 5 s after which llama.cpp (cpp-httplib) and vLLM
# (uvicorn) close them, so that a request never goes out on a connection the server is closing.
_KEEPALIVE_S = 4.0


def check_base_url(url: str) -> str:
    """An OpenAI-compatible base URL, checked before any request: http(s), a host, a path ending in /v1,
    no credentials (they would be stored with the flow's parameters). Returns it without a trailing slash.

    Raises:
        LLMError: Saying what is wrong (not retryable).
    """
    shown = re.sub(r"//[^/@]*@", "//***@", url)[:MAX_ERROR_CHARS]
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as error:
        raise LLMError(f"LLM URL {shown!r} is not a valid URL ({error})", retryable=False) from None
    if parts.scheme not in ("http", "https") or not host:
        raise LLMError(f"LLM URL {shown!r}: expected http(s)://host[:port]/v1", retryable=False)
    if parts.username or parts.password:
        raise LLMError(
            f"LLM URL {redact_url(url)}: put the API key in SELFINSTRUCT_API_KEY, not in the URL",
            retryable=False,
        )
    if not parts.path.rstrip("/").endswith("/v1"):
        raise LLMError(
            f"LLM URL {redact_url(url)}: the base URL of an OpenAI-compatible server ends in /v1 "
            f"(e.g. http://{host}{f':{port}' if port else ''}/v1)",
            retryable=False,
        )
    return url.rstrip("/")


class OpenAICompletionClient:
    """Async client for the /v1/completions (or /v1/chat/completions) endpoint of OpenAI-compatible servers.

    One `complete` call is one HTTP request carrying a list of prompts (one prompt with the chat api), sent to
    the base URL with the fewest requests in flight, and retried with exponential backoff and jitter on
    transient faults.
    """

    def __init__(
        self,
        base_urls: list[str],
        model: str,
        api_key: SecretStr | None = None,
        timeout_s: float = 600,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        *,
        max_in_flight: int | None = None,
        max_backoff_s: float = 30.0,
        token_ids: bool = False,
        api: LLMApi = "completions",
    ) -> None:
        """Create the client; no connection is made until the first request.

        Args:
            base_urls: OpenAI-compatible base URLs ending in /v1; requests are spread over them.
            model: Model name sent in every request.
            api_key: Sent as `Authorization: Bearer ...`; never appears in errors or records.
            timeout_s: Wall-clock limit of one HTTP request, including reading the whole answer.
            max_retries: Retries after the first attempt on connection errors, timeouts, 408/429/5xx,
                malformed JSON and missing choices.
            backoff_s: First retry delay; doubles per retry, with jitter, capped at `max_backoff_s`.
            max_in_flight: Cap on HTTP requests in flight across every caller sharing this client, a freed
                slot going to classification, then instructions, then instances (see `StageSlots`; None:
                only the callers' own concurrency limits apply).
            max_backoff_s: Longest wait between two attempts, also the cap on a server's Retry-After.
            token_ids: Ask for the token ids of every prompt and completion (vLLM's `return_token_ids`), so
                that each record carries exact token counts instead of a share of the request's usage.
            api: "completions" sends a list of prompts per request to /completions; "chat" sends each prompt
                alone to /chat/completions as one user message (a chat request is one conversation).
        """
        if not base_urls:
            raise ValueError("no LLM base URL given: start the embedded server or set SELFINSTRUCT_LLM_URL")
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.token_ids = token_ids
        self.api: LLMApi = api
        self._endpoint = ENDPOINTS[api]
        self._in_flight = dict.fromkeys(self.base_urls, 0)
        self._public_urls = {u: redact_url(u) for u in self.base_urls}
        self._tie_break = itertools.count()
        self._limit = StageSlots(max_in_flight) if max_in_flight else None
        self._secrets = [s for s in self._url_passwords() if s]
        bearer = {}
        if api_key is not None and api_key.get_secret_value():
            bearer["Authorization"] = f"Bearer {api_key.get_secret_value()}"
            self._secrets.append(api_key.get_secret_value())
        # Credentials in a URL are sent as Basic auth instead of the key (aiohttp refuses both at once).
        self._headers = {u: {} if urlsplit(u).password else bearer for u in self.base_urls}
        self._http: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, base_urls: list[str], *, max_in_flight: int | None = None
    ) -> OpenAICompletionClient:
        """Build a client from the infrastructure settings.

        Args:
            settings: Model name, API key, timeout and retry count come from here.
            base_urls: The servers to use (the embedded server's URL, or `settings.llm_urls()`).
            max_in_flight: Cap on HTTP requests in flight across the client's callers (None: no cap).
        """
        return cls(
            base_urls,
            settings.model,
            api_key=settings.api_key,
            timeout_s=settings.llm_timeout_s,
            max_retries=settings.llm_max_retries,
            token_ids=settings.llm_token_ids,
            max_in_flight=max_in_flight,
            api=settings.llm_api,
        )

    def in_flight(self) -> dict[str, int]:
        """HTTP requests in flight per base URL (credentials removed), for progress displays and tests."""
        return {redact_url(u): n for u, n in self._in_flight.items()}

    async def aclose(self) -> None:
        """Close the connections."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _session(self) -> aiohttp.ClientSession:
        # aiohttp's client, not httpx's: against a server answering 64 requests at once, httpx spent 2 ms of
        # CPU per request here (and 11 ms with one pool of 64 connections), aiohttp 0.3 ms. Created on first
        # use, inside the event loop that uses it.
        if self._http is None:
            https = any(u.startswith("https:") for u in self.base_urls)
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0,  # the callers' semaphores bound the requests in flight
                    keepalive_timeout=_KEEPALIVE_S,
                    # httpx's context (certifi's CA bundle), as before; loading it takes tens of ms.
                    ssl=httpx.create_ssl_context() if https else True,
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=min(self.timeout_s, 30.0), sock_read=self.timeout_s
                ),
            )
        return self._http

    async def _exchange(self, method: str, url: str, timeout_s: float, **kwargs: Any) -> Answer:
        """One HTTP exchange, read whole within `timeout_s` (raises TimeoutError and aiohttp.ClientError)."""
        # aiohttp's timeouts bound each read; this bounds the whole request, for servers that dribble.
        async with asyncio.timeout(timeout_s):
            async with self._session().request(method, url, allow_redirects=False, **kwargs) as response:
                body = await response.read()
                headers = response.headers
                return Answer(
                    response.status, headers.get("Content-Type", ""), body, headers.get("Retry-After")
                )

    async def complete(
        self, prompts: list[str], params: SamplingParams, seed: int | None, stage: Stage
    ) -> list[CompletionRecord]:
        """Complete a list of prompts with ONE HTTP request (retried as a whole on transient faults).

        Args:
            prompts: Prompts of the request; the server's choices are matched to them by `index`. Exactly
                one with the chat api (`complete_isolating` sends a batch's prompts side by side).
            params: Decoding parameters.
            seed: Seed of the request, or None to let the server pick.
            stage: Recorded on every returned record.

        Returns:
            One record per prompt, in prompt order.

        Raises:
            LLMError: On a 4xx other than 408/429 (with the server's message; not retried), or once
                `max_retries` retries have failed.
            ValueError: More than one prompt with the chat api.
        """
        if not prompts:
            return []
        body = self._body(prompts, params, seed)
        key_of = CompletionKeys(self.model, params, api=self.api)
        keys = [key_of(p, seed) for p in prompts]
        attempt = 0
        while True:
            try:
                return await self._attempt(prompts, keys, body, seed, stage)
            except TransientError as exc:
                if attempt >= self.max_retries:
                    raise LLMError(
                        self._redact(f"{len(prompts)} prompts failed after {attempt + 1} attempts: {exc}"),
                        retryable=True,
                    ) from None
                delay = self._backoff(attempt, exc.retry_after_s)
                log.warning("retrying in %.2fs (attempt %d): %s", delay, attempt + 1, self._redact(str(exc)))
                await asyncio.sleep(delay)
                attempt += 1

    def _body(self, prompts: list[str], params: SamplingParams, seed: int | None) -> bytes:
        # Encoded once per request, not once per attempt.
        body = request_body(self.api, self.model, prompts, params, seed, self.token_ids)
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.max_backoff_s)
        # Jitter spreads the retries of many concurrent requests that failed together.
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    def _pick_url(self) -> str:
        fewest = min(self._in_flight.values())
        idle = [u for u in self.base_urls if self._in_flight[u] == fewest]
        # Rotating among equally loaded servers spreads the first wave, when all are at zero.
        return idle[next(self._tie_break) % len(idle)]

    @contextlib.asynccontextmanager
    async def _slot(self, stage: Stage) -> AsyncIterator[str]:
        async with self._limit.hold(stage) if self._limit is not None else contextlib.nullcontext():
            url = self._pick_url()
            self._in_flight[url] += 1
            try:
                yield url
            finally:
                self._in_flight[url] -= 1

    async def _attempt(
        self, prompts: list[str], keys: list[str], body: bytes, seed: int | None, stage: Stage
    ) -> list[CompletionRecord]:
        async with self._slot(stage) as url:
            request_id = uuid.uuid4().hex
            sent_at = time.time()
            start = time.perf_counter()
            data = await self._post(url, body, request_id)
            latency = time.perf_counter() - start
        # The slot is free: let a request waiting for it go out before this one's records are built.
        await asyncio.sleep(0)
        choices = match_choices(data, len(prompts))
        per_prompt, per_choice, cached = token_counts(data, choices)
        public_url = self._public_urls[url]
        return [
            CompletionRecord(
                key=key,
                stage=stage,
                request_id=request_id,
                prompt=prompt,
                text=encodable(choice_text(choice) or ""),
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=n_prompt,
                completion_tokens=n,
                latency_s=latency,
                sent_at=sent_at,
                received_at=sent_at + latency,
                cached_prompt_tokens=cached,
                model=self.model,
                base_url=public_url,
                seed=seed,
            )
            for prompt, key, choice, n, n_prompt in zip(
                prompts, keys, choices, per_choice, per_prompt, strict=True
            )
        ]

    def refused(
        self, prompt: str, params: SamplingParams, seed: int | None, stage: Stage, reason: str
    ) -> CompletionRecord:
        """The record of a prompt the server refused: no text, `rejected` set to `reason`."""
        return CompletionRecord(
            key=completion_key(self.model, prompt, params, seed, api=self.api),
            stage=stage,
            request_id="",
            prompt=prompt,
            text="",
            finish_reason=None,
            prompt_tokens=0,
            completion_tokens=0,
            latency_s=0.0,
            model=self.model,
            base_url="",
            seed=seed,
            rejected=reason,
        )

    async def _post(self, url: str, body: bytes, request_id: str) -> dict[str, Any]:
        try:
            response = await self._exchange(
                "POST",
                f"{url}{self._endpoint}",
                self.timeout_s,
                data=body,
                headers={
                    **self._headers[url],
                    "Content-Type": "application/json",
                    "X-Request-Id": request_id,
                },
            )
        except TimeoutError:
            raise TransientError(f"{redact_url(url)}: no answer within {self.timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"{redact_url(url)}: {type(exc).__name__}: {exc}") from None
        status = response.status
        if is_transient(status):
            raise TransientError(
                f"{redact_url(url)} answered HTTP {status}: {error_text(response)}", retry_after(response)
            )
        if status >= 400:
            raise LLMError(
                self._redact(
                    f"{redact_url(url)} rejected the request (HTTP {status}): {error_text(response)}"
                ),
                retryable=False,
                status=status,
            )
        try:
            data = response.json()
        except ValueError:
            raise TransientError(f"{redact_url(url)}: malformed JSON: {response.text[:100]!r}") from None
        if not isinstance(data, dict):
            raise TransientError(f"{redact_url(url)}: expected a JSON object, got {type(data).__name__}")
        return data

    async def preflight(self, stop: tuple[str, ...] = ()) -> int | None:
        """Check every base URL before a round writes anything: it must be a /v1 URL whose GET /models answers
        JSON in OpenAI's shape, and a one-token request to the configured endpoint (completions or chat)
        must not be refused (4xx: unknown model, wrong API key, no such endpoint). Transient answers (5xx or
        429 in JSON, a timeout on the completion) pass: the round's retries deal with those.

        Returns:
            The smallest context window the servers report for the model, or None when none reports one.

        Raises:
            LLMError: Not retryable; the message quotes at most ~200 characters of a server's answer.
        """
        windows = []
        for url in self.base_urls:
            check_base_url(url)
            shown = redact_url(url)
            try:
                response = await self._exchange(
                    "GET", f"{url}/models", min(self.timeout_s, 10.0), headers=self._headers[url]
                )
            except (TimeoutError, aiohttp.ClientError) as error:
                raise LLMError(
                    f"LLM server {shown} is unreachable ({type(error).__name__})", retryable=False
                ) from None
            entries = models_answer(response)
            status = response.status
            if entries is None:
                transient = status in RETRY_STATUSES or status >= 500
                if not (transient and "json" in response.content_type):
                    kind = (response.content_type or "no content type").split(";")[0]
                    raise LLMError(
                        self._redact(
                            f"LLM server {shown}: GET /models did not answer like an OpenAI-compatible "
                            f"server (HTTP {status}, {kind}): {error_text(response)!r}"
                        ),
                        retryable=False,
                    )
            else:
                window = context_length(entries, self.model)
                if window:
                    windows.append(window)
            # The check carries `stop` (the most stop strings a stage of the round sends), so a server that
            # allows fewer (vLLM: 4) refuses it here rather than midway through the round.
            body = self._body(["Say OK."], SamplingParams(max_tokens=1, stop=stop), None)
            try:
                await self._post(url, body, uuid.uuid4().hex)
            except TransientError:
                pass
            except LLMError as error:
                hint = ""
                if error.status == 404:
                    served = {str(e["id"]) for e in entries or []}
                    hint = (
                        f"; it serves {self.model} but not {self._endpoint} (see SELFINSTRUCT_LLM_API)"
                        if self.model in served
                        else served_models_hint(entries)
                    )
                raise LLMError(
                    f"LLM server check failed: {error}{hint}", retryable=False, status=error.status
                ) from None
        return min(windows) if windows else None

    def _url_passwords(self) -> list[str]:
        return [urlsplit(u).password or "" for u in self.base_urls]

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

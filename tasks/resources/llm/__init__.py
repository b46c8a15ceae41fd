"""Completions from OpenAI-compatible servers: cache keys, an async client, and batched concurrent generation.

Pure async code first (usable without Prefect's engine), thin Prefect wrappers at the bottom.

Seeds: OpenAI-compatible servers (vLLM, llama.cpp) take ONE `seed` per HTTP request, not one per prompt, so
`generate` groups requests by (seed, stage) and every batch carries one seed. The intended use is one seed per
stage of a round (derived from the config's base seed and the round number), with the per-prompt variation in
the prompt itself; per-prompt seeds work too but then every batch holds a single prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import itertools
import json
import logging
import random
import re
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import SecretStr

from schemas import CompletionRecord, SamplingParams, Settings
from schemas.records import Stage
from tasks.resources.redact import redact_url

# on_progress(done, total, tokens): requests done of total, and completion tokens the server has generated so
# far in this call (cached completions count as done but add no tokens, so tokens/s stays a real rate).
ProgressCallback = Callable[[int, int, int], None]
T = TypeVar("T")

log = logging.getLogger(__name__)

# Bump when the meaning of a cached completion changes (e.g. what the request body carries).
# 2: top_k, min_p and repetition_penalty are sent with every request.
_KEY_VERSION = 2
# HTTP statuses worth retrying: overload, rate limits, server faults. Every other 4xx is the caller's fault.
_RETRY_STATUSES = frozenset({408, 429})
# 501 Not Implemented is what vLLM answers for a feature it lacks (NotImplementedError in
# entrypoints/serve/exception_handling/error_response.py `create_error_response`): the same every time.
_PERMANENT_5XX = frozenset({501})
# 400 messages that blame one prompt rather than the request: vLLM's context-length checks
# (renderers/params.py `TokenizeParams._token_len_check` / `_text_len_check`, v1/engine/input_processor.py),
# and llama.cpp's.
_PROMPT_REJECTIONS: tuple[tuple[str, str], ...] = (
    ("maximum context length", "prompt_too_long"),
    ("longer than the maximum model length", "prompt_too_long"),
    ("exceeds the available context size", "prompt_too_long"),
)
# Single-prompt requests in flight at once when a refused batch is sent again prompt by prompt.
_ALONE_IN_FLIGHT = 8
# Every `CompletionRecord.rejected` value.
REFUSAL_REASONS = frozenset({"prompt_too_long", "rejected_by_server"})
_MAX_ERROR_CHARS = 200  # of a server's answer quoted in an error line (an HTML page would flood it)
_REQUESTS_PER_POOL = 8
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class CompletionRequest:
    """One prompt to complete.

    Attributes:
        prompt: The full prompt text.
        stage: Which step of the round asks for it (recorded, and batches never mix stages).
        seed: Sampling seed sent with the HTTP request that carries this prompt.
    """

    prompt: str
    stage: Stage
    seed: int | None = None


class CompletionCache(Protocol):
    """Where finished completions are kept so that a rerun sends only what is missing."""

    def get_many(self, keys: list[str]) -> dict[str, CompletionRecord]:
        """Return the records found for `keys` (missing keys are absent from the result)."""
        ...

    def put_many(self, records: list[CompletionRecord]) -> None:
        """Store records; called from the event loop as soon as each HTTP batch returns, so keep it quick."""
        ...


class LLMError(Exception):
    """A completion request failed for good.

    Attributes:
        retryable: False when the server rejected the request itself (a 4xx such as an unknown model), so
            retrying the same request later cannot help; True when retries were exhausted on transient faults.
        status: The HTTP status of a rejection; None for transient faults.
    """

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class _TransientError(Exception):
    """A failure worth retrying; `retry_after_s` comes from the server's Retry-After header, if any."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def completion_key(model: str, prompt: str, params: SamplingParams, seed: int | None) -> str:
    """Cache key of a completion: sha256 hex of a canonical JSON of everything that determines it.

    Args:
        model: Model name sent to the server.
        prompt: Prompt text.
        params: Decoding parameters.
        seed: Sampling seed, or None.

    Returns:
        64 lowercase hex characters; equal inputs give equal keys across processes and Python versions.
    """
    payload = {
        "v": _KEY_VERSION,
        "model": model,
        "prompt": prompt,
        "params": params.model_dump(mode="json"),
        "seed": seed,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def rejection_reason(message: str) -> str | None:
    """The stable reason for a 400 that blames one prompt (e.g. `prompt_too_long`), or None."""
    lowered = message.lower()
    return next((reason for marker, reason in _PROMPT_REJECTIONS if marker in lowered), None)


def check_base_url(url: str) -> str:
    """An OpenAI-compatible base URL, checked before any request: http(s), a host, a path ending in /v1,
    no credentials (they would be stored with the flow's parameters). Returns it without a trailing slash.

    Raises:
        LLMError: Saying what is wrong (not retryable).
    """
    shown = re.sub(r"//[^/@]*@", "//***@", url)[:_MAX_ERROR_CHARS]
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


def _models_answer(response: httpx.Response) -> list[dict[str, Any]] | None:
    """The model entries of a GET /models answer in OpenAI's shape, or None when it is not that shape."""
    if "json" not in response.headers.get("content-type", ""):
        return None
    try:
        data = response.json()
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return None
    entries = data["data"]
    if not all(isinstance(e, dict) and isinstance(e.get("id"), str) for e in entries):
        return None
    return entries


def _context_length(entries: list[dict[str, Any]], model: str) -> int | None:
    """The context window a models answer gives for `model` (vLLM: max_model_len; llama.cpp: n_ctx_train)."""
    for entry in entries:
        if entry.get("id") != model and len(entries) > 1:
            continue
        meta = entry["meta"] if isinstance(entry.get("meta"), dict) else {}
        for value in (entry.get("max_model_len"), entry.get("context_length"), meta.get("n_ctx_train")):
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _served_models_hint(entries: list[dict[str, Any]] | None) -> str:
    """ "; it serves: a, b (...)" from a /v1/models answer, to say which name to use instead."""
    names = [str(e["id"]) for e in entries or []]
    if not names:
        return ""
    return f"; it serves: {', '.join(names[:10])} (set SELFINSTRUCT_MODEL, or the round's model/adapter)"


def _error_text(response: httpx.Response) -> str:
    """The server's own error text: OpenAI's {"error": {"message": ...}}, FastAPI's "detail", or the body."""
    try:
        data = response.json()
    except ValueError:
        data = None
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or data.get("message") or data.get("detail")
    if not message:
        message = response.text.strip() or response.reason_phrase
    return str(message)[:_MAX_ERROR_CHARS]


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _split_evenly(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class OpenAICompletionClient:
    """Async client for the legacy /v1/completions endpoint of one or more OpenAI-compatible servers.

    One `complete` call is one HTTP request carrying a list of prompts, sent to the base URL with the fewest
    requests in flight, and retried with exponential backoff and jitter on transient faults.
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
            max_in_flight: Cap on HTTP requests in flight across every caller sharing this client
                (None: only the callers' own concurrency limits apply).
            max_backoff_s: Longest wait between two attempts, also the cap on a server's Retry-After.
            token_ids: Ask for the token ids of every prompt and completion (vLLM's `return_token_ids`), so
                that each record carries exact token counts instead of a share of the request's usage.
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
        self._in_flight = dict.fromkeys(self.base_urls, 0)
        self._tie_break = itertools.count()
        self._limit = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._secrets = [s for s in self._url_passwords() if s]
        headers = {}
        if api_key is not None and api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
            self._secrets.append(api_key.get_secret_value())
        self._headers = headers
        # httpcore's pool does work proportional to its connection count on every request and release; at 64
        # connections that cost more CPU than the requests themselves. Small pools, added as load grows, keep
        # that cost flat.
        self._pools: list[httpx.AsyncClient] = []
        self._pool_load: list[int] = []
        self._ssl: ssl.SSLContext | None = None

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
        )

    def in_flight(self) -> dict[str, int]:
        """HTTP requests in flight per base URL (credentials removed), for progress displays and tests."""
        return {redact_url(u): n for u, n in self._in_flight.items()}

    async def aclose(self) -> None:
        """Close the connection pools."""
        for pool in self._pools:
            await pool.aclose()
        self._pools, self._pool_load = [], []

    def _new_pool(self) -> httpx.AsyncClient:
        if self._ssl is None:
            # Loading the CA bundle takes tens of ms: once per client, not once per pool.
            self._ssl = httpx.create_ssl_context()
        return httpx.AsyncClient(
            headers=self._headers,
            verify=self._ssl,
            timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 30.0)),
            # A pool never has more than _REQUESTS_PER_POOL requests at once, so it needs no limit of its own.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    @contextlib.contextmanager
    def _pool(self) -> Iterator[httpx.AsyncClient]:
        index = next((i for i, n in enumerate(self._pool_load) if n < _REQUESTS_PER_POOL), None)
        if index is None:
            self._pools.append(self._new_pool())
            self._pool_load.append(0)
            index = len(self._pools) - 1
        self._pool_load[index] += 1
        try:
            yield self._pools[index]
        finally:
            if index < len(self._pool_load):  # aclose() may have emptied the list meanwhile
                self._pool_load[index] -= 1

    async def complete(
        self, prompts: list[str], params: SamplingParams, seed: int | None, stage: Stage
    ) -> list[CompletionRecord]:
        """Complete a list of prompts with ONE HTTP request (retried as a whole on transient faults).

        Args:
            prompts: Prompts of the request; the server's choices are matched to them by `index`.
            params: Decoding parameters.
            seed: Seed of the request, or None to let the server pick.
            stage: Recorded on every returned record.

        Returns:
            One record per prompt, in prompt order.

        Raises:
            LLMError: On a 4xx other than 408/429 (with the server's message; not retried), or once
                `max_retries` retries have failed.
        """
        if not prompts:
            return []
        body = self._body(prompts, params, seed)
        attempt = 0
        while True:
            try:
                return await self._attempt(prompts, body, params, seed, stage)
            except _TransientError as exc:
                if attempt >= self.max_retries:
                    raise LLMError(
                        self._redact(f"{len(prompts)} prompts failed after {attempt + 1} attempts: {exc}"),
                        retryable=True,
                    ) from None
                delay = self._backoff(attempt, exc.retry_after_s)
                log.warning("retrying in %.2fs (attempt %d): %s", delay, attempt + 1, self._redact(str(exc)))
                await asyncio.sleep(delay)
                attempt += 1

    def _body(self, prompts: list[str], params: SamplingParams, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompts,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "frequency_penalty": params.frequency_penalty,
            "presence_penalty": params.presence_penalty,
            # Sent even at their neutral values: vLLM fills every field a request leaves out from the model's
            # generation_config.json (completion/protocol.py `to_sampling_params`), which would make the
            # sampling differ from what the cache key records.
            "top_k": params.top_k,
            "min_p": params.min_p,
            "repetition_penalty": params.repetition_penalty,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if seed is not None:
            body["seed"] = seed
        if self.token_ids:
            body["return_token_ids"] = True
        return body

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
    async def _slot(self) -> AsyncIterator[str]:
        async with self._limit if self._limit is not None else contextlib.nullcontext():
            url = self._pick_url()
            self._in_flight[url] += 1
            try:
                yield url
            finally:
                self._in_flight[url] -= 1

    async def _attempt(
        self,
        prompts: list[str],
        body: dict[str, Any],
        params: SamplingParams,
        seed: int | None,
        stage: Stage,
    ) -> list[CompletionRecord]:
        async with self._slot() as url:
            request_id = uuid.uuid4().hex
            sent_at = time.time()
            start = time.perf_counter()
            data = await self._post(url, body, request_id)
            latency = time.perf_counter() - start
        choices = self._match_choices(data, len(prompts))
        usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
        prompt_counts = [_id_count(c, "prompt_token_ids") for c in choices]
        per_prompt = [n for n in prompt_counts if n is not None]
        if len(per_prompt) != len(choices):
            per_prompt = [_as_count(usage.get("prompt_tokens"))] * len(choices)
        reported = [_first_count(_id_count(c, "token_ids"), _choice_tokens(c)) for c in choices]
        per_choice = [n for n in reported if n is not None]
        if len(per_choice) != len(choices):
            # Servers report one total per request; spread it so that the records add up to it.
            # (llama.cpp reports the FIRST prompt's usage only for a list of prompts.)
            per_choice = _split_evenly(_as_count(usage.get("completion_tokens")), len(prompts))
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        public_url = redact_url(url)
        return [
            CompletionRecord(
                key=completion_key(self.model, prompt, params, seed),
                stage=stage,
                request_id=request_id,
                prompt=prompt,
                text=_encodable(choice["text"]),
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=n_prompt,
                completion_tokens=n,
                latency_s=latency,
                sent_at=sent_at,
                received_at=sent_at + latency,
                cached_prompt_tokens=cached if isinstance(cached, int) and cached >= 0 else None,
                model=self.model,
                base_url=public_url,
                seed=seed,
            )
            for prompt, choice, n, n_prompt in zip(prompts, choices, per_choice, per_prompt, strict=True)
        ]

    def refused(
        self, prompt: str, params: SamplingParams, seed: int | None, stage: Stage, reason: str
    ) -> CompletionRecord:
        """The record of a prompt the server refused: no text, `rejected` set to `reason`."""
        return CompletionRecord(
            key=completion_key(self.model, prompt, params, seed),
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

    async def _post(self, url: str, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        try:
            # httpx's timeout bounds each read; this bounds the whole request, for servers that dribble.
            async with asyncio.timeout(self.timeout_s):
                with self._pool() as http:
                    response = await http.post(
                        f"{url}/completions", json=body, headers={"X-Request-Id": request_id}
                    )
        except TimeoutError:
            raise _TransientError(f"{redact_url(url)}: no answer within {self.timeout_s:g}s") from None
        except httpx.RequestError as exc:
            raise _TransientError(f"{redact_url(url)}: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status in _RETRY_STATUSES or (status >= 500 and status not in _PERMANENT_5XX):
            raise _TransientError(
                f"{redact_url(url)} answered HTTP {status}: {_error_text(response)}", _retry_after(response)
            )
        if status >= 400:
            raise LLMError(
                self._redact(
                    f"{redact_url(url)} rejected the request (HTTP {status}): {_error_text(response)}"
                ),
                retryable=False,
                status=status,
            )
        try:
            data = response.json()
        except ValueError:
            raise _TransientError(f"{redact_url(url)}: malformed JSON: {response.text[:100]!r}") from None
        if not isinstance(data, dict):
            raise _TransientError(f"{redact_url(url)}: expected a JSON object, got {type(data).__name__}")
        return data

    @staticmethod
    def _match_choices(data: dict[str, Any], n: int) -> list[dict[str, Any]]:
        """Order the choices by `index`; anything missing or malformed is a transient fault."""
        choices = data.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise _TransientError("response has no list of choices")
        if choices and all("index" not in c for c in choices) and len(choices) == n:
            by_index = dict(enumerate(choices))  # a server that omits `index` answers in order
        else:
            by_index = {}
            for c in choices:
                index = c.get("index")
                if not isinstance(index, int) or isinstance(index, bool) or index in by_index:
                    raise _TransientError(f"choice with a bad or repeated index: {index!r}")
                by_index[index] = c
        missing = [i for i in range(n) if i not in by_index]
        if missing:
            raise _TransientError(f"{len(missing)} of {n} choices missing (first: index {missing[0]})")
        ordered = [by_index[i] for i in range(n)]
        if not all(isinstance(c.get("text"), str) for c in ordered):
            raise _TransientError("choice without a text string")
        return ordered

    async def preflight(self, stop: tuple[str, ...] = ()) -> int | None:
        """Check every base URL before a round writes anything: it must be a /v1 URL whose GET /models answers
        JSON in OpenAI's shape, and a one-token completion must not be refused (4xx: unknown model, wrong
        API key). Transient answers (5xx or 429 in JSON, a timeout on the completion) pass: the round's
        retries deal with those.

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
                with self._pool() as http:
                    response = await http.get(f"{url}/models", timeout=min(self.timeout_s, 10.0))
            except httpx.TransportError as error:
                raise LLMError(
                    f"LLM server {shown} is unreachable ({type(error).__name__})", retryable=False
                ) from None
            entries = _models_answer(response)
            status = response.status_code
            if entries is None:
                transient = status in _RETRY_STATUSES or status >= 500
                if not (transient and "json" in response.headers.get("content-type", "")):
                    kind = response.headers.get("content-type", "no content type").split(";")[0]
                    raise LLMError(
                        self._redact(
                            f"LLM server {shown}: GET /models did not answer like an OpenAI-compatible "
                            f"server (HTTP {status}, {kind}): {_error_text(response)!r}"
                        ),
                        retryable=False,
                    )
            else:
                window = _context_length(entries, self.model)
                if window:
                    windows.append(window)
            # The check carries `stop` (the most stop strings a stage of the round sends), so a server that
            # allows fewer (vLLM: 4) refuses it here rather than midway through the round.
            body = self._body(["Say OK."], SamplingParams(max_tokens=1, stop=stop), None)
            try:
                await self._post(url, body, uuid.uuid4().hex)
            except _TransientError:
                pass
            except LLMError as error:
                hint = _served_models_hint(entries) if error.status == 404 else ""
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


def _encodable(text: str) -> str:
    """`text` with lone surrogates (JSON can carry "\\ud800"; UTF-8 cannot) replaced by U+FFFD.

    One such character would otherwise fail every Parquet write of the completion, on every rerun.
    """
    return _LONE_SURROGATE.sub("\ufffd", text)


def _as_count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _id_count(choice: dict[str, Any], field: str) -> int | None:
    """Length of a choice's list of token ids (vLLM's `token_ids` / `prompt_token_ids`), when it has one."""
    ids = choice.get(field)
    return len(ids) if isinstance(ids, list) else None


def _first_count(*counts: int | None) -> int | None:
    return next((n for n in counts if n is not None), None)


def _choice_tokens(choice: dict[str, Any]) -> int | None:
    """Completion tokens of one choice, for servers that report them per choice."""
    usage = choice.get("usage")
    value = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _plan_batches(
    requests: Sequence[CompletionRequest], batch_size: int
) -> list[tuple[int | None, Stage, list[str]]]:
    """Group prompts by (seed, stage) in first-seen order and cut each group into batches."""
    groups: dict[tuple[int | None, Stage], list[str]] = {}
    for r in requests:
        groups.setdefault((r.seed, r.stage), []).append(r.prompt)
    return [
        (seed, stage, prompts[i : i + batch_size])
        for (seed, stage), prompts in groups.items()
        for i in range(0, len(prompts), batch_size)
    ]


async def generate(
    client: OpenAICompletionClient,
    requests: list[CompletionRequest],
    params: SamplingParams,
    cache: CompletionCache | None,
    batch_size: int,
    concurrency: int,
    on_progress: ProgressCallback | None = None,
) -> list[CompletionRecord]:
    """Complete every request, sending only what the cache lacks, with a bounded number of requests in flight.

    Requests with the same cache key (same prompt, seed, params and model) are sent once. Batches hold prompts
    of one (seed, stage) group. Each batch's records are written to the cache as soon as it returns, so an
    interrupted round resumes where it stopped.

    Args:
        client: Where to send the prompts.
        requests: What to complete.
        params: Decoding parameters shared by all requests.
        cache: Looked up first, and written after every HTTP request; None disables caching.
        batch_size: Prompts per HTTP request.
        concurrency: HTTP requests in flight at most (for this call).
        on_progress: Called as `(done, total, tokens)`: requests, once after the cache lookup and after each
            batch, and the completion tokens generated by the server so far in this call.

    Returns:
        One record per request, in request order, cached ones included (their `stage` is the request's).

    Raises:
        LLMError: A batch failed for good; the other batches are cancelled, finished ones stay cached. A batch
            the server refuses with a 400 is first retried prompt by prompt (see `complete_isolating`): only
            the prompts it still refuses come back as records with `rejected` set.
    """
    if batch_size < 1 or concurrency < 1:
        raise ValueError("batch_size and concurrency must be at least 1")
    keys = [completion_key(client.model, r.prompt, params, r.seed) for r in requests]
    multiplicity: dict[str, int] = {}
    for k in keys:
        multiplicity[k] = multiplicity.get(k, 0) + 1
    found = cache.get_many(list(multiplicity)) if cache is not None and requests else {}
    results: dict[str, CompletionRecord] = {k: found[k] for k in multiplicity if k in found}

    todo: dict[str, CompletionRequest] = {}
    for k, r in zip(keys, requests, strict=True):
        if k not in results and k not in todo:
            todo[k] = r
    batches = deque(_plan_batches(list(todo.values()), batch_size))
    total = len(requests)
    done = sum(multiplicity[k] for k in results)
    tokens = 0
    if on_progress is not None:
        on_progress(done, total, tokens)

    async def worker() -> None:
        nonlocal done, tokens
        while batches:
            seed, stage, prompts = batches.popleft()
            records = await complete_isolating(client, prompts, params, seed, stage)
            fresh = [r for r in records if r.key not in results]
            for r in fresh:
                results[r.key] = r
            # A refused prompt is not cached: a rerun against a server with a longer context may serve it.
            answered = [r for r in fresh if r.rejected is None]
            if cache is not None and answered:
                cache.put_many(answered)
            done += sum(multiplicity[r.key] for r in fresh)
            tokens += sum(r.completion_tokens for r in fresh)
            if on_progress is not None:
                on_progress(done, total, tokens)

    await _run_all([worker() for _ in range(min(concurrency, len(batches)))])

    out = []
    for k, r in zip(keys, requests, strict=True):
        record = results[k]
        out.append(record if record.stage == r.stage else record.model_copy(update={"stage": r.stage}))
    return out


async def complete_isolating(
    client: OpenAICompletionClient, prompts: list[str], params: SamplingParams, seed: int | None, stage: Stage
) -> list[CompletionRecord]:
    """`client.complete`, but a 400 for the whole batch does not lose the batch.

    vLLM refuses a whole request when one of its prompts does not fit the context. The batch is then sent
    again one prompt per request; a prompt still refused comes back as a record with `rejected` set to the
    reason (`prompt_too_long`, or `rejected_by_server` for a 400 of unknown cause), and the others complete.

    Raises:
        LLMError: Any other failure; or a 400 that every prompt of the batch gets alone without a reason that
            blames the prompt (a request-wide refusal, such as too many stop strings).
    """
    try:
        return await client.complete(prompts, params, seed, stage)
    except LLMError as error:
        if error.status != 400:
            raise
        batch_error = error
    if len(prompts) == 1:
        outcomes: list[list[CompletionRecord] | LLMError] = [batch_error]
    else:
        limit = asyncio.Semaphore(_ALONE_IN_FLIGHT)
        outcomes = list(
            await asyncio.gather(*(_complete_alone(client, p, params, seed, stage, limit) for p in prompts))
        )
    refused = [o for o in outcomes if isinstance(o, LLMError)]
    if len(refused) == len(prompts) and not any(rejection_reason(str(e)) for e in refused):
        raise batch_error
    records = []
    for prompt, outcome in zip(prompts, outcomes, strict=True):
        if isinstance(outcome, LLMError):
            reason = rejection_reason(str(outcome)) or "rejected_by_server"
            log.warning("prompt refused (%s): %s", reason, outcome)
            records.append(client.refused(prompt, params, seed, stage, reason))
        else:
            records.extend(outcome)
    return records


async def _complete_alone(
    client: OpenAICompletionClient,
    prompt: str,
    params: SamplingParams,
    seed: int | None,
    stage: Stage,
    limit: asyncio.Semaphore,
) -> list[CompletionRecord] | LLMError:
    try:
        async with limit:
            return await client.complete([prompt], params, seed, stage)
    except LLMError as error:
        if error.status != 400:
            raise
        return error


async def _run_all(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Await all; on the first failure cancel the rest and raise that failure itself (not a group)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class GenerationSession:
    """One event loop in a background thread holding one client, shared by the chunk tasks of a round.

    Sharing it lets the chunks overlap: the next chunk's batches start as soon as HTTP slots free up, so the
    servers never idle at chunk boundaries, while the client keeps at most `llm_concurrency` requests in
    flight in total.
    """

    def __init__(self, settings: Settings, base_urls: list[str]) -> None:
        """Start the loop and create the client in it.

        Args:
            settings: Client settings; `llm_concurrency` becomes the client's global in-flight cap.
            base_urls: The servers.
        """
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llm-session", daemon=True)
        self._thread.start()

        async def make() -> OpenAICompletionClient:
            return OpenAICompletionClient.from_settings(
                settings, base_urls, max_in_flight=settings.llm_concurrency
            )

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
                        "requests": chunks[next_chunk],
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


__all__ = [
    "REFUSAL_REASONS",
    "CompletionCache",
    "CompletionRequest",
    "GenerationSession",
    "LLMError",
    "OpenAICompletionClient",
    "complete_isolating",
    "completion_key",
    "generate",
    "generate_chunk",
    "generate_in_tasks",
    "rejection_reason",
]

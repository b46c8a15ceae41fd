"""The OpenAI-compatible wire format on either side of the HTTP call: what a request body carries, and what
an answer means (its choices, token counts and errors). Pure functions; the client sends and retries."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from schemas import SamplingParams
from schemas.settings import LLMApi

# HTTP statuses worth retrying: overload, rate limits, server faults. Every other 4xx is the caller's fault.
RETRY_STATUSES = frozenset({408, 429})
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
# Path under the base URL that each api posts to.
ENDPOINTS: dict[LLMApi, str] = {"completions": "/completions", "chat": "/chat/completions"}
# Every `CompletionRecord.rejected` value.
REFUSAL_REASONS = frozenset({"prompt_too_long", "rejected_by_server"})
MAX_ERROR_CHARS = 200  # of a server's answer quoted in an error line (an HTML page would flood it)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Answer:
    """An HTTP answer, read whole: what the functions here need of it.

    Attributes:
        status: HTTP status.
        content_type: The Content-Type header ("" when absent).
        body: The body's bytes.
        retry_after: The Retry-After header, or None.
    """

    status: int
    content_type: str
    body: bytes
    retry_after: str | None = None

    def json(self) -> Any:
        """The body parsed as JSON (ValueError when it is not)."""
        return json.loads(self.body)

    @property
    def text(self) -> str:
        """The body as text (undecodable bytes replaced)."""
        return self.body.decode("utf-8", errors="replace")


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


class TransientError(Exception):
    """A failure worth retrying; `retry_after_s` comes from the server's Retry-After header, if any."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def is_transient(status: int) -> bool:
    """Whether an HTTP status is worth retrying (408, 429, and every 5xx but 501)."""
    return status in RETRY_STATUSES or (status >= 500 and status not in _PERMANENT_5XX)


def rejection_reason(message: str) -> str | None:
    """The stable reason for a 400 that blames one prompt (e.g. `prompt_too_long`), or None."""
    lowered = message.lower()
    return next((reason for marker, reason in _PROMPT_REJECTIONS if marker in lowered), None)


def request_body(
    api: LLMApi, model: str, prompts: list[str], params: SamplingParams, seed: int | None, token_ids: bool
) -> dict[str, Any]:
    """The JSON body of a request for `prompts`.

    Args:
        api: "completions": the prompts as one list (the server answers one choice per prompt); "chat": the
            one prompt as the one user message of a conversation.
        model: Model name.
        prompts: The prompts; exactly one for "chat".
        params: Decoding parameters.
        seed: Seed of the request, or None to let the server pick.
        token_ids: Ask for the token ids of prompt and completion (vLLM's `return_token_ids`); a chat
            request has one prompt, whose usage is exact, so it never asks.
    """
    body: dict[str, Any] = {"model": model}
    if api == "chat":
        if len(prompts) != 1:
            raise ValueError(f"a chat request carries one prompt, not {len(prompts)}")
        body["messages"] = [{"role": "user", "content": prompts[0]}]
    else:
        body["prompt"] = prompts
    body |= {
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
    if token_ids and api == "completions":
        body["return_token_ids"] = True
    return body


def choice_text(choice: dict[str, Any]) -> str | None:
    """The text of a choice: `text` (completions) or `message.content` (chat, where null means no text)."""
    if "message" not in choice:
        text = choice.get("text")
        return text if isinstance(text, str) else None
    message = choice["message"]
    content = message.get("content", "") if isinstance(message, dict) else None
    return "" if content is None else content if isinstance(content, str) else None


def match_choices(data: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The choices of an answer to `n` prompts, ordered by `index` (`choice_text` gives their text).

    Raises:
        TransientError: Choices missing, repeated, badly indexed or without a text string.
    """
    choices = data.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise TransientError("response has no list of choices")
    if choices and all("index" not in c for c in choices) and len(choices) == n:
        by_index = dict(enumerate(choices))  # a server that omits `index` answers in order
    else:
        by_index = {}
        for c in choices:
            index = c.get("index")
            if not isinstance(index, int) or isinstance(index, bool) or index in by_index:
                raise TransientError(f"choice with a bad or repeated index: {index!r}")
            by_index[index] = c
    missing = [i for i in range(n) if i not in by_index]
    if missing:
        raise TransientError(f"{len(missing)} of {n} choices missing (first: index {missing[0]})")
    ordered = [by_index[i] for i in range(n)]
    if any(choice_text(c) is None for c in ordered):
        raise TransientError("choice without a text string")
    return ordered


def token_counts(
    data: dict[str, Any], choices: list[dict[str, Any]]
) -> tuple[list[int], list[int], int | None]:
    """Prompt and completion tokens per choice, and the prompt tokens the server took from its cache.

    Exact per-choice counts when the server gives them (vLLM's token ids, per-choice usage); otherwise the
    request's usage: its prompt tokens on every choice, its completion tokens spread so that they add up.
    (llama.cpp reports the FIRST prompt's usage only for a list of prompts.)

    Returns:
        (prompt tokens per choice, completion tokens per choice, cached prompt tokens of the request or None).
    """
    usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
    prompt_counts = [_id_count(c, "prompt_token_ids") for c in choices]
    per_prompt = [n for n in prompt_counts if n is not None]
    if len(per_prompt) != len(choices):
        per_prompt = [_as_count(usage.get("prompt_tokens"))] * len(choices)
    reported = [_first_count(_id_count(c, "token_ids"), _choice_tokens(c)) for c in choices]
    per_choice = [n for n in reported if n is not None]
    if len(per_choice) != len(choices):
        per_choice = _split_evenly(_as_count(usage.get("completion_tokens")), len(choices))
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return per_prompt, per_choice, cached if isinstance(cached, int) and cached >= 0 else None


def encodable(text: str) -> str:
    """`text` with lone surrogates (JSON can carry "\\ud800"; UTF-8 cannot) replaced by U+FFFD.

    One such character would otherwise fail every Parquet write of the completion, on every rerun.
    """
    return _LONE_SURROGATE.sub("\ufffd", text)


def error_text(response: Answer) -> str:
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
        message = response.text.strip() or _reason_phrase(response.status)
    return str(message)[:MAX_ERROR_CHARS]


def retry_after(response: Answer) -> float | None:
    """The seconds a server's Retry-After header asks for, or None."""
    try:
        return max(0.0, float(response.retry_after or ""))
    except ValueError:
        return None


def models_answer(response: Answer) -> list[dict[str, Any]] | None:
    """The model entries of a GET /models answer in OpenAI's shape, or None when it is not that shape."""
    if "json" not in response.content_type:
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


def context_length(entries: list[dict[str, Any]], model: str) -> int | None:
    """The context window a models answer gives for `model` (vLLM: max_model_len; llama.cpp: n_ctx_train)."""
    for entry in entries:
        if entry.get("id") != model and len(entries) > 1:
            continue
        meta = entry["meta"] if isinstance(entry.get("meta"), dict) else {}
        for value in (entry.get("max_model_len"), entry.get("context_length"), meta.get("n_ctx_train")):
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def served_models_hint(entries: list[dict[str, Any]] | None) -> str:
    """ "; it serves: a, b (...)" from a /v1/models answer, to say which name to use instead."""
    names = [str(e["id"]) for e in entries or []]
    if not names:
        return ""
    return f"; it serves: {', '.join(names[:10])} (set SELFINSTRUCT_MODEL, or the round's model/adapter)"


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _split_evenly(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


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

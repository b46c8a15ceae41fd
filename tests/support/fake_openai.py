"""A real HTTP server on loopback speaking OpenAI's /v1/completions and /v1/chat/completions (one user
message, answered like the same prompt on /v1/completions), with latency and fault injection.

It exists for what a real LLM server cannot do on demand: answer in a fixed (or randomly drawn) time, and fail
in a chosen way at a chosen moment. Completions are deterministic: a numbered list that echoes the end of the
prompt, so tests can tell which prompt a choice belongs to.

Use it in-process (`with FakeOpenAI(latency_s=0.5) as fake: fake.url`), or as its own process so that it
does not share the GIL with the client under test (`python -m tests.support.fake_openai --latency 0.5`, which
prints `READY <url>`; counters at GET /_fake/stats).

With `vllm=VLLMMode(...)` it also enforces what vLLM 0.33.0's OpenAI server enforces and a client can trip
over (the rules live in tests/support/fake_vllm.py, each naming the vLLM source it copies): the stop-string
limit, the context limit, the request-queue limit (503), served model names, runtime LoRA loading, and token
ids per choice. Choices always come back in prompt order with one request-level usage, as vLLM's do.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import signal
import socket
import sys
import threading
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from aiohttp import web

from tests.support.engine_latency import BatchingLatency
from tests.support.fake_vllm import (
    VLLMMode,
    effective_sampling,
    error_response,
    load_lora,
    metrics_text,
    rejection,
    unload_lora,
    words,
)

Fault = Literal["500", "429", "hang", "close", "malformed", "empty", "length", "400", "drop_choice", "501"]
FAULTS: tuple[Fault, ...] = get_args(Fault)


@dataclass
class FaultConfig:
    """How often each fault hits a request (probabilities, drawn in this order), plus a script.

    `script` is consumed first, one entry per request: a fault name, or None for a normal answer. It injects a
    fault at an exact moment; the probabilities model a flaky server.
    """

    p_500: float = 0.0
    p_429: float = 0.0
    p_hang: float = 0.0
    p_close: float = 0.0
    p_malformed: float = 0.0
    p_empty: float = 0.0
    p_length: float = 0.0
    p_400: float = 0.0
    p_drop_choice: float = 0.0
    p_501: float = 0.0
    error_message_400: str = "Invalid request: this is the fake server's 400 message"
    retry_after_s: float | None = None
    hang_s: float = 3600.0
    script: deque[Fault | None] = field(default_factory=deque)

    def draw(self, rng: random.Random) -> Fault | None:
        if self.script:
            return self.script.popleft()
        for name in FAULTS:
            if rng.random() < getattr(self, f"p_{name}"):
                return name
        return None


def token_ids(text: str) -> list[int]:
    """Ids of the fake tokens of `text` (one per word), as vLLM returns with `return_token_ids`."""
    return [zlib.crc32(w.encode()) % 50_000 for w in words(text)]


def fake_completion(
    prompt: str, seed: int | None, max_tokens: int, stop: list[str], lines: int = 3
) -> tuple[str, str, int]:
    """Deterministic completion of `prompt`: a numbered list echoing the prompt's last words.

    Returns:
        (text, finish_reason, completion tokens), after cutting at the first stop sequence ("stop") or at
        `max_tokens` words ("length").
    """
    tag = hashlib.sha256(f"{seed}|{prompt}".encode()).hexdigest()[:8]
    tail = " ".join(words(prompt)[-4:])
    text = "".join(f" {i}. echo {tag} {tail}\n" for i in range(1, lines + 1))
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    if cut >= 0:
        text = text[:cut]
        return text, "stop", len(words(text))
    tokens = words(text)
    if len(tokens) > max_tokens:
        return " " + " ".join(tokens[:max_tokens]), "length", max_tokens
    return text, "stop", len(tokens)


class FakeOpenAI:
    """The server. Start with `start()` or as a context manager; `url` is `http://127.0.0.1:PORT/v1`.

    Counters (read them after requests finish): `requests` (POSTs to /v1/completions and
    /v1/chat/completions, faulted ones included), `paths` (Counter of the POSTs by path),
    `prompts` (prompts in those requests), `faults` (Counter by fault name), `max_in_flight`,
    `authorization` (Authorization headers seen), `bodies` (the last 1000 request bodies).
    """

    def __init__(
        self,
        latency_s: float = 0.0,
        faults: FaultConfig | None = None,
        *,
        jitter_s: float = 0.0,
        models: tuple[str, ...] | None = None,
        api_key: str | None = None,
        shuffle_choices: bool = False,
        per_choice_usage: bool = False,
        rng_seed: int = 0,
        context_length: int | None = None,
        responder: Callable[[str], str] | None = None,
        vllm: VLLMMode | None = None,
        batching: BatchingLatency | None = None,
    ) -> None:
        """Configure the server (nothing is bound until `start`).

        Args:
            latency_s: Fixed delay before every answer.
            jitter_s: Up to this much more delay, drawn per request (seeded by `rng_seed`), so that
                concurrent requests are answered out of order; it draws from its own generator, so the
                fault and shuffle draws stay those of the same `rng_seed` without jitter.
            faults: Fault injection; None for a well-behaved server.
            models: Model names the server knows (others get vLLM's 404); None accepts any.
            api_key: Bearer token required on every request; None requires none.
            shuffle_choices: Return choices in random order (clients must match them by `index`).
            per_choice_usage: Also put `usage.completion_tokens` in each choice.
            rng_seed: Seed of the fault and shuffle draws.
            context_length: Reported as each model's `max_model_len` in GET /v1/models, as vLLM does.
            responder: Completion text for a prompt, instead of the echo (e.g. a scripted judge); stop
                sequences still cut it.
            vllm: Enforce vLLM's limits and semantics (see `VLLMMode`); the served names are `models`
                (default "fake-model") plus the adapters loaded at runtime.
            batching: Answer after a batching engine's latency (rising with the prompts in flight), on
                top of `latency_s`; None: `latency_s` alone.
        """
        if vllm is not None and (shuffle_choices or per_choice_usage):
            raise ValueError("vLLM answers choices in prompt order with one request-level usage")
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self._jitter_rng = random.Random(rng_seed)
        self.faults = faults or FaultConfig()
        self.models = models
        self.context_length = context_length
        self.api_key = api_key
        self.shuffle_choices = shuffle_choices
        self.per_choice_usage = per_choice_usage
        self.vllm = vllm
        self.batching = batching
        self.prompts_in_flight = 0
        if vllm is not None and models is None:
            self.models = ("fake-model",)
        self.adapters: dict[str, str] = {}
        self.refused: Counter[int] = Counter()
        self.unfinished = 0
        self.max_unfinished = 0
        self.effective_sampling: deque[dict[str, Any]] = deque(maxlen=1000)
        self._rng = random.Random(rng_seed)
        self.responder = responder
        self.requests = 0
        self.paths: Counter[str] = Counter()
        self.prompts = 0
        self.faults_injected: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.authorization: list[str | None] = []
        self.bodies: deque[dict[str, Any]] = deque(maxlen=1000)
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> str:
        """Bind 127.0.0.1 on a free port and serve from a background thread; return the base URL."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start_site(sock))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        self.url = f"http://127.0.0.1:{port}/v1"
        return self.url

    def stop(self) -> None:
        """Stop serving; requests still hanging are cancelled."""
        if self._loop is None or self._thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> FakeOpenAI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Counters as a JSON-able dict."""
        return {
            "requests": self.requests,
            "prompts": self.prompts,
            "faults": dict(self.faults_injected),
            "max_in_flight": self.max_in_flight,
            "in_flight": self.in_flight,
            "max_unfinished": self.max_unfinished,
            "refused": {str(k): v for k, v in self.refused.items()},
        }

    async def _start_site(self, sock: socket.socket) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_fake/stats", self._stats)
        if self.vllm is not None:
            app.router.add_get("/metrics", self._metrics)
            # Unmounted, the paths answer FastAPI's 404, as vLLM's do.
            app.router.add_post("/v1/load_lora_adapter", self._load_lora)
            app.router.add_post("/v1/unload_lora_adapter", self._unload_lora)
        # handler_cancellation: a hung handler ends when the client gives up and disconnects.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    # -- handlers ----------------------------------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _models(self, request: web.Request) -> web.Response:
        names = self.models or ("fake-model",)
        cards: list[dict[str, Any]] = [{"id": m, "object": "model"} for m in names]
        if self.context_length:
            for card in cards:
                card["max_model_len"] = self.context_length
        if self.vllm is not None:
            # entrypoints/openai/models/serving.py `show_available_models`: base models carry max_model_len,
            # adapters their parent.
            for card in cards:
                card["max_model_len"] = self.vllm.max_model_len
            cards += [
                {"id": a, "object": "model", "root": path, "parent": names[0]}
                for a, path in self.adapters.items()
            ]
        return web.json_response({"object": "list", "data": cards})

    def served(self) -> tuple[str, ...]:
        """Model names requests may use: the served names and the adapters loaded so far."""
        return (*(self.models or ()), *self.adapters)

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self.vllm is not None
        return web.Response(
            text=metrics_text(self.vllm, self.unfinished, self.models), content_type="text/plain"
        )

    async def _load_lora(self, request: web.Request) -> web.Response:
        assert self.vllm is not None
        return await load_lora(self.vllm, self.models, self.adapters, request)

    async def _unload_lora(self, request: web.Request) -> web.Response:
        assert self.vllm is not None
        return await unload_lora(self.vllm, self.adapters, request)

    def _vllm_rejection(self, body: dict[str, Any], prompts: list[str]) -> web.Response | None:
        """vLLM's answer to a request it refuses as a whole, or None when it takes the request."""
        assert self.vllm is not None
        return rejection(self.vllm, self.unfinished, body, prompts)

    def _record_sampling(self, body: dict[str, Any]) -> None:
        assert self.vllm is not None
        self.effective_sampling.append(effective_sampling(self.vllm, body))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.paths[request.path] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.authorization.append(request.headers.get("Authorization"))
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return error_response(401, "Incorrect API key provided.", "invalid_api_key")
        chat = request.path.endswith("/chat/completions")
        try:
            body = await request.json()
            if chat:
                (message,) = body["messages"]  # the client sends one user message per request
                prompts = [message["content"]] if message["role"] == "user" else []
            else:
                prompts = body["prompt"]
                prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        except (ValueError, KeyError, TypeError):
            return error_response(
                400, f"request body must be JSON with {'one message' if chat else 'a prompt'}"
            )
        self.bodies.append(body)
        self.prompts += len(prompts)
        if self.models is not None and body.get("model") not in self.served():
            return error_response(
                404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", param="model"
            )
        if self.vllm is not None:
            refusal = self._vllm_rejection(body, prompts)
            if refusal is not None:
                self.refused[refusal.status] += 1
                return refusal
            self._record_sampling(body)
            # Each prompt of the list is one engine request: the queue counts prompts.
            self.unfinished += len(prompts)
            self.max_unfinished = max(self.max_unfinished, self.unfinished)
            try:
                return await self._respond(request, body, prompts)
            finally:
                self.unfinished -= len(prompts)
        return await self._respond(request, body, prompts)

    async def _respond(
        self, request: web.Request, body: dict[str, Any], prompts: list[str]
    ) -> web.StreamResponse:

        fault = self.faults.draw(self._rng)
        if fault is not None:
            self.faults_injected[fault] += 1
        delay = self.latency_s + (self._jitter_rng.uniform(0.0, self.jitter_s) if self.jitter_s else 0.0)
        if delay:
            await asyncio.sleep(delay)
        if fault == "hang":
            await asyncio.sleep(self.faults.hang_s)
        if fault == "close":
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPInternalServerError()  # never sent: the connection is gone
        if fault == "500":
            return error_response(500, "fake internal error")
        if fault == "429":
            headers = {}
            if self.faults.retry_after_s is not None:
                headers["Retry-After"] = f"{self.faults.retry_after_s:g}"
            return error_response(429, "Rate limit reached", headers=headers)
        if fault == "400":
            return error_response(400, self.faults.error_message_400)
        if fault == "501":  # vLLM's answer for a feature it lacks (a NotImplementedError)
            return error_response(501, "this feature is not implemented", "NotImplementedError")
        if fault == "malformed":
            return web.Response(text='{"choices": [{"text": "unterminated', content_type="application/json")
        result = self._result(body, prompts, fault)
        if self.batching is not None:
            self.prompts_in_flight += len(prompts)
            try:
                longest = max((len(words(c["text"])) for c in result["choices"]), default=0)
                await asyncio.sleep(self.batching.latency(longest, self.prompts_in_flight))
            finally:
                self.prompts_in_flight -= len(prompts)
        if request.path.endswith("/chat/completions"):
            result["object"] = "chat.completion"
            for choice in result["choices"]:
                choice["message"] = {"role": "assistant", "content": choice.pop("text")}
        if self.vllm is not None and body.get("return_token_ids"):
            n = int(body.get("n") or 1)
            for choice in result["choices"]:
                choice["prompt_token_ids"] = token_ids(prompts[choice["index"] // n])
                choice["token_ids"] = token_ids(choice["text"])
        return web.json_response(result)

    def _result(self, body: dict[str, Any], prompts: list[str], fault: Fault | None) -> dict[str, Any]:
        seed = body.get("seed")
        max_tokens = int(body.get("max_tokens") or 16)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        n = int(body.get("n") or 1)
        choices: list[dict[str, Any]] = []
        completion_tokens = 0
        for i, prompt in enumerate(prompts):
            budget = max_tokens
            if self.vllm is not None:  # what is left of the context (api_utils.py `get_max_tokens`)
                budget = min(max_tokens, self.vllm.max_model_len - len(words(prompt)))
            for j in range(n):
                text, finish, count = fake_completion(
                    prompt, None if seed is None else seed + j, budget, stop
                )
                if self.responder is not None:
                    text = self.responder(prompt)
                    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
                    text = text[:cut] if cut >= 0 else text
                    finish, count = "stop", len(words(text))
                if fault == "empty":
                    text, finish, count = "", "stop", 0
                elif fault == "length":
                    text, finish, count = " 1. cut off mid", "length", 4
                choice: dict[str, Any] = {
                    "index": i * n + j,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish,
                }
                if self.per_choice_usage:
                    choice["usage"] = {"completion_tokens": count}
                choices.append(choice)
                completion_tokens += count
        if fault == "drop_choice" and choices:
            choices.pop(self._rng.randrange(len(choices)))
        if self.shuffle_choices:
            self._rng.shuffle(choices)
        prompt_tokens = sum(len(words(p)) for p in prompts)
        return {
            "id": f"cmpl-fake-{self.requests}",
            "object": "text_completion",
            "model": body.get("model"),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def main(argv: list[str] | None = None) -> None:
    """Run the server in the foreground until SIGTERM/SIGINT; prints `READY <url>`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=float, default=0.0, help="Seconds before every answer.")
    parser.add_argument("--vllm", action="store_true", help="Enforce vLLM's limits (VLLMMode defaults).")
    parser.add_argument(
        "--batching", type=BatchingLatency.parse, default=None, help="BASE_S,PER_TOKEN_S,SATURATION"
    )
    parser.add_argument(
        "--model-like",
        action="store_true",
        help="Answer a round's prompts as a good model would (tests/support/model_like.py).",
    )
    for name in FAULTS:
        parser.add_argument(f"--p-{name.replace('_', '-')}", type=float, default=0.0)
    args = parser.parse_args(argv)
    server: type[FakeOpenAI] = FakeOpenAI
    if args.model_like:
        from tests.support.model_like import ModelLikeFake

        server = ModelLikeFake
    faults = FaultConfig(**{f"p_{n}": getattr(args, f"p_{n}") for n in FAULTS})
    fake = server(
        latency_s=args.latency, faults=faults, vllm=VLLMMode() if args.vllm else None, batching=args.batching
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with fake:
        sys.stdout.write(f"READY {fake.url}\n")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    sys.stdout.write(json.dumps(fake.stats()) + "\n")


if __name__ == "__main__":
    main()

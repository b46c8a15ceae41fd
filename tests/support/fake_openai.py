"""A real HTTP server on loopback speaking OpenAI's /v1/completions, with latency and fault injection.

It exists for what a real LLM server cannot do on demand: answer in a fixed time, and fail in a chosen way
at a chosen moment. Completions are deterministic: a numbered list that echoes the end of the prompt, so tests
can tell which prompt a choice belongs to.

Use it in-process (`with FakeOpenAI(latency_s=0.5) as fake: fake.url`), or as its own process so that it
does not share the GIL with the client under test (`python -m tests.support.fake_openai --latency 0.5`, which
prints `READY <url>`; counters at GET /_fake/stats).
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
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from aiohttp import web

Fault = Literal["500", "429", "hang", "close", "malformed", "empty", "length", "400", "drop_choice"]
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


def words(text: str) -> list[str]:
    """The fake tokenizer: whitespace-separated words."""
    return text.split()


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

    Counters (read them after requests finish): `requests` (POSTs to /v1/completions, faulted ones included),
    `prompts` (prompts in those requests), `faults` (Counter by fault name), `max_in_flight`,
    `authorization` (Authorization headers seen), `bodies` (the last 1000 request bodies).
    """

    def __init__(
        self,
        latency_s: float = 0.0,
        faults: FaultConfig | None = None,
        *,
        models: tuple[str, ...] | None = None,
        api_key: str | None = None,
        shuffle_choices: bool = False,
        per_choice_usage: bool = False,
        rng_seed: int = 0,
        responder: Callable[[str], str] | None = None,
    ) -> None:
        """Configure the server (nothing is bound until `start`).

        Args:
            latency_s: Fixed delay before every answer.
            faults: Fault injection; None for a well-behaved server.
            models: Model names the server knows (others get vLLM's 404); None accepts any.
            api_key: Bearer token required on every request; None requires none.
            shuffle_choices: Return choices in random order (clients must match them by `index`).
            per_choice_usage: Also put `usage.completion_tokens` in each choice.
            rng_seed: Seed of the fault and shuffle draws.
            responder: Completion text for a prompt, instead of the echo (e.g. a scripted judge); stop
                sequences still cut it.
        """
        self.latency_s = latency_s
        self.faults = faults or FaultConfig()
        self.models = models
        self.api_key = api_key
        self.shuffle_choices = shuffle_choices
        self.per_choice_usage = per_choice_usage
        self._rng = random.Random(rng_seed)
        self.responder = responder
        self.requests = 0
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
        }

    async def _start_site(self, sock: socket.socket) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_fake/stats", self._stats)
        # handler_cancellation: a hung handler ends when the client gives up and disconnects.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    # -- handlers ----------------------------------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _models(self, request: web.Request) -> web.Response:
        names = self.models or ("fake-model",)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in names]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.authorization.append(request.headers.get("Authorization"))
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            body = await request.json()
            prompts = body["prompt"]
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        except (ValueError, KeyError, TypeError):
            return _error(400, "request body must be JSON with a 'prompt'")
        self.bodies.append(body)
        self.prompts += len(prompts)
        if self.models is not None and body.get("model") not in self.models:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")

        fault = self.faults.draw(self._rng)
        if fault is not None:
            self.faults_injected[fault] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault == "hang":
            await asyncio.sleep(self.faults.hang_s)
        if fault == "close":
            assert request.transport is not None
            request.transport.close()
            raise web.HTTPInternalServerError()  # never sent: the connection is gone
        if fault == "500":
            return _error(500, "fake internal error")
        if fault == "429":
            headers = {}
            if self.faults.retry_after_s is not None:
                headers["Retry-After"] = f"{self.faults.retry_after_s:g}"
            return _error(429, "Rate limit reached", headers=headers)
        if fault == "400":
            return _error(400, self.faults.error_message_400)
        if fault == "malformed":
            return web.Response(text='{"choices": [{"text": "unterminated', content_type="application/json")
        return web.json_response(self._result(body, prompts, fault))

    def _result(self, body: dict[str, Any], prompts: list[str], fault: Fault | None) -> dict[str, Any]:
        seed = body.get("seed")
        max_tokens = int(body.get("max_tokens") or 16)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        n = int(body.get("n") or 1)
        choices: list[dict[str, Any]] = []
        completion_tokens = 0
        for i, prompt in enumerate(prompts):
            for j in range(n):
                text, finish, count = fake_completion(
                    prompt, None if seed is None else seed + j, max_tokens, stop
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


def _error(
    status: int, message: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None
) -> web.Response:
    payload = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(payload, status=status, headers=headers)


def main(argv: list[str] | None = None) -> None:
    """Run the server in the foreground until SIGTERM/SIGINT; prints `READY <url>`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=float, default=0.0, help="Seconds before every answer.")
    for name in FAULTS:
        parser.add_argument(f"--p-{name.replace('_', '-')}", type=float, default=0.0)
    args = parser.parse_args(argv)
    faults = FaultConfig(**{f"p_{n}": getattr(args, f"p_{n}") for n in FAULTS})
    fake = FakeOpenAI(latency_s=args.latency, faults=faults)
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

"""llama.cpp's OpenAI-compatible server (xllamacpp) in a child process: the CPU default of every command.

The server runs in a child process (`python -m tasks.resources.servers.embedded ...`) so that it can be
stopped with a signal and killed if it hangs, without taking the caller down. The child binds the port itself
(port 0 picks a free one, with no race between choosing and binding) and reports the URL it listens on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tasks.resources.processes import port_in_use, stop_process, tail, wait_until_ready
from tasks.resources.servers.models import SMOLLM2, resolve_model

_READY_PREFIX = "LISTENING "
# See `server_params`: the share of a new prompt that must match a slot's cached prompt for the slot to be
# picked for it, and the host memory that keeps prompts evicted from the slots.
SLOT_PROMPT_SIMILARITY = 0.1
PROMPT_CACHE_RAM_MIB = 8192


def default_threads() -> int:
    """Decoding threads: every core but one, which the flow and its HTTP client need.

    llama.cpp's threads busy-wait for each other; when one is descheduled the others spin. On 2 shared cores
    (load 5-6) SmolLM2 with 4 slots decoded 50-70 tokens/s with 1 thread and 6-46 tokens/s with 2.
    """
    return max(1, (os.cpu_count() or 1) - 1)


class EmbeddedServer:
    """llama.cpp's OpenAI-compatible server on 127.0.0.1 in a child process. Use as a context manager.

    Attributes:
        url: "http://127.0.0.1:PORT/v1" once started.
        log_path: The child's stderr (llama.cpp's log); kept after a failure, removed after a clean stop.
    """

    def __init__(
        self,
        model: str = SMOLLM2,
        port: int = 0,
        parallel: int = 4,
        ctx_per_slot: int = 4096,
        threads: int | None = None,
        cache_dir: Path = Path("data/models"),
        *,
        host: str = "127.0.0.1",
        api_key: str | None = None,
    ) -> None:
        """Configure the server; `start` launches it.

        Args:
            model: See `resolve_model`; also the name the server reports.
            port: TCP port; 0 lets the server pick a free one.
            parallel: Slots decoding concurrently (continuous batching across them).
            ctx_per_slot: Context tokens per slot (prompt + completion).
            threads: CPU threads for decoding; None leaves one core to the caller (see `default_threads`).
            cache_dir: Where assembled models are kept.
            host: Interface to bind; loopback unless the server must be reached from other machines.
            api_key: If set, the server requires it as a Bearer token.
        """
        self.model = model
        self.port = port
        self.parallel = parallel
        self.ctx_per_slot = ctx_per_slot
        self.threads = threads or default_threads()
        self.cache_dir = cache_dir
        self.host = host
        self.api_key = api_key
        self.url = ""
        self.log_path: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The child process while it runs."""
        return self._process

    def command(self, gguf: Path) -> list[str]:
        """The child's command line."""
        cmd = [
            sys.executable,
            "-m",
            "tasks.resources.servers.embedded",
            "--gguf",
            str(gguf),
            "--alias",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--parallel",
            str(self.parallel),
            "--ctx",
            str(self.ctx_per_slot),
            "--threads",
            str(self.threads),
        ]
        return cmd

    def start(self, timeout_s: float = 120) -> str:
        """Launch the server and wait until it answers.

        Args:
            timeout_s: Longest wait for the model to load.

        Returns:
            The base URL, e.g. "http://127.0.0.1:41234/v1".

        Raises:
            OSError: The requested port is in use.
            RuntimeError: The server exited before answering (the message ends with its log's tail).
            TimeoutError: It did not answer in time (it is stopped).
        """
        if self._process is not None:
            return self.url
        if self.port and port_in_use(self.port, self.host):
            raise OSError(f"port {self.port} on {self.host} is already in use: pick another with --port")
        gguf = resolve_model(self.model, self.cache_dir)
        fd, log_name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        self.log_path = Path(log_name)
        env = dict(os.environ)
        if self.api_key:
            env["EMBEDDED_LLM_API_KEY"] = self.api_key  # not on the command line, where ps shows it
        # The project root, so that this module's `-m` name resolves however the caller was started.
        root = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with os.fdopen(fd, "wb") as log_file:
            # stdin is a pipe the child watches: when this process dies, EOF tells the child to exit too.
            self._process = subprocess.Popen(
                self.command(gguf), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env
            )
        try:
            self.url = self._read_url(timeout_s)
            wait_until_ready(self.url, timeout_s, self._process, self.api_key)
        except BaseException as exc:
            self._fail()
            if isinstance(exc, TimeoutError | RuntimeError):
                raise type(exc)(
                    f"{exc}\n--- server log tail ({self.log_path}) ---\n{self._log_tail()}"
                ) from None
            raise
        return self.url

    def _read_url(self, timeout_s: float) -> str:
        assert self._process is not None and self._process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._process.stdout], [], [], 0.25)
            if ready:
                line = self._process.stdout.readline().decode(errors="replace").strip()
                if line.startswith(_READY_PREFIX):
                    return line.removeprefix(_READY_PREFIX).rstrip("/") + "/v1"
                if not line and self._process.poll() is not None:
                    break
            elif self._process.poll() is not None:
                break
        if self._process.poll() is not None:
            log = self._log_tail()
            if "couldn't bind" in log:
                raise RuntimeError(f"port {self.port} on {self.host} is already in use")
            raise RuntimeError(f"llama.cpp server exited with code {self._process.returncode} while starting")
        raise TimeoutError(f"llama.cpp server did not start within {timeout_s:g}s")

    def _log_tail(self) -> str:
        return tail(self.log_path) if self.log_path else ""

    def _fail(self) -> None:
        if self._process is not None:
            stop_process(self._process, timeout_s=5)
            self._process = None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s); its log is removed after a clean exit."""
        if self._process is None:
            return
        code = stop_process(self._process)
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                pipe.close()
        self._process = None
        if code == 0 and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the child process -------------------------------------------------------------------------------------


def server_params(
    gguf: str, alias: str | None, host: str, port: int, parallel: int, ctx_per_slot: int, threads: int
) -> Any:
    """llama.cpp's server parameters (an `xllamacpp.CommonParams`) as the child sets them.

    Prefix reuse: each slot keeps the KV cache of its last prompt (`cache_prompt`, on by default), and a new
    prompt goes to the slot whose cached prompt shares the largest part of it (`slot_prompt_similarity`, the
    share of the new prompt that must match; 0 would pick the least recently used slot instead). Prompts
    evicted from a slot stay in a host-memory cache (`cache_ram_mib`) from which a later prompt with the
    same prefix is restored. Set here explicitly so that a change of xllamacpp's defaults shows up in review.
    """
    import xllamacpp  # only the child loads llama.cpp

    params = xllamacpp.CommonParams()
    params.model.path = gguf
    if alias:
        params.model_alias = {alias}
    params.hostnames = [host]
    params.port = port
    params.n_parallel = parallel
    params.n_ctx = ctx_per_slot * parallel  # llama.cpp divides n_ctx among the slots
    params.cont_batching = True
    params.warmup = False  # the warm-up decode only delays startup; the first request warms up anyway
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.cache_prompt = True
    params.slot_prompt_similarity = SLOT_PROMPT_SIMILARITY
    params.cache_ram_mib = PROMPT_CACHE_RAM_MIB
    return params


def _serve(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run llama.cpp's server (xllamacpp) until SIGTERM/SIGINT.")
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--alias", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=4096, help="Context tokens per slot.")
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    import xllamacpp  # only the child loads llama.cpp

    params = server_params(args.gguf, args.alias, args.host, args.port, args.parallel, args.ctx, args.threads)
    api_key = os.environ.get("EMBEDDED_LLM_API_KEY")
    if api_key:
        params.api_keys = [api_key]
    try:
        server = xllamacpp.Server(params)
    except RuntimeError as exc:
        sys.stderr.write(f"failed to start llama.cpp server: {exc}\n")
        return 1
    sys.stdout.write(f"{_READY_PREFIX}{server.listening_address}\n")
    sys.stdout.flush()

    def watch_parent() -> None:
        # EOF on stdin: the parent is gone (even if it was SIGKILLed), so nobody will ever stop us.
        # os.read, not sys.stdin: a daemon thread holding the buffered reader's lock breaks interpreter exit.
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        stop.set()

    threading.Thread(target=watch_parent, daemon=True).start()
    while not stop.wait(0.5):
        pass
    del server  # the destructor stops llama.cpp's loop and joins its threads
    return 0


if __name__ == "__main__":
    sys.exit(_serve())

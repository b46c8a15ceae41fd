"""`selfinstruct llm serve`: run an OpenAI-compatible LLM server in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from selfinstruct.console import console, fail
from tasks.llm_server import (
    SMOLLM2,
    EmbeddedServer,
    free_port,
    port_in_use,
    stop_process,
    vllm_available,
    vllm_command,
    wait_until_ready,
)

llm_app = typer.Typer(help="LLM servers for generation.", no_args_is_help=True, add_completion=False)


class Engine(StrEnum):
    """Which server to run."""

    vllm = "vllm"
    llamacpp = "llamacpp"


@llm_app.callback()
def _group() -> None:
    """LLM servers for generation."""


def _check_flags(engine: Engine, given: dict[str, object]) -> None:
    """Reject flags that belong to the other engine (they would be silently ignored otherwise)."""
    only = {
        Engine.vllm: ("--tensor-parallel-size", "--enable-lora", "--gpu-memory-utilization"),
        Engine.llamacpp: ("--parallel", "--ctx-per-slot", "--threads"),
    }
    other = Engine.llamacpp if engine is Engine.vllm else Engine.vllm
    wrong = [flag for flag in only[other] if given.get(flag) not in (None, False)]
    if wrong:
        fail(f"{', '.join(wrong)}: only for --engine {other.value}, not {engine.value}")


def _wait_for_signal(process: subprocess.Popen[bytes] | None) -> bool:
    """Block until SIGINT/SIGTERM (True) or until the server process exits on its own (False)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            if process is not None and process.poll() is not None:
                return False
        return True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@llm_app.command()
def serve(
    engine: Annotated[Engine, typer.Option(help="vllm (GPU) or llamacpp (embedded, CPU).")] = Engine.llamacpp,
    model: Annotated[
        str,
        typer.Option(help="llamacpp: smollm2-135m-instruct, gemma3-270m or a .gguf path; vllm: HF id/path."),
    ] = SMOLLM2,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port; 0 picks a free one.")] = 8000,
    tensor_parallel_size: Annotated[int | None, typer.Option(min=1, help="vllm: GPUs per model.")] = None,
    enable_lora: Annotated[bool, typer.Option("--enable-lora", help="vllm: allow LoRA adapters.")] = False,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(min=0.05, max=1.0, help="vllm: fraction of GPU memory to use.")
    ] = None,
    parallel: Annotated[int | None, typer.Option(min=1, max=256, help="llamacpp: concurrent slots.")] = None,
    ctx_per_slot: Annotated[
        int | None, typer.Option(min=256, help="llamacpp: context tokens per slot.")
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="llamacpp: CPU threads.")] = None,
    cache_dir: Annotated[Path, typer.Option(help="llamacpp: where assembled models are kept.")] = Path(
        "data/models"
    ),
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the server to answer.")] = 600,
) -> None:
    """Start a server, wait until it answers, print its URL, and keep it up until Ctrl-C or SIGTERM."""
    _check_flags(
        engine,
        {
            "--tensor-parallel-size": tensor_parallel_size,
            "--enable-lora": enable_lora,
            "--gpu-memory-utilization": gpu_memory_utilization,
            "--parallel": parallel,
            "--ctx-per-slot": ctx_per_slot,
            "--threads": threads,
        },
    )
    if port and port_in_use(port, host):
        fail(f"port {port} on {host} is already in use: pick another with --port (0 for any free port)")
    if engine is Engine.vllm:
        _serve_vllm(
            model, host, port, tensor_parallel_size or 1, enable_lora, gpu_memory_utilization or 0.9, timeout
        )
    else:
        _serve_llamacpp(model, host, port, parallel or 4, ctx_per_slot or 4096, threads, cache_dir, timeout)


def _serve_llamacpp(
    model: str,
    host: str,
    port: int,
    parallel: int,
    ctx_per_slot: int,
    threads: int | None,
    cache_dir: Path,
    timeout: float,
) -> None:
    server = EmbeddedServer(model, port, parallel, ctx_per_slot, threads, cache_dir, host=host)
    with console.status(f"loading {model} into llama.cpp ({parallel} slots)..."):
        try:
            url = server.start(timeout_s=timeout)
        except (OSError, ValueError, RuntimeError) as exc:
            fail(str(exc), code=1)
    try:
        console.print(f"[green]llama.cpp server ready[/] model={model} slots={parallel}")
        console.print(url, highlight=False, soft_wrap=True)
        console.print("Ctrl-C or SIGTERM stops it.", style="dim")
        if not _wait_for_signal(server.process):
            fail(f"the server exited on its own; log: {server.log_path}", code=1)
    finally:
        server.stop()
    console.print("stopped")


def _serve_vllm(
    model: str,
    host: str,
    port: int,
    tensor_parallel_size: int,
    enable_lora: bool,
    gpu_memory_utilization: float,
    timeout: float,
) -> None:
    if not vllm_available():
        fail("vLLM is not installed here: pip install 'selfinstruct[vllm]' (on a GPU box)")
    port = port or free_port(host)
    cmd = vllm_command(model, port, tensor_parallel_size, enable_lora, gpu_memory_utilization, host=host)
    console.print(" ".join(cmd), style="dim", highlight=False)
    process = subprocess.Popen(cmd)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1"
    try:
        try:
            with console.status(f"waiting for vLLM to load {model}..."):
                wait_until_ready(url, timeout, process)
        except (TimeoutError, RuntimeError) as exc:
            fail(str(exc), code=1)
        console.print(f"[green]vLLM ready[/] model={model}")
        console.print(url, highlight=False, soft_wrap=True)
        if not _wait_for_signal(process):
            fail(f"vLLM exited on its own with code {process.returncode}", code=1)
    finally:
        stop_process(process, timeout_s=30)
    console.print("stopped")


if __name__ == "__main__":
    llm_app()

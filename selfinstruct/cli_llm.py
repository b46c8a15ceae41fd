"""`selfinstruct llm serve`: run an OpenAI-compatible LLM server in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from selfinstruct.console import console, fail
from tasks.resources.processes import free_port, port_in_use, stop_process, wait_until_ready
from tasks.resources.servers.embedded import EmbeddedServer
from tasks.resources.servers.models import SMOLLM2
from tasks.resources.servers.vllm import VLLM_LORA_RANKS, VLLMServe, vllm_available

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
        Engine.vllm: (
            "--tensor-parallel-size",
            "--enable-lora",
            "--gpu-memory-utilization",
            "--served-model-name",
            "--max-lora-rank",
            "--max-loras",
            "--max-num-seqs",
            "--max-model-len",
            "--print-command",
            "-- VLLM_ARGS",
        ),
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
    served_model_name: Annotated[
        str | None,
        typer.Option(
            help="vllm: the name requests use (SELFINSTRUCT_MODEL); default: the short name or model."
        ),
    ] = None,
    max_lora_rank: Annotated[
        int | None,
        typer.Option(
            help=f"vllm: biggest LoRA rank accepted, one of {VLLM_LORA_RANKS} (vLLM's default: 16)."
        ),
    ] = None,
    max_loras: Annotated[
        int | None, typer.Option(min=1, help="vllm: adapters in one batch at once (vLLM's default: 1).")
    ] = None,
    max_num_seqs: Annotated[
        int | None, typer.Option(min=1, help="vllm: sequences scheduled at once (vLLM: 1024 on H100/H200).")
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(min=16, help="vllm: context length in tokens.")] = None,
    generation_config: Annotated[
        str,
        typer.Option(
            help="vllm: 'vllm' ignores the model's generation_config.json sampling defaults; 'auto'."
        ),
    ] = "vllm",
    print_command: Annotated[
        bool,
        typer.Option("--print-command", help="vllm: print the command and its environment; run nothing."),
    ] = False,
    vllm_args: Annotated[
        list[str] | None, typer.Argument(help="vllm: further `vllm serve` arguments, after `--`.")
    ] = None,
) -> None:
    """Start a server, wait until it answers, print its URL, and keep it up until Ctrl-C or SIGTERM."""
    _check_flags(
        engine,
        {
            "--tensor-parallel-size": tensor_parallel_size,
            "--enable-lora": enable_lora,
            "--gpu-memory-utilization": gpu_memory_utilization,
            "--served-model-name": served_model_name,
            "--max-lora-rank": max_lora_rank,
            "--max-loras": max_loras,
            "--max-num-seqs": max_num_seqs,
            "--max-model-len": max_model_len,
            "--print-command": print_command,
            "-- VLLM_ARGS": vllm_args or None,
            "--parallel": parallel,
            "--ctx-per-slot": ctx_per_slot,
            "--threads": threads,
        },
    )
    if engine is Engine.vllm:
        if max_lora_rank is not None and max_lora_rank not in VLLM_LORA_RANKS:
            fail(f"--max-lora-rank {max_lora_rank}: vLLM accepts one of {VLLM_LORA_RANKS}")
        if (max_lora_rank is not None or max_loras is not None) and not enable_lora:
            fail("--max-lora-rank and --max-loras need --enable-lora")
        spec = VLLMServe(
            model,
            served_model_name=served_model_name,
            enable_lora=enable_lora,
            max_lora_rank=max_lora_rank,
            max_loras=max_loras,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            generation_config=generation_config,
            tensor_parallel_size=tensor_parallel_size or 1,
            gpu_memory_utilization=gpu_memory_utilization or 0.9,
            extra=tuple(vllm_args or ()),
        )
        if print_command:
            _print_vllm(spec, host, port or free_port(host))
            return
    if port and port_in_use(port, host):
        fail(f"port {port} on {host} is already in use: pick another with --port (0 for any free port)")
    if engine is Engine.vllm:
        _serve_vllm(spec, host, port, timeout)
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


def _client_url(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1"


def _print_vllm(spec: VLLMServe, host: str, port: int) -> None:
    """The command as one shell line (environment first), then what rounds need to reach it."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.environment().items())
    console.print(
        " ".join(filter(None, (env, shlex.join(spec.command(port, host))))), highlight=False, soft_wrap=True
    )
    console.print(
        f"# rounds: SELFINSTRUCT_LLM_URL={_client_url(host, port)} "
        f"SELFINSTRUCT_MODEL={shlex.quote(spec.served_name())}",
        highlight=False,
        soft_wrap=True,
    )


def _serve_vllm(spec: VLLMServe, host: str, port: int, timeout: float) -> None:
    if not vllm_available():
        fail("vLLM is not installed here: pip install 'selfinstruct[vllm]' (on a GPU box)")
    port = port or free_port(host)
    _print_vllm(spec, host, port)
    process = subprocess.Popen(spec.command(port, host), env={**os.environ, **spec.environment()})
    url = _client_url(host, port)
    try:
        try:
            with console.status(f"waiting for vLLM to load {spec.model_id()}..."):
                wait_until_ready(url, timeout, process)
        except (TimeoutError, RuntimeError) as exc:
            fail(str(exc), code=1)
        console.print(f"[green]vLLM ready[/] model={spec.model_id()} served as {spec.served_name()}")
        console.print(url, highlight=False, soft_wrap=True)
        if not _wait_for_signal(process):
            fail(f"vLLM exited on its own with code {process.returncode}", code=1)
    finally:
        stop_process(process, timeout_s=30)
    console.print("stopped")


if __name__ == "__main__":
    llm_app()

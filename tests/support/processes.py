"""Real processes for tests: the CLI as a subprocess, and moto's S3 server as its own (pausable) process
with a bucket the store settings point at."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest

from tasks.resources.processes import free_port

ROOT = Path(__file__).resolve().parents[2]


def cli_env(api_url: str, **extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: the test's Prefect server, no inherited SELFINSTRUCT_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFINSTRUCT_")}
    env.update(PREFECT_API_URL=api_url, PYTHONPATH=str(ROOT), **extra)
    return env


def cli_command(*args: str, script: str | None = None) -> list[str]:
    """`selfinstruct ARGS` as a command line; with `script`, that Python code runs first and then the CLI."""
    if script is None:
        return [sys.executable, "-m", "selfinstruct", *args]
    return [sys.executable, "-c", script, *args]


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 240, script: str | None = None
) -> tuple[int, str]:
    """Run the CLI to the end; returns (exit status, stdout and stderr together)."""
    done = subprocess.run(
        cli_command(*args, script=script),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout


class MotoProcess:
    """moto's S3 server as its own process on 127.0.0.1, so that it can be paused and resumed.

    moto keeps buckets in memory: a stopped and restarted server comes back empty. SIGSTOP/SIGCONT instead
    freeze the process with its state: while frozen the kernel still accepts connections, but nothing
    answers, so clients hang until their own timeouts, as with a dead endpoint behind a load balancer.
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoProcess:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = subprocess.Popen(
            command, env=self._env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.terminate()
            self.process.wait(timeout=10)

    def client(self, access_key: str = "test", secret_key: str = "test") -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
        )


@contextmanager
def moto_process(env: dict[str, str] | None = None) -> Iterator[MotoProcess]:
    """A MotoProcess for the duration of the block."""
    server = MotoProcess(env).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def moto_bucket(
    monkeypatch: pytest.MonkeyPatch, bucket: str, connect_s: float, read_s: float, write_s: float
) -> Iterator[MotoProcess]:
    """A MotoProcess holding `bucket`, with SELFINSTRUCT_S3_* (endpoint, keys, timeouts in seconds) pointing
    at it and no ambient AWS credentials, for the duration of the block."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("SELFINSTRUCT_S3_CONNECT_TIMEOUT_S", f"{connect_s:g}")
    monkeypatch.setenv("SELFINSTRUCT_S3_READ_TIMEOUT_S", f"{read_s:g}")
    monkeypatch.setenv("SELFINSTRUCT_S3_WRITE_TIMEOUT_S", f"{write_s:g}")
    with moto_process() as moto:
        moto.client().create_bucket(Bucket=bucket)
        monkeypatch.setenv("SELFINSTRUCT_S3_ENDPOINT_URL", moto.url)
        monkeypatch.setenv("SELFINSTRUCT_S3_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("SELFINSTRUCT_S3_SECRET_ACCESS_KEY", "test")
        yield moto

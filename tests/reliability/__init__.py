"""Reliability tests: faults, bad input, secrets and load against real processes on loopback.

Shared pieces live here: a fake model whose answers parse like a good model's, the CLI run as a subprocess,
a moto S3 server run as its own process (so that it can be paused), and the store checks every test ends with.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
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

from tasks.seeds import load_seeds
from tasks.store import Store
from tasks.verify import VerifyReport, verify_store
from tests.support.fake_openai import FakeOpenAI, Fault

ROOT = Path(__file__).resolve().parents[2]

# Pseudo-words give instructions that share few ROUGE-L tokens, so most of them survive dedup and the pool
# grows round after round; real English words from a small list would collide above the 0.7 threshold.
_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vo", "ber", "qui", "den", "ho", "zan", "pe", "ri", "mol")
_VERBS = ("Explain", "Summarize", "Compare", "Describe", "Classify", "List", "Rewrite", "Translate", "Rank")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(_word(rng) for _ in range(words)).capitalize() + "."


def model_answer(prompt: str, seed: int | None) -> str:
    """What a well-behaved model would answer to one of the round's prompts, deterministically."""
    rng = random.Random(hashlib.sha256(f"{seed}|{prompt}".encode()).digest())
    if prompt.endswith("Is it classification?"):
        return " Yes" if rng.random() < 0.3 else " No"
    numbered = re.search(r"\n(\d+)\.$", prompt)
    if numbered:
        first = int(numbered.group(1))
        items = [f"{rng.choice(_VERBS)} the {_word(rng)} {_word(rng)} of {_word(rng)} {_word(rng)}."]
        items += [f"{rng.choice(_VERBS)} how {_word(rng)} {_word(rng)} {_word(rng)}." for _ in range(2)]
        if rng.random() < 0.3:  # a near-copy, for dedup to catch
            items.append(items[0].replace(".", " now."))
        return " " + items[0] + "".join(f"\n{first + i}. {t}" for i, t in enumerate(items[1:], start=1))
    if "Class label:" in prompt.rsplit("Task:", 1)[0]:
        labels = [_word(rng).capitalize() for _ in range(2)]
        return "".join(f"Class label: {label}\nInput: {_sentence(rng, 5)}\n" for label in labels)
    return "".join(
        f"Example {n}\nInput: {_sentence(rng, 4)}\nOutput: {_sentence(rng, 3)}\n" for n in range(1, 3)
    )


class ModelLikeFake(FakeOpenAI):
    """The fake server with answers that parse (new instructions, Yes/No, instances); faults still apply.

    `answered_prompts` lists the prompts answered (faults that answer included) with the test phase they were
    answered in (set `phase`), to tell completions reused from an earlier phase from new ones.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = 0
        self.answered_prompts: list[tuple[int, str]] = []

    def __enter__(self) -> ModelLikeFake:
        self.start()
        return self

    def _result(self, body: dict[str, Any], prompts: list[str], fault: Fault | None) -> dict[str, Any]:
        result = super()._result(body, prompts, fault)
        if fault != "drop_choice":  # every prompt got an answer, if not a good one
            self.answered_prompts += [(self.phase, p) for p in prompts]
        if fault in ("empty", "length"):
            return result
        n = int(body.get("n") or 1)
        for choice in result["choices"]:
            prompt = prompts[choice["index"] // n]
            choice["text"] = model_answer(prompt, body.get("seed"))
            choice["finish_reason"] = "stop"
        return result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def assert_store_sound(store: Store) -> VerifyReport:
    """What every reliability test ends with.

    Every committed round passes verification (files match the manifest, counts match the files), no
    instruction appears twice in the pool (seeds included), and only rounds with a manifest are listed.
    """
    seeds, _ = load_seeds()
    report = verify_store(store, seeds)
    assert report.ok, report.problems
    committed = store.committed_rounds()
    for number in committed:
        assert store.fs.exists(f"{store.round_dir(number)}/manifest.json")
        for name, entry in store.read_manifest(number).files.items():
            assert store.file_checksum(number, name) == entry.sha256, (number, name)
    texts = [
        " ".join(t.lower().split())
        for t in store.read_committed("instructions").column("instruction").to_pylist()
    ]
    texts += [" ".join(t.instruction.lower().split()) for t in seeds]
    assert len(texts) == len(set(texts)), "an instruction appears twice in the pool"
    assert not set(committed) & set(store.uncommitted_rounds())
    return report


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


def full_app() -> Any:
    """The CLI app with the commands `main()` adds (export, finetune, report, ...), registered once."""
    from selfinstruct import cli_ops, cli_train
    from selfinstruct.cli import app

    names = {command.name for command in app.registered_commands}
    if "export" not in names:
        cli_train.register(app)
    if "report" not in names:
        cli_ops.register(app)
    return app

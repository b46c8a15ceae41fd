"""The terminal progress display: bars on a terminal, silence otherwise, and the real `run` under a pty."""

import io
import os
import pty
import re
import subprocess
import time
from pathlib import Path

import pytest
from rich.console import Console

from selfinstruct.progress import TerminalProgress, terminal_progress
from tasks.publish.progress import ProgressUpdate, generation_hook, report, showing
from tasks.resources.store.rounds import Store
from tests.support.model_like import ModelLikeFake
from tests.support.processes import ROOT, cli_command, cli_env

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def _render(display: TerminalProgress) -> str:
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(display.progress.get_renderable())
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def test_lines_show_counts_rates_and_notes() -> None:
    display = TerminalProgress(Console(file=io.StringIO(), force_terminal=True, width=160))
    artifact: list[tuple[int, int, int]] = []
    with showing(display):
        hook = generation_hook("round 3 instructions", lambda d, t, k: artifact.append((d, t, k)))
        hook(0, 16, 0)
        time.sleep(0.01)  # a rate needs elapsed time; this is not a timing assertion
        hook(12, 16, 480)
        report(ProgressUpdate("round 3 instructions", note="kept 5"))
        report(ProgressUpdate("evaluate base", done=3, total=8, unit="tasks"))
        report(ProgressUpdate("finetune", done=4, total=12, unit="steps", note="loss 1.2345"))
    text = _render(display)
    assert artifact == [(0, 16, 0), (12, 16, 480)]  # the Prefect artifact's callback still gets every call
    assert re.search(r"round 3 instructions .*12/16\s+requests\s+\d+ tok/s\s+kept 5", text), text
    assert re.search(r"evaluate base .*3/8\s+tasks", text), text
    assert re.search(r"finetune .*4/12\s+steps\s+loss 1\.2345", text), text
    report(ProgressUpdate("after", done=1))  # nothing installed any more: a no-op
    assert "after" not in _render(display)


def test_silent_when_not_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out)  # a file is not a terminal
    with terminal_progress(console):
        generation_hook("round 1 instructions")(3, 4, 100)
        report(ProgressUpdate("finetune", done=1, total=2, unit="steps"))
    assert out.getvalue() == ""


def test_a_broken_display_does_not_break_the_work() -> None:
    def broken(update: ProgressUpdate) -> None:
        raise RuntimeError("display gone")

    with showing(broken):
        report(ProgressUpdate("x", done=1))  # logged, not raised


def _run_under_pty(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run `command` with a pseudo-terminal as stdin, stdout and stderr; returns (status, output)."""
    parent, child = pty.openpty()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdin=child, stdout=child, stderr=child)
    os.close(child)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(parent, 65536)
        except OSError:  # EIO: the child side closed
            break
        if not data:
            break
        chunks.append(data)
    else:
        process.kill()
    os.close(parent)
    return process.wait(timeout=30), ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


@pytest.mark.slow
def test_run_shows_stage_progress_on_a_terminal_and_nothing_when_piped(
    prefect_server: None, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    env = cli_env(str(PREFECT_API_URL.value()), COLUMNS="160", LINES="50", TERM="xterm-256color")
    with ModelLikeFake(latency_s=0.05) as fake:
        args = ["run", "--prompts", "2", "--no-store-slot", "--llm-url", fake.url]
        code, shown = _run_under_pty(cli_command(*args, "--store", str(tmp_path / "tty")), env, timeout=300)
        assert code == 0, shown[-3000:]
        # Piped, and with no --llm-url: the Quick start's path, on the embedded llama.cpp server.
        piped = subprocess.run(
            cli_command("run", "--prompts", "1", "--no-store-slot", "--store", str(tmp_path / "piped")),
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            timeout=300,
        )
    assert piped.returncode == 0, piped.stdout[-3000:]
    assert Store(str(tmp_path / "piped")).read_manifest(1).model == "smollm2-135m-instruct"
    kept = Store(str(tmp_path / "tty")).read_manifest(1).counts["kept"]
    assert re.search(r"round 1 instructions .*\d+/\d+\s+requests\s+\d+ tok/s", shown), shown[-3000:]
    assert re.search(rf"round 1 instructions .*kept {kept}\b", shown), shown[-3000:]
    assert re.search(r"round 1 instances .*kept \d+ instructions, \d+ instances", shown), shown[-3000:]
    assert re.search(r"run .*1/1\s+rounds\s+.*kept so far", shown), shown[-3000:]
    assert "round 1 committed" in shown
    # Piped: the same summary, and not one progress line.
    assert "round 1 committed" in piped.stdout
    assert "requests" not in piped.stdout and "tok/s" not in piped.stdout

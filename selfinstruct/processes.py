"""Child processes and signals of commands that start servers (the ephemeral Prefect API, an LLM)."""

import logging
import os
import signal
import threading

from selfinstruct.console import errors

as_program = False  # True when started as the `selfinstruct` program (not in-process, as in tests)
signalled: int | None = None
CANCEL_GRACE_S = 5.0


def _cancel(signum: int, _frame: object) -> None:
    """SIGINT/SIGTERM: stop the round with a clear line; a hard exit after CANCEL_GRACE_S if it hangs.

    A Ctrl-C reaches the whole process group, so Prefect's ephemeral server may already be gone and the
    engine's last state report could retry for minutes: the timer bounds the wait.
    """
    global signalled
    if signalled is not None:  # a second signal: leave now
        os._exit(128 + signum)
    signalled = signum
    name = signal.Signals(signum).name
    errors.print(
        f"[bold red]error:[/] {name}: cancelling; the round is not committed (a rerun resumes it)",
        soft_wrap=True,
        highlight=False,
    )
    # The engine logs the interrupted task and flow runs with tracebacks (their states keep them): after the
    # line above, the console gets nothing more.
    logging.disable(logging.CRITICAL)
    timer = threading.Timer(CANCEL_GRACE_S, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()
    # Backstop that needs no Python thread to run (on a loaded machine the timer can be late): the kernel
    # ends the process on SIGALRM; the watchdog then ends its children.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(int(CANCEL_GRACE_S) + 3)
    raise KeyboardInterrupt


def guard_child_processes() -> None:
    """Children end with this process even when it is SIGKILLed, and SIGINT/SIGTERM cancel within seconds.

    Only when run as the program: in-process callers (tests) keep their own children and signal handlers.
    """
    if not as_program:
        return
    from tasks.resources.reaper import start_reaper

    start_reaper()
    signal.signal(signal.SIGINT, _cancel)
    signal.signal(signal.SIGTERM, _cancel)

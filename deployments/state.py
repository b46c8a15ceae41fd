"""What `stack up` is told and what it records: the options, the paths of one stack, and its state file.

Everything the stack starts listens on 127.0.0.1 and keeps its state under one data folder (data/ by
default); the state file (stack.json) names every started process, so `stack down` stops exactly those.
"""

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deployments.processes import ManagedProcess, StackError

DEFAULT_POOL = "selfinstruct-process"
DEFAULT_PORT = 4200
DEFAULT_LLM_PORT = 8081
DEFAULT_REPORT_PORT = 8082
HOST = "127.0.0.1"  # every server the stack starts listens on loopback only
PREFECT_FILE = Path("deployments/prefect.yaml")
STATE_VERSION = 2
Say = Callable[[str], None]  # where the stack reports what it is doing (the CLI's status line)


@dataclass(frozen=True)
class StackLayout:
    """Paths of one stack: the repository it deploys and the data folder it keeps its state in."""

    root: Path
    data_dir: Path

    @property
    def prefect_home(self) -> Path:
        """PREFECT_HOME of the stack's server, worker and CLI calls (database, leases, profiles)."""
        return self.data_dir / "prefect-stack"

    @property
    def state_dir(self) -> Path:
        """Where the state file, the logs and the rendered deployments file go."""
        return self.data_dir / "stack"

    @property
    def state_file(self) -> Path:
        """The record of what `stack up` started."""
        return self.state_dir / "stack.json"

    def log(self, name: str) -> Path:
        """Log file of one component."""
        return self.state_dir / f"{name}.log"


@dataclass
class StackState:
    """What `stack up` recorded."""

    api_url: str
    ui_url: str
    llm_url: str | None
    pool: str
    root: str
    prefect_home: str
    started_at: str
    processes: list[ManagedProcess] = field(default_factory=list)
    store_url: str = ""
    report_url: str | None = None
    version: int = STATE_VERSION

    def to_json(self) -> str:
        """The state file's content."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "StackState":
        """Parse a state file.

        Raises:
            StackError: When the file is not a state this version wrote.
        """
        try:
            data = json.loads(text)
            processes = [ManagedProcess(**p) for p in data.pop("processes")]
            return cls(**data, processes=processes)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise StackError(
                f"unreadable stack state ({error}); remove it after checking nothing runs"
            ) from None


@dataclass(frozen=True)
class StackOptions:
    """How to bring the stack up (the `stack up` flags)."""

    port: int = DEFAULT_PORT
    llm_port: int = DEFAULT_LLM_PORT
    report_port: int = DEFAULT_REPORT_PORT
    llm_url: str | None = None
    store_url: str | None = None
    pool: str = DEFAULT_POOL
    prefect_file: Path = PREFECT_FILE
    dry_run_finetunes: bool = False
    every_s: int | None = None
    round_config: dict[str, Any] | None = None
    data_ready_threshold: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


def read_state(layout: StackLayout) -> StackState | None:
    """The recorded stack, or None when there is none."""
    if not layout.state_file.exists():
        return None
    return StackState.from_json(layout.state_file.read_text())


def write_state(layout: StackLayout, state: StackState) -> None:
    """Record the stack (replaced atomically, so a reader never sees half a file)."""
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    partial = layout.state_file.with_suffix(".json.tmp")
    partial.write_text(state.to_json())
    partial.replace(layout.state_file)

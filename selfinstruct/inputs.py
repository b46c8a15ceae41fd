"""What every command reads before it works: settings, a config file, the store, and Prefect's environment.

Each reader turns bad input into one `error:` line and exit 2; Prefect is not imported here.
"""

import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from schemas import BootstrapConfig, Settings
from selfinstruct.console import fail

if TYPE_CHECKING:
    from tasks.resources.store.rounds import Store


def local_data_dir(settings: Settings) -> Path:
    """Folder for local state (Prefect's database, model files): the store when local, else ./data."""
    if "://" in settings.store_url and not settings.store_url.startswith("file://"):
        return Path("data").resolve()
    return Path(settings.store_url.removeprefix("file://")).expanduser().resolve()


PREFECT_STARTUP_TIMEOUT_S = 300  # a first start of the ephemeral server took over 90 s on 2 loaded cores
MAX_CONFIG_BYTES = 1 << 20


def configure_prefect(data_dir: Path) -> None:
    """Point Prefect at the store's data folder and give its ephemeral API time to start. Writes nothing.

    Prefect reads its settings once, when it is first imported, so every command calls this (through
    `load_settings`, and `main` from the command line) before anything imports Prefect. Values the user set
    in the environment win.
    """
    if "prefect" in sys.modules:  # too late to change anything for this process (in-process tests)
        return
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(data_dir / "prefect"))
        os.environ.setdefault(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(PREFECT_STARTUP_TIMEOUT_S)
        )
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # Prefect tries to create its home when imported; for a store that does not exist yet that fails with
    # a warning, which is right: nothing is written until `prepare_prefect_env`, after every check.
    warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory")


def prepare_prefect_env(data_dir: Path) -> None:
    """Create Prefect's home before a flow runs (after every check passed, so bad input writes nothing)."""
    configure_prefect(data_dir)
    if not os.environ.get("PREFECT_API_URL") and os.environ.get("PREFECT_HOME"):
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


def configure_prefect_from_argv(argv: list[str]) -> None:
    """Configure Prefect for the store the command line names, before any command imports anything.

    Commands call `load_settings` first, which does the same; this covers a command that imports a module
    pulling in Prefect before it reads its settings. Bad values are left for the command to report.
    """
    store = None
    for index, arg in enumerate(argv):
        if arg == "--store" and index + 1 < len(argv):
            store = argv[index + 1]
        elif arg.startswith("--store="):
            store = arg.removeprefix("--store=")
    try:
        settings = Settings()
        if store:
            settings = settings.model_copy(update={"store_url": store})
        configure_prefect(local_data_dir(settings))
    except (ValidationError, OSError, ValueError):
        pass


def load_settings(store: str | None) -> Settings:
    """Settings from the environment, with the store overridden by --store; Prefect configured for it."""
    try:
        settings = Settings()
        if store:
            settings = settings.model_copy(update={"store_url": store})
    except ValidationError as error:
        first = error.errors()[0]
        fail(f"settings: SELFINSTRUCT_{str(first['loc'][0]).upper()}: {first['msg']}")
    try:
        data_dir = local_data_dir(settings)
    except (OSError, ValueError) as error:
        fail(f"store URL {settings.store_url[:200]!r}: not a usable path ({error})")
    configure_prefect(data_dir)
    return settings


def load_config(path: Path | None, prompts: int | None, adapter: str | None = None) -> BootstrapConfig:
    """A BootstrapConfig from a JSON file (all fields optional), with --prompts and --adapter applied."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = path.read_bytes()
        except OSError as error:
            fail(f"{path}: cannot read ({error.strerror})")
        if len(raw) > MAX_CONFIG_BYTES:
            fail(f"{path}: {len(raw)} bytes; a config file is at most {MAX_CONFIG_BYTES}")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            fail(f"{path}: not UTF-8 text")
        except json.JSONDecodeError as error:
            fail(f"{path}:{error.lineno}: invalid JSON ({error.msg})")
        except RecursionError:
            fail(f"{path}: JSON nested too deeply")
        if not isinstance(data, dict):
            fail(f"{path}: expected a JSON object of BootstrapConfig fields")
    if prompts is not None:
        data["prompts_per_round"] = prompts
    if adapter is not None:
        data["adapter"] = adapter
    try:
        return BootstrapConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<config>"
        fail(f"{path or 'config'}: field '{where}': {first['msg'][:200]}")
    except RecursionError:
        fail(f"{path or 'config'}: nested too deeply")


def open_store_or_fail(settings: Settings, *, must_exist: bool = True) -> "Store":
    """The configured store, read once (see `open_store` in the store), or one `error:` line and exit 2.

    Args:
        settings: Where the store is.
        must_exist: Refuse a store that does not exist (a mistyped path, a missing bucket); `run` passes
            False, and a local store is then created on the first commit, below a folder that must exist.
    """
    from tasks.resources.store.files import StoreError
    from tasks.resources.store.rounds import open_store

    try:
        store = open_store(settings.store_url, settings, check=True)
        problem = store.existence_problem(must_exist)
    except StoreError as error:
        fail(str(error))
    except Exception as error:  # an S3 HEAD of the bucket that fails
        fail(f"store {settings.store_url[:200]}: cannot read it ({type(error).__name__}: {str(error)[:200]})")
    if problem:
        from tasks.resources.redact import redact_url

        fail(f"store {redact_url(settings.store_url)}: {problem}")
    return store


def check_store_writable(settings: Settings) -> None:
    """A local store folder (or the folder it will be created in) must be writable; checked, not written."""
    if "://" in settings.store_url and not settings.store_url.startswith("file://"):
        return  # an S3 bucket's permissions show on the first write, which only a committed round makes
    root = local_data_dir(settings)
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"store {settings.store_url}: {existing} is not writable")


# The store and rounds of `export`, `finetune` and `evaluate`: the same options, and the same check.
StoreOption = Annotated[str | None, typer.Option(help="Store root URL (folder or s3://bucket/prefix).")]
RoundsOption = Annotated[
    str | None, typer.Option(help="Committed rounds, inclusive: N, A:B, :B or A: (default: all).")
]


def rounds_or_fail(store: "Store", spec: str | None) -> list[int]:
    """The committed rounds `spec` names, their files checked against the manifests' checksums, or one
    `error:` line (a tampered round is never read)."""
    from tasks.resources.redact import redact_url
    from tasks.resources.store.files import StoreError
    from tasks.training.export import ExportError, checked_rounds

    try:
        return checked_rounds(store, spec)
    except (ExportError, StoreError) as error:
        fail(f"{error} (store {redact_url(store.url)})")


# The judge of `audit` and `evaluate`: the same two options, and the same check of its servers.
JudgeUrlOption = Annotated[
    list[str] | None,
    typer.Option(
        help="Judge's OpenAI-compatible base URL (repeatable; default: SELFINSTRUCT_LLM_URL or the "
        "embedded server)."
    ),
]
JudgeModelOption = Annotated[str | None, typer.Option(help="Judge model name (default: SELFINSTRUCT_MODEL).")]


def judge_urls(judge_url: list[str] | None, judge_model: str | None, settings: Settings) -> list[str]:
    """The judge's servers (given, else Settings'), preflighted; none: the flow starts the embedded one."""
    from selfinstruct.cli import check_llm_servers  # the module that registers the commands: loaded by now

    urls = [u.rstrip("/") for u in judge_url or []] or settings.llm_urls()
    if urls:
        check_llm_servers(urls, judge_model or settings.model, settings)
    return urls

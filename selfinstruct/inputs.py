"""What every command reads before it works: settings, a config file, the store, and Prefect's environment.

Each reader turns bad input into one `error:` line and exit 2; Prefect is not imported here.
"""

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from schemas import BootstrapConfig, Settings
from selfinstruct.console import fail

if TYPE_CHECKING:
    from tasks.store import Store


def local_data_dir(settings: Settings) -> Path:
    """Folder for local state (Prefect's database, model files): the store when local, else ./data."""
    if "://" in settings.store_url and not settings.store_url.startswith("file://"):
        return Path("data").resolve()
    return Path(settings.store_url.removeprefix("file://")).expanduser().resolve()


def prepare_prefect_env(data_dir: Path) -> None:
    """Keep Prefect's ephemeral API inside the project's data folder, and give it time to start on 2 cores."""
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(data_dir / "prefect"))
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def load_settings(store: str | None) -> Settings:
    """Settings from the environment, with the store overridden by --store."""
    try:
        settings = Settings()
        if store:
            settings = settings.model_copy(update={"store_url": store})
    except ValidationError as error:
        first = error.errors()[0]
        fail(f"settings: SELFINSTRUCT_{str(first['loc'][0]).upper()}: {first['msg']}")
    return settings


def load_config(path: Path | None, prompts: int | None, adapter: str | None = None) -> BootstrapConfig:
    """A BootstrapConfig from a JSON file (all fields optional), with --prompts and --adapter applied."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(path.read_text())
        except OSError as error:
            fail(f"{path}: cannot read ({error.strerror})")
        except json.JSONDecodeError as error:
            fail(f"{path}:{error.lineno}: invalid JSON ({error.msg})")
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
        where = ".".join(str(p) for p in first["loc"])
        fail(f"{path or 'config'}: field '{where}': {first['msg']}")


def open_store_or_fail(settings: Settings) -> "Store":
    """The configured store, read once (see `tasks.store.open_store`), or one `error:` line and exit 2."""
    from tasks.store import StoreError, open_store

    try:
        return open_store(settings.store_url, settings, check=True)
    except StoreError as error:
        fail(str(error))

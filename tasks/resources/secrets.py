"""Settings for a flow run: the environment first, then Prefect Secret blocks for the secrets it lacks.

A worker that runs flows for several teams often has no credentials in its environment; operators keep them
in Prefect Secret blocks instead. Each secret field of Settings has a block name (SELFINSTRUCT_*_BLOCK, with
a default): when the environment leaves the field empty, the block of that name is loaded, if it exists.
The values stay SecretStr and never become flow parameters.
"""

import logging

from pydantic import SecretStr

from schemas import Settings

log = logging.getLogger(__name__)

# Settings field -> Settings field that names its Secret block.
SECRET_BLOCK_FIELDS = {
    "api_key": "api_key_block",
    "s3_access_key_id": "s3_access_key_id_block",
    "s3_secret_access_key": "s3_secret_access_key_block",
}


def read_secret_block(name: str) -> str | None:
    """The value of the Prefect Secret block `name`, or None when there is no such block (or no API)."""
    from prefect.blocks.system import Secret
    from prefect.exceptions import ObjectNotFound

    try:
        value = Secret.load(name, _sync=True).get()  # type: ignore[call-arg, union-attr]
    except (ObjectNotFound, ValueError):
        return None
    return value if isinstance(value, str) and value else None


def run_settings(settings: Settings | None = None) -> Settings:
    """Settings with every secret the environment left empty filled from its Secret block, if any.

    Args:
        settings: Settings already read (default: read the environment now).

    Returns:
        A copy of the settings; the fields the environment set are never replaced.
    """
    settings = settings or Settings()
    found: dict[str, SecretStr] = {}
    for field, block_field in SECRET_BLOCK_FIELDS.items():
        block = getattr(settings, block_field)
        if getattr(settings, field) is not None or not block:
            continue
        value = read_secret_block(block)
        if value is not None:
            found[field] = SecretStr(value)
            log.info("%s taken from the Prefect Secret block %r", field, block)
    return settings.model_copy(update=found) if found else settings

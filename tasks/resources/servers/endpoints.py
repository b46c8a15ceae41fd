"""Which LLM servers a command generates with: the URLs it was given, else Settings', else an embedded one."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from schemas import Settings
from tasks.resources.servers.embedded import EmbeddedServer


@contextmanager
def llm_endpoints(urls: list[str], settings: Settings) -> Iterator[list[str]]:
    """Base URLs to generate with: given ones, else Settings', else an embedded server for the duration."""
    configured = [u.rstrip("/") for u in urls] or settings.llm_urls()
    if configured:
        yield configured
        return
    with EmbeddedServer(cache_dir=Path(settings.store_url).expanduser() / "models") as server:
        yield [server.url]

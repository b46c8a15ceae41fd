"""Files under a store's root URL: the only module that talks to fsspec/s3fs.

A root URL is a local folder or s3://bucket/prefix. `StoreFiles` reads, lists and writes whole files there,
with the guarantees the rest of the store builds on: an S3 write answers within a deadline, a replace is seen
whole or not at all, and an exclusive write creates a file only if it is absent (the manifest's and the
claims' create-if-absent).
"""

import re
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec

from schemas import Settings
from tasks.resources.redact import redact_url


class StoreError(RuntimeError):
    """A store that cannot be used as asked; the message says why, without credentials."""


def open_filesystem(url: str, settings: Settings) -> tuple[fsspec.AbstractFileSystem, str]:
    """Map a store URL to a filesystem and the root path inside it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("", "file") or re.fullmatch(r"[a-z]", scheme):  # a Windows drive letter is not a scheme
        path = parts.path if scheme == "file" else url
        if not path.strip():
            raise StoreError(f"store URL {url!r}: no folder given")
        try:
            return fsspec.filesystem("file"), str(Path(path).expanduser().resolve())
        except (OSError, ValueError, RuntimeError) as error:
            raise StoreError(f"store URL {url[:200]!r}: not a usable folder ({error})") from None
    if scheme == "s3":
        if parts.username or parts.password or parts.query or parts.fragment:
            raise StoreError(
                f"store URL {redact_url(url)}: put S3 credentials in settings, not in the URL "
                "(no user info, query string or fragment)"
            )
        bucket = parts.netloc
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
            raise StoreError(f"store URL {redact_url(url)}: '{bucket}' is not a valid S3 bucket name")
        options: dict[str, Any] = {}
        if settings.s3_endpoint_url:
            options["client_kwargs"] = {"endpoint_url": settings.s3_endpoint_url}
        if settings.s3_access_key_id and settings.s3_secret_access_key:
            options["key"] = settings.s3_access_key_id.get_secret_value()
            options["secret"] = settings.s3_secret_access_key.get_secret_value()
        # Only the store ever writes here; s3fs's listing cache would hide other writers' rounds.
        options["use_listings_cache"] = False
        # Bounded waits: a frozen endpoint fails a request in known time instead of hanging the round.
        options["config_kwargs"] = {
            "connect_timeout": settings.s3_connect_timeout_s,
            "read_timeout": settings.s3_read_timeout_s,
            "retries": {"total_max_attempts": 2},
            "signature_version": "s3v4",  # what a Config without it would sign with (presigned report links)
        }
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        return fs, f"{bucket}{parts.path.rstrip('/')}"
    raise StoreError(f"store URL {redact_url(url)}: unsupported scheme '{scheme}' (use a folder or s3://)")


class StoreFiles:
    """Whole-file access under one root URL; paths are absolute inside the filesystem (`root` + '/...').

    Attributes:
        url: The root URL as given.
        settings: Credentials, endpoint and timeouts.
        fs: The fsspec filesystem (tests and tools may use it directly).
        root: The root path inside `fs`.
    """

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        self.fs, self.root = open_filesystem(url, settings)

    @property
    def is_local(self) -> bool:
        """True for a local folder, False for an object store."""
        protocol = self.fs.protocol
        return protocol == "file" or (isinstance(protocol, tuple) and "file" in protocol)

    @property
    def is_s3(self) -> bool:
        """True for an S3 store."""
        return self.fs.protocol in ("s3", ("s3", "s3a"))

    def display(self, path: str) -> str:
        """Human-readable location of `path` (s3:// in front on S3)."""
        return ("s3://" if self.is_s3 else "") + path

    def existence_problem(self, must_exist: bool) -> str | None:
        """Why the root cannot be used, or None: a missing bucket, or (with `must_exist`) a missing root.

        A local root that need not exist yet must have an existing folder above it.
        """
        if self.is_local:
            root = Path(self.root)
            if root.is_dir():
                return None
            if root.exists():
                return "not a folder"
            if must_exist:
                return "no such store (the folder does not exist)"
            parent = next((p for p in root.parents if p.exists()), None)
            if parent is not None and not parent.is_dir():
                return f"{parent} is not a folder"
            return None
        bucket = self.root.split("/", 1)[0]
        # An empty prefix in an existing bucket is a new store: S3 has no folders to tell it from a typo.
        if not self.fs.exists(bucket):
            return f"bucket '{bucket}' does not exist"
        return None

    # -- reading ---------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        """True when `path` exists."""
        return bool(self.fs.exists(path))

    def read(self, path: str) -> bytes:
        """The whole file; FileNotFoundError when it does not exist."""
        with self.fs.open(path, "rb") as handle:
            return bytes(handle.read())

    def ls(self, folder: str) -> list[str]:
        """Paths directly under `folder`, unsorted; empty when it does not exist."""
        try:
            return list(self.fs.ls(folder, detail=False))
        except FileNotFoundError:
            return []

    def find(self, folder: str) -> list[str]:
        """Every file below `folder`."""
        return list(self.fs.find(folder))

    def sign(self, path: str, expires_s: int) -> str:
        """A presigned HTTPS URL of `path` on S3."""
        return str(self.fs.sign(path, expiration=expires_s))

    # -- writing ---------------------------------------------------------------------------------
    def makedirs(self, folder: str) -> None:
        """Create `folder` and its parents (nothing to do on S3 beyond the call)."""
        self.fs.makedirs(folder, exist_ok=True)

    def rm(self, path: str) -> None:
        """Remove one file."""
        self.fs.rm(path)

    def move(self, source: str, target: str) -> None:
        """Move the folder `source` to `target` (a rename locally; copy and delete on S3, not atomic)."""
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(source).rename(target)
        else:
            self.fs.mv(source, target, recursive=True)

    def write(self, path: str, data: bytes, mode: str = "wb") -> None:
        """Write a whole file; on S3 within `Settings.s3_write_timeout_s` or StoreError.

        botocore's read timeout does not bound a PUT that waits for "100 Continue" from a frozen endpoint
        (aiohttp waits for it without a timeout), so S3 writes run in a worker thread with a deadline. A write
        that times out may still land later; the manifest, written last and create-if-absent, keeps the round
        either committed or not.
        """

        def write() -> None:
            with self.fs.open(path, mode) as handle:
                handle.write(data)

        if self.is_local:
            write()
            return
        # A daemon thread, not an executor: an executor's threads are joined at exit, and a hung one would
        # hold the process as long as the endpoint stays frozen.
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                write()
            except BaseException as error:  # handed to the caller below
                outcome.append(error)
            else:
                outcome.append(None)

        thread = threading.Thread(target=run, name="s3-write", daemon=True)
        thread.start()
        thread.join(self.settings.s3_write_timeout_s)
        if not outcome:
            raise StoreError(
                f"store {redact_url(self.url)}: no answer to a write within "
                f"{self.settings.s3_write_timeout_s:g}s"
            )
        if outcome[0] is not None:
            raise outcome[0]

    def replace(self, path: str, data: bytes) -> None:
        """Write `path` so that readers see the old or the new content, never a partial file."""
        if not self.is_local:
            self.write(path, data)  # an S3 PUT is atomic
            return
        temporary = Path(f"{path}.{uuid.uuid4().hex}.tmp")
        temporary.write_bytes(data)
        temporary.replace(path)

    def exclusive_write(self, path: str, data: bytes) -> bool:
        """Create `path` with `data` only if absent (never seen partly written); False if it existed."""
        if not self.is_local:
            try:
                self.write(path, data, "xb")  # a conditional PUT: atomic and exclusive
            except FileExistsError:
                return False
            return True
        folder = Path(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{Path(path).name}.{uuid.uuid4().hex}.tmp"
        temporary.write_bytes(data)
        try:
            Path(path).hardlink_to(temporary)
        except FileExistsError:
            return False
        finally:
            temporary.unlink(missing_ok=True)
        return True

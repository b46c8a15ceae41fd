"""The round store: the only module that talks to fsspec/s3fs.

Layout under the root URL (a local folder or s3://bucket/prefix):

    rounds/round=00007/claim-0001.json        exclusive claim of the round (create-if-absent)
    rounds/round=00007/completions/*.parquet  completion cache, written as each HTTP batch returns
    rounds/round=00007/instructions.parquet   accepted instructions with lineage
    rounds/round=00007/instances.parquet
    rounds/round=00007/rejected.parquet
    rounds/round=00007/requests.parquet
    rounds/round=00007/pool_index.parquet     token ids of the round's instructions (ROUGE-L index)
    rounds/round=00007/pool_vocab.parquet     vocabulary entries the round added
    rounds/round=00007/manifest.json          written last, create-if-absent: the round exists from here on

Readers only look at rounds that have a manifest.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import socket
import threading
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from schemas import (
    CompletionRecord,
    FileEntry,
    InstanceRecord,
    InstructionRecord,
    RejectionRecord,
    RoundManifest,
    Settings,
)
from schemas.records import INT32_COLUMN
from tasks.resources.redact import redact_url

MANIFEST = "manifest.json"
FINETUNES = "finetunes"  # finetunes/<id>/...: one folder per fine-tune
ARTIFACT_AREAS = (FINETUNES, "evaluations", "reports", "state", "audits")
MAX_ROUND = 99_999
DEFAULT_LEASE_S = 180.0


# Columns added to a round file after rounds were first written; files written before lack them, and
# readers treat them as null.
ADDED_COLUMNS: dict[str, tuple[str, ...]] = {
    "requests": ("rejected", "sent_at", "received_at", "cached_prompt_tokens")
}


def _arrow_type(annotation: Any, metadata: Sequence[Any] = ()) -> pa.DataType:
    """The Arrow type a record field is stored as; a TypeError for a type with no column type yet."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (UnionType, Union):  # X | None: every column is nullable anyway
        present = [a for a in args if a is not type(None)]
        if len(present) == 1:
            return _arrow_type(present[0], metadata)
    elif origin is Annotated:
        return _arrow_type(args[0], [*metadata, *args[1:]])
    elif origin is Literal and all(isinstance(a, str) for a in args):
        return pa.string()
    elif origin is list and len(args) == 1:
        return pa.list_(_arrow_type(args[0]))
    elif annotation is bool:
        return pa.bool_()
    elif annotation is int:
        return pa.int32() if INT32_COLUMN in metadata else pa.int64()
    elif annotation is float:
        return pa.float64()
    elif annotation is str:
        return pa.string()
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.string()  # a nested model on its own (decoding parameters) is stored as its JSON
    raise TypeError(f"no Arrow column type for {annotation!r}")


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """The Arrow schema of a record model: one nullable column per field, in field order.

    str/Literal -> string, int -> int64 (int32 when marked `Int32`), float -> float64, bool -> bool,
    list[X] -> list<X>, list[Model] -> list<struct> of the model's fields, a nested Model -> its JSON string.
    """
    fields = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        args = get_args(annotation)
        if get_origin(annotation) is list and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            column = pa.list_(pa.struct(list(arrow_schema(args[0]))))
        else:
            column = _arrow_type(annotation, info.metadata)
        fields.append(pa.field(name, column))
    return pa.schema(fields)


# Each round file and the record model of its rows: the Arrow schemas are derived, never typed twice.
RECORD_FILES: dict[str, type[BaseModel]] = {
    "instructions": InstructionRecord,
    "instances": InstanceRecord,
    "rejected": RejectionRecord,
    "requests": CompletionRecord,
}
ARROW_SCHEMAS: dict[str, pa.Schema] = {name: arrow_schema(model) for name, model in RECORD_FILES.items()}


class StoreError(RuntimeError):
    """A store that cannot be used as asked; the message says why, without credentials."""


class RoundClaimedError(StoreError):
    """Another live run holds the round this run would write."""


def _open_filesystem(url: str, settings: Settings) -> tuple[fsspec.AbstractFileSystem, str]:
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


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol
    return protocol == "file" or (isinstance(protocol, tuple) and "file" in protocol)


def lease_expiry(claim: dict[str, Any]) -> datetime | None:
    """When a claim's lease runs out; claims written before leases existed get the default lease."""
    try:
        if "lease_expires_at" in claim:
            expires = datetime.fromisoformat(str(claim["lease_expires_at"]))
        else:
            expires = datetime.fromisoformat(str(claim["claimed_at"])) + timedelta(seconds=DEFAULT_LEASE_S)
    except (KeyError, ValueError, TypeError):
        return None
    return expires if expires.tzinfo else expires.replace(tzinfo=UTC)


def _check_round(number: int) -> int:
    if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= MAX_ROUND:
        raise StoreError(f"round must be an integer from 1 to {MAX_ROUND}, got {number!r}")
    return number


def _to_row(record: BaseModel, schema: pa.Schema) -> dict[str, Any]:
    """A record as a dict for Arrow: nested models stored in string columns become JSON."""
    row = record.model_dump(mode="json")
    for field in schema:
        value = row.get(field.name)
        if pa.types.is_string(field.type) and isinstance(value, dict | list):
            row[field.name] = json.dumps(value, sort_keys=True)
    return row


def records_to_table(records: Sequence[BaseModel], name: str) -> pa.Table:
    """Build the Arrow table of a round file from its records, with the schema derived from their model.

    Raises:
        TypeError: When a record is not of the file's model (Arrow would silently drop its other fields).
    """
    model = RECORD_FILES[name]
    if any(type(r) is not model for r in records):
        raise TypeError(f"{name}.parquet holds {model.__name__} rows only")
    schema = ARROW_SCHEMAS[name]
    return pa.Table.from_pylist([_to_row(r, schema) for r in records], schema=schema)


class Store:
    """Rounds of one bootstrap run, under one root URL."""

    def __init__(self, url: str, settings: Settings | None = None) -> None:
        self.url = url
        self.settings = settings or Settings(store_url=url)
        self.fs, self.root = _open_filesystem(url, self.settings)

    def existence_problem(self, must_exist: bool) -> str | None:
        """Why this store cannot be used, or None: a missing bucket, or (with `must_exist`) a missing store.

        A local store that need not exist yet must have an existing folder above it.
        """
        if _is_local(self.fs):
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

    def __repr__(self) -> str:
        return f"Store({redact_url(self.url)!r})"

    # -- paths -----------------------------------------------------------------------------------
    def round_dir(self, number: int) -> str:
        """Folder of round `number` (validated, so no input can point outside the root)."""
        return f"{self.root}/rounds/round={_check_round(number):05d}"

    def _path(self, number: int, name: str) -> str:
        if not re.fullmatch(r"[a-z_]+(\.[a-z]+)?|claim-\d{4}\.json|completions/[0-9a-f\-]+\.parquet", name):
            raise StoreError(f"invalid store file name {name!r}")
        return f"{self.round_dir(number)}/{name}"

    def location(self, number: int) -> str:
        """Human-readable location of a round, for summaries."""
        prefix = "s3://" if self.fs.protocol in ("s3", ("s3", "s3a")) else ""
        return prefix + self.round_dir(number)

    # -- reading committed rounds ----------------------------------------------------------------
    def _round_numbers_on_disk(self) -> list[int]:
        base = f"{self.root}/rounds"
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        numbers = []
        for entry in entries:
            match = re.search(r"round=(\d{5})$", entry.rstrip("/"))
            if match:
                numbers.append(int(match.group(1)))
        return sorted(numbers)

    def committed_rounds(self) -> list[int]:
        """Rounds whose manifest exists, ascending."""
        return [n for n in self._round_numbers_on_disk() if self.fs.exists(self._path(n, MANIFEST))]

    def uncommitted_rounds(self) -> list[int]:
        """Round folders with no manifest: crashed or in-progress runs, invisible to readers."""
        committed = set(self.committed_rounds())
        return [n for n in self._round_numbers_on_disk() if n not in committed]

    def read_manifest(self, number: int) -> RoundManifest:
        """The manifest of a committed round."""
        with self.fs.open(self._path(number, MANIFEST), "rb") as handle:
            data = handle.read()
        try:
            return RoundManifest.model_validate_json(data)
        except ValueError as error:  # pydantic's ValidationError is a ValueError
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise StoreError(f"round {number}: manifest unreadable ({first[:200]})") from None

    def read_table(self, number: int, name: str) -> pa.Table:
        """One Parquet file of a committed round, checked against the sha256 its manifest records.

        Raises:
            StoreError: When the round is not committed, or the file is not in its manifest, is missing or
                differs from the manifest's checksum (a tampered or corrupt round is never read).
        """
        if not self.fs.exists(self._path(number, MANIFEST)):
            raise StoreError(f"round {number} is not committed")
        file_name = f"{name}.parquet"
        entry = self.read_manifest(number).files.get(file_name)
        if entry is None:
            raise StoreError(f"round {number}: {file_name} is not in the round's manifest")
        try:
            with self.fs.open(self._path(number, file_name), "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            raise StoreError(f"round {number}: {file_name} is missing; run `selfinstruct verify`") from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StoreError(
                f"round {number}: {file_name} does not match the checksum in its manifest (tampered or "
                "corrupt); run `selfinstruct verify`"
            )
        return pq.read_table(pa.BufferReader(data))

    def check_checksums(self, numbers: Iterable[int]) -> None:
        """Check every file of the committed rounds `numbers` against its manifest's sha256.

        Raises:
            StoreError: Naming the first round and file that is missing or differs.
        """
        for number in numbers:
            if not self.fs.exists(self._path(number, MANIFEST)):
                raise StoreError(f"round {number} is not committed")
            files = self.read_manifest(number).files
            for name, entry in sorted(files.items()):
                try:
                    checksum = self.file_checksum(number, name)
                except FileNotFoundError:
                    raise StoreError(
                        f"round {number}: {name} is missing; run `selfinstruct verify`"
                    ) from None
                if checksum != entry.sha256:
                    raise StoreError(
                        f"round {number}: {name} does not match the checksum in its manifest (tampered or "
                        "corrupt); run `selfinstruct verify`"
                    )

    def read_committed(self, name: str, rounds: Iterable[int] | None = None) -> pa.Table:
        """A file concatenated over committed rounds (all of them by default), in round order."""
        wanted = self.committed_rounds() if rounds is None else sorted(set(rounds))
        tables = [self.read_table(n, name) for n in wanted]
        if not tables:
            return ARROW_SCHEMAS[name].empty_table() if name in ARROW_SCHEMAS else pa.table({})
        return pa.concat_tables(tables, promote_options="default")

    # -- claiming and committing -----------------------------------------------------------------
    def _claims(self, number: int) -> list[str]:
        try:
            names = self.fs.ls(self.round_dir(number), detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if re.search(r"/claim-\d{4}\.json$", n))

    def _read_claim(self, path: str) -> dict[str, Any] | None:
        """A claim file's content, or None when it is unreadable (empty, truncated, not JSON)."""
        try:
            with self.fs.open(path, "rb") as handle:
                claim = json.loads(handle.read())
        except (OSError, ValueError):
            return None
        return claim if isinstance(claim, dict) else None

    def _write(self, path: str, data: bytes, mode: str = "wb") -> None:
        """Write a whole file; on S3 within `Settings.s3_write_timeout_s` or StoreError.

        botocore's read timeout does not bound a PUT that waits for "100 Continue" from a frozen endpoint
        (aiohttp waits for it without a timeout), so S3 writes run in a worker thread with a deadline. A write
        that times out may still land later; the manifest, written last and create-if-absent, keeps the round
        either committed or not.
        """

        def write() -> None:
            with self.fs.open(path, mode) as handle:
                handle.write(data)

        if _is_local(self.fs):
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

    def _replace(self, path: str, data: bytes) -> None:
        """Write `path` so that readers see the old or the new content, never a partial file."""
        if not _is_local(self.fs):
            self._write(path, data)  # an S3 PUT is atomic
            return
        temporary = Path(f"{path}.{uuid.uuid4().hex}.tmp")
        temporary.write_bytes(data)
        temporary.replace(path)

    def _exclusive_write(self, path: str, data: bytes) -> bool:
        """Create `path` with `data` only if absent (never seen partly written); False if it existed."""
        if not _is_local(self.fs):
            try:
                self._write(path, data, "xb")  # a conditional PUT: atomic and exclusive
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

    def claim_is_stale(self, claim: dict[str, Any] | None) -> bool:
        """True when a claim no longer protects its round: unreadable, its lease expired, or (on this
        host) its process is gone. The lease is what counts across hosts."""
        if claim is None:
            return True
        if claim.get("host") == socket.gethostname():
            try:
                os.kill(int(claim["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError, TypeError):
                pass
        expires = lease_expiry(claim)
        return expires is None or expires <= datetime.now(UTC)

    def _claim_description(self, number: int, claim: dict[str, Any]) -> str:
        expires = lease_expiry(claim)
        until = expires.isoformat(timespec="seconds") if expires else "?"
        return (
            f"round {number} of store {redact_url(self.url)} is being written by run {claim.get('run_id')} "
            f"(pid {claim.get('pid')} on {claim.get('host')}, lease renewed until {until})"
        )

    def claim_next_round(self, run_id: str, lease_s: float | None = None, *, renew: bool = True) -> int:
        """Claim the round after the last committed one for this run, under a lease.

        The claim records when its lease expires; while the round is worked on, a background thread renews
        it every third of `lease_s` (see `ClaimLease`). A claim whose lease has expired (its holder died or
        hung, on any host), whose process is gone on this host, or that is unreadable is taken over, so a
        crashed round is redone under the same number and reuses its cached completions. A claim by the same
        `run_id` (a retry of the same flow run) is reused. The claim is a create-if-absent write, so of two
        runs only one can hold a round.

        Args:
            run_id: The flow run's id.
            lease_s: Lease length; None = Settings.claim_lease_s.
            renew: Start the renewer thread (stopped by `commit` or `end_claim`).

        Returns:
            The round number now held by `run_id`.

        Raises:
            RoundClaimedError: When a live run holds the next round.
        """
        lease_s = self.settings.claim_lease_s if lease_s is None else lease_s
        committed = self.committed_rounds()
        number = _check_round((committed[-1] if committed else 0) + 1)
        claims = self._claims(number)
        attempt = 1
        if claims:
            current = self._read_claim(claims[-1])
            if current is not None and current.get("run_id") == run_id:
                self.renew_claim(number, run_id, lease_s)
                if renew:
                    self._start_lease(number, run_id, lease_s)
                return number
            if not self.claim_is_stale(current):
                raise RoundClaimedError(
                    f"{self._claim_description(number, current or {})}; wait for it to finish, or run "
                    f"`selfinstruct unlock --round {number}` once its lease has expired"
                )
            attempt = int(re.search(r"claim-(\d{4})\.json$", claims[-1]).group(1)) + 1  # type: ignore[union-attr]
        if attempt > 9999:
            raise StoreError(f"round {number} has been claimed 9999 times; clean it with `verify --clean`")
        now = datetime.now(UTC)
        claim = {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "claimed_at": now.isoformat(),
            "attempt": attempt,
            "lease_s": lease_s,
            "lease_expires_at": (now + timedelta(seconds=lease_s)).isoformat(),
        }
        if not self._exclusive_write(
            self._path(number, f"claim-{attempt:04d}.json"), json.dumps(claim).encode()
        ):
            raise RoundClaimedError(
                f"round {number} of store {redact_url(self.url)} was just claimed by another run"
            )
        if renew:
            self._start_lease(number, run_id, lease_s)
        return number

    def renew_claim(self, number: int, run_id: str, lease_s: float, *, expire_now: bool = False) -> bool:
        """Push the lease of `run_id`'s claim on round `number` to now + `lease_s` (or to now, releasing it).

        Returns:
            False when the newest claim is no longer `run_id`'s (another run took the round over).
        """
        claims = self._claims(number)
        current = self._read_claim(claims[-1]) if claims else None
        if current is None or current.get("run_id") != run_id:
            return False
        now = datetime.now(UTC)
        current["lease_s"] = lease_s
        current["lease_expires_at"] = (now if expire_now else now + timedelta(seconds=lease_s)).isoformat()
        self._replace(claims[-1], json.dumps(current).encode())
        return True

    def _start_lease(self, number: int, run_id: str, lease_s: float) -> None:
        with _LEASES_LOCK:
            previous = _LEASES.pop((self.root, number), None)
            _LEASES[(self.root, number)] = ClaimLease(self, number, run_id, lease_s).start()
        if previous is not None:
            previous.stop()

    def end_claim(self, number: int, *, release: bool = True) -> None:
        """Stop renewing the claim on round `number`; with `release`, expire it now so a rerun need not wait.

        `commit` calls it without `release`; a round that ends without a commit calls it with (through
        `end_run_claims`).
        """
        with _LEASES_LOCK:
            lease = _LEASES.pop((self.root, number), None)
        if lease is None:
            return
        lease.stop()
        if release and not self.fs.exists(self._path(number, MANIFEST)):
            with contextlib.suppress(Exception):  # best effort: an expired lease frees the round anyway
                self.renew_claim(number, lease.run_id, lease.lease_s, expire_now=True)

    def round_is_live(self, number: int) -> bool:
        """True when an uncommitted round's newest claim belongs to a run that may still be writing it."""
        claims = self._claims(number)
        if not claims:
            return False
        return not self.claim_is_stale(self._read_claim(claims[-1]))

    def holds_claim(self, number: int, run_id: str) -> bool:
        """True when the newest claim of round `number` is `run_id`'s."""
        claims = self._claims(number)
        if not claims:
            return False
        claim = self._read_claim(claims[-1])
        return claim is not None and claim.get("run_id") == run_id

    def unlock(self, number: int) -> list[str]:
        """Remove the claims of an uncommitted round whose lease has expired (for operators).

        Returns:
            The names of the claim files removed.

        Raises:
            StoreError: When the round is committed or has no claim.
            RoundClaimedError: When its lease is still live.
        """
        if self.fs.exists(self._path(number, MANIFEST)):
            raise StoreError(f"round {number} is committed; it has no claim to lift")
        claims = self._claims(number)
        if not claims:
            raise StoreError(f"round {number} of store {redact_url(self.url)} has no claim")
        current = self._read_claim(claims[-1])
        if not self.claim_is_stale(current):
            raise RoundClaimedError(f"{self._claim_description(number, current or {})}; not unlocking")
        for path in claims:
            self.fs.rm(path)
        return [path.rsplit("/", 1)[-1] for path in claims]

    def quarantine_round(self, number: int) -> str:
        """Move an uncommitted round's folder to quarantine/round=NNNNN-<UTC time>/; returns where it went.

        Nothing is deleted: an operator can inspect or remove the quarantine folder.
        """
        if self.fs.exists(self._path(number, MANIFEST)):
            raise StoreError(f"round {number} is committed; it is never quarantined")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = f"{self.root}/quarantine/round={number:05d}-{stamp}"
        if _is_local(self.fs):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(self.round_dir(number)).rename(target)
        else:
            self.fs.mv(self.round_dir(number), target, recursive=True)
        prefix = "s3://" if not _is_local(self.fs) else ""
        return prefix + target

    def write_table(self, number: int, name: str, table: pa.Table) -> FileEntry:
        """Write one Parquet file of an uncommitted round and return its manifest entry."""
        if self.fs.exists(self._path(number, MANIFEST)):
            raise StoreError(f"round {number} is committed and immutable")
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
        self.fs.makedirs(self.round_dir(number), exist_ok=True)
        self._write(self._path(number, f"{name}.parquet"), data)
        return FileEntry(rows=table.num_rows, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))

    def commit(self, manifest: RoundManifest) -> None:
        """Write the manifest last, create-if-absent: from here on the round exists and never changes.

        Raises:
            StoreError: When the round is already committed or the run no longer holds its claim.
        """
        if not self.holds_claim(manifest.round, manifest.run_id):
            raise RoundClaimedError(
                f"run {manifest.run_id} no longer holds round {manifest.round}; not committing"
            )
        data = manifest.model_dump_json(indent=2).encode()
        if not self._exclusive_write(self._path(manifest.round, MANIFEST), data):
            # A retried write whose first response was lost finds its own manifest: that is success.
            if self.read_manifest(manifest.round).run_id == manifest.run_id:
                self.end_claim(manifest.round, release=False)
                return
            raise StoreError(f"round {manifest.round} was already committed; nothing written")
        self.end_claim(manifest.round, release=False)

    def file_checksum(self, number: int, name: str) -> str:
        """sha256 of a stored file, for verification."""
        with self.fs.open(self._path(number, name), "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()

    def write_bytes(self, number: int, name: str, data: bytes) -> str:
        """Write a non-Parquet file (an HTML report) into a round's folder; returns its location."""
        path = self._path(number, name)
        self._write(path, data)
        return path

    def read_bytes(self, number: int, name: str) -> bytes | None:
        """A non-Parquet file of a round's folder (an HTML report), or None when it does not exist."""
        path = self._path(number, name)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as handle:
            return bytes(handle.read())

    def signed_url(self, number: int, name: str, expires_s: int) -> str | None:
        """A presigned HTTPS URL of a round's file on an object store; None for a local folder.

        The URL carries a signature and the access key id (not the secret key) and grants read access
        to that one object until it expires.
        """
        if self.fs.protocol not in ("s3", ("s3", "s3a")):
            return None
        return str(self.fs.sign(self._path(number, name), expiration=expires_s))

    # -- other artifacts (fine-tunes, evaluations, reports) --------------------------------------
    def _artifact_path(self, relative: str) -> str:
        """Absolute path of `relative` under the root: plain names below one of ARTIFACT_AREAS only."""
        parts = relative.strip("/").split("/")
        if parts[0] not in ARTIFACT_AREAS or any(
            not re.fullmatch(r"[A-Za-z0-9_.=\-]+", p) or p in (".", "..") for p in parts
        ):
            raise StoreError(f"invalid store path {relative!r}")
        return f"{self.root}/{'/'.join(parts)}"

    def put_bytes(self, relative: str, data: bytes) -> str:
        """Write bytes at `relative` (e.g. finetunes/<id>/manifest.json); returns the full location."""
        path = self._artifact_path(relative)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self._write(path, data)
        return path

    def get_bytes(self, relative: str) -> bytes:
        """Read bytes written with `put_bytes`."""
        with self.fs.open(self._artifact_path(relative), "rb") as handle:
            return bytes(handle.read())

    def exists(self, relative: str) -> bool:
        """True when `relative` exists in the store."""
        return bool(self.fs.exists(self._artifact_path(relative)))

    def list_names(self, relative: str) -> list[str]:
        """Names directly under the folder `relative` (empty when it does not exist)."""
        try:
            return sorted(
                p.rstrip("/").rsplit("/", 1)[-1]
                for p in self.fs.ls(self._artifact_path(relative), detail=False)
            )
        except FileNotFoundError:
            return []

    def put_tree(self, local_dir: Path, relative: str) -> list[str]:
        """Upload every file under `local_dir` to the folder `relative`; returns the names written."""
        written = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            name = path.relative_to(local_dir).as_posix()
            self.put_bytes(f"{relative.rstrip('/')}/{name}", path.read_bytes())
            written.append(name)
        return written

    def get_tree(self, relative: str, local_dir: Path) -> None:
        """Download the folder `relative` into `local_dir`."""
        base = self._artifact_path(relative)
        for path in self.fs.find(base):
            target = local_dir / path[len(base) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open(path, "rb") as handle:
                target.write_bytes(handle.read())

    def location_of(self, relative: str) -> str:
        """Human-readable location of an artifact path."""
        prefix = "s3://" if self.fs.protocol in ("s3", ("s3", "s3a")) else ""
        return prefix + self._artifact_path(relative)


def end_run_claims(run_id: str) -> None:
    """Stop and release every claim lease this process renews for `run_id` (a flow run that failed)."""
    with _LEASES_LOCK:
        mine = [lease for lease in _LEASES.values() if lease.run_id == run_id]
    for lease in mine:
        lease.store.end_claim(lease.number)


class ClaimLease:
    """A daemon thread that renews one round claim's lease every third of the lease, until stopped.

    It stops by itself when the claim is no longer its run's (taken over after an expiry); a renewal that
    fails (an S3 outage) is retried at the next tick, and the commit's own claim check decides in the end.
    """

    def __init__(self, store: Store, number: int, run_id: str, lease_s: float) -> None:
        self.store = store
        self.number = number
        self.run_id = run_id
        self.lease_s = lease_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"claim-lease-{number}", daemon=True)

    def start(self) -> "ClaimLease":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.store.renew_claim(self.number, self.run_id, self.lease_s):
                    self.lost = True
                    return
            except FileNotFoundError:
                self.lost = True
                return
            except Exception:
                continue

    def stop(self) -> None:
        """Stop renewing (waits for a renewal in progress)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


# The leases this process renews, by (store root, round); module state because a lease outlives the task
# that claimed the round and ends in the flow's commit or its failure hook.
_LEASES: dict[tuple[str, int], ClaimLease] = {}
_LEASES_LOCK = threading.Lock()


def open_store(
    store_url: str | None = None, settings: Settings | None = None, *, check: bool = False
) -> Store:
    """The store at `store_url` (default: the settings' store), with credentials from `settings`.

    Args:
        store_url: Root URL; None takes `settings.store_url`.
        settings: Credentials and endpoint; None reads them from the environment.
        check: Also list the store once, so missing or wrong S3 credentials, an unreachable endpoint or a
            store path that is a file show up as one StoreError line here, not as a traceback later.

    Raises:
        StoreError: The URL is unusable, or (with `check`) the store cannot be read; credentials left out.
    """
    settings = settings or Settings()
    url = store_url or settings.store_url
    store = Store(url, settings)
    if check:
        try:
            store.committed_rounds()
        except Exception as error:
            raise StoreError(
                f"store {redact_url(url)}: cannot read it ({type(error).__name__}: {error})"
            ) from None
    return store


class StoreCompletionCache:
    """Completions of one round, persisted in the store as each HTTP batch returns.

    Implements the `CompletionCache` protocol of `tasks.resources.llm.cache`.
    """

    def __init__(self, store: Store, number: int) -> None:
        self.store = store
        self.number = number
        self._folder = f"{store.round_dir(number)}/completions"
        self._loaded: dict[str, CompletionRecord] | None = None

    def _load(self) -> dict[str, CompletionRecord]:
        if self._loaded is None:
            self._loaded = {}
            try:
                paths = sorted(self.store.fs.ls(self._folder, detail=False))
            except FileNotFoundError:
                paths = []
            for path in paths:
                if not path.endswith(".parquet"):
                    continue
                with self.store.fs.open(path, "rb") as handle:
                    for row in pq.read_table(handle).to_pylist():
                        self._loaded[row["key"]] = CompletionRecord.model_validate(row)
        return self._loaded

    def get_many(self, keys: list[str]) -> dict[str, CompletionRecord]:
        """The cached completions among `keys`."""
        loaded = self._load()
        return {key: loaded[key] for key in keys if key in loaded}

    def put_many(self, records: list[CompletionRecord]) -> None:
        """Persist one batch of completions as its own Parquet part."""
        if not records:
            return
        table = records_to_table(records, "requests")
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.store.fs.makedirs(self._folder, exist_ok=True)
        self.store._write(f"{self._folder}/{uuid.uuid4()}.parquet", buffer.getvalue())
        loaded = self._load()
        for record in records:
            loaded[record.key] = record

    def all_records(self) -> list[CompletionRecord]:
        """Every completion cached for the round (for requests.parquet)."""
        return list(self._load().values())

"""The round store: rounds written file by file and committed by their manifest, written last.

`Store` is what the rest of the project holds: under one root URL (see `layout` for the paths) it writes a
claimed round's files, commits the round by writing its manifest create-if-absent, and reads only rounds that
have a manifest, each file checked against the sha256 the manifest records. It also keeps the artifact areas
beside the rounds (fine-tunes, evaluations, reports, state, audits). Files go through `files.StoreFiles`,
claims through `claims.RoundClaims`.
"""

import hashlib
import io
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import FileEntry, RoundManifest, Settings
from tasks.resources.redact import redact_url
from tasks.resources.store.claims import RoundClaimedError, RoundClaims
from tasks.resources.store.files import StoreError, StoreFiles
from tasks.resources.store.layout import (
    MANIFEST,
    artifact_path,
    check_round,
    round_dir,
    round_file,
    round_number,
)
from tasks.resources.store.records import ARROW_SCHEMAS


class Store:
    """Rounds of one bootstrap run, under one root URL.

    Attributes:
        url: The root URL as given.
        settings: Credentials, endpoint, timeouts and the claim lease.
        files: Whole-file access under the root.
        claims: The rounds' claims.
        fs: The fsspec filesystem (for tests and tools), and root: the root path inside it.
    """

    def __init__(self, url: str, settings: Settings | None = None) -> None:
        self.url = url
        self.settings = settings or Settings(store_url=url)
        self.files = StoreFiles(url, self.settings)
        self.claims = RoundClaims(self.files)
        self.fs, self.root = self.files.fs, self.files.root

    def existence_problem(self, must_exist: bool) -> str | None:
        """Why this store cannot be used, or None: a missing bucket, or (with `must_exist`) a missing store.

        A local store that need not exist yet must have an existing folder above it.
        """
        return self.files.existence_problem(must_exist)

    def __repr__(self) -> str:
        return f"Store({redact_url(self.url)!r})"

    # -- paths -----------------------------------------------------------------------------------
    def round_dir(self, number: int) -> str:
        """Folder of round `number` (validated, so no input can point outside the root)."""
        return round_dir(self.root, number)

    def _path(self, number: int, name: str) -> str:
        return round_file(self.root, number, name)

    def _committed(self, number: int) -> bool:
        return self.files.exists(self._path(number, MANIFEST))

    def location(self, number: int) -> str:
        """Human-readable location of a round, for summaries."""
        return self.files.display(self.round_dir(number))

    # -- reading committed rounds ----------------------------------------------------------------
    def _round_numbers_on_disk(self) -> list[int]:
        numbers = (round_number(entry) for entry in self.files.ls(f"{self.root}/rounds"))
        return sorted(n for n in numbers if n is not None)

    def committed_rounds(self) -> list[int]:
        """Rounds whose manifest exists, ascending."""
        return [n for n in self._round_numbers_on_disk() if self._committed(n)]

    def uncommitted_rounds(self) -> list[int]:
        """Round folders with no manifest: crashed or in-progress runs, invisible to readers."""
        committed = set(self.committed_rounds())
        return [n for n in self._round_numbers_on_disk() if n not in committed]

    def read_manifest(self, number: int) -> RoundManifest:
        """The manifest of a committed round."""
        data = self.files.read(self._path(number, MANIFEST))
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
        if not self._committed(number):
            raise StoreError(f"round {number} is not committed")
        file_name = f"{name}.parquet"
        entry = self.read_manifest(number).files.get(file_name)
        if entry is None:
            raise StoreError(f"round {number}: {file_name} is not in the round's manifest")
        try:
            data = self.files.read(self._path(number, file_name))
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
            if not self._committed(number):
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

    # -- claiming (see `claims`) -----------------------------------------------------------------
    def claim_next_round(self, run_id: str, lease_s: float | None = None, *, renew: bool = True) -> int:
        """Claim the round after the last committed one for this run, under a lease.

        The claim records when its lease expires; while the round is worked on, a background thread renews
        it every third of `lease_s` (`claims.ClaimLease`). A claim whose lease has expired (its holder died
        or hung, on any host), whose process is gone on this host, or that is unreadable is taken over, so a
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
        number = check_round((committed[-1] if committed else 0) + 1)
        return self.claims.claim(number, run_id, lease_s, renew=renew)

    def claim_is_stale(self, claim: dict[str, Any] | None) -> bool:
        """True when a claim no longer protects its round (see `RoundClaims.is_stale`)."""
        return self.claims.is_stale(claim)

    def renew_claim(self, number: int, run_id: str, lease_s: float, *, expire_now: bool = False) -> bool:
        """Push the lease of `run_id`'s claim on round `number` to now + `lease_s` (or to now, releasing it).

        Returns:
            False when the newest claim is no longer `run_id`'s (another run took the round over).
        """
        return self.claims.renew(number, run_id, lease_s, expire_now=expire_now)

    def end_claim(self, number: int, *, release: bool = True) -> None:
        """Stop renewing the claim on round `number`; with `release`, expire it now so a rerun need not wait.

        `commit` calls it without `release`; a round that ends without a commit calls it with (through
        `end_run_claims`).
        """
        self.claims.end(number, release=release)

    def round_is_live(self, number: int) -> bool:
        """True when an uncommitted round's newest claim belongs to a run that may still be writing it."""
        return self.claims.is_live(number)

    def holds_claim(self, number: int, run_id: str) -> bool:
        """True when the newest claim of round `number` is `run_id`'s."""
        return self.claims.holds(number, run_id)

    def unlock(self, number: int) -> list[str]:
        """Remove the claims of an uncommitted round whose lease has expired (see `RoundClaims.unlock`)."""
        return self.claims.unlock(number)

    # -- writing and committing ------------------------------------------------------------------
    def quarantine_round(self, number: int) -> str:
        """Move an uncommitted round's folder to quarantine/round=NNNNN-<UTC time>/; returns where it went.

        Nothing is deleted: an operator can inspect or remove the quarantine folder.
        """
        if self._committed(number):
            raise StoreError(f"round {number} is committed; it is never quarantined")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = f"{self.root}/quarantine/round={number:05d}-{stamp}"
        self.files.move(self.round_dir(number), target)
        return self.files.display(target)

    def write_table(self, number: int, name: str, table: pa.Table) -> FileEntry:
        """Write one Parquet file of an uncommitted round and return its manifest entry."""
        if self._committed(number):
            raise StoreError(f"round {number} is committed and immutable")
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
        self.files.makedirs(self.round_dir(number))
        self.files.write(self._path(number, f"{name}.parquet"), data)
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
        if not self.files.exclusive_write(self._path(manifest.round, MANIFEST), data):
            # A retried write whose first response was lost finds its own manifest: that is success.
            if self.read_manifest(manifest.round).run_id == manifest.run_id:
                self.end_claim(manifest.round, release=False)
                return
            raise StoreError(f"round {manifest.round} was already committed; nothing written")
        self.end_claim(manifest.round, release=False)

    def file_checksum(self, number: int, name: str) -> str:
        """sha256 of a stored file, for verification."""
        return hashlib.sha256(self.files.read(self._path(number, name))).hexdigest()

    def write_bytes(self, number: int, name: str, data: bytes) -> str:
        """Write a non-Parquet file (an HTML report) into a round's folder; returns its location."""
        path = self._path(number, name)
        self.files.write(path, data)
        return path

    def read_bytes(self, number: int, name: str) -> bytes | None:
        """A non-Parquet file of a round's folder (an HTML report), or None when it does not exist."""
        path = self._path(number, name)
        if not self.files.exists(path):
            return None
        return self.files.read(path)

    def signed_url(self, number: int, name: str, expires_s: int) -> str | None:
        """A presigned HTTPS URL of a round's file on an object store; None for a local folder.

        The URL carries a signature and the access key id (not the secret key) and grants read access
        to that one object until it expires.
        """
        if not self.files.is_s3:
            return None
        return self.files.sign(self._path(number, name), expires_s)

    # -- other artifacts (fine-tunes, evaluations, reports) --------------------------------------
    def put_bytes(self, relative: str, data: bytes) -> str:
        """Write bytes at `relative` (e.g. finetunes/<id>/manifest.json); returns the full location."""
        path = artifact_path(self.root, relative)
        self.files.makedirs(path.rsplit("/", 1)[0])
        self.files.write(path, data)
        return path

    def get_bytes(self, relative: str) -> bytes:
        """Read bytes written with `put_bytes`."""
        return self.files.read(artifact_path(self.root, relative))

    def exists(self, relative: str) -> bool:
        """True when `relative` exists in the store."""
        return self.files.exists(artifact_path(self.root, relative))

    def list_names(self, relative: str) -> list[str]:
        """Names directly under the folder `relative` (empty when it does not exist)."""
        return sorted(
            p.rstrip("/").rsplit("/", 1)[-1] for p in self.files.ls(artifact_path(self.root, relative))
        )

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
        base = artifact_path(self.root, relative)
        for path in self.files.find(base):
            target = local_dir / path[len(base) :].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.files.read(path))

    def location_of(self, relative: str) -> str:
        """Human-readable location of an artifact path."""
        return self.files.display(artifact_path(self.root, relative))


def store_root_url(store: Store) -> str:
    """The store's root as an absolute, credential-free URL that a worker elsewhere can open.

    A relative local root ("./data") would mean something else in a flow run started by a worker in
    another working directory, so local stores are announced by their absolute path.
    """
    return redact_url(store.location_of("state").removesuffix("/state"))


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

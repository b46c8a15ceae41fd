"""The fine-tunes recorded in a store: new ids, the manifest that marks a fine-tune finished, and lookups.

A fine-tune's folder, finetunes/<id>/, holds the dataset (data.py), then the adapter, training config and
metrics (train.py), and last its manifest:

    finetunes/<id>/manifest.json             rounds, rows, checksums: the fine-tune exists from here on

Readers ignore a folder without a manifest (a fine-tune still running, or one that crashed).
"""

import secrets
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NO_CACHE

from schemas.training import FinetuneManifest, FinetuneParams
from tasks.resources.redact import redact_url
from tasks.resources.secrets import run_settings
from tasks.resources.store.layout import FINETUNES
from tasks.resources.store.rounds import Store, open_store
from tasks.training.data import DataSummary
from tasks.training.models import EMBEDDED, FinetuneError, stack_versions
from tasks.training.train import TrainedAdapter

MANIFEST_FILE = "manifest.json"


def new_finetune_id(now: datetime | None = None) -> str:
    """A fresh id that sorts by creation time: ft-20261105T041500Z-3f9a1c."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"ft-{stamp}-{secrets.token_hex(3)}"


def write_manifest(
    store: Store, params: FinetuneParams, data: DataSummary, trained: TrainedAdapter | None
) -> FinetuneManifest:
    """Write finetunes/<id>/manifest.json, last: from here on the fine-tune exists for readers."""
    manifest = FinetuneManifest(
        finetune_id=data.finetune_id,
        created_at=datetime.now(UTC),
        dry_run=trained is None,
        store=redact_url(store.url),
        rounds=data.rounds,
        include_seeds=params.include_seeds,
        seeds_sha256=data.seeds_sha256,
        rows=data.rows,
        sha256=data.sha256,
        dataset_fingerprint=data.fingerprint,
        export=data.stats,
        base_model=params.base_model or EMBEDDED,
        params=params,
        metrics=trained.metrics if trained else None,
        files=sorted([*data.files, *(trained.files if trained else [])]),
        versions=stack_versions(),
    )
    store.put_bytes(
        f"{FINETUNES}/{data.finetune_id}/{MANIFEST_FILE}", manifest.model_dump_json(indent=2).encode()
    )
    return manifest


def read_finetune_manifest(store: Store, finetune_id: str) -> FinetuneManifest:
    """The manifest of a finished fine-tune.

    Raises:
        FinetuneError: When the fine-tune has no manifest (unknown, running or crashed).
    """
    relative = f"{FINETUNES}/{finetune_id}/{MANIFEST_FILE}"
    if not store.exists(relative):
        raise FinetuneError(f"no finished fine-tune {finetune_id!r} in store {redact_url(store.url)}")
    return FinetuneManifest.model_validate_json(store.get_bytes(relative))


def latest_finetune(store: Store) -> str | None:
    """Id of the newest fine-tune that trained an adapter (dry runs and unfinished ones are skipped)."""
    for finetune_id in sorted(store.list_names(FINETUNES), reverse=True):
        try:
            manifest = read_finetune_manifest(store, finetune_id)
        except (FinetuneError, ValueError):
            continue
        if not manifest.dry_run:
            return finetune_id
    return None


def finetune_to_evaluate(store: Store, finetune_id: str | None) -> str | None:
    """The fine-tune to evaluate: the one asked for, else the newest trained one (None: there is none).

    Raises:
        FinetuneError: When the one asked for is unknown, unfinished or a dry run (it has no adapter).
    """
    if finetune_id is None:
        return latest_finetune(store)
    if read_finetune_manifest(store, finetune_id).dry_run:
        raise FinetuneError(f"fine-tune {finetune_id} is a dry run: it has no adapter to evaluate")
    return finetune_id


@task(name="write-finetune-manifest", cache_policy=NO_CACHE)
def write_manifest_task(
    params: FinetuneParams, data: DataSummary, trained: TrainedAdapter | None
) -> FinetuneManifest:
    """Write the manifest, the fine-tune's completion marker."""
    return write_manifest(open_store(params.store_url, run_settings()), params, data, trained)

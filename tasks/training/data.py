"""The training data of a fine-tune: built as the exported dataset folder, uploaded, read back to train on.

Store layout (see registry.py for the rest of a fine-tune's folder):

    finetunes/<id>/dataset/...               the Hugging Face dataset folder the adapter was trained on,
                                             built by dataset.py exactly as `selfinstruct export --to`
                                             builds it: README.md (card), data/train-*.parquet and
                                             data/validation-*.parquet (instructions disjoint from train)

`datasets` is imported inside `load_training_splits`, so importing this module stays cheap.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from schemas.training import ExportStats, FinetuneParams
from tasks.resources.secrets import run_settings
from tasks.resources.store.layout import FINETUNES
from tasks.resources.store.rounds import Store, open_store
from tasks.training.dataset import DatasetSpec, build_dataset_folder, fingerprint_of_folder
from tasks.training.export import format_rounds
from tasks.training.models import FinetuneError

DATASET_DIR = "dataset"
TRAINED_COLUMNS = ["prompt", "completion"]


@dataclass(frozen=True)
class DataSummary:
    """The training data of one fine-tune, as uploaded: small enough to pass between tasks."""

    finetune_id: str
    rounds: list[int]
    rows: dict[str, int]
    sha256: dict[str, str]
    fingerprint: str
    stats: ExportStats
    seeds_sha256: str | None
    files: list[str]


def dataset_spec(params: FinetuneParams) -> DatasetSpec:
    """The dataset folder a fine-tune trains on, in the terms of `selfinstruct export --to`."""
    return DatasetSpec(
        rounds=params.rounds,
        include_seeds=params.include_seeds,
        seeds_path=Path(params.seeds_path) if params.seeds_path else None,
        max_instances=params.max_instances,
        seed=params.seed,
        validation_fraction=params.validation_fraction,
        validation_max_instructions=params.validation_max_instructions,
    )


def upload_training_data(store: Store, finetune_id: str, params: FinetuneParams) -> DataSummary:
    """Build the dataset folder (the export's own code path) and write it under finetunes/<id>/dataset/.

    Raises:
        ExportError: When the rounds are not committed or hold no usable instances.
    """
    base = f"{FINETUNES}/{finetune_id}"
    with tempfile.TemporaryDirectory(prefix="selfinstruct-dataset-") as scratch:
        folder = build_dataset_folder(store, dataset_spec(params), Path(scratch) / DATASET_DIR)
        names = store.put_tree(folder.path, f"{base}/{DATASET_DIR}")
    return DataSummary(
        finetune_id=finetune_id,
        rounds=folder.rounds,
        rows={split: folder.rows.get(split, 0) for split in ("train", "validation")},
        sha256={f"{DATASET_DIR}/{name}": sha for name, sha in folder.files.items()},
        fingerprint=folder.fingerprint,
        stats=folder.stats,
        seeds_sha256=folder.seeds_sha256,
        files=[f"{DATASET_DIR}/{name}" for name in names],
    )


def load_training_splits(
    store: Store, finetune_id: str, scratch: Path, fingerprint: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Download a fine-tune's dataset folder and load it with `datasets.load_dataset`, as a user would.

    Args:
        store: The store holding finetunes/<id>/dataset/.
        finetune_id: The fine-tune.
        scratch: A local folder to download into (and for datasets' cache).
        fingerprint: The data fingerprint recorded when the folder was built; checked when given.

    Returns:
        The prompt/completion rows of the train and validation splits (validation may be empty).

    Raises:
        FinetuneError: When the folder's data files differ from what was recorded.
    """
    import datasets

    folder = scratch / DATASET_DIR
    store.get_tree(f"{FINETUNES}/{finetune_id}/{DATASET_DIR}", folder)
    found = fingerprint_of_folder(folder)
    if fingerprint is not None and found != fingerprint:
        raise FinetuneError(
            f"fine-tune {finetune_id}: dataset files changed since they were built "
            f"(fingerprint {found[:16]}, recorded {fingerprint[:16]})"
        )
    splits = datasets.load_dataset(str(folder), cache_dir=str(scratch / "hf-cache"))
    train = splits["train"].select_columns(TRAINED_COLUMNS).to_list()
    validation = (
        splits["validation"].select_columns(TRAINED_COLUMNS).to_list() if "validation" in splits else []
    )
    return train, validation


@task(name="prepare-finetune-data", cache_policy=NO_CACHE)
def prepare_data_task(params: FinetuneParams, finetune_id: str) -> DataSummary:
    """Build and upload the train/validation data of a fine-tune."""
    store = open_store(params.store_url, run_settings())
    data = upload_training_data(store, finetune_id, params)
    get_run_logger().info(
        "fine-tune %s: %d train / %d validation rows from rounds %s%s (%d duplicates dropped); "
        "dataset fingerprint %s",
        finetune_id,
        data.rows["train"],
        data.rows["validation"],
        format_rounds(data.rounds),
        " and seeds" if params.include_seeds else "",
        data.stats.duplicates,
        data.fingerprint[:16],
    )
    return data

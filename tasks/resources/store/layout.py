"""Where things lie under a store's root: round folders and their files, and the artifact areas beside them.

    rounds/round=00007/claim-0001.json        exclusive claim of the round (create-if-absent)
    rounds/round=00007/completions/*.parquet  completion cache, written as each HTTP batch returns
    rounds/round=00007/instructions.parquet   accepted instructions with lineage
    rounds/round=00007/instances.parquet
    rounds/round=00007/rejected.parquet
    rounds/round=00007/requests.parquet
    rounds/round=00007/pool_index.parquet     token ids of the round's instructions (ROUGE-L index)
    rounds/round=00007/pool_vocab.parquet     vocabulary entries the round added
    rounds/round=00007/manifest.json          written last, create-if-absent: the round exists from here on
    finetunes/<id>/..., evaluations/, reports/, state/, audits/

Every path is built from validated parts, so no input can point outside the root.
"""

import re

from tasks.resources.store.files import StoreError

MANIFEST = "manifest.json"
FINETUNES = "finetunes"  # finetunes/<id>/...: one folder per fine-tune
ARTIFACT_AREAS = (FINETUNES, "evaluations", "reports", "state", "audits")
MAX_ROUND = 99_999


def check_round(number: int) -> int:
    """`number` when it is a round number (1..MAX_ROUND); StoreError otherwise."""
    if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= MAX_ROUND:
        raise StoreError(f"round must be an integer from 1 to {MAX_ROUND}, got {number!r}")
    return number


def round_dir(root: str, number: int) -> str:
    """Folder of round `number` under `root`."""
    return f"{root}/rounds/round={check_round(number):05d}"


def round_file(root: str, number: int, name: str) -> str:
    """Path of the file `name` of round `number`; StoreError for a name that is not a round file's."""
    if not re.fullmatch(r"[a-z_]+(\.[a-z]+)?|claim-\d{4}\.json|completions/[0-9a-f\-]+\.parquet", name):
        raise StoreError(f"invalid store file name {name!r}")
    return f"{round_dir(root, number)}/{name}"


def round_number(folder: str) -> int | None:
    """The round number of a round folder's path, or None for anything else."""
    match = re.search(r"round=(\d{5})$", folder.rstrip("/"))
    return int(match.group(1)) if match else None


def artifact_path(root: str, relative: str) -> str:
    """Absolute path of `relative` under `root`: plain names below one of ARTIFACT_AREAS only."""
    parts = relative.strip("/").split("/")
    if parts[0] not in ARTIFACT_AREAS or any(
        not re.fullmatch(r"[A-Za-z0-9_.=\-]+", p) or p in (".", "..") for p in parts
    ):
        raise StoreError(f"invalid store path {relative!r}")
    return f"{root}/{'/'.join(parts)}"

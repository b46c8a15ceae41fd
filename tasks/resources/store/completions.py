"""The completion cache of a round in the store: each HTTP batch's completions persisted as it returns.

A crashed round, redone under the same number, finds its completions here and does not ask the LLM again.
"""

import io
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import CompletionRecord
from tasks.resources.store.records import records_to_table
from tasks.resources.store.rounds import Store


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
            for path in sorted(self.store.files.ls(self._folder)):
                if not path.endswith(".parquet"):
                    continue
                table = pq.read_table(pa.BufferReader(self.store.files.read(path)))
                for row in table.to_pylist():
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
        self.store.files.makedirs(self._folder)
        self.store.files.write(f"{self._folder}/{uuid.uuid4()}.parquet", buffer.getvalue())
        loaded = self._load()
        for record in records:
            loaded[record.key] = record

    def all_records(self) -> list[CompletionRecord]:
        """Every completion cached for the round (for requests.parquet)."""
        return list(self._load().values())

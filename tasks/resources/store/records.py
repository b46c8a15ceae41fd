"""Round files and their Arrow schemas, derived from the pydantic records that their rows are.

Each Parquet file of a round (`instructions`, `instances`, `rejected`, `requests`) holds one record model's
rows; its Arrow schema is computed from the model's fields, never typed a second time.
"""

import json
from collections.abc import Sequence
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel

from schemas import CompletionRecord, InstanceRecord, InstructionRecord, RejectionRecord
from schemas.records import INT32_COLUMN

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

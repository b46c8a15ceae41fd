"""Fine-tuning data from committed rounds, prepared the way Self-Instruct prepares it (arXiv:2212.10560, §4).

Each kept instruction contributes up to `max_instances` of its instances; duplicates are removed; every
example is rendered with one of several prompt templates (with- and without-input variants, picked by a
seeded RNG) so that the model does not tie itself to one surface form; the result is shuffled with the seed.

Templates live in tasks/prompts/sft_*.txt and are parsed and rendered by templates.py.

Formats (`to_rows`, `encode_rows`): `jsonl` (JSON Lines with provenance), `alpaca` (one JSON array of
instruction/input/output, as Alpaca's own data file), `sft` (JSON Lines of prompt/completion, rendered with
the templates) and `messages` (JSON Lines of conversations: an optional system turn, the user's instruction
and input, the assistant's output). The file name must end as its content: `.json` for alpaca, `.jsonl` for
the others. The Hugging Face dataset folder is built in tasks/training/dataset.py from the same examples.

Everything here is pure except `write_export`, which reads the store and writes one file.
"""

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from schemas import SeedTask
from schemas.training import ExportFormat, ExportStats
from tasks.resources.store.rounds import Store
from tasks.training.templates import SftTemplate, load_templates

SEED_ROUND = 0  # the `round` of examples that come from the seed file
_ROUNDS_SPEC = re.compile(r"\s*(\d*)\s*(:?)\s*(\d*)\s*")


class ExportError(ValueError):
    """Data that cannot be exported as asked; the message says why in one line."""


@dataclass(frozen=True)
class Example:
    """One instruction/input/output triple on its way into a training set."""

    id: str
    instruction: str
    input: str
    output: str
    is_classification: bool | None
    round: int  # SEED_ROUND for seed tasks


@dataclass(frozen=True)
class ExportResult:
    """Where an export went and what it holds."""

    path: Path
    rows: int
    sha256: str
    rounds: list[int]
    stats: ExportStats


# -- examples -------------------------------------------------------------------------------------------


def select_rounds(spec: str | None, committed: Sequence[int]) -> list[int]:
    """The committed rounds a spec like "3", "2:5", ":4" or "3:" (inclusive) names; all when `spec` is None.

    Raises:
        ExportError: On a malformed spec, or when it names no committed round.
    """
    if not committed:
        raise ExportError("the store has no committed rounds")
    if spec is None or not spec.strip():
        return sorted(committed)
    match = _ROUNDS_SPEC.fullmatch(spec)
    if match is None or not (match.group(1) or match.group(3)):
        raise ExportError(f"--rounds {spec!r}: expected N, A:B, :B or A: (inclusive round numbers)")
    first = int(match.group(1)) if match.group(1) else 1
    last = int(match.group(3)) if match.group(3) else (first if not match.group(2) else max(committed))
    if first > last:
        raise ExportError(f"--rounds {spec!r}: {first} is after {last}")
    chosen = [n for n in sorted(committed) if first <= n <= last]
    if not chosen:
        raise ExportError(
            f"--rounds {spec!r}: no committed round in that range (committed: {format_rounds(committed)})"
        )
    return chosen


def format_rounds(numbers: Sequence[int]) -> str:
    """Round numbers as ranges for messages: [1, 2, 3, 5] -> "1-3, 5"; [] -> "none"."""
    if not numbers:
        return "none"
    parts: list[str] = []
    ordered = sorted(numbers)
    start = previous = ordered[0]
    for number in [*ordered[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ", ".join(parts)


def _cap(items: list[Any], max_items: int, key: str, seed: int) -> list[Any]:
    """At most `max_items` of `items`: a seeded sample keyed by `key` (other rounds never change the pick)."""
    if len(items) <= max_items:
        return items
    chosen = set(random.Random(f"{seed}:{key}").sample(range(len(items)), max_items))
    return [item for i, item in enumerate(items) if i in chosen]


def examples_from_rounds(
    instructions: pa.Table, instances: pa.Table, max_instances: int, seed: int
) -> tuple[list[Example], Counter[str]]:
    """Examples from the instructions and instances tables of committed rounds, in round and id order.

    Returns:
        The examples, and counts of `read`, `over_cap`, `empty_output` and `orphans`.
    """
    counts: Counter[str] = Counter()
    by_id = {
        row["id"]: row for row in instructions.select(["id", "instruction", "is_classification"]).to_pylist()
    }
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in instances.select(["instruction_id", "round", "index", "input", "output"]).to_pylist():
        counts["read"] += 1
        if row["instruction_id"] not in by_id:
            counts["orphans"] += 1
            continue
        grouped.setdefault(row["instruction_id"], []).append(row)
    examples: list[Example] = []
    for instruction_id in sorted(grouped, key=lambda i: (grouped[i][0]["round"], i)):
        rows = sorted(grouped[instruction_id], key=lambda r: r["index"])
        usable = [r for r in rows if (r["output"] or "").strip()]
        counts["empty_output"] += len(rows) - len(usable)
        kept = _cap(usable, max_instances, instruction_id, seed)
        counts["over_cap"] += len(usable) - len(kept)
        record = by_id[instruction_id]
        examples += [
            Example(
                id=f"{instruction_id}#{r['index']}",
                instruction=record["instruction"].strip(),
                input=(r["input"] or "").strip(),
                output=r["output"].strip(),
                is_classification=record["is_classification"],
                round=int(r["round"]),
            )
            for r in kept
        ]
    return examples, counts


def examples_from_seeds(
    tasks: Iterable[SeedTask], max_instances: int, seed: int
) -> tuple[list[Example], Counter[str]]:
    """Examples from seed tasks (round 0), with the same cap and empty-output rule as generated data."""
    counts: Counter[str] = Counter()
    examples: list[Example] = []
    for task in tasks:
        counts["read"] += len(task.instances)
        numbered = [(k, inst) for k, inst in enumerate(task.instances) if inst.output.strip()]
        counts["empty_output"] += len(task.instances) - len(numbered)
        kept = _cap(numbered, max_instances, task.id, seed)
        counts["over_cap"] += len(numbered) - len(kept)
        examples += [
            Example(
                id=f"{task.id}#{k}",
                instruction=task.instruction.strip(),
                input=inst.input.strip(),
                output=inst.output.strip(),
                is_classification=task.is_classification,
                round=SEED_ROUND,
            )
            for k, inst in kept
        ]
    return examples, counts


def _dedup_key(example: Example) -> tuple[str, str, str]:
    def norm(text: str) -> str:
        # Case and spacing differences do not make a new training example.
        return " ".join(text.split()).lower()

    return norm(example.instruction), norm(example.input), norm(example.output)


def deduplicate(examples: Sequence[Example]) -> tuple[list[Example], int]:
    """Drop examples whose instruction, input and output equal an earlier one's (up to case and spacing).

    Returns:
        The first occurrence of each example, in order, and how many were dropped.
    """
    seen: set[tuple[str, str, str]] = set()
    kept: list[Example] = []
    for example in examples:
        key = _dedup_key(example)
        if key not in seen:
            seen.add(key)
            kept.append(example)
    return kept, len(examples) - len(kept)


def prepare_examples(
    instructions: pa.Table,
    instances: pa.Table,
    seed_tasks: Sequence[SeedTask] | None,
    max_instances: int,
    seed: int,
) -> tuple[list[Example], ExportStats]:
    """Seeds (if given) then generated examples, capped, deduplicated and shuffled with `seed`.

    Args:
        instructions: instructions.parquet rows of the chosen rounds.
        instances: instances.parquet rows of the same rounds.
        seed_tasks: Seed tasks to include, or None.
        max_instances: Instances per instruction at most.
        seed: Seeds the cap's sampling and the shuffle.

    Returns:
        The examples in training order, and what was dropped on the way.
    """
    seeds, seed_counts = examples_from_seeds(seed_tasks or [], max_instances, seed)
    generated, counts = examples_from_rounds(instructions, instances, max_instances, seed)
    counts.update(seed_counts)
    examples, duplicates = deduplicate([*seeds, *generated])
    random.Random(seed).shuffle(examples)
    per_source = Counter("seeds" if e.round == SEED_ROUND else str(e.round) for e in examples)
    stats = ExportStats(
        instructions=len({(e.round == SEED_ROUND, e.instruction) for e in examples}),
        instances_read=counts["read"],
        over_cap=counts["over_cap"],
        empty_output=counts["empty_output"],
        orphans=counts["orphans"],
        duplicates=duplicates,
        rows=len(examples),
        rows_per_source=dict(
            sorted(per_source.items(), key=lambda kv: -1 if kv[0] == "seeds" else int(kv[0]))
        ),
    )
    return examples, stats


def split_by_instruction(
    examples: Sequence[Example], fraction: float, seed: int, max_instructions: int | None = None
) -> tuple[list[Example], list[Example]]:
    """Split into train and validation so that no instruction has instances on both sides.

    About `fraction` of the instructions (at least one when `fraction` > 0 and there are two or more, at most
    `max_instructions`) go to validation, chosen with `seed`; the examples keep their order.
    """
    instructions = sorted({e.instruction for e in examples})
    wanted = round(len(instructions) * fraction)
    if fraction > 0 and len(instructions) >= 2:
        wanted = min(max(wanted, 1), len(instructions) - 1)
    if max_instructions is not None:
        wanted = min(wanted, max_instructions)
    held = set(random.Random(f"{seed}:split").sample(instructions, wanted))
    return [e for e in examples if e.instruction not in held], [e for e in examples if e.instruction in held]


def template_for(example: Example, templates: Sequence[SftTemplate], seed: int) -> SftTemplate:
    """The template an example is rendered with: a seeded pick keyed by its id, stable across exports."""
    return templates[random.Random(f"{seed}:template:{example.id}").randrange(len(templates))]


def user_turn(instruction: str, input_text: str) -> str:
    """The user's message of a conversation: the instruction, then the input after a blank line if any."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def to_messages(example: Example, system_prompt: str | None = None) -> list[dict[str, str]]:
    """One example as a conversation: optional system turn, user (instruction + input), assistant (output)."""
    turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        *turns,
        {"role": "user", "content": user_turn(example.instruction, example.input)},
        {"role": "assistant", "content": example.output},
    ]


def to_rows(
    examples: Iterable[Example],
    fmt: ExportFormat,
    seed: int,
    templates: Sequence[SftTemplate] | None = None,
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Rows of the export format.

    `jsonl`: instruction, input, output, is_classification, round (0 = seed), id. `alpaca`: instruction,
    input, output. `sft`: prompt, completion, with the prompt rendered by a seeded choice of template.
    `messages`: a conversation under "messages" (see `to_messages`; `system_prompt` only applies here).
    """
    if fmt == "messages":
        return [{"messages": to_messages(e, system_prompt)} for e in examples]
    if fmt == "jsonl":
        return [
            {
                "instruction": e.instruction,
                "input": e.input,
                "output": e.output,
                "is_classification": e.is_classification,
                "round": e.round,
                "id": e.id,
            }
            for e in examples
        ]
    if fmt == "alpaca":
        return [{"instruction": e.instruction, "input": e.input, "output": e.output} for e in examples]
    if fmt == "sft":
        chosen = list(templates or load_templates())
        return [
            {"prompt": template_for(e, chosen, seed).render(e.instruction, e.input), "completion": e.output}
            for e in examples
        ]
    raise ExportError(f"unknown export format {fmt!r} (use jsonl, alpaca, sft or messages)")


def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    """Rows as UTF-8 JSON Lines, one object per line, keys in row order (the bytes that get checksummed)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def json_array_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    """Rows as one UTF-8 JSON array (what `json.load` and Alpaca's tooling read), one object per line."""
    body = ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in rows)
    return ("[\n" + body + "\n]\n" if body else "[]\n").encode("utf-8")


# The file suffix each format's content needs: alpaca is one JSON array, the others JSON Lines.
SUFFIXES: dict[str, str] = {"jsonl": ".jsonl", "alpaca": ".json", "sft": ".jsonl", "messages": ".jsonl"}


def encode_rows(rows: Sequence[dict[str, Any]], fmt: ExportFormat) -> bytes:
    """The bytes of an export file of format `fmt`."""
    return json_array_bytes(rows) if SUFFIXES[fmt] == ".json" else jsonl_bytes(rows)


def check_export_path(out: Path, fmt: ExportFormat) -> None:
    """Refuse a file name whose suffix does not say what `fmt` writes into it.

    Raises:
        ExportError: When the suffix differs from `SUFFIXES[fmt]`, or `out` is a folder.
    """
    wanted = SUFFIXES[fmt]
    if out.suffix.lower() != wanted:
        others = sorted(f for f, suffix in SUFFIXES.items() if suffix == out.suffix.lower())
        names = ", ".join(others[:-1]) + " or " + others[-1] if len(others) > 1 else "".join(others)
        hint = f" ({out.suffix} is for --format {names})" if others else ""
        what = "one JSON array" if wanted == ".json" else "JSON Lines"
        raise ExportError(f"{out}: --format {fmt} writes {what}, so the file name must end in {wanted}{hint}")
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; give a file name ending in {wanted}")


# -- I/O ------------------------------------------------------------------------------------------------


def checked_rounds(store: Store, spec: str | None) -> list[int]:
    """The committed rounds of `store` that `spec` names (see `select_rounds`), every file checked against its
    round manifest's checksum, so a tampered round is never read.

    Raises:
        ExportError: On a malformed spec, or when it names no committed round.
        tasks.resources.store.files.StoreError: When a file of a chosen round is missing or differs.
    """
    chosen = select_rounds(spec, store.committed_rounds())
    store.check_checksums(chosen)
    return chosen


def read_round_tables(store: Store, rounds: Sequence[int]) -> tuple[pa.Table, pa.Table]:
    """The instructions and instances of the given committed rounds."""
    return store.read_committed("instructions", rounds), store.read_committed("instances", rounds)


def write_export(
    store: Store,
    out: Path,
    fmt: ExportFormat,
    rounds: str | None = None,
    include_seeds: bool = False,
    seeds_path: Path | None = None,
    max_instances: int = 5,
    seed: int = 42,
    system_prompt: str | None = None,
) -> ExportResult:
    """Export committed rounds of `store` to the file `out`; nothing is written on error.

    Args:
        store: The round store.
        out: The file to write (its folder is created); `.json` for alpaca, `.jsonl` for the others.
        fmt: jsonl, alpaca, sft or messages.
        rounds: A round spec for `select_rounds` ("2:5"); None = every committed round.
        include_seeds: Also export the seed tasks.
        seeds_path: Seed file; None = the seeds we ship.
        max_instances: Instances per instruction at most. 5, the cap of instance generation, keeps them all,
            as the paper did (82K instances of 52K instructions).
        seed: Seeds the instance cap, template choice and shuffle.
        system_prompt: System turn of every conversation (messages format only).

    Raises:
        ExportError: When the file name does not fit the format, the store has no such rounds or the export
            would be empty.
        tasks.round.seeds.SeedFileError: When the seed file is invalid.
    """
    from tasks.round.seeds import load_seeds

    check_export_path(out, fmt)
    chosen = select_rounds(rounds, store.committed_rounds())
    seed_tasks = load_seeds(seeds_path)[0] if include_seeds else None
    instructions, instances = read_round_tables(store, chosen)
    examples, stats = prepare_examples(instructions, instances, seed_tasks, max_instances, seed)
    if not examples:
        raise ExportError(f"rounds {format_rounds(chosen)} hold no usable instances; nothing written")
    data = encode_rows(to_rows(examples, fmt, seed, system_prompt=system_prompt), fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return ExportResult(
        path=out, rows=len(examples), sha256=hashlib.sha256(data).hexdigest(), rounds=chosen, stats=stats
    )

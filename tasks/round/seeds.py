"""Loading seed tasks from a Self-Instruct seed JSONL file, ours or a user's."""

import hashlib
import json
from pathlib import Path

from pydantic import ValidationError

from schemas import SeedTask

DEFAULT_SEEDS = Path(__file__).resolve().parents[2] / "seeds" / "seed_tasks.jsonl"
MAX_SEED_FILE_BYTES = 16 << 20  # the original release's 175 tasks take 100 kB
MAX_LINE_BYTES = 1 << 20
# The shipped seeds were written by this team and are licensed like the project (seeds/README.md); the
# dataset card names this license for data grown from them.
SEEDS_LICENSE = "apache-2.0"


class SeedFileError(ValueError):
    """A seed file that cannot be used; the message names the file, line and field."""


def _field_of(error: ValidationError) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "<record>"
    return f"field '{location}': {first['msg']}"


def estimated_tokens(text: str) -> int:
    """A low estimate of the tokens of `text` for any tokenizer: a word is at least one token, and no
    token spans more than 8 bytes of UTF-8 (so text without spaces, e.g. Chinese, counts too)."""
    return max(len(text.split()), len(text.encode("utf-8", "replace")) // 8)


def parse_seed_lines(
    lines: list[str],
    source: str,
    repeated_instructions: bool = False,
    max_instruction_tokens: int | None = None,
) -> list[SeedTask]:
    """Parse seed tasks from JSONL lines.

    Args:
        lines: The file's lines; blank lines are skipped.
        source: The file name used in error messages.
        repeated_instructions: Accept one instruction on several lines when their inputs differ (held-out
            files test one task on several inputs); a line repeating both instruction and inputs is still
            refused. Seed files keep every instruction unique: the pool must not hold one twice.
        max_instruction_tokens: Refuse an instruction estimated (`estimated_tokens`) longer than this.

    Returns:
        The tasks in file order.

    Raises:
        SeedFileError: On bad JSON, a line too long or nested too deeply, a schema violation, a duplicate
            id or instruction, an instruction too long for the model, or no tasks at all.
    """
    tasks: list[SeedTask] = []
    seen_ids: dict[str, int] = {}
    seen_instructions: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            raise SeedFileError(f"{source}:{number}: line longer than {MAX_LINE_BYTES} characters")
        try:
            raw = json.loads(line)
            task = SeedTask.model_validate(raw)
        except json.JSONDecodeError as error:
            raise SeedFileError(
                f"{source}:{number}: invalid JSON ({error.msg} at column {error.colno})"
            ) from None
        except ValidationError as error:
            raise SeedFileError(f"{source}:{number}: {_field_of(error)[:300]}") from None
        except RecursionError:
            raise SeedFileError(f"{source}:{number}: JSON nested too deeply") from None
        if max_instruction_tokens is not None and estimated_tokens(task.instruction) > max_instruction_tokens:
            raise SeedFileError(
                f"{source}:{number}: field 'instruction': about {estimated_tokens(task.instruction)} tokens "
                f"or more, too long for the model's context (at most {max_instruction_tokens})"
            )
        if task.id in seen_ids:
            raise SeedFileError(f"{source}:{number}: field 'id': duplicate of line {seen_ids[task.id]}")
        key = task.instruction.strip().lower()
        if repeated_instructions:
            key = json.dumps([key, [i.input.strip() for i in task.instances]])
        if key in seen_instructions:
            same = " with the same inputs" if repeated_instructions else ""
            raise SeedFileError(
                f"{source}:{number}: field 'instruction': duplicate of line {seen_instructions[key]}{same}"
            )
        seen_ids[task.id] = number
        seen_instructions[key] = number
        tasks.append(task)
    if not tasks:
        raise SeedFileError(f"{source}: no seed tasks")
    return tasks


def load_seeds(
    path: Path | None = None,
    repeated_instructions: bool = False,
    *,
    max_instruction_tokens: int | None = None,
) -> tuple[list[SeedTask], str]:
    """Read and validate a seed file.

    Args:
        path: A JSONL file in the Self-Instruct seed schema; None means the seeds this project ships.
        repeated_instructions: See `parse_seed_lines` (True for held-out files).
        max_instruction_tokens: Refuse instructions that cannot fit the model's context (see
            `parse_seed_lines`).

    Returns:
        The tasks and the sha256 of the file's bytes (recorded in round manifests).

    Raises:
        SeedFileError: When the file is missing, not UTF-8, or any line is invalid.
    """
    path = path or DEFAULT_SEEDS
    try:
        size = path.stat().st_size
        if size > MAX_SEED_FILE_BYTES:
            raise SeedFileError(f"{path}: {size} bytes; a seed file is at most {MAX_SEED_FILE_BYTES}")
        data = path.read_bytes()
    except OSError as error:
        raise SeedFileError(f"{path}: cannot read ({error.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise SeedFileError(f"{path}:{line}: not UTF-8 text") from None
    tasks = parse_seed_lines(text.splitlines(), str(path), repeated_instructions, max_instruction_tokens)
    return tasks, hashlib.sha256(data).hexdigest()

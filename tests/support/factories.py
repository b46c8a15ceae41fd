"""Builders of records, completions, manifests and committed rounds: the one place tests make them.

Each builder fills every required field with a plain default and takes keyword overrides, so a test names only
what it is about. Rounds are committed through the real store API (claim, write, manifest last):
`commit_round` writes the records it is given, `commit_tasks` builds them from (instruction,
is_classification, pairs), and `commit_texts` writes a round the way a real run does (`write_round`:
completions, index delta, checksums) for what reads those too (verify, preflight).
"""

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas import (
    BootstrapConfig,
    CompletionRecord,
    FileEntry,
    InstanceRecord,
    InstructionRecord,
    RejectionRecord,
    RoundManifest,
    SamplingParams,
    SeedInstance,
    SeedTask,
)
from tasks.resources.store.records import records_to_table
from tasks.resources.store.rounds import Store
from tasks.round.commit import RoundResult, write_round
from tasks.round.pool import IndexDelta, load_pool


def completion(text: str = "t", **fields: Any) -> CompletionRecord:
    """A completion as the LLM client returns it; `fields` override the defaults."""
    values: dict[str, Any] = {
        "key": "k",
        "stage": "instruction",
        "request_id": "req",
        "prompt": "p",
        "text": text,
        "finish_reason": "stop",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "latency_s": 0.1,
        "model": "m",
        "base_url": "http://127.0.0.1:1/v1",
        "seed": 1,
    }
    return CompletionRecord(**(values | fields))


def instruction(
    round_number: int = 1, n: int = 0, text: str = "Name a colour.", **fields: Any
) -> InstructionRecord:
    """An accepted, classified instruction with id r{round:05d}-{n:05d}; `fields` override the defaults."""
    values: dict[str, Any] = {
        "id": f"r{round_number:05d}-{n:05d}",
        "round": round_number,
        "instruction": text,
        "request_key": "k",
        "prompt_index": 0,
        "in_context_ids": ["seed_task_0"],
        "model": "m",
        "sampling": SamplingParams(),
        "max_rouge": 0.1,
        "most_similar": [],
        "avg_similarity": 0.05,
        "is_classification": False,
        "classification_raw": "No",
    }
    values |= fields
    if "classification_raw" not in fields and values["is_classification"] is not None:
        values["classification_raw"] = "Yes" if values["is_classification"] else "No"
    return InstructionRecord(**values)


def instance(
    instruction_id: str = "r00001-00000", round_number: int = 1, index: int = 0, **fields: Any
) -> InstanceRecord:
    """One input/output pair of an instruction; `fields` override the defaults."""
    values: dict[str, Any] = {
        "instruction_id": instruction_id,
        "round": round_number,
        "index": index,
        "input": "",
        "output": "o",
        "request_key": "k",
    }
    return InstanceRecord(**(values | fields))


def rejection(round_number: int = 1, reason: str = "too_short", **fields: Any) -> RejectionRecord:
    """A rejected candidate; `fields` override the defaults (stage "instruction", text "Hi.")."""
    values: dict[str, Any] = {"round": round_number, "stage": "instruction", "reason": reason, "text": "Hi."}
    return RejectionRecord(**(values | fields))


def manifest(number: int, run_id: str, files: dict[str, FileEntry], **fields: Any) -> RoundManifest:
    """A round manifest naming `files`; `fields` override the defaults (counts, model, pool size, config)."""
    values: dict[str, Any] = {
        "round": number,
        "run_id": run_id,
        "created_at": datetime.now(UTC),
        "model": "m",
        "seeds_sha256": "0" * 64,
        "pool_size_before": 175,
        "counts": {},
        "config": BootstrapConfig(),
        "files": files,
    }
    return RoundManifest(**(values | fields))


def commit_round(
    store: Store,
    instructions: Sequence[InstructionRecord] | None = None,
    instances: Sequence[InstanceRecord] | None = None,
    rejected: Sequence[RejectionRecord] | None = None,
    *,
    requests: Sequence[CompletionRecord] | None = None,
    run_id: str = "test-run",
    counts: dict[str, int] | None = None,
    **manifest_fields: Any,
) -> int:
    """Claim the next round, write the files given (None = not written), then commit its manifest.

    Build the records with `next_round(store)` as their round. Counts default to kept and instances.

    Returns:
        The committed round's number.
    """
    number = store.claim_next_round(run_id)
    files = {
        f"{name}.parquet": store.write_table(number, name, records_to_table(list(records), name))
        for name, records in (
            ("instructions", instructions),
            ("instances", instances),
            ("rejected", rejected),
            ("requests", requests),
        )
        if records is not None
    }
    default_counts = {"kept": len(instructions or []), "instances": len(instances or [])}
    store.commit(manifest(number, run_id, files, counts=counts or default_counts, **manifest_fields))
    return number


def next_round(store: Store) -> int:
    """The number the store's next round will get (for building its records before committing it)."""
    committed = store.committed_rounds()
    return (committed[-1] if committed else 0) + 1


# A test round's task: (instruction, is_classification, [(input, output), ...]).
Task = tuple[str, bool, Sequence[tuple[str, str]]]

TASKS: list[Task] = [
    ("Give the plural of the noun.", False, [("mouse", "mice"), ("child", "children"), ("leaf", "leaves")]),
    ("Is the number even or odd?", True, [("14", "even"), ("9", "odd"), ("0", "even")]),
    (
        "Name the color you get by mixing the two colors.",
        False,
        [("blue and yellow", "green"), ("red and white", "pink")],
    ),
    ("Write the opposite of the adjective.", False, [("hot", "cold"), ("early", "late"), ("full", "empty")]),
    ("Suggest a name for a bakery.", False, [("", "The Rolling Pin")]),
    ("Translate the number into English words.", False, [("12", "twelve"), ("40", "forty")]),
    (
        "Classify the animal as mammal, bird or fish.",
        True,
        [("sparrow", "bird"), ("salmon", "fish"), ("goat", "mammal")],
    ),
    ("Give the capital city of the country.", False, [("Japan", "Tokyo"), ("Italy", "Rome")]),
    ("Count the vowels in the word.", False, [("banana", "3"), ("sky", "0")]),
    ("Say whether the sentence is a question or a statement.", True, [("Where is the station?", "question")]),
    ("Name a fruit that is yellow.", False, [("", "banana")]),
    ("Add the two numbers.", False, [("3 and 4", "7"), ("10 and 5", "15")]),
]


def commit_tasks(store: Store, tasks: Sequence[Task], run_id: str = "test") -> int:
    """Commit one round holding `tasks` (instruction, is_classification, pairs) with their instances, and
    one rejected candidate: every file a real round writes, so that the report and audit can read it."""
    number = next_round(store)
    instructions, instances = [], []
    for n, (text, is_classification, pairs) in enumerate(tasks):
        record = instruction(
            number,
            n,
            text,
            request_key=f"key-{number}-{n}",
            model="smollm2",
            is_classification=is_classification,
        )
        instructions.append(record)
        instances += [instance(record.id, number, k, input=i, output=o) for k, (i, o) in enumerate(pairs)]
    rejected = [rejection(number, stage="instance", reason="empty_output", text="Say nothing.")]
    return commit_round(
        store, instructions, instances, rejected, run_id=run_id, model="smollm2", pool_size_before=10
    )


def two_round_store(root: Path) -> Store:
    """A store with TASKS split over rounds 1 (six tasks) and 2 (six tasks)."""
    store = Store(str(root))
    commit_tasks(store, TASKS[:6])
    commit_tasks(store, TASKS[6:])
    return store


SEEDS = [
    SeedTask(
        id="seed_task_0",
        name="greet",
        instruction="Write a friendly greeting for a new colleague.",
        instances=[SeedInstance(input="", output="Welcome aboard!")],
        is_classification=False,
    )
]


def commit_texts(
    store: Store, texts: list[str], seeds: list[SeedTask] = SEEDS, config: BootstrapConfig | None = None
) -> int:
    """Claim the next round, and write and commit with `write_round` a round that kept `texts` (one instance
    each, every other one a classification task, one rejection), its completions and its pool index delta.

    Returns:
        The committed round's number.
    """
    config = config or BootstrapConfig()
    run_id = f"run-{uuid.uuid4()}"
    number = store.claim_next_round(run_id, renew=False)
    pool = load_pool(store, seeds, config.tokenizer)
    size_before, index_start, vocab_start = pool.size, len(pool.index), pool.index.vocab_size
    ids = [f"r{number:05d}-{i:05d}" for i in range(len(texts))]
    pool.index.add(ids, texts)
    generation = completion("\n".join(texts), key=f"g{number}")
    instructions = [
        instruction(
            number,
            i,
            text,
            request_key=generation.key,
            in_context_ids=[seeds[0].id],
            is_classification=i % 2 == 1,
            classification_raw=" Yes" if i % 2 else " No",
        )
        for i, text in enumerate(texts)
    ]
    classify = [
        completion(r.classification_raw or "", key=f"c{r.id}", stage="classify", prompt=r.instruction)
        for r in instructions
    ]
    answers = [
        completion("Output: done.", key=f"i{r.id}", stage="instance", prompt=r.instruction)
        for r in instructions
    ]
    instances = [
        instance(r.id, number, output="done.", request_key=a.key)
        for r, a in zip(instructions, answers, strict=True)
    ]
    rejected = [rejection(number, request_key=generation.key)]
    result = RoundResult(
        number=number,
        run_id=run_id,
        model="m",
        seeds_sha256="0" * 64,
        pool_size_before=size_before,
        prompts=1,
        candidates_parsed=len(texts) + len(rejected),
        instructions=instructions,
        instances=instances,
        rejected=rejected,
        completions=[generation, *classify, *answers],
    )
    write_round(store, result, IndexDelta.since(pool.index, index_start, vocab_start), config)
    return number


HELDOUT = [
    ("Is the number positive or negative?", "-12", "negative", True),
    ("Give the past tense of the verb.", "swim", "swam", False),
    ("Name the largest planet in the solar system.", "", "Jupiter", False),
    ("Convert the word to uppercase.", "quiet", "QUIET", False),
]


def write_heldout(path: Path) -> Path:
    """A held-out file in the seed schema, one instance per task."""
    lines = [
        {
            "id": f"heldout_task_{i}",
            "name": f"task_{i}",
            "instruction": instruction,
            "instances": [{"input": input_text, "output": output}],
            "is_classification": is_classification,
        }
        for i, (instruction, input_text, output, is_classification) in enumerate(HELDOUT)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# Small enough for ~1 minute on 2 shared cores, large enough that the loss falls clearly.
TRAIN_KNOBS: dict[str, Any] = {
    "max_steps": 12,
    "lr": 2e-3,
    "batch_size": 4,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "max_length": 96,
    "validation_fraction": 0.2,
    "seed": 0,
    "torch_threads": 1,  # 2 threads on 2 cores shared with other processes ran 4x slower than 1
}


def write_seed_file(path: Path) -> Path:
    """A two-task seed file; its second task duplicates an instance of round 1."""
    lines = [
        {
            "id": "seed_task_0",
            "name": "shout",
            "instruction": "Rewrite the sentence in capital letters.",
            "instances": [{"input": "good morning", "output": "GOOD MORNING"}],
            "is_classification": False,
        },
        {
            "id": "seed_task_1",
            "name": "plural",
            "instruction": "Give the plural of the noun.",
            "instances": [{"input": "mouse", "output": "mice"}],
            "is_classification": False,
        },
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path

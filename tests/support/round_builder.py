"""Commit a small round through the real store API: instructions, instances, rejections and manifest."""

from collections.abc import Sequence
from datetime import UTC, datetime

from schemas import (
    BootstrapConfig,
    InstanceRecord,
    InstructionRecord,
    RejectionRecord,
    RoundManifest,
    SamplingParams,
)
from tasks.resources.store.records import records_to_table
from tasks.resources.store.rounds import Store

# (instruction, [(input, output), ...])
Task = tuple[str, Sequence[tuple[str, str]]]


def commit_round(store: Store, tasks: Sequence[Task], run_id: str = "builder") -> int:
    """Commit the next round of `store` holding `tasks` (ids r{round:05d}-{n:05d}); returns its number."""
    number = store.claim_next_round(run_id)
    instructions, instances = [], []
    for n, (text, pairs) in enumerate(tasks):
        record = InstructionRecord(
            id=f"r{number:05d}-{n:05d}",
            round=number,
            instruction=text,
            request_key=f"key-{number}-{n}",
            prompt_index=0,
            in_context_ids=["seed_task_0"],
            model="smollm2",
            sampling=SamplingParams(),
            max_rouge=0.2,
            most_similar=[],
            avg_similarity=0.05,
            is_classification=False,
            classification_raw="No",
        )
        instructions.append(record)
        instances += [
            InstanceRecord(
                instruction_id=record.id, round=number, index=k, input=i, output=o, request_key="k"
            )
            for k, (i, o) in enumerate(pairs)
        ]
    rejected = [RejectionRecord(round=number, stage="instance", reason="empty_output", text="Say nothing.")]
    files = {
        f"{name}.parquet": store.write_table(number, name, records_to_table(records, name))
        for name, records in (
            ("instructions", instructions),
            ("instances", instances),
            ("rejected", rejected),
        )
    }
    store.commit(
        RoundManifest(
            round=number,
            run_id=run_id,
            created_at=datetime.now(UTC),
            model="smollm2",
            seeds_sha256="0" * 64,
            pool_size_before=175,
            counts={"generated": len(tasks) + 1, "kept": len(instructions), "instances": len(instances)},
            config=BootstrapConfig(),
            files=files,
        )
    )
    return number

"""Committed rounds built without an LLM: records for given instruction texts, written by the real
`write_round`, so that every file, count and checksum of the manifest is what a real round writes."""

from __future__ import annotations

import uuid

from schemas import (
    BootstrapConfig,
    CompletionRecord,
    InstanceRecord,
    InstructionRecord,
    RejectionRecord,
    SamplingParams,
    SeedInstance,
    SeedTask,
)
from tasks.resources.store.rounds import Store
from tasks.round.commit import RoundResult, write_round
from tasks.round.pool import IndexDelta, load_pool

SEEDS = [
    SeedTask(
        id="seed_task_0",
        name="greet",
        instruction="Write a friendly greeting for a new colleague.",
        instances=[SeedInstance(input="", output="Welcome aboard!")],
        is_classification=False,
    )
]


def _completion(key: str, stage: str, prompt: str, text: str) -> CompletionRecord:
    return CompletionRecord.model_validate(
        {
            "key": key,
            "stage": stage,
            "request_id": f"req-{key}",
            "prompt": prompt,
            "text": text,
            "finish_reason": "stop",
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "latency_s": 0.1,
            "model": "m",
            "base_url": "http://127.0.0.1:1/v1",
            "seed": 1,
        }
    )


def commit_round(
    store: Store, texts: list[str], seeds: list[SeedTask] = SEEDS, config: BootstrapConfig | None = None
) -> int:
    """Claim the next round of `store`, write a round that kept `texts` (one instance each, one rejection)
    with `write_round`, and commit it. Returns the round number."""
    config = config or BootstrapConfig()
    run_id = f"run-{uuid.uuid4()}"
    number = store.claim_next_round(run_id, renew=False)
    pool = load_pool(store, seeds, config.tokenizer)
    size_before, index_start, vocab_start = pool.size, len(pool.index), pool.index.vocab_size
    ids = [f"r{number:05d}-{i:05d}" for i in range(len(texts))]
    pool.index.add(ids, texts)
    generation = _completion(f"g{number}", "instruction", "Come up with tasks:\n1.", "\n".join(texts))
    instructions = [
        InstructionRecord(
            id=instruction_id,
            round=number,
            instruction=text,
            request_key=generation.key,
            prompt_index=0,
            in_context_ids=[seeds[0].id],
            model="m",
            sampling=SamplingParams(),
            max_rouge=0.1,
            most_similar=[],
            avg_similarity=0.05,
            is_classification=i % 2 == 1,
            classification_raw=" Yes" if i % 2 else " No",
        )
        for i, (instruction_id, text) in enumerate(zip(ids, texts, strict=True))
    ]
    classify = [
        _completion(f"c{r.id}", "classify", r.instruction, r.classification_raw or "") for r in instructions
    ]
    answers = [_completion(f"i{r.id}", "instance", r.instruction, "Output: done.") for r in instructions]
    instances = [
        InstanceRecord(
            instruction_id=r.id, round=number, index=0, input="", output="done.", request_key=a.key
        )
        for r, a in zip(instructions, answers, strict=True)
    ]
    rejected = [
        RejectionRecord(
            round=number, stage="instruction", reason="too_short", text="Hi.", request_key=generation.key
        )
    ]
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

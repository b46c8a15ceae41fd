"""What a round shows in the Prefect UI (artifacts under stable keys) and tells Prefect's event bus."""

import hashlib
import random
import threading
import time
from collections.abc import Callable
from uuid import UUID

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from schemas import InstanceRecord, InstructionRecord, RoundManifest
from tasks.resources.redact import redact_url
from tasks.resources.store.rounds import Store, store_root_url

COUNTS_KEY = "selfinstruct-round-counts"
SAMPLES_KEY = "selfinstruct-round-samples"
PROGRESS_KEY = "selfinstruct-generation-progress"
ROUND_COMMITTED = "selfinstruct.round.committed"


def counts_rows(counts: dict[str, int]) -> list[dict[str, str | int]]:
    """Table rows (stage, reason, count) from a manifest's counts."""
    rows: list[dict[str, str | int]] = []
    for name, value in counts.items():
        if name.startswith("rejected:"):
            _, stage, reason = name.split(":", 2)
            rows.append({"stage": stage, "outcome": f"rejected: {reason}", "count": value})
        else:
            rows.append({"stage": "round", "outcome": name, "count": value})
    return rows


def load_summary(manifest: RoundManifest) -> str:
    """'; LLM server busy 87% of 123 s of generation', or '' for a round with no recorded load."""
    if manifest.load is None:
        return ""
    load = manifest.load
    return f"; LLM server busy {load.busy_fraction:.0%} of {load.wall_s:.0f} s of generation"


def samples_markdown(
    number: int,
    instructions: list[InstructionRecord],
    instances: list[InstanceRecord],
    k: int = 10,
    seed: int = 0,
) -> str:
    """Markdown with `k` random accepted instructions and their instances."""
    by_instruction: dict[str, list[InstanceRecord]] = {}
    for instance in instances:
        by_instruction.setdefault(instance.instruction_id, []).append(instance)
    chosen = random.Random(seed).sample(instructions, min(k, len(instructions)))
    lines = [f"# Round {number}: {len(chosen)} of {len(instructions)} accepted instructions", ""]
    for record in chosen:
        kind = "classification" if record.is_classification else "generation"
        lines += [
            f"### {record.id} ({kind}, max ROUGE-L {record.max_rouge:.2f})",
            "",
            f"> {record.instruction}",
            "",
        ]
        for instance in by_instruction.get(record.id, []):
            lines += [f"- **input:** {instance.input or '(none)'}", f"  **output:** {instance.output}"]
        lines.append("")
    return "\n".join(lines)


def store_resource_id(store: Store) -> str:
    """A stable, credential-free id for a store, usable in Prefect resource ids.

    Derived from the absolute root, so "./data", "data/" and "/abs/path/data" are one resource.
    """
    digest = hashlib.sha256(store_root_url(store).encode()).hexdigest()[:12]
    return f"selfinstruct.store.{digest}"


def name_flow_run(name: str) -> None:
    """Rename the current flow run (e.g. `round-00042`) once its subject is known; no-op outside a run.

    Prefect names runs randomly when they are created, before a round has claimed its number or a
    fine-tune has its id, so the flow renames itself as soon as it knows what it is working on.
    """
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name)


@task(name="publish-round", cache_policy=NO_CACHE)  # its inputs are a store and a round's records
def publish_round(
    store: Store,
    manifest: RoundManifest,
    instructions: list[InstructionRecord],
    instances: list[InstanceRecord],
) -> None:
    """Table and markdown artifacts for a committed round, and the round.committed event."""
    create_table_artifact(
        table=counts_rows(manifest.counts),
        key=COUNTS_KEY,
        description=f"Round {manifest.round} of {redact_url(store.url)}: counts per stage and reason"
        + load_summary(manifest),
    )
    create_markdown_artifact(
        markdown=samples_markdown(manifest.round, instructions, instances, seed=manifest.round),
        key=SAMPLES_KEY,
        description=f"Round {manifest.round}: random accepted instructions with their instances",
    )
    emit_event(
        event=ROUND_COMMITTED,
        resource={
            "prefect.resource.id": f"{store_resource_id(store)}.round.{manifest.round}",
            "prefect.resource.name": f"round {manifest.round}",
            "selfinstruct.store": store_root_url(store),
            "selfinstruct.round": str(manifest.round),
        },
        payload={"round": manifest.round, "counts": manifest.counts, "store": store_root_url(store)},
    )


# Least seconds between two updates of the progress artifact for one stage. Every update is a request to the
# Prefect API (~40 ms, and a database write on the server); a 2,000-prompt pipelined round reported 220 times,
# 9 s spent in the pipeline's own thread while the LLM client waited for its next chunks.
PROGRESS_INTERVAL_S = 1.0


class ProgressArtifact:
    """A progress artifact updated as generation batches return, at most once a `PROGRESS_INTERVAL_S` per
    stage, except that a stage's update with everything done so far is always sent."""

    def __init__(self, description: str) -> None:
        self.description = description
        created = create_progress_artifact(progress=0.0, key=PROGRESS_KEY, description=description)
        assert isinstance(created, UUID)  # the sync API: flows here are synchronous
        self.artifact_id = created

    def callback(self, stage: str) -> Callable[[int, int, int], None]:
        """An `on_progress(done, total, tokens)` callback for one generation stage (tokens are not shown)."""
        last_sent = -PROGRESS_INTERVAL_S
        lock = threading.Lock()

        def report(done: int, total: int, tokens: int = 0) -> None:
            nonlocal last_sent
            now = time.monotonic()
            with lock:
                if done < total and now - last_sent < PROGRESS_INTERVAL_S:
                    return
                last_sent = now
            percent = 100.0 * done / total if total else 100.0
            update_progress_artifact(self.artifact_id, percent, description=f"{self.description}: {stage}")

        return report

"""A round's LLM stages, staged: all instruction prompts, then filters and dedup, then classification of every
accepted instruction, then instance generation for all, each stage waiting for the last one to finish.

Also what both executions share: how they reach the servers (`Generation`) and what they hand to the commit
(`StageOutputs`). The pipelined execution in `tasks.round.pipeline` produces the same outputs.
"""

from dataclasses import dataclass

from schemas import (
    BootstrapConfig,
    CompletionRecord,
    SamplingParams,
    Settings,
)
from tasks.publish.artifacts import ProgressArtifact
from tasks.publish.progress import ProgressUpdate, generation_hook, report
from tasks.resources.llm.batch import CompletionRequest, ProgressCallback
from tasks.resources.llm.cache import CompletionCache
from tasks.resources.llm.chunks import generate_in_tasks
from tasks.resources.task_inputs import as_is
from tasks.round.commit import RoundRecords, RoundResult
from tasks.round.pool import IndexDelta
from tasks.round.records import (
    apply_classification,
    classify_requests,
    instance_requests,
    instruction_requests,
    parsed_count,
)
from tasks.round.steps import (
    RoundContext,
    collect_candidates_task,
    collect_instances_task,
    dedup_candidates_task,
    plan_instruction_prompts_task,
)

# Stage names: they name the task runs (`instructions-chunk-000`) and the progress lines.
INSTRUCTIONS = "instructions"
CLASSIFICATION = "classification"
INSTANCES = "instances"


@dataclass(frozen=True)
class Generation:
    """How a round's stages reach the LLM servers.

    Attributes:
        settings: Client settings, sized for the servers (batch size, concurrency, model).
        urls: The servers' base URLs.
        cache: The round's completion cache: looked up before anything is sent, written as batches return.
        model: The model name the round sends.
        artifact: The round's Prefect progress artifact, or None.
    """

    settings: Settings
    urls: list[str]
    cache: CompletionCache
    model: str
    artifact: ProgressArtifact | None = None

    def on_progress(self, round_number: int, stage: str) -> ProgressCallback:
        """The progress hook of one stage: the terminal line and the progress artifact."""
        also = self.artifact.callback(stage) if self.artifact is not None else None
        return generation_hook(f"round {round_number} {stage}", also)

    def complete(
        self, requests: list[CompletionRequest], sampling: SamplingParams, stage: str, round_number: int
    ) -> list[CompletionRecord]:
        """Complete one whole stage's requests as chunk task runs named by the stage."""
        return generate_in_tasks(
            requests,
            sampling,
            self.settings,
            self.urls,
            self.cache,
            on_progress=self.on_progress(round_number, stage),
            model=self.model,
            stage=stage,
        )


@dataclass(frozen=True)
class StageOutputs(RoundRecords):
    """What a round's stages produced, in the order the commit writes it, and the dedup's index delta."""

    delta: IndexDelta

    def result(self, ctx: RoundContext) -> RoundResult:
        """The round's records with its identity, ready for `commit-round`."""
        return RoundResult(
            number=ctx.number,
            run_id=ctx.run_id,
            model=ctx.model,
            seeds_sha256=ctx.seeds_sha256,
            pool_size_before=ctx.pool_size_before,
            **self.records(),
        )


def report_kept(round_number: int, accepted: int) -> None:
    """Tell the terminal how many instructions dedup has accepted so far."""
    report(ProgressUpdate(f"round {round_number} instructions", note=f"kept {accepted}"))


def report_instances(round_number: int, instructions: int, instances: int) -> None:
    """Tell the terminal what the round keeps."""
    note = f"kept {instructions} instructions, {instances} instances"
    report(ProgressUpdate(f"round {round_number} instances", note=note))


def run_staged(
    ctx: RoundContext, config: BootstrapConfig, settings: Settings, generation: Generation
) -> StageOutputs:
    """Run the round's stages one after another, each over all of its inputs.

    Args:
        ctx: The open round.
        config: The round's knobs.
        settings: Store settings (the steps open the store and load the pool themselves).
        generation: How to reach the servers.

    Returns:
        The round's outputs, in commit order.
    """
    number = ctx.number
    plans = plan_instruction_prompts_task(ctx, config, settings)
    new = generation.complete(
        instruction_requests(plans, config, number), config.instruction_sampling, INSTRUCTIONS, number
    )
    candidates, filtered = collect_candidates_task(as_is(plans), as_is(new), config, number)
    dedup = dedup_candidates_task(as_is(candidates), ctx, config, settings)
    report_kept(number, len(dedup.accepted))
    answers = generation.complete(
        classify_requests(dedup.accepted, config, number), config.classify_sampling, CLASSIFICATION, number
    )
    classified, unanswered = apply_classification(dedup.accepted, answers, number)
    outputs = generation.complete(
        instance_requests(classified, config, number), config.instance_sampling, INSTANCES, number
    )
    instructions, instances, unusable = collect_instances_task(
        as_is(classified), as_is(outputs), config, number
    )
    report_instances(number, len(instructions), len(instances))
    return StageOutputs(
        prompts=len(plans),
        candidates_parsed=parsed_count(candidates, filtered),
        instructions=instructions,
        instances=instances,
        rejected=filtered + dedup.rejected + unanswered + unusable,
        completions=new + answers + outputs,
        delta=dedup.delta,
    )

"""One Self-Instruct bootstrap round as a Prefect flow."""

import uuid
from contextlib import nullcontext

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from schemas import CompletionRecord, RoundParams, SamplingParams
from tasks.publish.artifacts import ProgressArtifact, name_flow_run, publish_round
from tasks.publish.events import emit_data_ready_if_due, round_slot
from tasks.publish.progress import ProgressUpdate, generation_hook, report
from tasks.publish.report import publish_report
from tasks.resources.llm import CompletionRequest, generate_in_tasks
from tasks.resources.llm.sizing import size_for_servers_task
from tasks.resources.redact import redact_url
from tasks.resources.secrets import run_settings
from tasks.resources.store import Store, StoreCompletionCache, end_run_claims
from tasks.round.steps import (
    RoundResult,
    apply_classification,
    classify_requests,
    collect_candidates_task,
    collect_instances_task,
    dedup_candidates_task,
    instance_requests,
    instruction_requests,
    llm_endpoints,
    open_round,
    parsed_count,
    plan_instruction_prompts_task,
    write_round_task,
)


def _end_claims(flow: object, flow_run: object, state: object) -> None:
    """A round that ends without a commit stops renewing its claim and releases it; reruns need not wait."""
    end_run_claims(str(getattr(flow_run, "id", "")))


@flow(
    name="bootstrap-round", on_failure=[_end_claims], on_crashed=[_end_claims], on_cancellation=[_end_claims]
)
def bootstrap_round(params: RoundParams | None = None) -> dict[str, object]:
    """Generate, filter, deduplicate, classify and instantiate new instructions; commit them as one round.

    Args:
        params: Store, seeds, LLM servers and the round's knobs. Credentials come from Settings (the
            environment) or Prefect Secret blocks, never from parameters.

    Returns:
        The round number, its counts and where its files are.
    """
    params = params or RoundParams()
    settings = run_settings()
    config = params.config
    logger = get_run_logger()
    run_id = str(flow_run.id or uuid.uuid4())
    store_url = params.store_url or settings.store_url
    # One round at a time per store: a Prefect global concurrency limit, with the store's exclusive
    # round claim as the last line of defense.
    with round_slot(store_url, params.store_slot_timeout_s) if params.store_slot else nullcontext():
        ctx = open_round(store_url, params.seeds_path, config, settings, run_id)
        name_flow_run(f"round-{ctx.number:05d}")
        logger.info(
            "round %d of %s: pool of %d instructions", ctx.number, redact_url(store_url), ctx.pool_size_before
        )
        store = Store(store_url, settings)
        cache = StoreCompletionCache(store, ctx.number)
        progress = ProgressArtifact(f"Round {ctx.number} generation")

        with llm_endpoints(params.llm_urls, settings) as urls:
            llm_settings = size_for_servers_task(settings, urls)

            def complete(
                requests: list[CompletionRequest], sampling: SamplingParams, stage: str
            ) -> list[CompletionRecord]:
                return generate_in_tasks(
                    requests,
                    sampling,
                    llm_settings,
                    urls,
                    cache,
                    on_progress=generation_hook(f"round {ctx.number} {stage}", progress.callback(stage)),
                    model=ctx.model,
                    stage=stage,
                )

            plans = plan_instruction_prompts_task(ctx, config, settings)
            new = complete(
                instruction_requests(plans, config, ctx.number), config.instruction_sampling, "instructions"
            )
            candidates, filtered = collect_candidates_task(plans, new, config, ctx.number)
            dedup = dedup_candidates_task(candidates, ctx, config, settings)
            report(ProgressUpdate(f"round {ctx.number} instructions", note=f"kept {len(dedup.accepted)}"))
            answers = complete(
                classify_requests(dedup.accepted, config, ctx.number),
                config.classify_sampling,
                "classification",
            )
            classified, unanswered = apply_classification(dedup.accepted, answers, ctx.number)
            outputs = complete(
                instance_requests(classified, config, ctx.number), config.instance_sampling, "instances"
            )
        instructions, instances, unusable = collect_instances_task(classified, outputs, config, ctx.number)
        report(
            ProgressUpdate(
                f"round {ctx.number} instances",
                note=f"kept {len(instructions)} instructions, {len(instances)} instances",
            )
        )

        manifest = write_round_task(
            ctx,
            RoundResult(
                number=ctx.number,
                run_id=run_id,
                model=ctx.model,
                seeds_sha256=ctx.seeds_sha256,
                pool_size_before=ctx.pool_size_before,
                prompts=len(plans),
                candidates_parsed=parsed_count(candidates, filtered),
                instructions=instructions,
                instances=instances,
                rejected=filtered + dedup.rejected + unanswered + unusable,
                completions=new + answers + outputs,
                concurrency=llm_settings.llm_concurrency,
                per_prompt_tokens=llm_settings.llm_token_ids,
            ),
            dedup.delta,
            config,
            settings,
        )
        publish_round(store, manifest, instructions, instances)
        # The event goes out before the report, so a plotting error cannot hold back a fine-tune.
        emit_data_ready_if_due(store, params.data_ready_threshold)
        publish_report(store, manifest.round, settings.report_url)
        logger.info("round %d committed: %s", manifest.round, manifest.counts)
        return {
            "round": manifest.round,
            "counts": manifest.counts,
            "location": store.location(manifest.round),
        }

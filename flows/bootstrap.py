"""One Self-Instruct bootstrap round as a Prefect flow."""

import uuid
from contextlib import nullcontext

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from schemas import CompletionRecord, RoundParams, SamplingParams
from tasks.artifacts import ProgressArtifact, name_flow_run, publish_round
from tasks.events import emit_data_ready_if_due, round_slot
from tasks.llm import CompletionRequest, generate_in_tasks
from tasks.report import publish_report
from tasks.secrets import run_settings
from tasks.steps import (
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
    plan_instruction_prompts_task,
    write_round_task,
)
from tasks.store import StoreCompletionCache, redact_url


@flow(name="bootstrap-round")
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
            "round %d of %s: pool of %d instructions", ctx.number, redact_url(ctx.store.url), ctx.pool.size
        )
        cache = StoreCompletionCache(ctx.store, ctx.number)
        progress = ProgressArtifact(f"Round {ctx.number} generation")

        with llm_endpoints(params.llm_urls, settings) as urls:

            def complete(
                requests: list[CompletionRequest], sampling: SamplingParams, stage: str
            ) -> list[CompletionRecord]:
                return generate_in_tasks(
                    requests,
                    sampling,
                    settings,
                    urls,
                    cache,
                    on_progress=progress.callback(stage),
                    model=ctx.model,
                    stage=stage,
                )

            plans = plan_instruction_prompts_task(ctx.pool, config, ctx.number)
            new = complete(
                instruction_requests(plans, config, ctx.number), config.instruction_sampling, "instructions"
            )
            candidates, filtered = collect_candidates_task(plans, new, config, ctx.number)
            accepted, duplicates = dedup_candidates_task(
                candidates, ctx.pool, config, ctx.number, ctx.model, settings.dask_address
            )
            answers = complete(
                classify_requests(accepted, config, ctx.number), config.classify_sampling, "classification"
            )
            classified = apply_classification(accepted, answers)
            outputs = complete(
                instance_requests(classified, config, ctx.number), config.instance_sampling, "instances"
            )
        instructions, instances, unusable = collect_instances_task(classified, outputs, config, ctx.number)

        manifest = write_round_task(
            ctx.store,
            ctx.pool,
            RoundResult(
                number=ctx.number,
                run_id=run_id,
                model=ctx.model,
                seeds_sha256=ctx.seeds_sha256,
                pool_size_before=ctx.pool_size_before,
                index_start=ctx.index_start,
                vocab_start=ctx.vocab_start,
                prompts=len(plans),
                candidates_parsed=len(candidates) + sum(1 for r in filtered if r.reason != "unparseable"),
                instructions=instructions,
                instances=instances,
                rejected=filtered + duplicates + unusable,
                completions=new + answers + outputs,
            ),
            config,
        )
        publish_round(ctx.store, manifest, instructions, instances)
        # The event goes out before the report, so a plotting error cannot hold back a fine-tune.
        emit_data_ready_if_due(ctx.store, params.data_ready_threshold)
        publish_report(ctx.store, manifest.round, settings.report_url)
        logger.info("round %d committed: %s", manifest.round, manifest.counts)
        return {
            "round": manifest.round,
            "counts": manifest.counts,
            "location": ctx.store.location(manifest.round),
        }

"""One Self-Instruct bootstrap round as a Prefect flow."""

import dataclasses
import uuid
from contextlib import nullcontext

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from schemas import RoundParams
from tasks.publish.artifacts import ProgressArtifact, name_flow_run, publish_round
from tasks.publish.events import emit_data_ready_if_due
from tasks.publish.report import publish_report
from tasks.resources.latency import generation_latency
from tasks.resources.llm.sizing import size_for_servers_task
from tasks.resources.redact import redact_url
from tasks.resources.secrets import run_settings
from tasks.resources.servers.endpoints import llm_endpoints
from tasks.resources.store.claims import end_run_claims
from tasks.resources.store.completions import StoreCompletionCache
from tasks.resources.store.rounds import Store
from tasks.resources.store.slot import round_slot
from tasks.resources.task_inputs import as_is
from tasks.round.pipeline import run_pipelined
from tasks.round.stages import Generation, run_staged
from tasks.round.steps import open_round, write_round_task


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
    if params.llm_api:
        settings = settings.model_copy(update={"llm_api": params.llm_api})
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
        progress = ProgressArtifact(f"Round {ctx.number} generation")

        with llm_endpoints(params.llm_urls, settings) as urls:
            generation = Generation(
                settings=size_for_servers_task(settings, urls),
                urls=urls,
                cache=StoreCompletionCache(store, ctx.number),
                model=ctx.model,
                artifact=progress,
            )
            run_stages = run_pipelined if config.pipelined else run_staged
            # Until the commit: the full collection that ends the pause (0.4 s at 2,000 prompts) is not part
            # of the round's wall time.
            with generation_latency():
                outputs = run_stages(ctx, config, settings, generation)
                result = dataclasses.replace(
                    outputs.result(ctx),
                    concurrency=generation.settings.llm_concurrency,
                    per_prompt_tokens=generation.settings.llm_token_ids,
                )
                manifest = write_round_task(ctx, as_is(result), as_is(outputs.delta), config, settings)
        publish_round(store, manifest, as_is(outputs.instructions), as_is(outputs.instances))
        # The event goes out before the report, so a plotting error cannot hold back a fine-tune.
        emit_data_ready_if_due(store, params.data_ready_threshold)
        publish_report(store, manifest.round, settings.report_url)
        logger.info("round %d committed: %s", manifest.round, manifest.counts)
        return {
            "round": manifest.round,
            "counts": manifest.counts,
            "location": store.location(manifest.round),
        }

"""Audit the quality of a committed round with an LLM judge, as a Prefect flow."""

from prefect import flow

from schemas import Settings
from schemas.audit import AuditParams
from tasks.publish.artifacts import name_flow_run
from tasks.publish.report import publish_report
from tasks.quality.audit import audit_task, publish_audit_task
from tasks.resources.store.rounds import open_store


@flow(name="audit")
def audit(params: AuditParams | None = None) -> dict[str, object]:
    """Judge a seeded sample of a round's instructions, one instance each, on the paper's three questions.

    Writes audits/round=NNNNN/<audit id>.parquet and its manifest beside the round, a table artifact of the
    rates with 95% intervals, and rewrites the round's report so that it shows the audit.

    Args:
        params: Store, round (default: the newest), sample size, seed and judge.

    Returns:
        The audit id, round, where its manifest is, and the rates.
    """
    params = params or AuditParams()
    manifest = audit_task(params)
    name_flow_run(f"audit-round-{manifest.round:05d}")
    location = publish_audit_task(params.store_url, manifest)
    settings = Settings()
    publish_report(open_store(params.store_url, settings), manifest.round, settings.report_url)
    return {
        "audit_id": manifest.audit_id,
        "round": manifest.round,
        "location": location,
        "sampled": manifest.sampled,
        "unparseable": manifest.unparseable,
        "rates": [r.model_dump() for r in manifest.rates],
    }

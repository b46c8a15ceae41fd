"""The generation progress artifact on a real Prefect server: updates spaced out, a finished one is not."""

import time

from tasks.publish.artifacts import PROGRESS_INTERVAL_S, ProgressArtifact


def shown(artifact: ProgressArtifact) -> float:
    """The progress the server holds for the artifact now."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    with get_client(sync_client=True) as client:
        (found,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact.artifact_id]))
        )
    assert isinstance(found.data, float | int)
    return float(found.data)


def test_progress_updates_are_spaced_out_but_a_finished_stage_always_shows(prefect_server: None) -> None:
    artifact = ProgressArtifact("Round 1 generation")
    report = artifact.callback("instructions")
    report(1, 100)
    report(50, 100)  # within the interval: not sent
    assert shown(artifact) == 1.0
    time.sleep(PROGRESS_INTERVAL_S + 0.2)
    report(60, 100)
    assert shown(artifact) == 60.0
    report(100, 100)  # everything queued so far is done: sent at once
    assert shown(artifact) == 100.0
    # Each stage keeps its own interval.
    artifact.callback("classification")(3, 10)
    assert shown(artifact) == 30.0

"""The round report: statistics on exact inputs, a self-contained HTML page, written into a real store."""

import re
from pathlib import Path

import httpx
import pytest

from schemas import (
    Settings,
)
from tasks.publish.report import REPORT_KEY, load_report, render_html, report_link, write_report
from tasks.publish.report_stats import (
    GrowthPoint,
    VerbStats,
    build_report,
    histogram,
    rejections_by_reason,
    summary,
    top_verbs,
    verb_and_object,
)
from tasks.publish.timeline import stacked_steps, timeline_svg
from tasks.resources.store.files import StoreError
from tasks.resources.store.rounds import Store
from tasks.round.server_load import RequestSpan, generation_load
from tests.support import factories
from tests.support.s3 import SECRET_KEY

INSTRUCTIONS = [
    ("Write a short story about a dragon.", 0.31),
    ("Write a poem about the sea.", 0.42),
    ("Give me three examples of prime numbers.", 0.18),
    ("Please write a story for children.", 0.66),
    ("What is the capital of France?", 0.55),
]


def commit_round(store: Store, kept: list[tuple[str, float]], pool_before: int = 175) -> int:
    """Commit a round holding `kept` instructions, one instance each, and a few rejections."""
    number = factories.next_round(store)
    instructions = [
        factories.instruction(number, i, text, max_rouge=rouge, avg_similarity=0.1, classification_raw=None)
        for i, (text, rouge) in enumerate(kept)
    ]
    instances = [
        factories.instance(r.id, number, input="" if i % 2 else "some input text", output="an output")
        for i, r in enumerate(instructions)
    ]
    rejected = [
        factories.rejection(number, "too_short", text="Hi."),
        factories.rejection(number, "too_short", text="Go."),
        factories.rejection(number, "rouge_l>0.7", stage="dedup", text="x", max_rouge=0.92),
        factories.rejection(number, "no_valid_instance", stage="instance", text="y", max_rouge=0.25),
    ]
    counts = {"kept": len(instructions), "instances": len(instances), "rejected:instruction:too_short": 2}
    return factories.commit_round(
        store, instructions, instances, rejected, counts=counts, pool_size_before=pool_before
    )


def test_histogram_bins_edges_and_clipping() -> None:
    counts = histogram([0.0, 0.049, 0.05, 0.7, 1.0, 1.2, -0.1], bins=20)
    assert len(counts) == 20
    assert counts[0] == 3  # 0.0, 0.049 and the clipped -0.1
    assert counts[1] == 1
    assert counts[14] == 1  # 0.7
    assert counts[19] == 2  # 1.0 and the clipped 1.2
    assert sum(counts) == 7


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Write a short story about a dragon.", ("write", "story")),
        ("Generate a list of fruits.", ("generate", "list")),
        ("Please give me three examples.", ("give", "examples")),
        ("Tell me a joke", ("tell", "joke")),
        ("Sort the following numbers quickly.", ("sort", "numbers")),
        ("Summarize.", ("summarize", None)),
        ("What is the capital of France?", (None, None)),
        ("Given a sentence, classify it.", (None, None)),
        ("", (None, None)),
    ],
)
def test_verb_and_object(text: str, expected: tuple[str | None, str | None]) -> None:
    assert verb_and_object(text) == expected


def test_top_verbs_ranks_verbs_and_their_objects() -> None:
    texts = [t for t, _ in INSTRUCTIONS] + ["Write an essay on war.", "Give an example."]
    assert top_verbs(texts, verbs=2, objects=2) == [
        VerbStats("write", 4, [("story", 2), ("essay", 1)]),
        VerbStats("give", 2, [("example", 1), ("examples", 1)]),
    ]


def test_rejections_by_reason_most_frequent_first() -> None:
    rows = [("dedup", "rouge_l>0.7"), ("instruction", "too_short"), ("instruction", "too_short")]
    assert rejections_by_reason(rows) == [("instruction: too_short", 2), ("dedup: rouge_l>0.7", 1)]


def test_summary_of_lengths() -> None:
    assert summary([4, 1, 3, 2]) == {"n": 4, "mean": 2.5, "median": 2.5, "max": 4}
    assert summary([])["n"] == 0


def test_report_from_a_committed_store(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    commit_round(store, INSTRUCTIONS[:2])
    commit_round(store, INSTRUCTIONS, pool_before=177)
    report = load_report(store)  # the newest round by default
    assert report.round == 2
    assert report.growth == [GrowthPoint(1, 175, 2, 2), GrowthPoint(2, 177, 5, 5)]
    assert [p.pool_after for p in report.growth] == [177, 182]
    # Kept instructions plus the one that passed dedup but lost its instances; the dedup rejection apart.
    assert sorted(report.rouge_kept) == sorted([r for _, r in INSTRUCTIONS] + [0.25])
    assert report.rouge_rejected == [0.92]
    assert report.instruction_words == [7, 6, 7, 6, 6]
    assert report.input_words == [3, 3, 3] and report.empty_inputs == 2
    assert report.rejections[0] == ("instruction: too_short", 2)
    assert report.verbs[0] == VerbStats("write", 3, [("story", 2), ("poem", 1)])
    assert load_report(store, 1).growth == [GrowthPoint(1, 175, 2, 2)]
    with pytest.raises(StoreError, match="not committed"):
        load_report(store, 3)
    with pytest.raises(StoreError, match="no committed round"):
        load_report(Store(str(tmp_path / "empty")))


def test_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    commit_round(store, [*INSTRUCTIONS, ("Explain <script>alert(1)</script> tags.", 0.2)])
    page = render_html(load_report(store, 1))
    assert page.startswith("<!DOCTYPE html>")
    assert page.count('src="data:image/svg+xml;base64,') == 5
    assert "<script>" not in page and "&lt;script&gt;" not in page  # only verbs/objects are shown, escaped
    # Nothing is fetched from elsewhere when the file is opened offline.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "Pool growth" in page and "rouge_l&gt;0.7" in page


def test_empty_round_renders(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    commit_round(store, [])
    page = render_html(load_report(store))
    assert "no leading verbs found" in page


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_report_is_written_into_the_committed_round(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "local":
        store = Store(str(tmp_path / "store"))
    else:
        settings: Settings = request.getfixturevalue("s3_settings")
        store = Store(settings.store_url, settings)
    number = commit_round(store, INSTRUCTIONS)
    before = {name: store.file_checksum(number, name) for name in store.read_manifest(number).files}
    written, location = write_report(store)
    assert written == number
    assert location == f"{store.location(number)}/report.html"
    assert store.file_checksum(number, "report.html")  # readable back through the store
    assert {name: store.file_checksum(number, name) for name in before} == before  # data files untouched
    assert store.committed_rounds() == [number]
    served = "http://127.0.0.1:9/reports"
    assert report_link(store, number, served) == f"{served}/rounds/round=00001/report.html"
    if kind == "local":
        assert Path(location).read_text().startswith("<!DOCTYPE html>")
        assert report_link(store, number) == f"file://{location}"
    else:
        # An object store's report opens in a browser through a presigned URL, without credentials.
        link = report_link(store, number)
        assert location.startswith("s3://") and link.startswith("http://127.0.0.1:")
        assert "Signature=" in link and SECRET_KEY not in link
        page = httpx.get(link, timeout=30)
        assert page.status_code == 200 and page.text.startswith("<!DOCTYPE html>")


def test_report_server_serves_committed_reports_only(tmp_path: Path) -> None:
    import threading
    from http.server import ThreadingHTTPServer

    from tasks.publish.report_server import make_handler

    store = Store(str(tmp_path / "store"))
    number = commit_round(store, INSTRUCTIONS)
    write_report(store)
    store.claim_next_round("another-run")  # round 2: claimed, never committed
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(store))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert httpx.get(f"{base}/health").status_code == 200
        index = httpx.get(f"{base}/")
        assert index.status_code == 200 and 'href="/rounds/round=00001/report.html"' in index.text
        page = httpx.get(f"{base}/rounds/round={number:05d}/report.html")
        assert page.status_code == 200 and page.text.startswith("<!DOCTYPE html>")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for missing in (
            "/rounds/round=00002/report.html",  # not committed
            "/rounds/round=00001/manifest.json",  # not a report
            "/rounds/round=00001/../../etc/passwd",
            "/rounds/round=00000/report.html",
        ):
            assert httpx.get(f"{base}{missing}").status_code == 404, missing
    finally:
        server.shutdown()
        server.server_close()


def test_build_report_needs_the_round_manifest() -> None:
    with pytest.raises(ValueError, match="no manifest of round 1"):
        build_report("x", [], 1, [], [], [])


@pytest.mark.slow
def test_publish_report_links_an_artifact(prefect_server: None, tmp_path: Path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks.publish.report import publish_report

    store = Store(str(tmp_path / "store"))
    number = commit_round(store, INSTRUCTIONS)

    @flow
    def report_flow() -> str:
        return publish_report(store, number)

    state = report_flow(return_state=True)
    location = state.result()
    assert location.endswith("rounds/round=00001/report.html")
    # The Prefect server is shared by the session: look only at this flow run's artifacts.
    run_id = str(state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        response = client.request(
            "POST",
            "/artifacts/filter",
            json={"artifacts": {"key": {"any_": [REPORT_KEY]}, "flow_run_id": {"any_": [run_id]}}},
        )
    artifacts = response.json()
    assert len(artifacts) == 1
    assert f"file://{location}" in artifacts[0]["data"]


def _span(stage: str, start: float, end: float) -> RequestSpan:
    return RequestSpan(
        stage, start, end, prompts=8, prompt_tokens=100, completion_tokens=50, cached_prompt_tokens=None
    )


def test_stacked_steps_count_each_stage_in_flight() -> None:
    # The classify stage starts while the last instruction request is still out (pipelined stages).
    spans = [
        _span("instruction", 100.0, 103.0),
        _span("instruction", 100.0, 101.0),
        _span("classify", 102.0, 104.0),
    ]
    assert stacked_steps(spans) == [
        (0.0, 1.0, {"instruction": 2}),
        (1.0, 2.0, {"instruction": 1}),
        (2.0, 3.0, {"instruction": 1, "classify": 1}),
        (3.0, 4.0, {"classify": 1}),
    ]
    assert stacked_steps([]) == []


def test_timeline_is_plain_svg_with_stages_and_concurrency() -> None:
    spans = [_span("instruction", 0.0, 3.0), _span("instruction", 0.0, 1.0), _span("classify", 2.0, 4.0)]
    svg = timeline_svg(spans, concurrency=2, busy_fraction=0.5)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    # One rectangle per stage and step, plus one legend swatch per stage.
    assert svg.count("<rect") == 5 + 2
    assert "concurrency 2" in svg and "busy 50%" in svg
    assert ">instruction</text>" in svg and ">classify</text>" in svg
    assert "<script" not in svg and "href" not in svg
    assert timeline_svg([], 2, 0.0) == ""


def test_report_shows_the_server_load_of_a_round(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    commit_round(store, INSTRUCTIONS[:2])  # committed before loads were recorded
    number = factories.next_round(store)
    requests = [
        factories.completion(key="old", request_id="r0", sent_at=1.0, received_at=2.0),  # a crashed run's
        factories.completion(key="a", request_id="r1", sent_at=10.0, received_at=14.0, completion_tokens=9),
        factories.completion(key="b", request_id="r2", sent_at=10.0, received_at=12.0, completion_tokens=3),
        factories.completion(key="c", request_id="r3", stage="classify", sent_at=13.0, received_at=15.0),
    ]
    load = generation_load(requests, concurrency=2, since=5.0, round_wall_s=20.0)
    assert load is not None and load.busy_fraction == pytest.approx(3 / 5)
    factories.commit_round(store, [], [], [], requests=requests, load=load)
    report = load_report(store, number)
    assert [s.sent_at for s in report.requests] == [10.0, 10.0, 13.0]  # the reused completion left out
    page = render_html(report)
    assert "busy 60%" in page and page.count("<svg") == 1
    assert "<td>classify</td><td>1</td><td>1</td><td>2.0</td>" in page
    assert "$" not in page.split("<body>", 1)[1].split("<svg", 1)[0]  # every placeholder filled
    assert "not recorded for this round" in render_html(load_report(store, 1))

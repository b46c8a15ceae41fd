"""Round audit: seeded sampling, rates with Wilson intervals, store layout, and the flow against a scripted
judge (the loopback fake OpenAI server answering like a judge would), so the rates are known exactly."""

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from schemas.audit import AuditManifest, AuditParams, AuditRecord
from tasks.quality.audit import (
    AuditItem,
    audit_id,
    audit_rates,
    judge_records,
    rate_rows,
    read_audit_records,
    read_audits,
    resolve_round,
    sample_items,
)
from tasks.resources.store.files import StoreError
from tasks.resources.store.rounds import Store
from tests.support.factories import commit_tasks

INSTRUCTIONS = [{"id": f"r00001-{n:05d}", "instruction": f"Task number {n}."} for n in range(10)]
INSTANCES = [
    {"instruction_id": f"r00001-{n:05d}", "index": k, "input": f"in {n}.{k}", "output": f"out {n}.{k}"}
    for n in range(9)  # task 9 has no instance
    for k in range(3)
]


def test_sample_is_seeded_and_independent_of_row_order() -> None:
    first = sample_items(INSTRUCTIONS, INSTANCES, 4, seed=7)
    assert first == sample_items(INSTRUCTIONS[::-1], INSTANCES[::-1], 4, seed=7)
    assert first != sample_items(INSTRUCTIONS, INSTANCES, 4, seed=8)
    assert len({item.instruction_id for item in first}) == 4
    for item in first:
        n = int(item.instruction_id[-5:])
        assert item.instruction == f"Task number {n}."
        assert (item.input, item.output) == (
            f"in {n}.{item.instance_index}",
            f"out {n}.{item.instance_index}",
        )


def test_sample_larger_than_the_round_takes_every_instruction_with_an_instance() -> None:
    items = sample_items(INSTRUCTIONS, INSTANCES, 200, seed=0)
    assert sorted(i.instruction_id for i in items) == [f"r00001-{n:05d}" for n in range(9)]


def _record(answers: str) -> AuditRecord:
    item = AuditItem("r00001-00000", 0, "Add.", "1 and 2", "3")
    (record,) = judge_records([item], [answers])
    return record


def test_rates_count_parseable_answers_only() -> None:
    records = [
        _record(" yes\nQ2: yes\nQ3: yes"),
        _record(" yes\nQ2: yes\nQ3: no"),
        _record(" yes\nQ2: no\nQ3: no"),
        _record(" no\nQ2: no\nQ3: yes"),
        _record(" I think so"),
    ]
    assert records[-1].parse_error == "bad_line:Q1" and records[-1].valid_instruction is None
    assert records[-1].judge_answer == " I think so"
    rates = {r.question: r for r in audit_rates(records)}
    assert {q: (r.yes, r.n) for q, r in rates.items()} == {
        "valid_instruction": (3, 4),
        "appropriate_input": (2, 4),
        "correct_output": (2, 4),
        "all_three": (1, 4),
    }
    assert rates["valid_instruction"].rate == 0.75
    low, high = rates["valid_instruction"].ci_low, rates["valid_instruction"].ci_high
    assert low == pytest.approx(0.3006, abs=1e-4) and high == pytest.approx(0.9544, abs=1e-4)
    (empty,) = [r for r in audit_rates([_record("")]) if r.question == "all_three"]
    assert (empty.n, empty.rate, empty.ci_low) == (0, None, None)


def test_audit_id_is_deterministic() -> None:
    params = AuditParams(sample=50, seed=1)
    assert audit_id("run-1", params, "judge", "v1") == audit_id("run-1", params, "judge", "v1")
    assert audit_id("run-1", params, "judge", "v1").startswith("audit-")
    assert audit_id("run-1", params, "judge", "v1") != audit_id("run-1", params, "judge", "v2")
    assert audit_id("run-1", params, "judge", "v1") != audit_id("run-2", params, "judge", "v1")


def test_resolve_round(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="no committed round"):
        resolve_round(store, None)
    commit_tasks(store, [("Add the numbers.", False, [("1 and 2", "3")])])
    assert resolve_round(store, None) == 1
    with pytest.raises(StoreError, match=r"round 2 .* is not committed"):
        resolve_round(store, 2)


# -- the flow against a scripted judge --------------------------------------------------------------------

# Ten instructions; the judge's answer depends on the output it is shown.
TASKS = [
    ("Add the two numbers.", False, [("3 and 4", "7"), ("1 and 1", "2")]),
    ("Give the plural of the noun.", False, [("mouse", "mice")]),
    ("Name the capital of the country.", False, [("Kenya", "Nairobi")]),
    ("Write the opposite of the word.", False, [("hot", "cold")]),
    ("Translate the number into words.", False, [("12", "twelve")]),
    ("Count the vowels in the word.", False, [("banana", "WRONG")]),
    ("Sort the letters alphabetically.", False, [("cab", "WRONG")]),
    ("Say whether the number is even.", False, [("9", "BADINPUT")]),
    ("Suggest a name for a cafe.", False, [("", "GIBBERISH")]),
    ("Reverse the word.", False, [("stop", "GIBBERISH")]),
]


def scripted_judge(prompt: str) -> str:
    """Answers after the prompt's final "Q1:", chosen by the item's output (the prompt's last Output line)."""
    output = prompt.rsplit("\nOutput: ", 1)[1].split("\n", 1)[0]
    if output == "WRONG":
        return " yes\nQ2: yes\nQ3: no"
    if output == "BADINPUT":
        return " yes\nQ2: no\nQ3: no"
    if output == "GIBBERISH":
        return " The answer looks fine to me."
    return " yes\nQ2: yes\nQ3: yes\n\nInstruction: more"  # the stop sequence cuts the rest


@pytest.mark.slow
def test_audit_flow_with_a_scripted_judge(prefect_server: None, tmp_path: Path, fake_openai: Any) -> None:
    from prefect.client.orchestration import get_client

    from flows.audit import audit
    from tasks.quality.audit import TABLE_KEY

    judge = fake_openai(responder=scripted_judge)
    store = Store(str(tmp_path / "store"))
    number = commit_tasks(store, TASKS)
    before = sorted(p.name for p in (tmp_path / "store" / "rounds" / "round=00001").iterdir())

    params = AuditParams(
        store_url=store.url, sample=200, seed=5, judge_urls=[judge.url], judge_model="judge-x"
    )
    state = audit(params, return_state=True)
    summary = state.result()
    assert summary["round"] == number and summary["sampled"] == 10 and summary["unparseable"] == 2
    rates = {r["question"]: (r["yes"], r["n"]) for r in summary["rates"]}
    assert rates == {
        "valid_instruction": (8, 8),
        "appropriate_input": (7, 8),
        "correct_output": (5, 8),
        "all_three": (5, 8),
    }
    assert {b["model"] for b in judge.bodies} == {"judge-x"}
    assert all(b["temperature"] == 0.0 for b in judge.bodies)

    # Beside the round, not in it: the round's own files are unchanged except for the rewritten report.
    (manifest,) = read_audits(store, number)
    assert manifest.audit_id == summary["audit_id"] and manifest.judge_model == "judge-x"
    assert manifest.sample_seed == 5 and manifest.sampled == 10 and manifest.instructions_in_round == 10
    assert manifest.prompt_files == ["tasks/prompts/audit_judge.txt"] and len(manifest.prompt_version) == 64
    folder = tmp_path / "store" / "audits" / "round=00001"
    assert sorted(p.name for p in folder.iterdir()) == [f"{manifest.audit_id}.json", manifest.file]
    after = sorted(p.name for p in (tmp_path / "store" / "rounds" / "round=00001").iterdir())
    assert after == sorted({*before, "report.html"})
    records = read_audit_records(store, manifest)
    assert sorted(r.parse_error or "" for r in records) == [""] * 8 + ["bad_line:Q1"] * 2
    gibberish = next(r for r in records if r.output == "GIBBERISH")
    assert gibberish.judge_answer == " The answer looks fine to me." and gibberish.correct_output is None
    assert all(not r.judge_answer.endswith("more") for r in records)  # cut at the stop sequence

    # The report shows the audit; the artifact of this flow run holds the rates.
    page = (tmp_path / "store" / "rounds" / "round=00001" / "report.html").read_text()
    assert "<h2>Quality audit</h2>" in page and "5 / 8" in page and manifest.audit_id in page
    run_id = str(state.state_details.flow_run_id)
    with get_client(sync_client=True) as client:
        response = client.request(
            "POST",
            "/artifacts/filter",
            json={"artifacts": {"key": {"any_": [TABLE_KEY]}, "flow_run_id": {"any_": [run_id]}}},
        )
    (artifact,) = response.json()
    data = artifact["data"]
    rows = json.loads(data) if isinstance(data, str) else data
    assert rows == rate_rows(manifest)
    assert rows[2]["rate_%"] == 62.5 and rows[-1]["yes"] == 2

    # Audited again the same way: the same audit id, replaced rather than added.
    again = audit(params)
    assert again["audit_id"] == summary["audit_id"] and len(read_audits(store, number)) == 1


def test_cli_audit_bad_input_writes_nothing(tmp_path: Path) -> None:
    from selfinstruct.cli import app

    store = tmp_path / "store"
    store.mkdir()  # an existing, empty store (a missing one is refused before anything else)
    empty = CliRunner().invoke(app, ["audit", "--store", str(store)])
    assert empty.exit_code == 2 and "no committed round to audit" in empty.output
    commit_tasks(Store(str(store)), [("Add the numbers.", False, [("1 and 2", "3")])])
    missing = CliRunner().invoke(app, ["audit", "--store", str(store), "--round", "4"])
    assert missing.exit_code == 2 and "round 4" in missing.output and "not committed" in missing.output
    down = CliRunner().invoke(app, ["audit", "--store", str(store), "--judge-url", "http://127.0.0.1:9/v1"])
    assert down.exit_code == 2 and "unreachable" in down.output
    assert not (store / "audits").exists()


def test_audit_manifest_roundtrip() -> None:
    manifest = AuditManifest.model_validate(
        {
            "audit_id": "audit-0",
            "round": 1,
            "created_at": "2026-12-02T00:00:00Z",
            "store": "/s",
            "judge_model": "j",
            "judge_urls": [],
            "prompt_version": "0" * 64,
            "prompt_files": [],
            "sample_seed": 0,
            "sample_requested": 200,
            "sampled": 0,
            "instructions_in_round": 0,
            "unparseable": 0,
            "rates": [],
            "file": "audit-0.parquet",
            "sha256": "",
        }
    )
    assert rate_rows(manifest)[-1]["rate_%"] is None

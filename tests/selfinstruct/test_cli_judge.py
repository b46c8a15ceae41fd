"""Bad input to `evaluate` (judged, --compare) and `audit`: one error line, non-zero exit, nothing written."""

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from selfinstruct.cli_audit import register as register_audit
from selfinstruct.cli_train import register as register_train
from tasks.resources.store.rounds import Store
from tests.support.factories import commit_tasks

app = typer.Typer()
register_train(app)
register_audit(app)
runner = CliRunner()


def _store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    commit_tasks(Store(str(root)), [("Add the numbers.", False, [("1 and 2", "3")])])
    return root


def _names(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_compare_refuses_a_finetune_id_and_unknown_rounds(tmp_path: Path) -> None:
    root = _store(tmp_path)
    before = _names(root)
    both = runner.invoke(app, ["evaluate", "--compare", "--finetune-id", "ft-1", "--store", str(root)])
    assert both.exit_code == 2 and "drop --finetune-id" in both.output
    rounds = runner.invoke(app, ["evaluate", "--compare", "--rounds", "4:5", "--store", str(root)])
    assert rounds.exit_code == 2 and "no committed round in that range" in rounds.output
    assert _names(root) == before


def test_heldout_repeating_instruction_and_inputs_is_refused(tmp_path: Path) -> None:
    root = _store(tmp_path)
    line = {
        "id": "h0",
        "name": "n",
        "instruction": "Add the numbers.",
        "instances": [{"input": "1 and 2", "output": "3"}],
        "is_classification": False,
    }
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps(line) + "\n" + json.dumps(line | {"id": "h1"}) + "\n")
    before = _names(root)
    result = runner.invoke(
        app, ["evaluate", "--compare", "--heldout", str(heldout), "--no-judge", "--store", str(root)]
    )
    assert result.exit_code == 2
    assert "heldout.jsonl:2: field 'instruction': duplicate of line 1 with the same inputs" in " ".join(
        result.output.split()
    )
    assert _names(root) == before


def test_unreachable_judge_is_refused_before_anything_runs(tmp_path: Path) -> None:
    root = _store(tmp_path)
    before = _names(root)
    result = runner.invoke(
        app, ["evaluate", "--compare", "--judge-url", "http://127.0.0.1:9/v1", "--store", str(root)]
    )
    assert result.exit_code == 2 and "unreachable" in result.output
    assert _names(root) == before

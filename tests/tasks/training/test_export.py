"""Fine-tuning data from committed rounds: caps, dedup, shuffling, formats, and the export CLI."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from schemas import (
    SeedTask,
    Settings,
)
from schemas.training import ExportFormat, FinetuneParams
from selfinstruct.cli import app
from tasks.resources.store.rounds import Store
from tasks.training.export import (
    ExportError,
    prepare_examples,
    select_rounds,
    split_by_instruction,
    to_rows,
    write_export,
)
from tasks.training.templates import load_templates
from tests.support.factories import TASKS, commit_tasks, two_round_store, write_seed_file

# -- examples -------------------------------------------------------------------------------------------


def test_select_rounds_specs() -> None:
    committed = [1, 2, 3, 5]
    assert select_rounds(None, committed) == [1, 2, 3, 5]
    assert select_rounds("2:3", committed) == [2, 3]
    assert select_rounds("3", committed) == [3]
    assert select_rounds(":2", committed) == [1, 2]
    assert select_rounds("3:", committed) == [3, 5]
    with pytest.raises(ExportError, match=r"no committed round in that range \(committed: 1-3, 5\)"):
        select_rounds("4", committed)
    with pytest.raises(ExportError, match="expected N, A:B"):
        select_rounds("two", committed)
    with pytest.raises(ExportError, match="3 is after 2"):
        select_rounds("3:2", committed)
    with pytest.raises(ExportError, match="no committed rounds"):
        select_rounds(None, [])


def test_examples_are_capped_deduplicated_and_shuffled_reproducibly(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    noisy = [
        (
            "Give the plural of the noun.",
            False,
            [("mouse", "mice"), ("Mouse ", " mice"), ("leaf", "leaves"), ("ox", "oxen")],
        ),
        ("Suggest a name for a bakery.", False, [("", "The Rolling Pin"), ("", "  ")]),
    ]
    commit_tasks(store, noisy)
    commit_tasks(store, [("give the  plural of the noun.", False, [("leaf", "leaves")])])
    instructions, instances = store.read_committed("instructions"), store.read_committed("instances")

    examples, stats = prepare_examples(instructions, instances, None, max_instances=5, seed=1)
    assert stats.instances_read == 7
    assert stats.empty_output == 1
    assert stats.duplicates == 2  # "Mouse "/" mice" in round 1, and round 2's copy of "leaf"
    assert stats.rows == len(examples) == 4
    assert stats.rows_per_source == {"1": 4}
    assert sorted(e.output for e in examples) == ["The Rolling Pin", "leaves", "mice", "oxen"]

    capped, capped_stats = prepare_examples(instructions, instances, None, max_instances=2, seed=1)
    assert capped_stats.over_cap == 2
    again, _ = prepare_examples(instructions, instances, None, max_instances=2, seed=1)
    assert again == capped
    orders = {
        tuple(e.id for e in prepare_examples(instructions, instances, None, 5, seed)[0]) for seed in range(6)
    }
    assert len(orders) > 1  # the seed changes the order


def test_seeds_come_first_in_dedup_and_have_round_zero(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    seeds = [
        SeedTask.model_validate(json.loads(line))
        for line in write_seed_file(tmp_path / "s.jsonl").read_text().splitlines()
    ]
    examples, stats = prepare_examples(
        store.read_committed("instructions"), store.read_committed("instances"), seeds, 5, 0
    )
    assert stats.duplicates == 1
    assert stats.rows_per_source["seeds"] == 2
    assert {e.id for e in examples if e.round == 0} == {"seed_task_0#0", "seed_task_1#0"}
    assert "r00001-00000#0" not in {e.id for e in examples}  # the round's copy of the seed's instance


def test_split_keeps_each_instruction_on_one_side(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    examples, _ = prepare_examples(
        store.read_committed("instructions"), store.read_committed("instances"), None, 5, 3
    )
    train, validation = split_by_instruction(examples, 0.2, seed=3)
    assert len(train) + len(validation) == len(examples)
    assert validation and not {e.instruction for e in train} & {e.instruction for e in validation}
    assert split_by_instruction(examples, 0.0, seed=3) == (examples, [])
    assert len({e.instruction for e in split_by_instruction(examples, 0.5, 3, max_instructions=2)[1]}) == 2


def test_sft_rows_use_every_template_and_the_choice_is_stable(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    examples, _ = prepare_examples(
        store.read_committed("instructions"), store.read_committed("instances"), None, 5, 0
    )
    rows = to_rows(examples, "sft", seed=0)
    assert all(set(row) == {"prompt", "completion"} for row in rows)
    by_output = {row["completion"]: row["prompt"] for row in rows}
    assert by_output["mice"] in {t.render("Give the plural of the noun.", "mouse") for t in load_templates()}
    used = {
        t.name
        for e in examples
        for t in load_templates()
        if t.render(e.instruction, e.input) in {r["prompt"] for r in rows}
    }
    assert len(used) >= 3
    # The template of an example depends on the seed and its id only, not on which other rounds are exported.
    only_round_1 = [e for e in examples if e.round == 1]
    assert to_rows(only_round_1, "sft", seed=0) == [
        r for r, e in zip(rows, examples, strict=True) if e.round == 1
    ]


# -- writing and loading --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "name", "columns"),
    [
        ("jsonl", "out.jsonl", {"instruction", "input", "output", "is_classification", "round", "id"}),
        ("alpaca", "out.json", {"instruction", "input", "output"}),
        ("sft", "out.jsonl", {"prompt", "completion"}),
        ("messages", "out.jsonl", {"messages"}),
    ],
)
def test_export_round_trips_through_datasets(
    tmp_path: Path, fmt: ExportFormat, name: str, columns: set[str]
) -> None:
    import datasets

    store = two_round_store(tmp_path / "store")
    out = tmp_path / "out" / name
    result = write_export(
        store, out, fmt, rounds="1:2", include_seeds=True, seeds_path=write_seed_file(tmp_path / "s.jsonl")
    )
    loaded = datasets.load_dataset("json", data_files=str(out), split="train")
    assert set(loaded.column_names) == columns
    assert loaded.num_rows == result.rows == result.stats.rows == 26
    assert result.rounds == [1, 2]
    if fmt == "jsonl":
        assert sorted(set(loaded["round"])) == [0, 1, 2]
        assert out.read_text().splitlines()[0].startswith('{"instruction": ')


def test_alpaca_is_one_json_array(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    out = tmp_path / "alpaca_data.json"
    write_export(store, out, "alpaca", rounds="2")
    with out.open(encoding="utf-8") as handle:
        rows = json.load(handle)  # what Alpaca's own training script does with its data file
    assert isinstance(rows, list) and len(rows) == 11
    assert all(list(row) == ["instruction", "input", "output"] for row in rows)
    assert {
        "instruction": "Give the capital city of the country.",
        "input": "Japan",
        "output": "Tokyo",
    } in rows


def test_messages_are_conversations_trl_accepts(tmp_path: Path) -> None:
    from trl.data_utils import is_conversational

    store = two_round_store(tmp_path / "store")
    out = tmp_path / "chat.jsonl"
    write_export(store, out, "messages", rounds="1", system_prompt="You follow instructions.")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(is_conversational(row) for row in rows)
    by_answer = {row["messages"][-1]["content"]: row["messages"] for row in rows}
    assert by_answer["mice"] == [
        {"role": "system", "content": "You follow instructions."},
        {"role": "user", "content": "Give the plural of the noun.\n\nmouse"},
        {"role": "assistant", "content": "mice"},
    ]
    assert by_answer["The Rolling Pin"][1:] == [
        {"role": "user", "content": "Suggest a name for a bakery."},
        {"role": "assistant", "content": "The Rolling Pin"},
    ]
    no_system = tmp_path / "plain.jsonl"
    write_export(store, no_system, "messages", rounds="1")
    first = json.loads(no_system.read_text().splitlines()[0])["messages"]
    assert [turn["role"] for turn in first] == ["user", "assistant"] and is_conversational(
        {"messages": first}
    )


@pytest.mark.parametrize(
    ("fmt", "name", "message"),
    [
        ("alpaca", "a.jsonl", r"alpaca writes one JSON array, so the file name must end in \.json "),
        ("jsonl", "a.json", r"must end in \.jsonl \(\.json is for --format alpaca\)"),
        ("messages", "a.txt", r"messages writes JSON Lines, so the file name must end in \.jsonl$"),
        ("sft", "a", r"must end in \.jsonl"),
    ],
)
def test_a_file_name_that_contradicts_the_format_is_refused(
    tmp_path: Path, fmt: ExportFormat, name: str, message: str
) -> None:
    store = two_round_store(tmp_path / "store")
    with pytest.raises(ExportError, match=message):
        write_export(store, tmp_path / name, fmt)
    assert not (tmp_path / name).exists()


def test_export_errors_write_nothing(tmp_path: Path) -> None:
    empty = Store(str(tmp_path / "empty"))
    out = tmp_path / "x.jsonl"
    with pytest.raises(ExportError, match="no committed rounds"):
        write_export(empty, out, "jsonl")
    store = two_round_store(tmp_path / "store")
    with pytest.raises(ExportError, match="no committed round in that range"):
        write_export(store, out, "sft", rounds="7:9")
    assert not out.exists()


def test_export_cli(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    out = tmp_path / "alpaca.json"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "export",
            "--format",
            "alpaca",
            "--rounds",
            "2",
            "--max-instances",
            "1",
            "--store",
            store.url,
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())) == 6
    assert "6 rows" in result.output

    (tmp_path / "none").mkdir()  # an empty store; a missing one is refused before it is read
    wrong_name = runner.invoke(
        app, ["export", "--format", "alpaca", "--store", store.url, str(tmp_path / "alpaca.jsonl")]
    )
    assert wrong_name.exit_code == 2 and not (tmp_path / "alpaca.jsonl").exists()
    assert wrong_name.output.lstrip().startswith("error: ")
    system_elsewhere = runner.invoke(
        app, ["export", "--system-prompt", "x", "--store", store.url, str(tmp_path / "j.jsonl")]
    )
    assert system_elsewhere.exit_code == 2 and "only applies to --format messages" in system_elsewhere.output

    failed = runner.invoke(
        app, ["export", "--format", "sft", "--store", str(tmp_path / "none"), str(tmp_path / "n.jsonl")]
    )
    assert failed.exit_code != 0
    assert "no committed rounds" in failed.output
    assert not (tmp_path / "n.jsonl").exists()


def test_export_and_training_data_on_s3(s3_settings: Settings, tmp_path: Path) -> None:
    from tasks.training.data import upload_training_data

    store = Store(s3_settings.store_url, s3_settings)
    commit_tasks(store, TASKS[:4])
    result = write_export(store, tmp_path / "out.jsonl", "jsonl")
    assert result.rows == 11 and result.rounds == [1]
    data = upload_training_data(store, "ft-s3", FinetuneParams(store_url=store.url))
    assert data.rows["train"] + data.rows["validation"] == 11
    assert store.list_names("finetunes/ft-s3/dataset/data") == [
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]

"""Seed loading: our file, a user's file, and malformed files with exact error messages."""

import json
from pathlib import Path

import pytest

from tasks.round.seeds import DEFAULT_SEEDS, SeedFileError, load_seeds


def _task(n: int, **overrides: object) -> dict[str, object]:
    task: dict[str, object] = {
        "id": f"seed_task_{n}",
        "name": f"task_{n}",
        "instruction": f"Describe item number {n} in one sentence.",
        "instances": [{"input": "", "output": f"Item {n} is an item."}],
        "is_classification": False,
    }
    task.update(overrides)
    return task


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shipped_seeds_meet_the_spec() -> None:
    tasks, digest = load_seeds()
    assert len(tasks) == 175
    assert len(digest) == 64
    assert sum(t.is_classification for t in tasks) >= 25
    assert sum(all(i.input == "" for i in t.instances) for t in tasks) >= 40
    assert len({t.id for t in tasks}) == 175
    assert DEFAULT_SEEDS.name == "seed_tasks.jsonl"


def test_user_file_in_the_same_schema_loads(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.jsonl", [json.dumps(_task(n)) for n in range(3)])
    tasks, _ = load_seeds(path)
    assert [t.id for t in tasks] == ["seed_task_0", "seed_task_1", "seed_task_2"]


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    lines = [json.dumps(_task(n)) for n in range(20)]
    lines[16] = lines[16][:-5]  # line 17 cut short
    path = _write(tmp_path / "seeds.jsonl", lines)
    with pytest.raises(SeedFileError) as caught:
        load_seeds(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:17: invalid JSON")
    assert "\n" not in message


def test_missing_field_names_the_field(tmp_path: Path) -> None:
    broken = _task(4)
    del broken["instruction"]
    lines = [json.dumps(_task(n)) for n in range(4)] + [json.dumps(broken)]
    with pytest.raises(SeedFileError, match=r"seeds.jsonl:5: field 'instruction': Field required"):
        load_seeds(_write(tmp_path / "seeds.jsonl", lines))


def test_wrong_nested_type_and_extra_field(tmp_path: Path) -> None:
    bad_instance = _task(0, instances=[{"input": "x"}])
    with pytest.raises(SeedFileError, match=r":1: field 'instances.0.output'"):
        load_seeds(_write(tmp_path / "a.jsonl", [json.dumps(bad_instance)]))
    extra = _task(0, label="x")
    with pytest.raises(SeedFileError, match=r":1: field 'label': Extra inputs"):
        load_seeds(_write(tmp_path / "b.jsonl", [json.dumps(extra)]))


def test_duplicates_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(SeedFileError, match=r":2: field 'id': duplicate of line 1"):
        load_seeds(_write(tmp_path / "d.jsonl", [json.dumps(_task(1)), json.dumps(_task(1, name="other"))]))
    with pytest.raises(SeedFileError, match="no seed tasks"):
        load_seeds(_write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(SeedFileError, match="cannot read"):
        load_seeds(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(json.dumps(_task(0)).encode() + b"\n\xff\xfe\n")
    with pytest.raises(SeedFileError, match=r"bin.jsonl:2: not UTF-8"):
        load_seeds(tmp_path / "bin.jsonl")

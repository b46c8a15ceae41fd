"""Answering the held-out tasks: the shipped held-out file, and prompts in the fine-tuning template."""

from pathlib import Path

from tasks.training.answers import DEFAULT_HELDOUT, build_prompts, load_heldout
from tests.support.factories import write_heldout


def test_shipped_heldout_file_loads() -> None:
    tasks, sha256 = load_heldout(DEFAULT_HELDOUT)
    assert len(tasks) >= 100 and all(len(t.instances) == 1 for t in tasks) and len(sha256) == 64
    assert [t.id for t in load_heldout(DEFAULT_HELDOUT, limit=3)[0]] == [t.id for t in tasks[:3]]


def test_prompts_use_the_finetuning_template(tmp_path: Path) -> None:
    tasks, _ = load_heldout(write_heldout(tmp_path / "heldout.jsonl"))
    prompts = build_prompts(tasks, "template", "task_input_output")
    assert prompts[0].prompt == "Task: Is the number positive or negative?\nInput: -12\nOutput:\n"
    assert prompts[2].prompt == "Task: Name the largest planet in the solar system.\nOutput:\n"
    assert [p.reference for p in prompts] == ["negative", "swam", "Jupiter", "QUIET"]

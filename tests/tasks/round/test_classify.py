"""Classification prompt and answer parsing (tasks/round/classify.py)."""

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.round.classify import build_classify_prompt, parse_classification

DATA = Path(__file__).parent / "data"


def recorded(name: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads((DATA / f"recorded_{name}.json").read_text())["records"]
    return records


def test_prompt_matches_the_golden_file() -> None:
    prompt = build_classify_prompt("Tell whether the word is a palindrome.")
    assert prompt == (DATA / "expected_classify_prompt.txt").read_text(encoding="utf-8")


def test_prompt_ends_with_the_new_task_and_the_bare_question() -> None:
    prompt = build_classify_prompt("  Tell whether the word is a palindrome.\n")
    assert prompt.endswith(
        "Task: Decide if the tweet expresses anger, joy, sadness or fear.\n"
        "Is it classification? Yes\n"
        "\n"
        "Task: Tell whether the word is a palindrome.\n"
        "Is it classification?"
    )


def test_prompt_has_thirty_worked_examples_twelve_yes() -> None:
    answers = re.findall(r"^Is it classification\? (Yes|No)$", build_classify_prompt("x"), re.MULTILINE)
    assert len(answers) == 30
    assert answers.count("Yes") == 12


def test_instruction_braces_are_kept() -> None:
    assert build_classify_prompt("Format {name} as JSON.").endswith(
        "Task: Format {name} as JSON.\nIs it classification?"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", True),
        ("yes", True),
        (" Yes.", True),
        ("YES", True),
        (" Yes!\n", True),
        ("\n Yes", True),
        ("Yes\nTask: something else", True),
        ("No", False),
        (" No.", False),
        ("", False),
        ("   ", False),
        ("Yes, it is", False),
        ("Maybe", False),
        ("yess", False),
        ("Is it", False),
    ],
)
def test_parse_classification(text: str, expected: bool) -> None:
    assert parse_classification(text) is expected


def test_recorded_prompts_match_the_current_template() -> None:
    for record in recorded("classify"):
        assert build_classify_prompt(record["instruction"]) == record["prompt"], (
            "re-run tests/tasks/round/data/record.py"
        )


def test_recorded_answers_parse() -> None:
    records = recorded("classify")
    assert len(records) >= 10
    answers = {r["instruction"]: parse_classification(r["text"]) for r in records}
    # The real model answered " Yes" / " No" to every recorded task; these are its answers.
    assert all(r["text"].strip() in {"Yes", "No"} for r in records)
    assert answers["Determine whether the given year is a leap year."] is True
    assert answers["Decide whether the given movie review is positive or negative."] is True
    assert answers["Write a letter to your future self."] is False
    assert answers["Explain why leaves change color in the fall."] is False
    assert [parse_classification(r["text"]) for r in records] == [r["text"].strip() == "Yes" for r in records]


@given(st.text())
def test_parse_classification_never_raises(text: str) -> None:
    assert isinstance(parse_classification(text), bool)

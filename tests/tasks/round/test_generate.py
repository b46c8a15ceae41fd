"""Instruction generation: in-context sampling, the prompt, and parsing (tasks/round/generate.py)."""

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.round.generate import build_instruction_prompt, parse_instructions, sample_in_context

DATA = Path(__file__).parent / "data"
HEADER = (
    "Here is a numbered list of different tasks that people ask a helpful assistant to do. "
    "Every task is one instruction on its own line.\n\n"
)

SEEDS = [(f"seed_{n}", f"Human task number {n}.") for n in range(20)]
MACHINE = [(f"machine_{n}", f"Machine task number {n}.") for n in range(5)]


def recorded(name: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads((DATA / f"recorded_{name}.json").read_text())["records"]
    return records


# -- sample_in_context -------------------------------------------------------------------------------------


def origin(pairs: list[tuple[str, str]]) -> tuple[int, int]:
    machine = sum(i.startswith("machine_") for i, _ in pairs)
    return len(pairs) - machine, machine


def test_six_human_and_two_machine_when_machine_ones_exist() -> None:
    chosen = sample_in_context(SEEDS, MACHINE, 8, 2, rng=random.Random(0))
    assert origin(chosen) == (6, 2)
    assert len(set(chosen)) == 8


def test_all_human_while_the_machine_pool_is_empty() -> None:
    assert origin(sample_in_context(SEEDS, [], 8, 2, rng=random.Random(0))) == (8, 0)


def test_one_machine_instruction_only_when_one_exists() -> None:
    assert origin(sample_in_context(SEEDS, MACHINE[:1], 8, 2, rng=random.Random(0))) == (7, 1)


def test_machine_instructions_fill_in_for_missing_seeds() -> None:
    assert origin(sample_in_context(SEEDS[:5], MACHINE, 8, 2, rng=random.Random(0))) == (5, 3)
    assert origin(sample_in_context(SEEDS[:2], MACHINE[:3], 8, 2, rng=random.Random(0))) == (2, 3)


def test_num_machine_larger_than_the_prompt() -> None:
    assert origin(sample_in_context(SEEDS, MACHINE, 3, 10, rng=random.Random(0))) == (0, 3)


def test_same_seed_same_choice_and_rng_may_be_positional() -> None:
    first = sample_in_context(SEEDS, MACHINE, 8, 2, random.Random(42))
    assert first == sample_in_context(SEEDS, MACHINE, 8, 2, random.Random(42))
    assert first != sample_in_context(SEEDS, MACHINE, 8, 2, random.Random(43))


def test_order_is_shuffled() -> None:
    rng = random.Random(1)
    positions: set[int] = set()
    for _ in range(50):
        chosen = sample_in_context(SEEDS, MACHINE, 8, 2, rng=rng)
        positions.update(n for n, (i, _) in enumerate(chosen) if i.startswith("machine_"))
    assert positions == set(range(8))


def test_defaults_are_eight_and_two() -> None:
    assert origin(sample_in_context(SEEDS, MACHINE)) == (6, 2)


@pytest.mark.parametrize(("num_in_context", "num_machine"), [(0, 2), (8, -1)])
def test_bad_counts_raise(num_in_context: int, num_machine: int) -> None:
    with pytest.raises(ValueError):
        sample_in_context(SEEDS, MACHINE, num_in_context, num_machine, rng=random.Random(0))


# -- build_instruction_prompt ------------------------------------------------------------------------------


def test_prompt_exact() -> None:
    prompt = build_instruction_prompt(
        ["Name three primary colors.", "Rewrite the sentence in the past tense.", "Is 17 a prime number?"]
    )
    assert prompt == (
        "Here is a numbered list of different tasks that people ask a helpful assistant to do. "
        "Every task is one instruction on its own line.\n"
        "\n"
        "1. Name three primary colors.\n"
        "2. Rewrite the sentence in the past tense.\n"
        "3. Is 17 a prime number?\n"
        "4."
    )


def test_prompt_puts_each_instruction_on_one_line() -> None:
    prompt = build_instruction_prompt(["  Summarize the text:\n\n  keep it   short. ", "Add {a} and {b}."])
    assert prompt == HEADER + "1. Summarize the text: keep it short.\n2. Add {a} and {b}.\n3."


def test_prompt_with_eight_ends_with_nine() -> None:
    prompt = build_instruction_prompt([f"Task {n}" for n in range(8)])
    assert prompt.endswith("\n8. Task 7\n9.")


def test_prompt_needs_instructions() -> None:
    with pytest.raises(ValueError):
        build_instruction_prompt([])


# -- parse_instructions on recorded completions ------------------------------------------------------------


def test_recorded_prompts_match_the_current_template() -> None:
    for record in recorded("instructions"):
        assert build_instruction_prompt(record["in_context"]) == record["prompt"], "re-run data/record.py"
        assert record["prompt"].endswith(f"\n{record['first_number']}.")


def test_every_recorded_completion_parses() -> None:
    records = recorded("instructions")
    assert len(records) >= 10
    total = 0
    for record in records:
        items = parse_instructions(record["text"], record["first_number"], record["finish_reason"])
        total += len(items)
        assert items, record["text"]
        for item in items:
            assert item == item.strip() and item in record["text"]
            assert not re.match(r"\d+\s*[.)]\s", item), item
    assert total >= 40


def test_recorded_list_is_split_on_numbers() -> None:
    record = next(
        r for r in recorded("instructions") if r["text"].count("\n1") >= 6 and r["finish_reason"] == "stop"
    )
    items = parse_instructions(record["text"], 9, "stop")
    numbered = re.findall(r"^(\d+)\. ", record["text"], re.MULTILINE)
    assert len(items) == len(numbered) + 1
    assert numbered == [str(n) for n in range(10, 10 + len(numbered))]


def test_recorded_length_cut_loses_its_last_item() -> None:
    record = next(r for r in recorded("instructions") if r["finish_reason"] == "length")
    cut = parse_instructions(record["text"], 9, "length")
    whole = parse_instructions(record["text"], 9, "stop")
    assert cut == whole[:-1]


def test_recorded_text_after_the_list_is_ignored() -> None:
    # Recorded without the "\n\n" stop: the model goes on after a blank line.
    stressed = [r for r in recorded("instructions") if "\n\n" not in r["params"]["stop"]]
    assert stressed
    for record in stressed:
        items = parse_instructions(record["text"], 9, record["finish_reason"])
        head = record["text"].strip().split("\n\n")[0]
        assert all(item in head for item in items)


def test_recorded_examples_exact() -> None:
    records = recorded("instructions")
    cut = next(r for r in records if r["finish_reason"] == "length")
    # "10. Solve the following equation: 1 + 1 + 1 ..." ran into the token limit and is dropped.
    assert parse_instructions(cut["text"], 9, "length") == ["Find the missing number in the number line."]
    junk = next(r for r in records if "P.S." in r["text"])
    assert parse_instructions(junk["text"], 9, junk["finish_reason"]) == [
        "Provide a healthy recipe for a vegan breakfast.",
        "Make a homemade recipe that uses a microwave oven.",
    ]


# -- parse_instructions edge cases -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "finish_reason", "expected"),
    [
        (
            " Name a fruit.\n10. Name a color.\n11. Name a city.",
            "stop",
            ["Name a fruit.", "Name a color.", "Name a city."],
        ),
        (" Name a fruit.\n10. Name a color.\n11. Name a ci", "length", ["Name a fruit.", "Name a color."]),
        (" Name a fruit.", "length", []),
        ("", "stop", []),
        ("   \n  \n", "stop", []),
        # "10)" and "10:" variants, spaces before the number
        (" A b c.\n10) D e f.\n  11: G h i.", "stop", ["A b c.", "D e f.", "G h i."]),
        # repeated and skipped numbers
        (" A.\n10. B.\n10. C.\n13. D.", "stop", ["A.", "B.", "C.", "D."]),
        # the model restates the prompt's number
        (" 9. A.\n10. B.", "stop", ["A.", "B."]),
        # ...but a different number on the first line is kept as text
        (" 10 apples cost how much?\n10. B.", "stop", ["10 apples cost how much?", "B."]),
        # empty items are dropped
        (" A.\n10.\n11.   \n12. B.", "stop", ["A.", "B."]),
        # a blank line ends the list; what follows is commentary
        (" A.\n10. B.\n\nThese tasks are all fun!\n11. C.", "stop", ["A.", "B."]),
        # ...and a length cut after it does not hurt the last item
        (" A.\n10. B.\n\nThese tasks are all fu", "length", ["A.", "B."]),
        # leading blank lines before anything are skipped
        ("\n\n10. B.\n11. C.", "stop", ["B.", "C."]),
        # decimals and times are not item numbers
        (
            " Convert\n3.5 cups to ml.\n10. Meet at\n10:30 today.",
            "stop",
            ["Convert\n3.5 cups to ml.", "Meet at\n10:30 today."],
        ),
        # Windows line ends
        (" A.\r\n10. B.\r\n", "stop", ["A.", "B."]),
        # a cut right after the next number leaves the previous items whole
        (" A.\n10. B.\n11.", "length", ["A.", "B."]),
        (" A.\n10. B.\n11. C", None, ["A.", "B.", "C"]),
    ],
)
def test_parse_instructions_edge_cases(text: str, finish_reason: str | None, expected: list[str]) -> None:
    assert parse_instructions(text, 9, finish_reason) == expected


list_like = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.from_regex(r"\A\s?\d{1,3}\s?[.):]\s?[A-Za-z ]{0,20}\Z"),
        st.sampled_from(["", "\n", "\r", "  ", "9.", "10.", "Task:", "16."]),
    ),
    max_size=12,
).map("\n".join)


@given(
    st.one_of(st.text(), list_like), st.integers(-5, 10_000), st.sampled_from([None, "stop", "length", ""])
)
def test_parse_instructions_never_raises(text: str, first_number: int, finish_reason: str | None) -> None:
    items = parse_instructions(text, first_number, finish_reason)
    assert isinstance(items, list)
    for item in items:
        assert isinstance(item, str)
        assert item and item == item.strip()

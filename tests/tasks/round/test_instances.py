"""Instance prompts and parsing (tasks/round/instances.py)."""

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.round.filters import filter_instances
from tasks.round.instances import build_instance_prompt, parse_instances

DATA = Path(__file__).parent / "data"


def recorded(name: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads((DATA / f"recorded_{name}.json").read_text())["records"]
    return records


# -- prompts -----------------------------------------------------------------------------------------------


def test_input_first_prompt_matches_the_golden_file() -> None:
    prompt = build_instance_prompt(
        "Give the opposite of the adjective.", is_classification=False, max_instances=5
    )
    assert prompt == (DATA / "expected_instances_input_first_prompt.txt").read_text(encoding="utf-8")


def test_output_first_prompt_matches_the_golden_file() -> None:
    prompt = build_instance_prompt("Tell whether the animal can fly.", is_classification=True)
    assert prompt == (DATA / "expected_instances_output_first_prompt.txt").read_text(encoding="utf-8")


def test_input_first_prompt_head_and_tail() -> None:
    prompt = build_instance_prompt(" Give the opposite of the adjective. ", False, 3)
    assert prompt.startswith("Below, every task is followed by up to 3 worked examples. ")
    assert prompt.endswith(
        "Task: Give one synonym of the word.\n"
        "Example 1\n"
        "Input: happy\n"
        "Output: cheerful\n"
        "Example 2\n"
        "Input: quick\n"
        "Output: rapid\n"
        "Example 3\n"
        "Input: begin\n"
        "Output: start\n"
        "\n"
        "Task: Give the opposite of the adjective.\n"
    )


def test_output_first_prompt_tail() -> None:
    prompt = build_instance_prompt("Tell whether the animal can fly.", True, 5)
    assert prompt.endswith(
        "Task: Say whether the statement is true or false.\n"
        "Class label: True\n"
        "Input: Water boils at 100 degrees Celsius at sea level.\n"
        "Class label: False\n"
        "Input: The Sun travels around the Earth once a day.\n"
        "\n"
        "Task: Tell whether the animal can fly.\n"
    )
    assert "Example 1" not in prompt


def test_the_worked_examples_parse_back() -> None:
    # The prompt's own demonstrations must be readable by the parser: the format is one format.
    prompt = build_instance_prompt("x", False, 5)
    rhyme = prompt.split("Task: Write a two-line rhyme about rain.\n")[1].split("\n\n")[0]
    assert parse_instances(rhyme, False, "stop") == [
        ("", "The clouds grew heavy, dark and gray,\nthen rain came down and washed the dust away.")
    ]
    prompt = build_instance_prompt("x", True)
    animals = prompt.split("Task: Classify the animal as a mammal, a bird, a reptile or a fish.\n")[1].split(
        "\n\n"
    )[0]
    assert parse_instances(animals, True, "stop") == [
        ("dolphin", "Mammal"),
        ("penguin", "Bird"),
        ("iguana", "Reptile"),
        ("salmon", "Fish"),
    ]


# -- recorded completions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["instances_input_first", "instances_output_first"])
def test_recorded_prompts_match_the_current_template(name: str) -> None:
    records = recorded(name)
    assert len(records) >= 10
    for record in records:
        prompt = build_instance_prompt(
            record["instruction"], record["is_classification"], record["max_instances"]
        )
        assert prompt == record["prompt"], "re-run tests/tasks/round/data/record.py"


@pytest.mark.parametrize("name", ["instances_input_first", "instances_output_first"])
def test_recorded_completions_parse_into_fields_found_in_the_text(name: str) -> None:
    for record in recorded(name):
        pairs = parse_instances(record["text"], record["is_classification"], record["finish_reason"])
        for input_text, output in pairs:
            assert input_text == input_text.strip() and output == output.strip()
            assert input_text in record["text"] and output in record["text"]
            assert "Input:" not in input_text and "Output:" not in output
        filter_instances(pairs, 5, 2000)


def parsed(name: str, instruction: str) -> list[tuple[str, str]]:
    record = next(r for r in recorded(name) if r["instruction"] == instruction)
    return parse_instances(record["text"], record["is_classification"], record["finish_reason"])


def test_recorded_input_first_examples() -> None:
    # Three examples, the last a repeat: the filter drops it.
    plural = parsed("instances_input_first", "Give the plural form of the noun.")
    assert plural == [
        ("The dog is a big dog.", "dogs"),
        ("The cat is a cat.", "cats"),
        ("The cat is a cat.", "cats"),
    ]
    assert filter_instances(plural, 5, 2000)[1] == [("The cat is a cat.", "cats", "duplicate")]
    # The model wrote the answer without "Output:" first, then again with it.
    assert parsed("instances_input_first", "Rewrite the sentence below in the passive voice.") == [
        ("", "The ball was thrown by John.")
    ]
    # A haiku with no markers at all, and an Input repeated until the length limit: nothing usable.
    assert parsed("instances_input_first", "Write a haiku about a quiet morning.") == []
    assert parsed("instances_input_first", "Summarize the paragraph in one sentence.") == []
    # "Output:" repeated until the length limit: many empty outputs, all rejected by the filter.
    empty = parsed(
        "instances_input_first", "List four things a person should pack for a weekend hiking trip."
    )
    assert len(empty) > 50 and set(empty) == {("", "")}
    assert filter_instances(empty, 5, 2000)[0] == []
    title = parsed("instances_input_first", "Suggest a title for the short story.")
    assert filter_instances(title, 5, 2000)[1][0][2] == "input_equals_output"


def test_recorded_output_first_examples() -> None:
    # The last label came without an input, as the model often ends: it is dropped.
    assert parsed(
        "instances_output_first", "Identify the language of the sentence: English, French or Spanish."
    ) == [
        ("The cat is a cat.", "English"),
        ("The cat is a dog.", "French"),
    ]
    # One input under two labels: the filter rejects the whole task.
    sign = parsed("instances_output_first", "Tell whether the given number is positive, negative or zero.")
    assert sign == [("10", "Positive"), ("10", "Negative")]
    assert filter_instances(sign, 5, 2000) == ([], [(i, o, "conflicting_outputs") for i, o in sign])
    # With presence penalty 1.5 the model switches to "Output:" lines, which this format ignores.
    assert parsed(
        "instances_output_first", "Pick the season described: spring, summer, autumn or winter."
    ) == [("", "Spring")]
    assert parsed("instances_output_first", "Label the weather description as sunny, rainy or snowy.") == [
        ("Rainy", "Sunny")
    ]


# -- edge cases --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "finish_reason", "expected"),
    [
        (
            "Example 1\nInput: 3, 1, 2\nOutput: 1, 2, 3\nExample 2\nInput: 9, 8\nOutput: 8, 9\n\n",
            "stop",
            [("3, 1, 2", "1, 2, 3"), ("9, 8", "8, 9")],
        ),
        # no header for the first example, blank lines between examples, any case, extra spaces
        ("input:  a\nOUTPUT :b\n\n\nExample 2\nInput: c\nOutput: d", "stop", [("a", "b"), ("c", "d")]),
        # tasks without input: empty Input, "None", "N/A", "<noinput>", or no Input line
        (
            "Example 1\nInput:\nOutput: Bubbles\nExample 2\nInput: None\nOutput: Fin\n"
            "Example 3\nInput: N/A.\nOutput: Koi\n"
            "Example 4\nInput: <noinput>\nOutput: Goldie\nExample 5\nOutput: Nemo",
            "stop",
            [("", "Bubbles"), ("", "Fin"), ("", "Koi"), ("", "Goldie"), ("", "Nemo")],
        ),
        # multi-line fields
        (
            "Example 1\nInput: line one\nline two\nOutput: first\nsecond\nExample 2\nInput: x\nOutput: y",
            "stop",
            [("line one\nline two", "first\nsecond"), ("x", "y")],
        ),
        # a field's value may start on the next line, even after a blank line
        ("Example 1\nInput:\nThe text.\nOutput:\n\nThe summary.", "stop", [("The text.", "The summary.")]),
        # text after a blank line that is not a marker is commentary
        (
            "Example 1\nInput: a\nOutput: b\n\nIn this task you will learn about b.\nOutput: c",
            "stop",
            [("a", "b")],
        ),
        # an example without an Output is dropped; a second Input replaces the first
        (
            "Example 1\nThe answer is 4.\nExample 2\nInput: a\nInput: b\nOutput: c\nExample 3\nInput: d",
            "stop",
            [("b", "c")],
        ),
        # repeated Outputs are separate instances without input
        (
            "Example 1\nOutput: words\nOutput: words\nOutput:",
            "stop",
            [("", "words"), ("", "words"), ("", "")],
        ),
        # "Example 1: Input: ..." on one line
        ("Example 1: Input: a\nOutput: b\nExample 2. Output: c", "stop", [("a", "b"), ("", "c")]),
        # class labels mean nothing to an input-first parse
        ("Example 1\nInput: a\nClass label: X\nOutput: b", "stop", [("a", "b")]),
        # length cut: the last instance goes
        ("Example 1\nInput: a\nOutput: b\nExample 2\nInput: c\nOutput: d, e, f, g", "length", [("a", "b")]),
        ("Example 1\nInput: a, b, c, d", "length", []),
        ("", "stop", []),
        ("Example 1\r\nInput: a\r\nOutput: b\r\n", "stop", [("a", "b")]),
    ],
)
def test_parse_input_first(text: str, finish_reason: str | None, expected: list[tuple[str, str]]) -> None:
    assert parse_instances(text, False, finish_reason) == expected


@pytest.mark.parametrize(
    ("text", "finish_reason", "expected"),
    [
        (
            "Class label: Positive\nInput: Great food.\nClass label: Negative\nInput: Cold soup.\n\n",
            "stop",
            [("Great food.", "Positive"), ("Cold soup.", "Negative")],
        ),
        # a last label without input is dropped when other labels have inputs
        (
            "Class label: English\nInput: The cat.\n"
            "Class label: French\nInput: Le chat.\nClass label: Spanish\n\n",
            "stop",
            [("The cat.", "English"), ("Le chat.", "French")],
        ),
        # ...but kept with an empty input when no label has one (a task without input)
        ("Class label: Heads\nClass label: Tails", "stop", [("", "Heads"), ("", "Tails")]),
        # several inputs under one label
        (
            "Class label: Even\nInput: 2\nInput: 4\nClass label: Odd\nInput: 3",
            "stop",
            [("2", "Even"), ("4", "Even"), ("3", "Odd")],
        ),
        # Output lines are not part of this format; inputs before any label are orphans
        (
            "Input: orphan\nClass label: Yes\nOutput: No\nInput: It is raining.\n",
            "stop",
            [("It is raining.", "Yes")],
        ),
        # "Label:" and case variants, multi-line input
        (
            "label: spam\ninput: WIN A PRIZE\nclick here\nCLASS LABEL: ham\nINPUT: see you at 5",
            "stop",
            [("WIN A PRIZE\nclick here", "spam"), ("see you at 5", "ham")],
        ),
        # the "None" input of a labelled example means no input
        ("Class label: A\nInput: None\nClass label: B\nInput: b", "stop", [("", "A"), ("b", "B")]),
        # a length cut drops the last (input, label) pair
        ("Class label: A\nInput: a\nClass label: B\nInput: b b b b", "length", [("a", "A")]),
        # ...and a cut right after a label loses just that label
        ("Class label: A\nInput: a\nClass label: B", "length", [("a", "A")]),
        # commentary after a blank line
        ("Class label: A\nInput: a\n\nIn this example we see A.", "stop", [("a", "A")]),
        ("Class label:\nInput: a", "stop", [("a", "")]),
        ("", None, []),
    ],
)
def test_parse_output_first(text: str, finish_reason: str | None, expected: list[tuple[str, str]]) -> None:
    assert parse_instances(text, True, finish_reason) == expected


marker_lines = st.lists(
    st.one_of(
        st.text(max_size=30),
        st.sampled_from(
            ["", " ", "Example 1", "Example 12:", "Input:", "Output:", "Class label:", "Label:", "None"]
        ),
        st.tuples(
            st.sampled_from(["Input: ", "Output: ", "Class label: ", "Example 3 "]), st.text(max_size=20)
        ).map("".join),
    ),
    max_size=15,
).map("\n".join)


@given(st.one_of(st.text(), marker_lines), st.booleans(), st.sampled_from([None, "stop", "length", ""]))
def test_parse_instances_never_raises(text: str, is_classification: bool, finish_reason: str | None) -> None:
    pairs = parse_instances(text, is_classification, finish_reason)
    assert isinstance(pairs, list)
    for pair in pairs:
        assert isinstance(pair, tuple) and len(pair) == 2
        assert all(isinstance(field, str) and field == field.strip() for field in pair)

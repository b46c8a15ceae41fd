"""Judge prompts (exact strings), strict parsers of judge answers, and the prompt version."""

import pytest

from tasks.prompts import load_template
from tasks.quality.judge import (
    AuditVerdict,
    RatingVerdict,
    build_audit_prompt,
    build_rating_prompt,
    parse_audit_answer,
    parse_rating,
    prompt_version,
)


def test_audit_prompt_ends_with_the_item_and_the_first_question() -> None:
    prompt = build_audit_prompt("  Add the two numbers. ", "3 and 4\n", " 7 ")
    assert prompt.startswith(
        "You check machine-generated training data for an instruction-following model. Each item is an "
        "instruction, an input ((none) when there is no input) and an output. Answer three questions "
        "about the item, each with yes or no:\nQ1: Does the instruction describe a valid task?\n"
    )
    assert prompt.endswith(
        "Instruction: Name the capital city of the country.\nInput: Kenya\nOutput: Nairobi\n"
        "Q1: yes\nQ2: yes\nQ3: yes\n\n"
        "Instruction: Add the two numbers.\nInput: 3 and 4\nOutput: 7\nQ1:"
    )
    assert prompt.count("Instruction: ") == 6  # five worked examples and the item


def test_audit_prompt_with_an_empty_input_and_braces_in_the_data() -> None:
    prompt = build_audit_prompt("Write a haiku about {output}.", "", "{input}")
    assert prompt.endswith("Instruction: Write a haiku about {output}.\nInput: (none)\nOutput: {input}\nQ1:")


def test_rating_prompt_exact_tail() -> None:
    prompt = build_rating_prompt("Add the two numbers.", "", "7", " seven ")
    assert prompt.startswith("Rate how well a response carries out a task, on this four-level scale:\n")
    assert prompt.endswith(
        "Response: The weather is nice today today today.\nRating: D\n\n"
        "Instruction: Add the two numbers.\nInput: (none)\nReference answer: 7\nResponse: seven\nRating:"
    )


@pytest.mark.parametrize(
    ("completion", "verdict"),
    [
        (" yes\nQ2: yes\nQ3: yes", AuditVerdict(True, True, True)),
        (" Yes\nQ2: NO\nQ3: no", AuditVerdict(True, False, False)),
        (" yes.\nQ2: no - the input is a question\nQ3: no (wrong sum)", AuditVerdict(True, False, False)),
        (" yes\n\nQ2: yes\nQ3: no\nQ4: yes\nInstruction: x", AuditVerdict(True, True, False)),
        ("yes\nQ2) yes\nQ3. yes", AuditVerdict(True, True, True)),
        # recorded from SmolLM2-135M as judge: it repeats the example instead of answering
        (" yes\nQ2: yes\nQ3: yes\n", AuditVerdict(True, True, True)),
        ("", AuditVerdict(None, None, None, "empty")),
        ("  \n ", AuditVerdict(None, None, None, "empty")),
        (" yes\nQ2: yes", AuditVerdict(None, None, None, "missing:Q3")),
        (" yes", AuditVerdict(None, None, None, "missing:Q2")),
        (" maybe\nQ2: yes\nQ3: yes", AuditVerdict(None, None, None, "bad_line:Q1")),
        (" yes and no\nQ2: yes\nQ3: yes", AuditVerdict(None, None, None, "bad_line:Q1")),
        (" yesterday\nQ2: yes\nQ3: yes", AuditVerdict(None, None, None, "bad_line:Q1")),
        (" yes\nQ3: yes\nQ2: yes", AuditVerdict(None, None, None, "bad_line:Q2")),
        (" yes\nQ2: yes\nThe output is correct.", AuditVerdict(None, None, None, "bad_line:Q3")),
        (" The instruction is valid.", AuditVerdict(None, None, None, "bad_line:Q1")),
    ],
)
def test_parse_audit_answer(completion: str, verdict: AuditVerdict) -> None:
    assert parse_audit_answer(completion) == verdict


@pytest.mark.parametrize(
    ("completion", "verdict"),
    [
        (" A", RatingVerdict("A")),
        ("B", RatingVerdict("B")),
        (" C.", RatingVerdict("C")),
        (" D - the answer is about something else", RatingVerdict("D")),
        (" A\nInstruction: next", RatingVerdict("A")),
        ("\n B ", RatingVerdict("B")),
        ("", RatingVerdict(None, "empty")),
        (" ", RatingVerdict(None, "empty")),
        (" A good answer", RatingVerdict(None, "not_a_rating")),
        (" b", RatingVerdict(None, "not_a_rating")),
        (" E", RatingVerdict(None, "not_a_rating")),
        (" AB", RatingVerdict(None, "not_a_rating")),
        (" The response is fine.", RatingVerdict(None, "not_a_rating")),
    ],
)
def test_parse_rating(completion: str, verdict: RatingVerdict) -> None:
    assert parse_rating(completion) == verdict


def test_prompt_version_hashes_the_template_files() -> None:
    audit = prompt_version("audit_judge")
    assert len(audit) == 64 and all(c in "0123456789abcdef" for c in audit)
    assert audit == prompt_version("audit_judge")
    assert audit != prompt_version("rate_answer")
    assert prompt_version("audit_judge", "rate_answer") != prompt_version("rate_answer", "audit_judge")
    assert load_template("audit_judge").endswith("\nQ1:")  # the parser puts "Q1:" back in front
    assert load_template("rate_answer").endswith("\nRating:")

"""Instruction and instance filters (tasks/round/filters.py)."""

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.config import DEFAULT_BLACKLIST
from tasks.round.filters import (
    check_ascii_start,
    check_blacklist,
    check_empty,
    check_instance,
    check_instruction,
    check_punctuation_start,
    check_word_count,
    check_write_a_program,
    filter_instances,
)


def check(text: str) -> tuple[bool, str | None]:
    return check_instruction(text, 3, 150, DEFAULT_BLACKLIST)


# -- instructions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Name three primary colors.", (True, None)),
        ("", (False, "empty")),
        ("   \n\t ", (False, "empty")),
        ("Sort these numbers", (False, "too_short")),  # exactly 3 words: needs MORE than 3
        ("Sort these four numbers", (True, None)),
        (" ".join(["word"] * 150), (True, None)),
        (" ".join(["word"] * 151), (False, "too_long")),
        ("Describe the image in one sentence.", (False, "blacklist:image")),
        ("Describe the IMAGES you see here.", (False, "blacklist:images")),
        ("Tell me how to go to the station.", (False, "blacklist:go to")),
        ("Tell me how to Go\n  To the station.", (False, "blacklist:go to")),
        ("Explain the goto statement in C.", (True, None)),
        ("Explain what a mapping of keys is.", (True, None)),
        ("Explain how a file-based database works.", (False, "blacklist:file")),
        ("Write a program that prints the primes.", (False, "write_a_program")),
        ("write a program to add two numbers", (False, "write_a_program")),
        (
            "Write a programmer's job ad in two lines.",
            (False, "write_a_program"),
        ),  # prefix match, as intended
        ('"Quote" the sentence below back to me.', (False, "starts_with_punctuation")),
        ("- List five fruits that are red.", (False, "starts_with_punctuation")),
        ("¿Cómo se dice hello en español?", (False, "non_ascii_start")),
        ("Ünterschied between two words, explain it.", (False, "non_ascii_start")),
        ("Explain the word «saudade» in English.", (True, None)),
    ],
)
def test_check_instruction(text: str, expected: tuple[bool, str | None]) -> None:
    assert check(text) == expected


def test_first_failure_wins_in_the_documented_order() -> None:
    # Too short AND blacklisted AND punctuation: the word count is checked first.
    assert check("- draw it") == (False, "too_short")
    # Blacklisted AND a program AND ...: the blacklist comes before "Write a program".
    assert check("Write a program that reads a file line by line.") == (False, "blacklist:file")
    # Blacklist order follows the configured tuple, not the position in the text.
    assert check_blacklist("Plot a graph of the image", ("plot", "image", "graph")) == (
        False,
        "blacklist:plot",
    )
    assert check_blacklist("Plot a graph of the image", ("image", "plot")) == (False, "blacklist:image")


def test_word_count_bounds_are_parameters() -> None:
    assert check_word_count("one two", 1, 2) == (True, None)
    assert check_word_count("one", 1, 2) == (False, "too_short")
    assert check_word_count("one two three", 1, 2) == (False, "too_long")


def test_blacklist_is_literal_not_regex() -> None:
    assert check_blacklist("Compute a+b for me please", ("a+b",)) == (False, "blacklist:a+b")
    assert check_blacklist("Compute aab for me please", ("a+b",)) == (True, None)
    assert check_blacklist("anything at all", ("", "   ")) == (True, None)


def test_single_checks_keep_clean_text() -> None:
    text = "Give two examples of renewable energy."
    for verdict in (
        check_empty(text),
        check_blacklist(text, DEFAULT_BLACKLIST),
        check_write_a_program(text),
        check_punctuation_start(text),
        check_ascii_start(text),
    ):
        assert verdict == (True, None)
    assert check_punctuation_start("") == (True, None)
    assert check_ascii_start("") == (True, None)


@given(st.text(max_size=300), st.integers(0, 10), st.integers(1, 200))
def test_check_instruction_never_raises(text: str, min_words: int, max_words: int) -> None:
    keep, reason = check_instruction(text, min_words, max_words, DEFAULT_BLACKLIST)
    assert isinstance(keep, bool)
    assert (reason is None) == keep
    assert reason is None or isinstance(reason, str)


# -- instances ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pair", "reason"),
    [
        (("2 + 2", "4"), None),
        (("", "A poem about rain."), None),
        (("2 + 2", ""), "empty_output"),
        (("2 + 2", "  \n"), "empty_output"),
        (("same", "same"), "input_equals_output"),
        (("same ", " same"), "input_equals_output"),
        (("Translate this:", "Bonjour"), "ends_with_colon"),
        (("hello", "The answer is:"), "ends_with_colon"),
        (("x" * 21, "short"), "too_long"),
        (("short", "y" * 21), "too_long"),
    ],
)
def test_check_instance(pair: tuple[str, str], reason: str | None) -> None:
    assert check_instance(*pair, max_field_chars=20) == (reason is None, reason)


def test_filter_instances_keeps_good_ones_in_order() -> None:
    pairs = [("a", "1"), ("b", "2"), ("", "3")]
    assert filter_instances(pairs, 5, 100) == (pairs, [])


def test_filter_instances_reasons_and_order() -> None:
    pairs = [
        ("a", "1"),
        ("b", ""),  # empty_output
        ("a", "1"),  # duplicate
        ("c", "c"),  # input_equals_output
        ("d:", "4"),  # ends_with_colon
        ("e", "5"),
        ("f", "6"),  # over_limit (max 2 kept)
        ("a", "1"),  # duplicate beats over_limit
        ("g", "x" * 50),  # too_long
    ]
    kept, rejected = filter_instances(pairs, 2, 20)
    assert kept == [("a", "1"), ("e", "5")]
    assert rejected == [
        ("b", "", "empty_output"),
        ("a", "1", "duplicate"),
        ("c", "c", "input_equals_output"),
        ("d:", "4", "ends_with_colon"),
        ("f", "6", "over_limit"),
        ("a", "1", "duplicate"),
        ("g", "x" * 50, "too_long"),
    ]


def test_conflicting_outputs_reject_the_whole_task() -> None:
    pairs = [("2020", "Leap year"), ("1900", "Not a leap year"), ("2020 ", "Not a leap year"), ("x", "")]
    kept, rejected = filter_instances(pairs, 5, 100)
    assert kept == []
    assert [r[2] for r in rejected] == [
        "conflicting_outputs",
        "conflicting_outputs",
        "conflicting_outputs",
        "empty_output",  # a per-instance reason found first is kept
    ]


def test_empty_inputs_never_conflict() -> None:
    pairs = [("", "Bubbles"), ("", "Captain Fin")]
    assert filter_instances(pairs, 5, 100) == (pairs, [])


def test_an_instance_already_rejected_does_not_cause_a_conflict() -> None:
    pairs = [("hello", "Bonjour"), ("hello", "Salut:"), ("hello", "")]
    kept, rejected = filter_instances(pairs, 5, 100)
    assert kept == [("hello", "Bonjour")]
    assert [r[2] for r in rejected] == ["ends_with_colon", "empty_output"]


def test_a_conflict_beyond_the_limit_still_counts() -> None:
    pairs = [("a", "1"), ("b", "2"), ("a", "3")]
    kept, rejected = filter_instances(pairs, 1, 100)
    assert kept == []
    assert {r[2] for r in rejected} == {"conflicting_outputs"}


pair_strategy = st.tuples(
    st.sampled_from(["", "a", "b", "a:", " a ", "x" * 30]),
    st.sampled_from(["", "1", "2", "a", "end:", "y" * 30]),
)


@given(st.lists(pair_strategy, max_size=12), st.integers(1, 6))
def test_filter_instances_partitions_its_input(pairs: list[tuple[str, str]], max_instances: int) -> None:
    kept, rejected = filter_instances(pairs, max_instances, 20)
    assert len(kept) <= max_instances
    assert len(set(kept)) == len(kept)
    assert Counter(kept) + Counter((i, o) for i, o, _ in rejected) == Counter(pairs)
    assert {r for _, _, r in rejected} <= {
        "empty_output",
        "input_equals_output",
        "ends_with_colon",
        "too_long",
        "conflicting_outputs",
        "duplicate",
        "over_limit",
    }
    # Kept instances keep their relative order.
    positions = iter(range(len(pairs)))
    assert all(any(pairs[p] == k for p in positions) for k in kept)

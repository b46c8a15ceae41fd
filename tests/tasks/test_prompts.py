"""Template loading and filling (tasks/prompts/__init__.py)."""

import re

import pytest

from tasks.prompts import TEMPLATE_FIELDS, fill, load_template, render


@pytest.mark.parametrize("name", sorted(TEMPLATE_FIELDS))
def test_every_template_has_exactly_its_declared_placeholders(name: str) -> None:
    text = load_template(name)
    found = set(re.findall(r"\{([a-z_][a-z0-9_]*)\}", text))
    assert found == TEMPLATE_FIELDS[name]
    for field in TEMPLATE_FIELDS[name]:
        assert text.count("{" + field + "}") == 1


@pytest.mark.parametrize("name", sorted(TEMPLATE_FIELDS))
def test_templates_are_plain_ascii_without_tabs_or_trailing_spaces(name: str) -> None:
    text = load_template(name)
    assert text.isascii()
    assert "\t" not in text and "\r" not in text
    assert all(line == line.rstrip() for line in text.split("\n"))


def test_load_template_drops_only_the_final_newline() -> None:
    assert load_template("classify").endswith("Task: {instruction}\nIs it classification?")
    # The instance prompts must end with a newline, so their files end with an empty line.
    assert load_template("instances_input_first").endswith("Task: {instruction}\n")
    assert load_template("instances_output_first").endswith("Task: {instruction}\n")
    assert load_template("instruction_generation").endswith("{numbered_tasks}\n{next_number}.")


def test_unknown_template_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="unknown template"):
        load_template("nope")


def test_fill_substitutes_in_one_pass() -> None:
    fields = frozenset({"a", "b"})
    assert fill("<{a}|{b}>", fields, {"a": "{b}", "b": "{a}"}) == "<{b}|{a}>"


def test_fill_keeps_literal_braces() -> None:
    template = 'JSON {"k": [1, {}]} and {other} and {{a}} then {a}'
    assert fill(template, frozenset({"a"}), {"a": "X"}) == 'JSON {"k": [1, {}]} and {other} and {X} then X'


def test_fill_requires_exactly_the_declared_fields() -> None:
    with pytest.raises(ValueError, match="needs fields"):
        fill("{a}", frozenset({"a"}), {})
    with pytest.raises(ValueError, match="needs fields"):
        fill("{a}", frozenset({"a"}), {"a": "1", "b": "2"})


def test_render_writes_ints_and_keeps_values_verbatim() -> None:
    prompt = render("instruction_generation", numbered_tasks="1. Use {braces} and $dollars.", next_number=2)
    assert prompt.endswith("\n\n1. Use {braces} and $dollars.\n2.")

"""The sft_*.txt prompt templates: exact rendered prompts, braces in the data, malformed files refused."""

import pytest

from tasks.training.templates import TemplateError, load_templates, parse_template, template_by_name


def test_templates_render_exact_prompts() -> None:
    templates = {t.name: t for t in load_templates()}
    assert len(templates) >= 4
    task_io = templates["task_input_output"]
    assert (
        task_io.render("Add the numbers.", "2 and 3") == "Task: Add the numbers.\nInput: 2 and 3\nOutput:\n"
    )
    assert task_io.render("Name a fruit.", "") == "Task: Name a fruit.\nOutput:\n"
    assert templates["bare"].render("Add the numbers.", "2 and 3") == "Add the numbers.\n\n2 and 3\n"
    assert templates["headings"].render("Name a fruit.", "") == "Instruction:\nName a fruit.\n\nResponse:\n"
    for template in templates.values():  # every prompt ends where the answer starts: on a fresh line
        assert template.render("x", "y").endswith("\n") and template.render("x", "").endswith("\n")


def test_braces_in_the_data_are_left_alone() -> None:
    template = template_by_name("task_input_output")
    assert (
        template.render("Fill {input} in", "{instruction}")
        == "Task: Fill {input} in\nInput: {instruction}\nOutput:\n"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "Task: {instruction}\n<<<with input>>>\n{instruction} {input}\n"
            "<<<without input>>>\n{instruction}\n",
            "before the first",
        ),
        (
            "<<<with input>>>\n{instruction}\n<<<without input>>>\n{instruction}\n",
            "needs {instruction} and {input}",
        ),
        (
            "<<<with input>>>\n{instruction} {input}\n<<<without input>>>\n{instruction} {input}\n",
            "no {input}",
        ),
        ("<<<with input>>>\n{instruction} {input}\n", "missing section <<<without input>>>"),
        ("<<<with input>>>\n{instruction} {input}\n\n<<<without input>>>\n{instruction}\n", "non-empty line"),
    ],
)
def test_malformed_templates_are_rejected(text: str, message: str) -> None:
    with pytest.raises(
        TemplateError, match="template broken: .*" + message.replace("{", r"\{").replace("}", r"\}")
    ):
        parse_template("broken", text)

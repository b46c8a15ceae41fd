"""Prompt templates: load them from `tasks/prompts/` and fill their placeholders.

A template is a text file used verbatim except for two things:

* its final newline is not part of the template. Files end with a newline like any text file, yet some
  prompts must end mid-line (the classification prompt ends right after "Is it classification?", so that
  the model's next token is the answer). A prompt that must end with a newline ends its file with an empty
  line.
* `{name}` is a placeholder only when `name` is one of the template's declared fields (`TEMPLATE_FIELDS`).
  Every other brace is literal, so templates may show JSON or code without escaping, and filled-in values
  are never scanned again (an instruction containing "{instruction}" is inserted as is).
"""

import re
from functools import cache
from importlib import resources

# The placeholders each template must contain; render() refuses anything else so a typo fails loudly.
TEMPLATE_FIELDS: dict[str, frozenset[str]] = {
    "instruction_generation": frozenset({"numbered_tasks", "next_number"}),
    "classify": frozenset({"instruction"}),
    "instances_input_first": frozenset({"instruction", "max_instances"}),
    "instances_output_first": frozenset({"instruction"}),
    "audit_judge": frozenset({"instruction", "input", "output"}),
    "rate_answer": frozenset({"instruction", "input", "reference", "response"}),
}

_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


@cache
def load_template(name: str) -> str:
    """Read a template file shipped in `tasks/prompts/`.

    Args:
        name: Template name without the `.txt` suffix, one of `TEMPLATE_FIELDS`.

    Returns:
        The file's text without its final newline.

    Raises:
        KeyError: `name` is not a known template.
    """
    if name not in TEMPLATE_FIELDS:
        raise KeyError(f"unknown template {name!r}; known: {sorted(TEMPLATE_FIELDS)}")
    text = resources.files(__package__).joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return text.removesuffix("\n")


def fill(template: str, fields: frozenset[str], values: dict[str, str]) -> str:
    """Replace the `{name}` placeholders of `fields` in one pass; other braces stay as they are.

    Args:
        template: Template text.
        fields: Names that are placeholders in this template.
        values: One string per field.

    Returns:
        The filled-in text.

    Raises:
        ValueError: `values` does not name exactly `fields`.
    """
    if set(values) != fields:
        raise ValueError(f"template needs fields {sorted(fields)}, got {sorted(values)}")

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        return values[name] if name in fields else match.group(0)

    return _PLACEHOLDER.sub(substitute, template)


def render(name: str, **values: str | int) -> str:
    """Fill a shipped template.

    Args:
        name: Template name, one of `TEMPLATE_FIELDS`.
        **values: One value per declared field; ints are written in decimal.

    Returns:
        The prompt text.
    """
    return fill(load_template(name), TEMPLATE_FIELDS[name], {k: str(v) for k, v in values.items()})

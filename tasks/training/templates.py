"""The prompt templates of fine-tuning data: tasks/prompts/sft_*.txt, parsed and rendered.

A file holds two sections, each opened by a marker line, `<<<with input>>>` and `<<<without input>>>`. Every
line of a section up to the next marker is part of the prompt and is followed by a newline, so a prompt always
ends with "\\n" and the completion (the output) starts on a fresh line; the last line must not be blank (see
`parse_template`). `{instruction}` and `{input}` are replaced in one pass, so braces in the data stay as they
are. Several templates (picked per example by a seeded RNG in export.py) keep the model from tying itself to
one surface form.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "prompts"
WITH_INPUT = "<<<with input>>>"
WITHOUT_INPUT = "<<<without input>>>"
_PLACEHOLDER = re.compile(r"\{(instruction|input)\}")


class TemplateError(ValueError):
    """A template file that does not follow the sft_*.txt format; the message names the file."""


@dataclass(frozen=True)
class SftTemplate:
    """A prompt template with its two variants."""

    name: str
    with_input: str
    without_input: str

    def render(self, instruction: str, input_text: str) -> str:
        """The prompt for an instruction and its input (the without-input variant when the input is empty)."""
        text = self.with_input if input_text else self.without_input
        values = {"instruction": instruction, "input": input_text}
        return _PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def parse_template(name: str, text: str) -> SftTemplate:
    """Parse the text of an sft_*.txt file.

    Args:
        name: The template's name (file name without `sft_` and `.txt`), used in messages.
        text: The file's content.

    Raises:
        TemplateError: When a section is missing or repeated, or a placeholder is missing or misplaced.
    """
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.strip() in (WITH_INPUT, WITHOUT_INPUT):
            if line.strip() in sections:
                raise TemplateError(f"template {name}: section {line.strip()} appears twice")
            current = sections.setdefault(line.strip(), [])
        elif current is None:
            raise TemplateError(f"template {name}: text before the first section marker")
        else:
            current.append(line + "\n")
    missing = [marker for marker in (WITH_INPUT, WITHOUT_INPUT) if marker not in sections]
    if missing:
        raise TemplateError(f"template {name}: missing section {missing[0]}")
    with_input, without_input = "".join(sections[WITH_INPUT]), "".join(sections[WITHOUT_INPUT])
    if with_input.endswith("\n\n") or without_input.endswith("\n\n") or not with_input or not without_input:
        # BPE tokenizers merge a run of newlines differently when the answer follows it, so a prompt ending in
        # a blank line would not be a token prefix of prompt + answer.
        raise TemplateError(f"template {name}: a section must end with a non-empty line")
    if with_input.count("{instruction}") != 1 or with_input.count("{input}") != 1:
        raise TemplateError(f"template {name}: {WITH_INPUT} needs {{instruction}} and {{input}} once each")
    if without_input.count("{instruction}") != 1 or "{input}" in without_input:
        raise TemplateError(f"template {name}: {WITHOUT_INPUT} needs {{instruction}} once and no {{input}}")
    return SftTemplate(name=name, with_input=with_input, without_input=without_input)


def load_templates(folder: Path = TEMPLATES_DIR) -> list[SftTemplate]:
    """Every sft_*.txt template in `folder`, sorted by name (the order the seeded RNG picks from)."""
    templates = [
        parse_template(path.stem.removeprefix("sft_"), path.read_text(encoding="utf-8"))
        for path in sorted(folder.glob("sft_*.txt"))
    ]
    if not templates:
        raise TemplateError(f"{folder}: no sft_*.txt templates")
    return templates


def template_by_name(name: str, templates: Sequence[SftTemplate] | None = None) -> SftTemplate:
    """The template called `name` (without the sft_ prefix)."""
    for template in templates or load_templates():
        if template.name == name:
            return template
    names = ", ".join(t.name for t in templates or load_templates())
    raise TemplateError(f"no template named {name!r} (have: {names})")

"""Instance generation: prompt for input/output examples of a task and parse them (section 2.2 of the paper).

Classification tasks are prompted output-first ("Class label: X" then "Input: ..."), so every label gets an
input instead of the model writing inputs of one easy class only; other tasks are prompted input-first
("Example k", "Input: ...", "Output: ..."; the Input is left empty for tasks that need none).

Parsing reads the completion line by line. A line starting with a marker (`Example k`, `Input:`, `Output:`,
`Class label:` / `Label:`, any case) opens a field; other lines continue the open field. A blank line closes
the open field, and unmarked text after a blank line ends the parse: in the prompt a blank line separates
tasks, so such text is the model wandering off (commentary, a new task) rather than part of an example.
"""

import re
from dataclasses import dataclass

from tasks.prompts import render

_MARKER = re.compile(
    r"^\s*(?:(?P<example>example\s*#?\s*\d+)\s*[:.)]?|(?P<field>input|output|class\s+label|label)\s*:)\s*(?P<rest>.*)$",
    re.IGNORECASE,
)
# Inputs the model writes for "no input"; they mean the same as an empty input.
_NO_INPUT = frozenset({"", "none", "n/a", "na", "no input", "<noinput>", "<no input>", "-", "empty", "null"})


@dataclass(frozen=True)
class _Field:
    kind: str  # "example", "input", "output" or "label"
    text: str


def build_instance_prompt(instruction: str, is_classification: bool, max_instances: int = 5) -> str:
    """Render the instance-generation prompt for one task.

    Args:
        instruction: The task instruction; surrounding whitespace is removed.
        is_classification: Output-first prompt when True, input-first otherwise.
        max_instances: How many examples per task the input-first header asks for (the output-first
            prompt asks for one input per label instead).

    Returns:
        Worked examples of other tasks, then "Task: <instruction>" and a newline; the model continues with
        "Example 1" (input-first) or "Class label:" (output-first).
    """
    if is_classification:
        return render("instances_output_first", instruction=instruction.strip())
    return render("instances_input_first", instruction=instruction.strip(), max_instances=max_instances)


def parse_instances(text: str, is_classification: bool, finish_reason: str | None) -> list[tuple[str, str]]:
    """Parse generated instances.

    Input-first: an `Output:` completes an instance with the `Input:` before it (none: empty input); a
    second `Input:` before any `Output:` replaces the first. Output-first: each `Class label:` starts an
    instance whose output is the label and whose input is the `Input:` after it; further `Input:` lines
    under the same label are more instances of that label. Labels without an input are kept (with an empty
    input) only when no label of the completion has one, i.e. when the task takes no input.

    Args:
        text: Completion text, without the prompt.
        is_classification: Whether the prompt was output-first.
        finish_reason: The server's finish reason; on "length" the last instance is dropped, as it may be cut.

    Returns:
        (input, output) pairs, stripped; "None", "N/A", "<noinput>"... inputs become "". Pairs are not
        filtered here (an empty output is still returned) so the filters can record why they reject them.
    """
    fields = _scan(text)
    if is_classification:
        pairs = _assemble_output_first(fields)
    else:
        pairs = [(input_text or "", output) for input_text, output in _assemble_input_first(fields)]
    if finish_reason == "length" and pairs:
        pairs.pop()
    if is_classification and any(input_text is not None for input_text, _ in pairs):
        pairs = [(input_text, output) for input_text, output in pairs if input_text is not None]
    return [(_normalize_input(input_text or ""), output) for input_text, output in pairs]


def _scan(text: str) -> list[_Field]:
    """Split the completion into marked fields, following the line rules of the module docstring."""
    fields: list[_Field] = []
    lines: list[str] = []
    kind: str | None = None  # the open field's kind; None when no field is open
    after_blank = False

    def close() -> None:
        if kind is not None:
            fields.append(_Field(kind, "\n".join(lines).strip()))

    for line in text.splitlines():
        if not line.strip():
            if kind is not None and any(part.strip() for part in lines):
                close()
                kind, lines = None, []
            after_blank = after_blank or bool(fields)
            continue
        match = _MARKER.match(line)
        if match is None:
            if kind is not None:
                lines.append(line)
            elif after_blank:
                break
            continue
        close()
        kind, lines = _kind_of(match), []
        after_blank = False
        if kind == "example":
            fields.append(_Field(kind, ""))
            kind = None
            # Text after "Example 1:" on the same line may itself start a field.
            rest = match.group("rest")
            inner = _MARKER.match(rest)
            if inner is not None and inner.group("field"):
                kind, lines = _kind_of(inner), [inner.group("rest")]
        else:
            lines = [match.group("rest")]
    close()
    return fields


def _kind_of(match: re.Match[str]) -> str:
    if match.group("example"):
        return "example"
    name = match.group("field").lower()
    return "label" if name.endswith("label") else name


def _assemble_input_first(fields: list[_Field]) -> list[tuple[str | None, str]]:
    pairs: list[tuple[str | None, str]] = []
    pending_input: str | None = None
    for field in fields:
        if field.kind == "input":
            pending_input = field.text
        elif field.kind == "output":
            pairs.append((pending_input, field.text))
            pending_input = None
        elif field.kind == "example":
            # An Input never followed by an Output is incomplete; a new example drops it.
            pending_input = None
    return pairs


def _assemble_output_first(fields: list[_Field]) -> list[tuple[str | None, str]]:
    pairs: list[tuple[str | None, str]] = []
    label: str | None = None
    label_used = False
    for field in fields:
        if field.kind == "label":
            if label is not None and not label_used:
                pairs.append((None, label))
            label, label_used = field.text, False
        elif field.kind == "input" and label is not None:
            pairs.append((field.text, label))
            label_used = True
        elif field.kind == "example":
            # Examples are not part of the output-first format; treat one as the end of the current label.
            if label is not None and not label_used:
                pairs.append((None, label))
            label, label_used = None, False
    if label is not None and not label_used:
        pairs.append((None, label))
    return pairs


def _normalize_input(text: str) -> str:
    return "" if text.strip().rstrip(".").strip().casefold() in _NO_INPUT else text.strip()

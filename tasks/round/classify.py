"""Classification check: ask the model whether an instruction is a classification task (section 2.2).

The answer decides how instances are generated: output-first (label, then an input with that label) for
classification tasks, so that every label gets examples; input-first for the rest.
"""

import string

from tasks.prompts import render

_STRIP = string.whitespace + string.punctuation


def build_classify_prompt(instruction: str) -> str:
    """Render the few-shot prompt that asks whether `instruction` is a classification task.

    Args:
        instruction: The task instruction; surrounding whitespace is removed.

    Returns:
        Thirty worked "Task: ...\\nIs it classification? Yes|No" examples, then the new task, ending with
        "Is it classification?" so that the model's next word is the answer.
    """
    return render("classify", instruction=instruction.strip())


def parse_classification(text: str) -> bool:
    """Read the model's answer.

    Args:
        text: Completion text. Only its first non-blank line counts, in case the server ignored the stop
            sequence.

    Returns:
        True only when that line is "yes" in any case, once surrounding whitespace and punctuation are
        stripped ("Yes", " Yes.", "YES"); anything else, including "Yes, it is", is False, as in the paper.
    """
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    return first_line.strip(_STRIP).casefold() == "yes"

"""Instruction generation: pick in-context instructions, build the numbered-list prompt, parse the completion.

The prompt is a numbered list of known instructions ending with the next number ("9."); the model continues
the list, so the completion's first item carries no number and the later ones do ("10. ...").
"""

import random
import re

from tasks.prompts import render

# An item boundary: a line that starts with a number and ".", ")" or ":" followed by a space or the line's
# end. Requiring the space keeps "3.5 cups of flour" or "10:30" from being split.
_NUMBERED = re.compile(r"^\s*(\d{1,4})\s*[.):](?:\s+|$)(.*)$")
_SPACE_RUN = re.compile(r"\s+")


def sample_in_context(
    seed_pool: list[tuple[str, str]],
    machine_pool: list[tuple[str, str]],
    num_in_context: int = 8,
    num_machine: int = 2,
    rng: random.Random | None = None,
) -> list[tuple[str, str]]:
    """Choose the instructions shown in one generation prompt, as in section 2.2 of the paper.

    `num_machine` come from the machine-generated pool (fewer while it is small) and the rest from the
    human-written seeds. When the seeds run short, more machine instructions fill the gap. The result is
    shuffled so machine instructions do not always sit at the end of the list.

    Args:
        seed_pool: (id, instruction) pairs written by humans.
        machine_pool: (id, instruction) pairs generated in earlier rounds.
        num_in_context: How many instructions the prompt shows.
        num_machine: How many of them should be machine-generated.
        rng: Source of randomness; pass a seeded one for reproducible rounds (None: a fresh unseeded one).

    Returns:
        At most `num_in_context` (id, instruction) pairs in prompt order; fewer only when both pools together
        hold fewer.

    Raises:
        ValueError: `num_in_context` < 1 or `num_machine` < 0.
    """
    if num_in_context < 1 or num_machine < 0:
        raise ValueError(
            f"need num_in_context >= 1 and num_machine >= 0, got {num_in_context}, {num_machine}"
        )
    rng = rng if rng is not None else random.Random()
    n_machine = min(num_machine, num_in_context, len(machine_pool))
    n_human = min(num_in_context - n_machine, len(seed_pool))
    # Top up from the machine pool when there are not enough seeds for the human share.
    n_machine = min(num_in_context - n_human, len(machine_pool))
    chosen = rng.sample(machine_pool, n_machine) + rng.sample(seed_pool, n_human)
    rng.shuffle(chosen)
    return chosen


def build_instruction_prompt(instructions: list[str]) -> str:
    """Render the instruction-generation prompt.

    Args:
        instructions: The in-context instructions, in the order shown. Runs of whitespace (newlines included)
            are collapsed to one space, since the list has one instruction per line.

    Returns:
        The header, the numbered instructions and the next number followed by "." (e.g. "9.") with nothing
        after it.

    Raises:
        ValueError: `instructions` is empty.
    """
    if not instructions:
        raise ValueError("the prompt needs at least one in-context instruction")
    lines = [f"{n}. {_SPACE_RUN.sub(' ', text).strip()}" for n, text in enumerate(instructions, start=1)]
    return render("instruction_generation", numbered_tasks="\n".join(lines), next_number=len(lines) + 1)


def parse_instructions(text: str, first_number: int, finish_reason: str | None) -> list[str]:
    """Split the completion of the numbered list into new instructions.

    The first line continues the prompt's last number, so it is an item even without a number (a repeated
    "9." at its start is removed). Every later line that starts with a number ("10.", "10)", "10:") opens
    a new item, whatever the number, as small models repeat or skip numbers. Unnumbered lines continue the
    current item. A blank line ends the list, as the "\\n\\n" stop sequence would: what follows is commentary.

    Args:
        text: Completion text, without the prompt.
        first_number: The number the prompt ended with, i.e. that of the completion's first item.
        finish_reason: The server's finish reason. On "length" the last item is dropped, as it may be cut,
            unless a blank line ended the list before the cut.

    Returns:
        Instructions in order, whitespace-stripped, empty ones dropped.
    """
    items: list[list[str]] = [[]]
    seen_text = ended_early = False
    for index, line in enumerate(text.split("\n")):
        if not line.strip():
            if seen_text:
                ended_early = True
                break
            continue
        match = _NUMBERED.match(line)
        if match and index == 0 and int(match.group(1)) == first_number:
            # The model restated the number the prompt already gave.
            items[-1].append(match.group(2))
        elif match and index > 0:
            items.append([match.group(2)])
        else:
            items[-1].append(line)
        seen_text = seen_text or bool(items[-1][-1].strip())
    instructions = ["\n".join(part.strip() for part in item if part.strip()) for item in items]
    # A cut can only hurt the last item when the list ran to the end of the text.
    if finish_reason == "length" and not ended_early:
        instructions.pop()
    return [text for text in instructions if text]

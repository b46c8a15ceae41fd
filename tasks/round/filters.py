"""Quality filters for generated instructions and instances (section 2.3 of the paper).

Every check is a pure function returning a `Verdict`: `(True, None)` to keep, `(False, reason)` to reject.
Reasons are stable strings that are counted per round and stored with the rejected item.
"""

import re
import string
from collections.abc import Iterable
from functools import cache

from tasks.round.dedup.tokens import Tokenizer, tokenize

Verdict = tuple[bool, str | None]

KEEP: Verdict = (True, None)


def check_empty(text: str) -> Verdict:
    """Reject an instruction that is empty or only whitespace (`empty`)."""
    return KEEP if text.strip() else (False, "empty")


def count_words(text: str, tokenizer: Tokenizer = "rouge") -> int:
    """Words of `text` for the length filter: whitespace-separated, as in the paper, under the "rouge"
    tokenizer; the multilingual tokenizer's tokens otherwise, so that a script written without spaces
    (Chinese, Japanese) counts one word per character instead of one per sentence."""
    return len(text.split()) if tokenizer == "rouge" else len(tokenize(text, tokenizer))


def check_word_count(text: str, min_words: int, max_words: int, tokenizer: Tokenizer = "rouge") -> Verdict:
    """Keep instructions with more than `min_words` and at most `max_words` words (see `count_words`).

    Returns:
        `too_short` or `too_long` on rejection.
    """
    words = count_words(text, tokenizer)
    if words <= min_words:
        return False, "too_short"
    if words > max_words:
        return False, "too_long"
    return KEEP


@cache
def _blacklist_patterns(blacklist: tuple[str, ...]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    # Whole words only ("map" must not hit "mapping"); inner spaces of "go to" match any whitespace run.
    return tuple(
        (word, re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, word.split())) + r"(?!\w)", re.IGNORECASE))
        for word in blacklist
        if word.strip()
    )


def check_blacklist(text: str, blacklist: Iterable[str]) -> Verdict:
    """Reject instructions that mention something a text-only model cannot handle (images, files...).

    Args:
        text: The instruction.
        blacklist: Keywords or phrases, matched as whole words, case-insensitively.

    Returns:
        `blacklist:<keyword>` for the first keyword of `blacklist` (in its order) that occurs.
    """
    for word, pattern in _blacklist_patterns(tuple(blacklist)):
        if pattern.search(text):
            return False, f"blacklist:{word}"
    return KEEP


def check_write_a_program(text: str) -> Verdict:
    """Reject "Write a program ..." instructions (`write_a_program`).

    Filtered as in the paper's reference pipeline: such requests leave open whether the answer is code or the
    result of running it, which makes their instances unreliable.
    """
    return (False, "write_a_program") if text.lstrip().lower().startswith("write a program") else KEEP


def check_punctuation_start(text: str) -> Verdict:
    """Reject instructions whose first character is ASCII punctuation (`starts_with_punctuation`)."""
    stripped = text.lstrip()
    return (False, "starts_with_punctuation") if stripped[:1] and stripped[0] in string.punctuation else KEEP


def check_ascii_start(text: str) -> Verdict:
    """Reject instructions whose first character is not ASCII (`non_ascii_start`)."""
    stripped = text.lstrip()
    return (False, "non_ascii_start") if stripped[:1] and not stripped[0].isascii() else KEEP


def check_instruction(
    text: str, min_words: int, max_words: int, blacklist: Iterable[str], tokenizer: Tokenizer = "rouge"
) -> Verdict:
    """Run every instruction filter; the first failure wins.

    Order: `empty`, word count (`too_short` / `too_long`), `blacklist:<word>`, `write_a_program`,
    `starts_with_punctuation`, `non_ascii_start` (the last only with the "rouge" tokenizer: with the
    multilingual one, non-English instructions are the point).

    Args:
        text: The candidate instruction.
        min_words: Keep only when there are more words than this.
        max_words: Keep only when there are at most this many words.
        blacklist: Whole-word keywords to reject.
        tokenizer: How words are counted (see `count_words`).

    Returns:
        `(True, None)` or `(False, reason)`.
    """
    for verdict in (
        check_empty(text),
        check_word_count(text, min_words, max_words, tokenizer),
        check_blacklist(text, blacklist),
        check_write_a_program(text),
        check_punctuation_start(text),
        check_ascii_start(text) if tokenizer == "rouge" else KEEP,
    ):
        if not verdict[0]:
            return verdict
    return KEEP


def check_instance(input_text: str, output_text: str, max_field_chars: int) -> Verdict:
    """Check one (input, output) pair on its own.

    Order: `empty_output`, `input_equals_output`, `ends_with_colon` (either field ends with ":", a sign of a
    prompt left unanswered), `too_long` (either field longer than `max_field_chars` characters).
    """
    output = output_text.strip()
    if not output:
        return False, "empty_output"
    if input_text.strip() == output:
        return False, "input_equals_output"
    if input_text.rstrip().endswith(":") or output.endswith(":"):
        return False, "ends_with_colon"
    if len(input_text) > max_field_chars or len(output_text) > max_field_chars:
        return False, "too_long"
    return KEEP


def filter_instances(
    instances: list[tuple[str, str]], max_instances: int, max_field_chars: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """Filter the instances generated for one task.

    Checks, in this order, each instance getting the first reason that applies:

    1. `check_instance`: `empty_output`, `input_equals_output`, `ends_with_colon`, `too_long`.
    2. `conflicting_outputs`: if two instances left after step 1 share a non-empty input (compared after
       stripping whitespace) but give different outputs, the model contradicts itself about this task, so
       every instance still left is rejected and nothing is kept.
    3. `duplicate`: an exact repeat of an instance already kept.
    4. `over_limit`: the instance would be kept but `max_instances` are kept already.

    Args:
        instances: (input, output) pairs as parsed, in order.
        max_instances: Keep at most this many.
        max_field_chars: Longest input or output accepted, in characters.

    Returns:
        The kept (input, output) pairs in order, and the rejected ones as (input, output, reason) in order.
    """
    reasons: list[str | None] = [check_instance(i, o, max_field_chars)[1] for i, o in instances]

    outputs_by_input: dict[str, set[str]] = {}
    for (input_text, output_text), reason in zip(instances, reasons, strict=True):
        if reason is None and input_text.strip():
            outputs_by_input.setdefault(input_text.strip(), set()).add(output_text.strip())
    if any(len(outputs) > 1 for outputs in outputs_by_input.values()):
        reasons = [reason or "conflicting_outputs" for reason in reasons]

    kept: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for index, (pair, reason) in enumerate(zip(instances, reasons, strict=True)):
        if reason is None and pair in seen:
            reasons[index] = "duplicate"
        elif reason is None and len(kept) >= max_instances:
            reasons[index] = "over_limit"
        elif reason is None:
            kept.append(pair)
            seen.add(pair)
    rejected = [(i, o, r) for (i, o), r in zip(instances, reasons, strict=True) if r is not None]
    return kept, rejected

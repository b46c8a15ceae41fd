"""Completions shaped like a real model's for every prompt of a round, for the fake server in benchmarks.

The fake server's own echo makes every candidate instruction of a prompt nearly the same text, so a round on
it keeps almost nothing and sends few classification and instance requests. This responder recognises the
round's prompts by their last lines and answers each as a capable model would, deterministically from the
prompt: a numbered list of instructions drawn from a made-up vocabulary (so that ROUGE-L keeps most of them),
"Yes" or "No" for classification, and examples in the input-first or output-first format.
"""

from __future__ import annotations

import hashlib
import random
import re

# Made-up words: no blacklist keyword, no real task; consonant-vowel syllables keep them pronounceable.
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
_NUMBER_TAIL = re.compile(r"\n(\d{1,4})\.\s*$")


def _rng(prompt: str) -> random.Random:
    return random.Random(hashlib.sha256(prompt.encode()).digest())


def _words(rng: random.Random, low: int, high: int) -> str:
    count = rng.randint(low, high)
    return " ".join("".join(rng.choices(_SYLLABLES, k=rng.randint(2, 3))) for _ in range(count))


def round_responder(prompt: str) -> str:
    """A completion for one of the round's prompts (instruction list, classification, instances)."""
    rng = _rng(prompt)
    tail = prompt.rstrip(" ")
    if tail.endswith("Is it classification?"):
        return " Yes" if rng.random() < 0.3 else " No"
    numbered = _NUMBER_TAIL.search(tail)
    if numbered:
        first = int(numbered.group(1))
        lines = [f" {_words(rng, 6, 14).capitalize()}."]
        lines += [f"{n}. {_words(rng, 6, 14).capitalize()}." for n in range(first + 1, first + rng.randint(4, 8))]
        return "\n".join(lines) + "\n\n"
    if "Class label:" in prompt and tail.endswith("\n"):
        labels = [_words(rng, 1, 1).capitalize() for _ in range(rng.randint(2, 3))]
        return "".join(f"Class label: {label}\nInput: {_words(rng, 5, 15)}\n" for label in labels)
    examples = rng.randint(2, 4)
    return "".join(
        f"Example {k}\nInput: {_words(rng, 3, 12)}\nOutput: {_words(rng, 8, 30)}\n" for k in range(1, examples + 1)
    )

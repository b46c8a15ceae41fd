"""A fake LLM server whose answers parse like a good model's, for whole rounds against a loopback server."""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

from tests.support.fake_openai import FakeOpenAI, Fault

# Pseudo-words give instructions that share few ROUGE-L tokens, so most of them survive dedup and the pool
# grows round after round; real English words from a small list would collide above the 0.7 threshold.
_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vo", "ber", "qui", "den", "ho", "zan", "pe", "ri", "mol")
_VERBS = ("Explain", "Summarize", "Compare", "Describe", "Classify", "List", "Rewrite", "Translate", "Rank")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(_word(rng) for _ in range(words)).capitalize() + "."


def model_answer(prompt: str, seed: int | None) -> str:
    """What a well-behaved model would answer to one of the round's prompts, deterministically."""
    rng = random.Random(hashlib.sha256(f"{seed}|{prompt}".encode()).digest())
    if prompt.endswith("Is it classification?"):
        return " Yes" if rng.random() < 0.3 else " No"
    numbered = re.search(r"\n(\d+)\.$", prompt)
    if numbered:
        first = int(numbered.group(1))
        items = [f"{rng.choice(_VERBS)} the {_word(rng)} {_word(rng)} of {_word(rng)} {_word(rng)}."]
        items += [f"{rng.choice(_VERBS)} how {_word(rng)} {_word(rng)} {_word(rng)}." for _ in range(2)]
        if rng.random() < 0.3:  # a near-copy, for dedup to catch
            items.append(items[0].replace(".", " now."))
        return " " + items[0] + "".join(f"\n{first + i}. {t}" for i, t in enumerate(items[1:], start=1))
    if "Class label:" in prompt.rsplit("Task:", 1)[0]:
        labels = [_word(rng).capitalize() for _ in range(2)]
        return "".join(f"Class label: {label}\nInput: {_sentence(rng, 5)}\n" for label in labels)
    return "".join(
        f"Example {n}\nInput: {_sentence(rng, 4)}\nOutput: {_sentence(rng, 3)}\n" for n in range(1, 3)
    )


class ModelLikeFake(FakeOpenAI):
    """The fake server with answers that parse (new instructions, Yes/No, instances); faults still apply.

    `answered_prompts` lists the prompts answered (faults that answer included) with the test phase they were
    answered in (set `phase`), to tell completions reused from an earlier phase from new ones.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = 0
        self.answered_prompts: list[tuple[int, str]] = []

    def __enter__(self) -> ModelLikeFake:
        self.start()
        return self

    def _result(self, body: dict[str, Any], prompts: list[str], fault: Fault | None) -> dict[str, Any]:
        result = super()._result(body, prompts, fault)
        if fault != "drop_choice":  # every prompt got an answer, if not a good one
            self.answered_prompts += [(self.phase, p) for p in prompts]
        if fault in ("empty", "length"):
            return result
        n = int(body.get("n") or 1)
        for choice in result["choices"]:
            prompt = prompts[choice["index"] // n]
            choice["text"] = model_answer(prompt, body.get("seed"))
            choice["finish_reason"] = "stop"
        return result

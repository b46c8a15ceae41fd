"""Tokenizers for ROUGE-L: rouge_score's own (bit for bit) and a multilingual variant.

`rouge_tokenize` gives exactly the tokens of `RougeScorer(["rougeL"], use_stemmer=False)`; non-ASCII text
yields few or none, so `multilingual_tokenize` exists for pools in other scripts. The pool index maps these
tokens to integer ids; the length filter counts words with them.
"""

import re
import unicodedata
from functools import cache
from typing import Literal

Tokenizer = Literal["rouge", "multilingual"]

_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """Tokens exactly as rouge_score's default tokenizer without stemming makes them.

    rouge_score lowercases with `str.lower` (so a few non-ASCII letters such as the Kelvin sign become ASCII),
    replaces each run of characters outside [a-z0-9] by a space, splits, and drops empty strings; the maximal
    runs of [a-z0-9] in the lowercased text are the same list.

    Args:
        text: Any text.

    Returns:
        The tokens, in order.
    """
    return _ROUGE_TOKEN.findall(text.lower())


# Scripts written without spaces between words: each character is one token.
_CJK_RANGES = (
    "\u1100-\u11ff"  # Hangul Jamo
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3130-\u318f"  # Hangul compatibility Jamo
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\ua960-\ua97f"  # Hangul Jamo extended A
    "\uac00-\ud7ff"  # Hangul syllables, Jamo extended B
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0003134f"  # CJK extensions B-G
)


@cache
def _multilingual_pattern() -> re.Pattern[str]:
    # Python's \w misses combining marks, which sit inside words of Devanagari, Thai, Arabic...; build their
    # class once (planes 0-1 hold every script's marks, plane 14 the variation selectors).
    starts: list[int] = []
    ends: list[int] = []
    for code in range(0x20000):
        if unicodedata.category(chr(code))[0] == "M":
            if ends and ends[-1] == code - 1:
                ends[-1] = code
            else:
                starts.append(code)
                ends.append(code)
    marks = "".join(f"{chr(a)}-{chr(b)}" for a, b in zip(starts, ends, strict=True)) + "\U000e0100-\U000e01ef"
    return re.compile(rf"(?=\w)[{_CJK_RANGES}]|(?:[^\W_{_CJK_RANGES}]|[{marks}])+")


def multilingual_tokenize(text: str) -> list[str]:
    """Tokens for text in any script: NFKC, casefolded; Han, kana and Hangul one character per token.

    Letters and digits of every script (with their combining marks) form words; anything else, including the
    underscore, separates them, as punctuation does in rouge_score's tokenizer.

    Args:
        text: Any text.

    Returns:
        The tokens, in order.
    """
    return _multilingual_pattern().findall(unicodedata.normalize("NFKC", text).casefold())


def tokenize(text: str, tokenizer: Tokenizer = "rouge") -> list[str]:
    """Tokens of `text` under the named tokenizer (see `rouge_tokenize`, `multilingual_tokenize`)."""
    if tokenizer == "rouge":
        return rouge_tokenize(text)
    if tokenizer == "multilingual":
        return multilingual_tokenize(text)
    raise ValueError(f"unknown tokenizer {tokenizer!r}; expected 'rouge' or 'multilingual'")

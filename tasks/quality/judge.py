"""An LLM as a judge: prompts for the round audit and for rating answers, strict parsers, and the HTTP call.

Two questionnaires from Wang et al. (2022):
* the audit of section 3.3: for one instruction and one of its instances, is the instruction a valid task,
  is the input appropriate for it, is the output a correct and acceptable response (yes/no each);
* the four-level rating of the user-oriented evaluation (section 4.4): A valid and satisfying, B acceptable
  with minor imperfections, C relevant but with significant errors, D irrelevant or invalid.

Prompts are template files in tasks/prompts/; their sha256 is the prompt version recorded with every
result. Parsers are strict: an answer that does not follow the format is reported with a reason and no
verdict, never guessed.
"""

import asyncio
import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from schemas import SamplingParams, Settings
from tasks.prompts import render

Rating = Literal["A", "B", "C", "D"]
RATINGS: tuple[Rating, ...] = ("A", "B", "C", "D")
AUDIT_TEMPLATE = "audit_judge"
RATING_TEMPLATE = "rate_answer"
# The audit prompt ends with "Q1:" so that a completion model answers the first question at once; the
# parser reads the answer with this prefix put back.
AUDIT_PREFIX = "Q1:"
AUDIT_QUESTIONS = ("valid_instruction", "appropriate_input", "correct_output")
_VERDICT = re.compile(r"Q([123])\s*[:.)]\s*(yes|no)(?:\s*|\s*[.,;:()\-–].*)", re.IGNORECASE)
_RATING = re.compile(r"\s*([ABCD])(?:\s*|\s*[.,;:)\-–].*)")


def prompt_version(*names: str) -> str:
    """sha256 over the named template files' bytes, in the order given: changes when any prompt changes."""
    digest = hashlib.sha256()
    for name in names:
        data = resources.files("tasks.prompts").joinpath(f"{name}.txt").read_bytes()
        digest.update(f"{name}.txt\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


# -- the audit --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditVerdict:
    """The judge's three answers; all None with `error` set when the answer could not be read."""

    valid_instruction: bool | None
    appropriate_input: bool | None
    correct_output: bool | None
    error: str | None = None


NO_INPUT = "(none)"


def build_audit_prompt(instruction: str, input_text: str, output: str) -> str:
    """The audit prompt for one instance; fields are stripped, an empty input is shown as "(none)", and it
    ends with "Q1:"."""
    return render(
        AUDIT_TEMPLATE,
        instruction=instruction.strip(),
        input=input_text.strip() or NO_INPUT,
        output=output.strip(),
    )


def parse_audit_answer(completion: str) -> AuditVerdict:
    """Read the judge's answers to the three audit questions.

    Args:
        completion: What the judge wrote after the prompt's final "Q1:".

    Returns:
        The three verdicts when the first three non-blank lines of "Q1:" + completion are "Q1: yes|no",
        "Q2: yes|no", "Q3: yes|no" in that order (any case; a short note may follow a punctuation mark, as
        in "no - the input is a question"); later lines are ignored. Otherwise no verdict, and `error`
        says why: "empty", "missing:Q2", "bad_line:Q3" (the line is not a yes/no answer to Q3).
    """
    if not completion.strip():
        return AuditVerdict(None, None, None, "empty")
    lines = [line.strip() for line in (AUDIT_PREFIX + completion).splitlines() if line.strip()]
    answers: list[bool] = []
    for number in (1, 2, 3):
        if len(lines) < number:
            return AuditVerdict(None, None, None, f"missing:Q{number}")
        match = _VERDICT.fullmatch(lines[number - 1])
        if match is None or match.group(1) != str(number):
            return AuditVerdict(None, None, None, f"bad_line:Q{number}")
        answers.append(match.group(2).lower() == "yes")
    return AuditVerdict(answers[0], answers[1], answers[2])


# -- rating answers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RatingVerdict:
    """A rating, or None with `error` set when the judge's answer could not be read."""

    rating: Rating | None
    error: str | None = None


def build_rating_prompt(instruction: str, input_text: str, reference: str, response: str) -> str:
    """The rating prompt for one answer; fields are stripped, an empty input is shown as "(none)", and it
    ends with "Rating:"."""
    return render(
        RATING_TEMPLATE,
        instruction=instruction.strip(),
        input=input_text.strip() or NO_INPUT,
        reference=reference.strip(),
        response=response.strip(),
    )


def parse_rating(completion: str) -> RatingVerdict:
    """Read a four-level rating.

    Args:
        completion: What the judge wrote after "Rating:".

    Returns:
        The rating when the completion starts with one capital letter A-D that stands alone: followed by
        nothing, whitespace up to the end of its line, or a punctuation mark (" B", "C.", "A - fine").
        "A good answer" or "b" is not a rating: `error` is "empty" or "not_a_rating".
    """
    if not completion.strip():
        return RatingVerdict(None, "empty")
    first_line = completion.lstrip().partition("\n")[0]
    match = _RATING.fullmatch(first_line)
    if match is None:
        return RatingVerdict(None, "not_a_rating")
    letter = match.group(1)
    assert letter in RATINGS
    return RatingVerdict(letter)  # type: ignore[arg-type]


RATING_SCORE: dict[Rating, float] = {"A": 1.0, "B": 1.0, "C": 0.0, "D": 0.0}
"""A rating counted as acceptable (A or B: the paper's "acceptable" threshold in Figure 6) or not."""


# -- the HTTP call ----------------------------------------------------------------------------------------

AUDIT_SAMPLING = SamplingParams(
    temperature=0.0, top_p=1.0, max_tokens=24, presence_penalty=0.0, stop=("\n\n", "\nInstruction:")
)
RATING_SAMPLING = SamplingParams(
    temperature=0.0, top_p=1.0, max_tokens=4, presence_penalty=0.0, stop=("\n", "Instruction:")
)


def judge_completions(
    prompts: list[str],
    sampling: SamplingParams,
    settings: Settings,
    urls: list[str],
    model: str,
    seed: int = 0,
) -> list[str]:
    """Complete judge prompts through the project's client (batched, concurrent, retried; no cache).

    Args:
        prompts: Rendered judge prompts.
        sampling: Decoding parameters (greedy by default above).
        settings: API key, batch size, concurrency, timeout and retries.
        urls: The judge's base URLs.
        model: The judge model's name on the server.
        seed: Seed of the requests.

    Returns:
        The completion text of each prompt, in order.

    Raises:
        tasks.resources.llm.protocol.LLMError: When a batch fails for good.
    """
    from tasks.resources.llm.batch import CompletionRequest, generate
    from tasks.resources.llm.client import OpenAICompletionClient

    async def run() -> list[str]:
        client = OpenAICompletionClient(
            urls,
            model,
            api_key=settings.api_key,
            timeout_s=settings.llm_timeout_s,
            max_retries=settings.llm_max_retries,
        )
        try:
            records = await generate(
                client,
                # Judging is its own stage in spirit; "classify" is the record stage closest to a verdict.
                [CompletionRequest(prompt=p, stage="classify", seed=seed) for p in prompts],
                sampling,
                None,
                settings.llm_batch_size,
                settings.llm_concurrency,
            )
        finally:
            await client.aclose()
        return [r.text for r in records]

    return asyncio.run(run()) if prompts else []

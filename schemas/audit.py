"""Quality audit of a committed round (section 3.3 of Wang et al. 2022): parameters, rows and manifest.

An audit lives beside its round, never inside it: audits/round=NNNNN/<audit id>.parquet (one row per judged
instance) and audits/round=NNNNN/<audit id>.json (this manifest, written last).
"""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Question = Literal["valid_instruction", "appropriate_input", "correct_output", "all_three"]
QUESTIONS: tuple[Question, ...] = ("valid_instruction", "appropriate_input", "correct_output", "all_three")


class AuditParams(BaseModel):
    """Parameters of the `audit` flow. Credentials never go here: they come from Settings."""

    model_config = ConfigDict(extra="forbid")

    store_url: str | None = Field(
        default=None, description="Store root; None = SELFINSTRUCT_STORE_URL or ./data."
    )
    round: int | None = Field(default=None, ge=1, description="Committed round to audit; None = the newest.")
    sample: int = Field(
        default=200, ge=1, le=100_000, description="Instructions to judge (the paper judged 200)."
    )
    seed: int = Field(default=0, description="Seeds the choice of instructions and of one instance each.")
    judge_urls: list[str] = Field(
        default_factory=list,
        description="OpenAI-compatible base URLs of the judge; empty = Settings, else the embedded server.",
    )
    judge_model: str | None = Field(default=None, description="Judge model name; None = Settings.model.")
    max_tokens: int = Field(default=24, ge=4, le=1024, description="Longest judge answer, in tokens.")


class AuditRecord(BaseModel):
    """One judged instance: a row of the audit's Parquet file. Verdicts are None when unparseable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instruction_id: str
    instance_index: int = Field(ge=0, description="Which of the instruction's instances was judged.")
    instruction: str
    input: str
    output: str
    judge_answer: str = Field(description="The judge's raw completion, as returned.")
    parse_error: str | None = Field(description="Why the answer could not be read; None when it could.")
    valid_instruction: bool | None
    appropriate_input: bool | None
    correct_output: bool | None


class RateEstimate(BaseModel):
    """A share of yes answers with its 95% Wilson score interval; rate and bounds are None when n = 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    question: Question
    yes: int = Field(ge=0)
    n: int = Field(ge=0, description="Parseable answers (the denominator).")
    rate: float | None
    ci_low: float | None
    ci_high: float | None


class AuditManifest(BaseModel):
    """audits/round=NNNNN/<audit id>.json: written last, so an audit exists exactly when it does."""

    model_config = ConfigDict(extra="forbid")

    audit_id: str
    round: int = Field(ge=1)
    created_at: datetime
    store: str = Field(description="Store root, credentials removed.")
    judge_model: str
    judge_urls: list[str] = Field(description="Judge servers, credentials removed.")
    prompt_version: str = Field(description="sha256 of the judge template file(s).")
    prompt_files: list[str] = Field(description="Template files the prompt version covers.")
    sample_seed: int
    sample_requested: int = Field(ge=1)
    sampled: int = Field(ge=0, description="Instructions judged (fewer when the round has fewer).")
    instructions_in_round: int = Field(ge=0)
    unparseable: int = Field(ge=0, description="Judge answers that could not be read.")
    rates: list[RateEstimate]
    file: str = Field(description="The Parquet file's name, beside this manifest.")
    sha256: str = Field(description="sha256 of the Parquet file.")

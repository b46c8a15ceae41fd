"""Records a round writes: one model per Parquet row, plus the round manifest."""

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.config import BootstrapConfig, SamplingParams

Stage = Literal["instruction", "dedup", "classify", "instance"]

# Annotated marker read by the store (tasks/resources/store/records.py), which derives each Parquet file's
# Arrow schema from these models:
# an int field so marked is a 32-bit column (every other int is 64-bit). Pydantic ignores it.
INT32_COLUMN = "arrow:int32"
Int32 = Annotated[int, INT32_COLUMN]


class CompletionRecord(BaseModel):
    """One prompt and what the server returned: a row of requests.parquet and of the completion cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(description="sha256 of (model, prompt, sampling params, seed): the cache key.")
    stage: Stage = Field(description="Which step of the round asked for it.")
    request_id: str = Field(description="Id of the HTTP request that carried this prompt.")
    prompt: str
    text: str = Field(description="Raw completion text.")
    finish_reason: str | None = Field(description="'stop' or 'length' as the server reported it.")
    prompt_tokens: int = Field(
        ge=0,
        description="Prompt tokens of this prompt when the server returned token ids, else of the whole "
        "HTTP request (shared by its prompts).",
    )
    completion_tokens: int = Field(ge=0, description="Completion tokens of this prompt, or of the request.")
    latency_s: float = Field(ge=0.0, description="Wall time of the HTTP request that carried this prompt.")
    sent_at: float | None = Field(
        default=None, description="When the HTTP request carrying this prompt was sent (Unix time, seconds)."
    )
    received_at: float | None = Field(
        default=None, description="When its answer had been read (Unix time, seconds)."
    )
    cached_prompt_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Prompt tokens the server took from its prompt cache instead of processing (its "
        "usage.prompt_tokens_details.cached_tokens, for the whole HTTP request); None when not reported.",
    )
    model: str
    base_url: str = Field(description="Server that answered, credentials removed.")
    seed: int | None = None
    rejected: str | None = Field(
        default=None,
        description="Why the server refused this prompt alone (e.g. prompt_too_long); None when answered.",
    )


class SimilarInstruction(BaseModel):
    """A pool instruction close to an accepted one, with its ROUGE-L F."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    instruction: str
    score: float


class InstructionRecord(BaseModel):
    """An accepted machine-generated instruction with its lineage."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Stable id: r{round:05d}-{n:05d}.")
    round: Int32 = Field(ge=1)
    instruction: str
    request_key: str = Field(description="Cache key of the completion it was parsed from.")
    prompt_index: Int32 = Field(
        ge=0, description="Which instruction-generation prompt of the round produced it."
    )
    in_context_ids: list[str] = Field(description="Pool ids shown in the prompt, in order.")
    model: str
    sampling: SamplingParams = Field(description="Decoding parameters of the generating request.")
    max_rouge: float = Field(description="Highest ROUGE-L F against the pool at acceptance.")
    most_similar: list[SimilarInstruction] = Field(description="Top-k most similar pool instructions.")
    avg_similarity: float | None = Field(description="Mean ROUGE-L F against the whole pool.")
    is_classification: bool | None = Field(default=None, description="None until classified.")
    classification_raw: str | None = Field(default=None, description="The model's raw yes/no answer.")


class InstanceRecord(BaseModel):
    """One input/output pair generated for an accepted instruction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instruction_id: str
    round: Int32 = Field(ge=1)
    index: Int32 = Field(ge=0, description="Position among the instruction's instances.")
    input: str
    output: str
    request_key: str


class RejectionRecord(BaseModel):
    """A candidate instruction or instance that did not make it, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: Int32 = Field(ge=1)
    stage: Stage
    reason: str = Field(description="Stable reason string, e.g. too_short, blacklist:image, rouge_l>0.7.")
    text: str = Field(description="The rejected instruction (or the instance's instruction).")
    instance_input: str | None = None
    instance_output: str | None = None
    request_key: str | None = None
    max_rouge: float | None = Field(default=None, description="For ROUGE rejections: the max F.")
    most_similar_instruction: str | None = Field(default=None, description="For ROUGE rejections.")


class FileEntry(BaseModel):
    """A data file of a committed round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int = Field(ge=0)
    sha256: str
    bytes: int = Field(ge=0)


class StageLoad(BaseModel):
    """What one stage of a round asked of the LLM servers: HTTP requests, tokens and wall time."""

    model_config = ConfigDict(extra="forbid")

    requests: int = Field(
        ge=0,
        description="HTTP requests this run sent (completions reused from the cache "
        "and prompts refused alone are not counted).",
    )
    prompts: int = Field(ge=0, description="Prompts those requests carried.")
    wall_s: float = Field(
        ge=0.0,
        description="First send to last receive of the stage's requests; stages "
        "that overlap each count their whole span.",
    )
    prompt_tokens: int = Field(
        ge=0,
        description="Prompt tokens of those requests as the servers reported them (llama.cpp reports a "
        "list of prompts' first prompt only).",
    )
    completion_tokens: int = Field(ge=0)
    cached_prompt_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Prompt tokens served from the servers' prompt caches (llama.cpp: of a list's first "
        "prompt only); None when no server reported them.",
    )


class GenerationLoad(BaseModel):
    """How busy a round kept the LLM servers, from its requests' send and receive times."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(ge=1, description="HTTP requests the client kept in flight at most.")
    started_at: float = Field(
        description="When the first request counted here was sent (Unix time); "
        "requests.parquet rows sent earlier are completions reused from a crashed run."
    )
    per_prompt_tokens: bool = Field(
        default=False, description="Each request's prompts carried their own prompt-token counts (token ids)."
    )
    round_wall_s: float | None = Field(default=None, ge=0.0, description="Round opened to committed.")
    wall_s: float = Field(ge=0.0, description="Generation: first request sent to last answer received.")
    busy_fraction: float = Field(
        ge=0.0, le=1.0, description="Share of `wall_s` during which `concurrency` requests were in flight."
    )
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    cached_prompt_tokens: int | None = Field(default=None, ge=0)
    stages: dict[str, StageLoad] = Field(default_factory=dict, description="By stage, in the order sent.")


class RoundManifest(BaseModel):
    """Written last: a round exists exactly when its manifest does."""

    model_config = ConfigDict(extra="forbid")

    round: int = Field(ge=1)
    run_id: str
    created_at: datetime
    model: str
    seeds_sha256: str = Field(description="Checksum of the seed file the pool started from.")
    pool_size_before: int = Field(ge=0)
    counts: dict[str, int] = Field(description="generated, kept, instances, rejected:<reason>, ...")
    config: BootstrapConfig
    files: dict[str, FileEntry]
    load: GenerationLoad | None = Field(
        default=None,
        description="Generation wall time, tokens and server busy fraction; None for rounds "
        "committed before it was recorded, or with no request sent in the committing run.",
    )

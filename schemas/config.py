"""Typed configuration of a bootstrap round.

Defaults follow Wang et al. (2022), arXiv:2212.10560, section 2.
"""

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.settings import LLMApi

# Section 2.3 of the paper: instructions mentioning these are filtered out because a language model
# cannot process them.
DEFAULT_BLACKLIST: tuple[str, ...] = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
)


# vLLM refuses a request with more stop strings than VLLM_MAX_STOP_STRINGS, 4 by default (vLLM 0.33.0:
# envs.py, and `StopParam` in entrypoints/generate/base/protocol.py). A config must pass on any server.
MAX_STOP_STRINGS = 4


class SamplingParams(BaseModel):
    """Decoding parameters sent with a completions request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=0.7, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(default=0.5, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=1024, ge=1, le=32768, description="Maximum new tokens per completion.")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="OpenAI frequency penalty.")
    presence_penalty: float = Field(default=2.0, ge=-2.0, le=2.0, description="OpenAI presence penalty.")
    top_k: int = Field(default=0, ge=0, le=100_000, description="Top-k cut-off; 0 = off.")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="Min-p cut-off; 0 = off.")
    repetition_penalty: float = Field(
        default=1.0, gt=0.0, le=2.0, description="Multiplicative repetition penalty; 1 = off."
    )
    stop: tuple[str, ...] = Field(
        default=(),
        max_length=MAX_STOP_STRINGS,
        description=f"Stop sequences, at most {MAX_STOP_STRINGS} (vLLM's limit).",
    )


class BootstrapConfig(BaseModel):
    """Every knob of one bootstrap round. Rendered by the Prefect UI as the flow's parameter form."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts_per_round: int = Field(
        default=16, ge=1, le=100_000, description="Instruction-generation prompts."
    )
    num_in_context: int = Field(default=8, ge=1, le=32, description="In-context instructions per prompt.")
    num_machine_in_context: int = Field(
        default=2, ge=0, le=32, description="How many of those come from machine-generated instructions."
    )
    rouge_threshold: float = Field(
        default=0.7, gt=0.0, le=1.0, description="Reject when max ROUGE-L F against the pool is above this."
    )
    min_words: int = Field(default=3, ge=0, description="Keep instructions with MORE than this many words.")
    max_words: int = Field(default=150, ge=1, description="Keep instructions with at most this many words.")
    blacklist: tuple[str, ...] = Field(
        default=DEFAULT_BLACKLIST, description="Whole-word keywords to reject."
    )
    instruction_sampling: SamplingParams = Field(
        default=SamplingParams(
            temperature=0.7,
            top_p=0.5,
            max_tokens=1024,
            presence_penalty=2.0,
            stop=("\n\n", "\n16", "16.", "16 ."),
        ),
        description="Decoding for new instructions (the paper's values).",
    )
    classify_sampling: SamplingParams = Field(
        default=SamplingParams(temperature=0.0, top_p=1.0, max_tokens=3, presence_penalty=0.0, stop=("\n",)),
        description="Greedy decoding for the is-classification question.",
    )
    instance_sampling: SamplingParams = Field(
        # The original release used presence_penalty=1.5 with GPT-3; on llama.cpp it also penalises the
        # prompt's own "Input:"/"Output:" markers and small models drift out of the format (seen with
        # SmolLM2-135M), so greedy decoding without penalties is the default here.
        default=SamplingParams(
            temperature=0.0, top_p=1.0, max_tokens=300, presence_penalty=0.0, stop=("Example 6", "Task:")
        ),
        description="Decoding for instance generation.",
    )
    max_instances: int = Field(default=5, ge=1, le=20, description="Instances kept per instruction at most.")
    max_field_chars: int = Field(
        default=2000, ge=10, description="Longer instance inputs/outputs are rejected."
    )
    seed: int = Field(
        default=42, description="Base seed; each round's sampling is seeded from (seed, round)."
    )
    dedup_lineage: bool = Field(
        default=True, description="Record top-k similar pool instructions per candidate."
    )
    dedup_top_k: int = Field(default=10, ge=1, le=100, description="How many similar instructions to record.")
    tokenizer: Literal["rouge", "multilingual"] = Field(
        default="rouge",
        description="ROUGE-L tokenizer: rouge-score's own, or one that keeps non-ASCII words.",
    )
    model: str | None = Field(default=None, description="Model name on the server; None = Settings.model.")
    adapter: str | None = Field(
        default=None,
        min_length=1,
        description="Generate with the LoRA adapter a fine-tune registered on the vLLM server (its fine-tune "
        "id; 'latest' = the store's newest trained fine-tune) instead of the base model.",
    )

    pipelined: bool = Field(
        default=True,
        description="Overlap the LLM stages: dedup, classification and instance generation start on the "
        "first instruction chunks while later ones still generate. False runs each stage over all prompts "
        "before the next (for comparison); both commit the same round.",
    )

    @model_validator(mode="after")
    def _fields_agree(self) -> Self:
        """Knobs that are valid alone but cannot work together (each would commit empty or odd rounds)."""
        if self.min_words >= self.max_words:
            raise ValueError(
                f"min_words ({self.min_words}) must be less than max_words ({self.max_words}): instructions "
                "need MORE than min_words and at most max_words words"
            )
        if self.num_machine_in_context > self.num_in_context:
            raise ValueError(
                f"num_machine_in_context ({self.num_machine_in_context}) cannot exceed num_in_context "
                f"({self.num_in_context})"
            )
        return self


class RoundParams(BaseModel):
    """Parameters of the bootstrap-round flow. Credentials never go here: they come from Settings."""

    model_config = ConfigDict(extra="forbid")

    store_url: str | None = Field(
        default=None, description="Store root; None = SELFINSTRUCT_STORE_URL or ./data."
    )
    seeds_path: str | None = Field(default=None, description="Seed JSONL file; None = the seeds we ship.")
    llm_urls: list[str] = Field(
        default_factory=list,
        description="OpenAI-compatible base URLs; empty = Settings, else the embedded server.",
    )
    llm_api: LLMApi | None = Field(
        default=None, description="'completions' or 'chat' endpoint; None = Settings (SELFINSTRUCT_LLM_API)."
    )
    config: BootstrapConfig = Field(default_factory=BootstrapConfig, description="The round's knobs.")
    store_slot: bool = Field(
        default=True,
        description="Hold the store's Prefect global concurrency slot so rounds on one store queue up.",
    )
    store_slot_timeout_s: float = Field(
        default=3 * 3600,
        gt=0,
        description="Give up (fail the run) after waiting this long for the store's slot.",
    )
    data_ready_threshold: int = Field(
        default=0,
        ge=0,
        description="Emit selfinstruct.data.ready at this many new instances since the last finetune; 0=off",
    )

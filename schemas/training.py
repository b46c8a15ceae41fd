"""Configs and records of fine-tuning on the generated data, and of the held-out evaluation."""

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ExportFormat = Literal["jsonl", "alpaca", "sft", "messages"]
PromptFormat = Literal["template", "chat"]
Rating = Literal["A", "B", "C", "D"]
Interval = tuple[float, float]


class FinetuneParams(BaseModel):
    """Parameters of the `finetune` flow. Credentials never go here: they come from Settings."""

    model_config = ConfigDict(extra="forbid")

    store_url: str | None = Field(
        default=None, description="Store root; None = SELFINSTRUCT_STORE_URL or ./data."
    )
    rounds: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None, description="Committed rounds to train on; None = all of them."
    )
    include_seeds: bool = Field(default=False, description="Also train on the human-written seed tasks.")
    seeds_path: str | None = Field(default=None, description="Seed JSONL file; None = the seeds we ship.")
    max_instances: int = Field(default=5, ge=1, le=100, description="Instances used per instruction at most.")
    validation_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Share of instructions held out for the validation loss."
    )
    validation_max_instructions: int = Field(
        default=1000,
        ge=0,
        description="Cap on validation instructions, so evaluating stays cheap on big runs.",
    )
    base_model: str | None = Field(
        default=None,
        description="Hub id, local model folder or .gguf file; None = the embedded SmolLM2-135M-Instruct.",
    )
    max_steps: int = Field(default=200, ge=1, le=1_000_000, description="Optimizer steps.")
    lr: float = Field(default=2e-4, gt=0.0, le=1.0, description="Peak learning rate (linear decay).")
    lora_r: int = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(
        default=32, ge=1, le=4096, description="LoRA scaling numerator (scale = alpha / r)."
    )
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="Module names that get adapters; 'all-linear' = every linear layer."
    )
    batch_size: int = Field(default=8, ge=1, le=4096, description="Examples per device step.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Steps per optimizer update."
    )
    max_length: int = Field(
        default=512, ge=16, le=131_072, description="Tokens per example; longer ones are cut."
    )
    seed: int = Field(
        default=42, description="Seeds data selection, templates, shuffling, the split and training."
    )
    torch_threads: int | None = Field(
        default=None, ge=1, le=1024, description="CPU threads for torch; None = torch's default."
    )
    dry_run: bool = Field(
        default=False, description="Build the data and write the manifest, but do not train."
    )
    purpose: Literal["standalone", "compare"] = Field(
        default="standalone",
        description="'compare': an arm of the compare flow, which evaluates its arms itself, so the evaluate "
        "deployment's trigger skips it; 'standalone': any other fine-tune (the trigger evaluates it).",
    )
    vllm_url: str | None = Field(
        default=None,
        description="vLLM server (…/v1) with runtime LoRA loading on, to register the adapter with.",
    )
    vllm_adapter_path: str | None = Field(
        default=None,
        description="The adapter folder as the vLLM server sees it; None = a local copy on this machine.",
    )
    vllm_max_lora_rank: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="The vLLM server's --max-lora-rank (vLLM's default: 16); lora_r must not exceed it.",
    )

    @model_validator(mode="after")
    def _rank_fits_the_server(self) -> "FinetuneParams":
        # vLLM refuses to load an adapter of a bigger rank (lora/peft_helper.py `validate_legal`), which would
        # only show after the whole training run.
        if self.vllm_url and not self.dry_run and self.lora_r > self.vllm_max_lora_rank:
            raise ValueError(
                f"lora_r={self.lora_r} is above the vLLM server's max LoRA rank ({self.vllm_max_lora_rank}): "
                "lower lora_r, or serve with a larger --max-lora-rank and set vllm_max_lora_rank to it"
            )
        return self


class EvaluateParams(BaseModel):
    """Parameters of the `evaluate` flow."""

    model_config = ConfigDict(extra="forbid")

    store_url: str | None = Field(
        default=None, description="Store root; None = SELFINSTRUCT_STORE_URL or ./data."
    )
    finetune_id: str | None = Field(
        default=None, description="Fine-tune to evaluate; None = the newest trained one."
    )
    heldout_path: str | None = Field(default=None, description="Held-out task JSONL; None = the one we ship.")
    limit: int | None = Field(
        default=None, ge=1, description="Evaluate the first N held-out tasks; None = all."
    )
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Greedy decoding length per answer.")
    batch_size: int = Field(default=8, ge=1, le=1024, description="Prompts per generate() call.")
    prompt_format: PromptFormat = Field(
        default="template",
        description="'template': the sft_*.txt template `template`; 'chat': the tokenizer's chat template.",
    )
    template: str = Field(
        default="task_input_output", description="Name of the sft_*.txt template to prompt with."
    )
    torch_threads: int | None = Field(
        default=None, ge=1, le=1024, description="CPU threads for torch; None = torch's default."
    )
    judge: bool = Field(
        default=True, description="Also rate every answer A-D with an LLM judge (section 4.4 of the paper)."
    )
    judge_urls: list[str] = Field(
        default_factory=list,
        description="OpenAI-compatible base URLs of the judge; empty = Settings, else the embedded server.",
    )
    judge_model: str | None = Field(default=None, description="Judge model name; None = Settings.model.")
    bootstrap_seed: int = Field(default=0, description="Seeds the bootstrap intervals over tasks.")
    bootstrap_resamples: int = Field(
        default=1000, ge=10, le=100_000, description="Bootstrap resamples per interval."
    )


class ExportStats(BaseModel):
    """What happened to the instances on their way into a training set."""

    model_config = ConfigDict(extra="forbid")

    instructions: int = Field(ge=0, description="Instructions with at least one usable instance.")
    instances_read: int = Field(ge=0, description="Instances read from the rounds (and seeds).")
    over_cap: int = Field(ge=0, description="Instances left out by max_instances.")
    empty_output: int = Field(ge=0, description="Instances dropped because their output is empty.")
    orphans: int = Field(ge=0, description="Instances whose instruction is not in the rounds read.")
    duplicates: int = Field(ge=0, description="Instances dropped as duplicates of an earlier one.")
    rows: int = Field(ge=0, description="Examples written.")
    rows_per_source: dict[str, int] = Field(description="Examples per round ('1', '2', ...) and 'seeds'.")


class LossPoint(BaseModel):
    """Training loss logged at one optimizer step."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0)
    loss: float


class FinetuneMetrics(BaseModel):
    """Losses of one training run; eval losses are on the validation split, before and after training."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=0, description="Optimizer steps taken.")
    train_loss_first: float | None = Field(description="Training loss logged at the first step.")
    train_loss_last: float | None = Field(description="Training loss logged at the last step.")
    train_loss_curve: list[LossPoint] = Field(description="Training loss at every logged step.")
    eval_loss_before: float | None = Field(
        description="Validation loss of the base model; None without a split."
    )
    eval_loss_after: float | None = Field(description="Validation loss after training; None without a split.")
    train_runtime_s: float = Field(ge=0.0)
    device: str = Field(description="'cpu' or the CUDA device name.")
    precision: Literal["float32", "bfloat16"]
    trainable_parameters: int = Field(ge=0)


class FinetuneManifest(BaseModel):
    """Written last under finetunes/<id>/: a fine-tune exists exactly when its manifest does.

    `rounds` and `dry_run` are read by tasks.publish.events to decide which rounds a fine-tune consumed.
    """

    model_config = ConfigDict(extra="forbid")

    finetune_id: str
    created_at: datetime
    dry_run: bool = Field(description="True when no model was trained (data and manifest only).")
    store: str = Field(description="Store root, credentials removed.")
    rounds: list[int] = Field(description="Committed rounds the data came from, ascending.")
    include_seeds: bool
    seeds_sha256: str | None = Field(description="Checksum of the seed file, when seeds were included.")
    rows: dict[str, int] = Field(description="Rows of the 'train' and 'validation' files.")
    sha256: dict[str, str] = Field(
        description="sha256 of every file of the dataset folder, by path relative to finetunes/<id>/."
    )
    dataset_fingerprint: str | None = Field(
        default=None,
        description="Fingerprint of the dataset folder's data files (training/dataset.py); equal to that of "
        "`selfinstruct export --to` with the same rounds and options. None in manifests older than it.",
    )
    export: ExportStats
    base_model: str = Field(description="The base model as given ('embedded' for the shipped GGUF).")
    params: FinetuneParams
    metrics: FinetuneMetrics | None = Field(description="None for a dry run.")
    files: list[str] = Field(description="Files under finetunes/<id>/, relative to it, manifest excluded.")
    versions: dict[str, str] = Field(description="Versions of the training stack.")


class AnswerScores(BaseModel):
    """Summary of one model's answers on the held-out tasks."""

    model_config = ConfigDict(extra="forbid")

    rouge_l_f: float = Field(ge=0.0, le=1.0, description="Mean ROUGE-L F against the references.")
    empty_share: float = Field(ge=0.0, le=1.0, description="Share of answers that are empty.")
    degenerate_share: float = Field(
        ge=0.0, le=1.0, description="Share of non-empty answers that repeat themselves."
    )
    tasks: int = Field(ge=0)
    rouge_l_f_ci: Interval | None = Field(
        default=None, description="95% bootstrap interval of the mean ROUGE-L F, resampling tasks."
    )
    ratings: dict[str, int] | None = Field(
        default=None, description="Answers rated A, B, C, D and 'unparseable'; None when not judged."
    )
    acceptable_share: float | None = Field(
        default=None, description="Share of parseable ratings that are A or B; None when none."
    )
    acceptable_ci: Interval | None = Field(
        default=None, description="95% bootstrap interval of acceptable_share, resampling tasks."
    )


class TaskAnswers(BaseModel):
    """Both models' answers to one held-out task."""

    model_config = ConfigDict(extra="forbid")

    id: str
    reference: str
    base: str
    finetuned: str
    base_rouge_l_f: float
    finetuned_rouge_l_f: float
    base_quality: Literal["ok", "empty", "degenerate"]
    finetuned_quality: Literal["ok", "empty", "degenerate"]
    base_rating: Rating | None = Field(default=None, description="None when not judged or unparseable.")
    finetuned_rating: Rating | None = None
    base_judge_answer: str | None = Field(default=None, description="The judge's raw answer.")
    finetuned_judge_answer: str | None = None


class EvaluationResult(BaseModel):
    """evaluations/<id>/result.json. Results with the same `comparison_key` were measured the same way."""

    model_config = ConfigDict(extra="forbid")

    evaluation_id: str
    finetune_id: str
    created_at: datetime
    comparison_key: str = Field(
        description="sha256 of the held-out file and every setting that affects scores."
    )
    heldout: str = Field(description="File name of the held-out tasks.")
    heldout_sha256: str
    base_model: str
    settings: dict[str, str | int | None] = Field(
        description="limit, max_new_tokens, prompt_format, template."
    )
    base: AnswerScores
    finetuned: AnswerScores
    answers: list[TaskAnswers]
    judge_model: str | None = Field(default=None, description="The judge that rated the answers, if any.")
    judge_prompt_version: str | None = Field(default=None, description="sha256 of the rating template.")
    bootstrap_seed: int = Field(default=0, description="Seed of the bootstrap intervals.")
    bootstrap_resamples: int = Field(default=1000, description="Resamples per bootstrap interval.")


class CompareParams(BaseModel):
    """Parameters of the `compare` flow: the ablation of section 4 of the paper, seeds only vs seeds + rounds.

    Both fine-tunes take `finetune` as it is (same base model, steps, learning rate, batch size, seed: the
    same budget) except for their data; both are evaluated with `evaluate` on the same held-out tasks.
    """

    model_config = ConfigDict(extra="forbid")

    store_url: str | None = Field(
        default=None, description="Store root for both fine-tunes; None = SELFINSTRUCT_STORE_URL or ./data."
    )
    finetune: FinetuneParams = Field(
        default_factory=FinetuneParams,
        description="Training knobs shared by both arms; `rounds` are those of the seeds + rounds arm.",
    )
    evaluate: EvaluateParams = Field(
        default_factory=EvaluateParams, description="Held-out tasks, decoding and judge of both arms."
    )


class Difference(BaseModel):
    """seeds + rounds minus seeds only, on the same held-out tasks, with a paired 95% bootstrap interval."""

    model_config = ConfigDict(extra="forbid")

    metric: str
    value: float | None
    ci: Interval | None


class ComparisonResult(BaseModel):
    """evaluations/<comparison id>/comparison.json: the two arms of the ablation side by side."""

    model_config = ConfigDict(extra="forbid")

    comparison_id: str
    created_at: datetime
    store: str = Field(description="Store root, credentials removed.")
    base_model: str
    comparison_key: str = Field(description="Shared by both evaluations: they were measured the same way.")
    heldout: str
    rounds: list[int] = Field(description="Committed rounds of the seeds + rounds arm.")
    finetunes: dict[str, str] = Field(description="Fine-tune id of 'seeds_only' and 'seeds_and_rounds'.")
    evaluations: dict[str, str] = Field(description="Evaluation id of each arm.")
    train_rows: dict[str, int] = Field(description="Training rows of each arm.")
    judge_model: str | None
    base: AnswerScores
    seeds_only: AnswerScores
    seeds_and_rounds: AnswerScores
    differences: list[Difference]

"""Infrastructure settings, read from SELFINSTRUCT_* environment variables when constructed."""

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# Which OpenAI-compatible endpoint takes the prompts: /v1/completions (a list of prompts per request) or
# /v1/chat/completions (one prompt per request, as the one user message of a conversation).
LLMApi = Literal["completions", "chat"]


class Settings(BaseSettings):
    """Where the store and the LLM servers are, and the credentials to reach them."""

    model_config = SettingsConfigDict(env_prefix="SELFINSTRUCT_", extra="forbid")

    store_url: str = Field(default="./data", description="Store root: a local folder or s3://bucket/prefix.")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, moto...).")
    s3_access_key_id: SecretStr | None = Field(default=None, description="S3 access key id.")
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret access key.")
    llm_url: str | None = Field(
        default=None,
        description="Comma-separated OpenAI-compatible base URLs (…/v1); None starts the embedded server.",
    )
    model: str = Field(default="smollm2-135m-instruct", description="Model name sent to the server.")
    llm_api: LLMApi = Field(
        default="completions",
        description="Endpoint for prompts: 'completions' (/v1/completions, a batch of prompts per request) "
        "or 'chat' (/v1/chat/completions, each prompt alone as one user message; for chat-only models).",
    )
    api_key: SecretStr | None = Field(default=None, description="Bearer token for the LLM servers.")
    llm_batch_size: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="Prompts per /v1/completions request (chat: sent side by side, one request each).",
    )
    llm_concurrency: int = Field(
        default=4, ge=1, le=1024, description="Batches (HTTP requests with completions) in flight at most."
    )
    llm_token_ids: bool = Field(
        default=False,
        description="Ask the server for token ids (vLLM's return_token_ids) for exact per-prompt token "
        "counts; "
        "turned on by itself when the server is found to be vLLM.",
    )
    llm_autosize: bool = Field(
        default=True,
        description="When the server is vLLM and neither batch size nor concurrency is set, size both "
        "from it.",
    )
    llm_server_max_seqs: int = Field(
        default=1024,
        ge=1,
        le=65536,
        description="Sequences the vLLM server schedules at once (its --max-num-seqs; vLLM 0.33.0 "
        "defaults to "
        "1024 on H100/H200-class GPUs, 256 on smaller ones), used by llm_autosize.",
    )
    llm_timeout_s: float = Field(default=600.0, gt=0, description="Timeout of one HTTP request.")
    llm_max_retries: int = Field(default=5, ge=0, le=50, description="Retries on 429/5xx/timeouts.")
    dask_address: str | None = Field(default=None, description="Dask scheduler for sharded ROUGE-L scoring.")
    claim_lease_s: float = Field(
        default=180.0,
        ge=1.0,
        le=86_400.0,
        description="Lease of a round claim: the holder renews it every third of this; once it has not been "
        "renewed for this long, the claim is stale on any host.",
    )
    s3_connect_timeout_s: float = Field(default=10.0, gt=0, description="S3 connect timeout per request.")
    s3_read_timeout_s: float = Field(default=60.0, gt=0, description="S3 read timeout per request.")
    s3_write_timeout_s: float = Field(
        default=300.0, gt=0, description="Longest wait for one S3 file write, retries included."
    )
    api_key_block: str | None = Field(
        default="selfinstruct-api-key",
        description="Prefect Secret block read in flow runs when SELFINSTRUCT_API_KEY is unset.",
    )
    s3_access_key_id_block: str | None = Field(
        default="selfinstruct-s3-access-key-id",
        description="Prefect Secret block read in flow runs when SELFINSTRUCT_S3_ACCESS_KEY_ID is unset.",
    )
    s3_secret_access_key_block: str | None = Field(
        default="selfinstruct-s3-secret-access-key",
        description="Prefect Secret block read in flow runs when SELFINSTRUCT_S3_SECRET_ACCESS_KEY is unset.",
    )
    report_url: str | None = Field(
        default=None,
        description="Base URL of a server that serves the store's reports over HTTP (`stack up` sets it).",
    )

    def llm_urls(self) -> list[str]:
        """The configured base URLs, or an empty list when the embedded server should be used."""
        if not self.llm_url:
            return []
        return [u.strip().rstrip("/") for u in self.llm_url.split(",") if u.strip()]

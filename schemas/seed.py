"""Seed tasks in the JSONL schema of the original Self-Instruct release."""

from pydantic import BaseModel, ConfigDict, Field


class SeedInstance(BaseModel):
    """One input/output demonstration of a task; `input` is empty when the task needs none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="Task input; empty string when the instruction is self-contained.")
    output: str = Field(description="Reference output for the input.")


class SeedTask(BaseModel):
    """A human-written task: one line of a seed JSONL file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="Unique task id, e.g. seed_task_0.")
    name: str = Field(min_length=1, description="Short snake_case name.")
    instruction: str = Field(min_length=1, description="The task instruction.")
    instances: list[SeedInstance] = Field(min_length=1, description="At least one demonstration.")
    is_classification: bool = Field(description="True when the output is one label from a fixed set.")

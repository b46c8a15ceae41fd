"""Pydantic models for every piece of data that crosses a boundary, and the typed configs."""

from schemas.config import BootstrapConfig, RoundParams, SamplingParams
from schemas.records import (
    CompletionRecord,
    FileEntry,
    InstanceRecord,
    InstructionRecord,
    RejectionRecord,
    RoundManifest,
    SimilarInstruction,
)
from schemas.seed import SeedInstance, SeedTask
from schemas.settings import Settings

__all__ = [
    "BootstrapConfig",
    "CompletionRecord",
    "FileEntry",
    "InstanceRecord",
    "InstructionRecord",
    "RejectionRecord",
    "RoundManifest",
    "RoundParams",
    "SamplingParams",
    "SeedInstance",
    "SeedTask",
    "Settings",
    "SimilarInstruction",
]

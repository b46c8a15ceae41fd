"""From committed rounds to a better model: exports and dataset folders, the LoRA fine-tune, held-out
evaluation and the seeds-only comparison."""

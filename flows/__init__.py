"""Prefect flows: a bootstrap round, fine-tune, evaluate, compare and audit; each calls `tasks/` in order."""

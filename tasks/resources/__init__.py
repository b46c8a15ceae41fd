"""What a round uses and does not own: the store, the LLM client, the LLM servers, secrets, and the
processes behind them (readiness polls, the orphan reaper). The one URL redaction rule lives here too."""

"""How good the data is: an LLM judge, the round audit, scores of held-out answers and their intervals."""

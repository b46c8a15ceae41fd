"""One bootstrap round's work: seeds and pool, prompts, parsing, filters, ROUGE-L dedup, classification,
instances, and the round steps that join them; plus verification of what rounds committed."""

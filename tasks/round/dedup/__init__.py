"""ROUGE-L near-duplicate filtering of new instructions against the pool (section 2.3 of the paper).

Self-Instruct keeps a candidate only when its ROUGE-L F against every instruction already in the pool is at
most 0.7 (reject when > 0.7), and candidates join the pool one by one, so a batch is deduplicated greedily in
order. This package reproduces `rouge_score`'s decisions bit for bit (its tokens, its float formula for F),
far faster: token ids as code-point strings compared by rapidfuzz's bit-parallel LCS, the pool scored in
blocks ordered by token count, and only the pairs that can matter evaluated in floating point.

Modules: `tokens` (tokenizers), `index` (the pool as token ids, its blocks, stored and reloaded), `score`
(F and candidates against blocks, on threads or a Dask cluster), `greedy` (`deduplicate`: the in-order walk).
"""

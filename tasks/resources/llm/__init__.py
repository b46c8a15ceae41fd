"""Completions from OpenAI-compatible servers (vLLM, llama.cpp).

- `protocol`: the wire format: request bodies, and what an answer means (choices, token counts, errors).
- `cache`: a completion's cache key, and the protocol of a completion cache.
- `client`: the HTTP client: dispatch over servers, retries with backoff, the preflight check.
- `batch`: batched, cached, concurrent `generate`, and `complete_isolating` for prompts a server refuses.
- `chunks`: the Prefect side: `generate_in_tasks` runs chunks as task runs that share one client.
- `sizing`: batch size and concurrency that keep a vLLM server busy.

Pure async code (protocol, cache, client, batch) needs no Prefect engine; `chunks` and `sizing` add tasks.
"""

"""A latency model of a batching GPU engine, for the fake OpenAI server: slower per request as more run.

A GPU engine (vLLM) decodes every running sequence in one step per token; a step takes longer the more
sequences share it, so one request's latency rises with the load while the engine's throughput rises towards
a ceiling. Modelled per request, from the prompts in flight when it arrives (its own included):

    latency = base_s + per_token_s * tokens * (1 + in_flight / saturation)

where `tokens` is the longest completion of the request. Throughput with k prompts in flight, each of n
tokens: k * n / (per_token_s * n * (1 + k / saturation)), approaching `saturation / per_token_s` tokens/s.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchingLatency:
    """`latency = base_s + per_token_s * tokens * (1 + in_flight / saturation)` (see the module docstring)."""

    base_s: float = 0.05
    per_token_s: float = 0.004
    saturation: float = 64.0

    def latency(self, tokens: int, in_flight: int) -> float:
        """Seconds to answer a request whose longest completion has `tokens` tokens, with `in_flight`
        prompts running (its own included)."""
        return self.base_s + self.per_token_s * tokens * (1 + in_flight / self.saturation)

    def max_rate(self) -> float:
        """The ceiling of completion tokens per second, approached as the prompts in flight grow."""
        return self.saturation / self.per_token_s

    @classmethod
    def parse(cls, text: str) -> BatchingLatency:
        """From "BASE_S,PER_TOKEN_S,SATURATION", as the command line gives it."""
        base, per_token, saturation = (float(x) for x in text.split(","))
        return cls(base, per_token, saturation)

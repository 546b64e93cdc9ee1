"""What a generation is asked (`GenParams`) and what it yields (`Piece`: text, then one `Done`),
shared by the backend and the prompt formats."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: not asked; N: each token's log probability and the N most likely
    grammar: object | None = None  # a llama_cpp.LlamaGrammar the reply must follow (structured output)


@dataclass
class Done:
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None  # OpenAI's chat shape: [{token, logprob, bytes, top_logprobs}]


Piece = str | Done

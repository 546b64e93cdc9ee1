"""One model interface, two implementations: PyTorch (`torch_lm.TorchLM`, a checkpoint decoded with
a KV cache) and llama.cpp (`llama_lm.LlamaLM`, a GGUF through llama-cpp-python).

Evaluation, parity, `barkgpt generate` and the server all talk to an `LM`:

    lm.name, lm.backend      the model's id (from its file) and "torch" or "llama.cpp"
    lm.tokenizer             the model's own tokenizer: encode(text), decode(ids), eos_id, vocab_size
    lm.n_ctx, lm.vocab_size
    lm.is_end(id)            does this token end generation (<EOS>, or a chat model's end of turn)?
    lm.logits(ids)           (T, V) float32 next-token logits of one sequence
    lm.token_losses(x, y)    (B, T) -ln p(y | x) in nats (float64), for rows of token ids
    lm.generate(ids, s, should_stop, scores)   iterator of new ids; stops after an end token (yielded),
                                       max_new_tokens, the context, or when should_stop() says so;
                                       given a list `scores`, appends each step's log-probabilities
                                       (the model's own distribution, before sampling's temperature)
    lm.generate_batch(prompts, s)      one id list per prompt (PyTorch decodes them together)

Importing this package imports neither torch nor llama_cpp: `load_lm` picks the implementation by
file type, so serving a GGUF never loads torch.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from barkgpt.errors import BarkError
from barkgpt.tokenizer import Tokenizer  # the interface; LlamaLM's tokenizer has it too

StopFn = Callable[[], bool]

# Below this temperature (0 included) decoding is greedy. Dividing logits by a temperature such as
# 1e-300 overflows to inf/NaN; any temperature this small already picks the most likely token.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Sampling:
    """The sampling rule both backends apply, in this order: temperature, top_k, top_p, draw."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None  # keep the smallest set of most likely tokens whose mass reaches top_p
    max_new_tokens: int = 32
    seed: int | None = None  # None: a fresh random seed per call

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise BarkError(f"temperature {self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise BarkError(f"top_k {self.top_k} must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise BarkError(f"top_p {self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise BarkError(f"max_new_tokens {self.max_new_tokens} must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class LM(Protocol):
    name: str
    backend: str
    tokenizer: Tokenizer
    n_ctx: int
    vocab_size: int

    def is_end(self, token: int) -> bool: ...
    def logits(self, ids: list[int]) -> np.ndarray: ...
    def token_losses(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray: ...
    def generate(self, ids: list[int], s: Sampling, should_stop: StopFn | None = None,
                 scores: list | None = None) -> Iterator[int]: ...
    def generate_batch(self, prompts: list[list[int]], s: Sampling) -> list[list[int]]: ...


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """ln p over the vocabulary from one row of logits, in float64 (logprobs sum to 1 exactly enough)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def new_tokens_budget(prompt_tokens: int, max_new: int, n_ctx: int) -> int:
    """How many tokens may follow a prompt: the one prompt check, for every backend and caller."""
    if prompt_tokens == 0:
        raise BarkError("the prompt is empty; give at least one token, e.g. 'User: speak Assistant:'")
    if prompt_tokens >= n_ctx:
        raise BarkError(f"the prompt has {prompt_tokens} tokens; this model's context is {n_ctx} tokens; "
                        "shorten the prompt")
    return min(max_new, n_ctx - prompt_tokens)


class TextStream:
    """Token ids in, text pieces out, decoded by the model's own tokenizer (incremental decoding).

    Each piece is what the new ids add to the decoded text, so the pieces concatenate to exactly the
    decoded continuation: nothing is inserted between BPE pieces, a word vocabulary keeps the
    spaces its decoder puts between words, and a character whose UTF-8 bytes span several tokens
    comes out whole once its last byte arrives (until then the text ends in U+FFFD: held back).
    A few prompt ids give the first piece its context (the space before a first word).
    """

    CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.decode = tokenizer.decode
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.start, self.read = 0, len(self.ids)  # ids[start:read] were decoded already

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is still held back (an incomplete character comes out as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.decode(self.ids[self.start : self.read])
        after = self.decode(self.ids[self.start :])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        self.start, self.read = self.read, len(self.ids)
        return after[len(before) :]


def generate_text(lm: LM, prompt: str, s: Sampling, should_stop: StopFn | None = None) -> str:
    """The text that follows `prompt` (without the closing end token): prompt + result is the
    decoded sequence, e.g. "User: speak Assistant:" + " woof arf", "The history of" + " the"."""
    ids = lm.tokenizer.encode(prompt)
    text = TextStream(lm.tokenizer, ids)
    pieces = [text.push(t) for t in lm.generate(ids, s, should_stop) if not lm.is_end(t)]
    return "".join(pieces) + text.flush()


def model_name(path: str | Path) -> str:
    """A model's id from its file: exports/webtext/webtext-q8_0.gguf -> webtext-q8_0,
    models/webtext/best.pt -> webtext-best (a pipeline's checkpoints share their file names)."""
    path = Path(path)
    if path.suffix == ".pt" and path.stem in ("best", "last") and path.parent.name:
        return f"{path.parent.name}-{path.stem}"
    return path.stem


def load_lm(path: str | Path, threads: int | None = None, n_ctx: int = 0, chat_format: str | None = None,
            all_logits: bool = False, flash_attn: bool = False, verbose: bool = False) -> LM:
    """A .pt checkpoint through PyTorch, or a .gguf through llama.cpp (torch is never imported).
    llama.cpp's log stays quiet (its warnings are kept in `lm.warnings`) unless verbose."""
    path = Path(path)
    if path.suffix == ".pt":
        from barkgpt.lm.torch_lm import TorchLM

        return TorchLM.load(path, threads)
    if path.suffix == ".gguf":
        from barkgpt.lm.llama_lm import LlamaLM

        return LlamaLM(path, n_ctx=n_ctx, threads=threads or 1, chat_format=chat_format, all_logits=all_logits,
                       flash_attn=flash_attn, verbose=verbose)
    raise BarkError(f"{path}: not a .pt checkpoint or a .gguf file; pass a model written by barkgpt train/export")

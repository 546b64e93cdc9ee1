"""Model backends behind one small interface: the GGUF through llama.cpp, or the PyTorch checkpoint.

A backend is used by exactly one thread (the model worker, `worker.py`): llama.cpp contexts and
the KV cache are not thread-safe. `complete` and `chat` are generators: text pieces, then one
`Done`. `should_stop()` is polled between tokens, so a timeout or a client that went away frees
the worker after at most one more token.
"""
from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from barkgpt.errors import BarkError
from barkgpt.serve.contract import bark_prompt

BARK_WORDS = {"User:", "Assistant:", "speak", "<EOS>"}


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Done:
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


Piece = str | Done
StopFn = Callable[[], bool]


class StopText:
    """Cut the output at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        self.buf += piece
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _check_fit(prompt_tokens: int, n_ctx: int) -> None:
    if prompt_tokens == 0:
        raise BarkError("the prompt is empty; send at least one word")
    if prompt_tokens >= n_ctx:
        raise BarkError(f"the prompt has {prompt_tokens} tokens; this model's context is {n_ctx} tokens; "
                        "shorten the prompt")


class TorchBackend:
    """The PyTorch checkpoint through barkgpt.engine (KV-cache decoding)."""

    kind = "bark"

    def __init__(self, path: Path, threads: int, model_id: str):
        import torch

        from barkgpt.checkpoint import load_model

        torch.set_num_threads(threads)
        self.model, self.tok = load_model(path)
        self.n_ctx = self.model.cfg.block_size
        self.model_id = model_id

    def complete(self, prompt: str, g: GenParams, should_stop: StopFn) -> Iterator[Piece]:
        from barkgpt.engine import Sampling, stream

        ids = self.tok.encode(prompt)
        _check_fit(len(ids), self.n_ctx)
        seed = g.seed % 2**63 if g.seed is not None else random.getrandbits(62)
        s = Sampling(temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_tokens, seed=seed)
        stopper, n, finish = StopText(g.stop), 0, "length"
        for tok_id in stream(self.model, ids, s, self.tok.eos_id):
            n += 1
            if tok_id == self.tok.eos_id:
                finish = "stop"
                break
            out, hit = stopper.feed(" " + self.tok.decode([tok_id]))
            if out:
                yield out
            if hit:
                finish = "stop"
                break
            if should_stop():
                break
        if rest := stopper.flush():
            yield rest
        yield Done(finish, len(ids), n)

    def chat(self, messages: list[dict], g: GenParams, should_stop: StopFn) -> Iterator[Piece]:
        yield from self.complete(bark_prompt(messages, self.n_ctx - 2), g, should_stop)


class LlamaBackend:
    """A GGUF through llama-cpp-python. A bark GGUF (its vocabulary holds the contract words) gets
    the contract prompt; any other chat GGUF gets its own chat template (create_chat_completion)."""

    def __init__(self, path: Path, threads: int, model_id: str, n_ctx: int = 0,
                 chat_format: str | None = None):
        from llama_cpp import Llama

        probe = Llama(model_path=str(path), vocab_only=True, verbose=False)
        trained = int(probe.metadata.get(f"{probe.metadata.get('general.architecture')}.context_length", 2048))
        self.vocab = self._small_vocab(probe)
        del probe
        self.n_ctx = n_ctx or min(trained, 4096)
        # flash_attn: llama.cpp's fused attention; the bark model decodes a token in ~60 us, not ~95 us
        self.llm = Llama(model_path=str(path), n_ctx=self.n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=min(512, self.n_ctx), chat_format=chat_format, flash_attn=True, verbose=False)
        self.kind = "bark" if self.vocab and BARK_WORDS <= self.vocab else "chat"
        self.model_id = model_id

    @staticmethod
    def _small_vocab(llm) -> set[str] | None:
        """The token texts of a small (word-level) vocabulary; None for a real LLM's vocabulary."""
        n = llm.n_vocab()
        if n > 4096:
            return None
        return {llm._model.token_get_text(i).replace("\u2581", "").strip() for i in range(n)}

    def _sampler(self, g: GenParams) -> dict:
        # OpenAI semantics: only temperature and top_p shape the distribution (llama.cpp's own
        # defaults add top_k=40, min_p=0.05 and a repeat penalty)
        seed = g.seed % 2**32 if g.seed is not None else random.getrandbits(32)
        return dict(max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p or 1.0, top_k=0,
                    min_p=0.0, repeat_penalty=1.0, stop=g.stop or None, seed=seed, stream=True)

    def _check_bark_words(self, prompt: str) -> None:
        unknown = [w for w in prompt.split() if w not in self.vocab]
        if unknown:
            raise BarkError(f"word {unknown[0]!r} is not in the bark vocabulary {sorted(self.vocab - {''})}; "
                            "prompts may use only these words, e.g. 'User: speak Assistant:'")

    def complete(self, prompt: str, g: GenParams, should_stop: StopFn) -> Iterator[Piece]:
        if self.kind == "bark":
            self._check_bark_words(prompt)
        n_prompt = len(self.llm.tokenize(prompt.encode("utf-8"), add_bos=True))
        _check_fit(n_prompt, self.n_ctx)
        params = self._sampler(g) | {"max_tokens": min(g.max_tokens, self.n_ctx - n_prompt)}
        n, finish = 0, "length"
        for chunk in self.llm.create_completion(prompt, **params):
            choice = chunk["choices"][0]
            if choice.get("finish_reason"):
                # the closing chunk: its token is <EOS> or a stop string (counted, like PyTorch's
                # <EOS>), or nothing new when max_tokens ran out
                finish = choice["finish_reason"]
                n += finish == "stop"
                if choice["text"]:
                    yield choice["text"]
                break
            n += 1
            if choice["text"]:
                yield choice["text"]
            if should_stop():
                break
        yield Done(finish, n_prompt, n)

    def chat(self, messages: list[dict], g: GenParams, should_stop: StopFn) -> Iterator[Piece]:
        if self.kind == "bark":
            yield from self.complete(bark_prompt(messages, self.n_ctx - 2), g, should_stop)
            return
        try:
            chunks = self.llm.create_chat_completion(messages=messages, **self._sampler(g))
            n, finish = 0, "length"
            for chunk in chunks:
                choice = chunk["choices"][0]
                text = choice["delta"].get("content")
                if text:
                    n += 1
                    yield text
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                    n += finish == "stop"  # the end-of-turn token
                    break
                if should_stop():
                    break
        except ValueError as err:  # llama-cpp-python: "Requested tokens (...) exceed context window of ..."
            raise BarkError(f"{err}; shorten the conversation") from None
        yield Done(finish, max(0, self.llm.n_tokens - n), n)


def resolve_model(serve, root: Path) -> Path:
    """The model file to serve: serve.model, else the pipeline's deploy GGUF or checkpoint."""
    from barkgpt.layout import layout

    if serve.model:
        path = Path(serve.model)
        path = path if path.is_absolute() else root / path
        if not path.exists():
            raise BarkError(f"{path}: model file not found; check serve.model / BARKGPT_MODEL / --model")
        return path
    paths = layout(serve.pipeline, root)
    if serve.backend == "torch":
        if not paths.checkpoint.exists():
            raise BarkError(f"{paths.checkpoint}: checkpoint not found; run the pipeline first (dvc repro)")
        return paths.checkpoint
    quant = (serve.quant or "q8_0").lower()
    gguf = paths.gguf(quant)
    if not gguf.exists():
        raise BarkError(f"{gguf}: not found; run the pipeline through quantization (dvc repro "
                        f"{serve.pipeline}-quantize), pass --model FILE.gguf, or serve the checkpoint with "
                        "--backend torch")
    return gguf


_LOADED: dict[tuple, object] = {}
_LOADED_LOCK = threading.Lock()


def load_backend(serve, root: Path):
    """Load once per process: an app's lifespan may run again for the same model (Mangum runs it
    on every AWS Lambda invocation), and a warm Lambda must not reload its model each time."""
    key = (str(resolve_model(serve, root).resolve()), serve.backend, serve.threads, serve.n_ctx,
           serve.chat_format, serve.model_id, serve.pipeline)
    with _LOADED_LOCK:
        if key not in _LOADED:
            _LOADED[key] = _load_backend(serve, root)
        return _LOADED[key]


def _load_backend(serve, root: Path):
    path = resolve_model(serve, root)
    if serve.backend == "torch" or path.suffix == ".pt":
        return TorchBackend(path, serve.threads, serve.model_id or f"barkgpt-{serve.pipeline}")
    if path.suffix != ".gguf":
        raise BarkError(f"{path}: not a .gguf or .pt file; the llama backend serves GGUF models")
    from barkgpt.export.checksums import verify_recorded
    from barkgpt.layout import layout

    # a pipeline's export must be the file its stage wrote (and pre-flighted); any other GGUF meets
    # llama.cpp's own loader checks
    verify_recorded(layout(serve.pipeline, root), path, required=False)
    return LlamaBackend(path, serve.threads, serve.model_id or path.stem, serve.n_ctx,
                        serve.chat_format)

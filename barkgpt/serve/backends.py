"""The server's model backend: one class over any barkgpt.lm model, a GGUF through llama.cpp or a
PyTorch checkpoint (the same generation, tokenizer and decoding the CLI and evaluation use).

A backend is used by exactly one thread (the model worker, `worker.py`): llama.cpp contexts and
the KV cache are not thread-safe. `complete` and `chat` are generators: text pieces, then one
`Done`. `should_stop()` is polled between tokens, so a timeout or a client that went away frees
the worker after at most one more token.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from barkgpt.errors import BarkError
from barkgpt.lm import Sampling, StopFn, TextStream, load_lm
from barkgpt.serve.formats import PromptFormat, prompt_format
from barkgpt.serve.pieces import Done, GenParams, Piece

__all__ = ["Backend", "Done", "GenParams", "Piece", "StopText", "load_backend", "resolve_model"]


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


class Backend:
    """A barkgpt.lm model (PyTorch or llama.cpp) behind the server: text in, text pieces out,
    decoded incrementally by the model's own tokenizer."""

    def __init__(self, lm, model_id: str):
        self.lm, self.model_id, self.n_ctx = lm, model_id, lm.n_ctx
        self.format: PromptFormat = prompt_format(lm)  # chosen once, from what the model file says

    def info(self) -> dict:
        """What the chat page and /v1/models say about the model."""
        return {"backend": self.lm.backend, "kind": self.format.kind, "hears": self.format.hears,
                "input_hint": self.format.input_hint, "context_length": self.n_ctx,
                "vocab_size": self.lm.vocab_size, "tokenizer": self.lm.tokenizer.kind}

    def complete(self, prompt: str, g: GenParams, should_stop: StopFn) -> Iterator[Piece]:
        ids = self.lm.tokenizer.encode(prompt)
        s = Sampling(temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_tokens, seed=g.seed)
        text, stopper, n, finish, hit = TextStream(self.lm.tokenizer, ids), StopText(g.stop), 0, "length", False
        scores, entries = ([], []) if g.logprobs is not None else (None, None)
        for token in self.lm.generate(ids, s, should_stop, scores):
            n += 1
            if self.lm.is_end(token):
                finish = "stop"
                break
            if entries is not None:  # one row of the vocabulary at a time, never all of them kept
                entries.append(self.logprob_entry(token, scores.pop(), g.logprobs))
            out, hit = stopper.feed(text.push(token))
            if out:
                yield out
            if hit:
                break
        if not hit:  # what the decoder held back (an unfinished character), then the stop-text hold
            out, hit = stopper.feed(text.flush())
            if out:
                yield out
        if hit:
            finish = "stop"
        elif rest := stopper.flush():
            yield rest
        yield Done(finish, len(ids), n, entries)

    def token_text(self, token: int) -> str:
        return self.lm.tokenizer.decode([token])

    def logprob_entry(self, token: int, row: np.ndarray, top: int) -> dict:
        """A generated token's log probability under the model and the `top` most likely tokens at
        its position (one item of OpenAI's chat logprobs.content); `row`: ln p over the vocabulary."""
        if not top:
            best = []
        elif len(row) > 4 * top + 1024:  # a large vocabulary (a chat GGUF's 262k): the top few, not a full sort
            part = np.argpartition(-row, top)[:top]
            best = part[np.argsort(-row[part], kind="stable")]
        else:
            best = np.argsort(-row, kind="stable")[:top]
        return {**self._entry(token, row), "top_logprobs": [self._entry(int(t), row) for t in best]}

    def _entry(self, token: int, row) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": float(row[token]), "bytes": list(text.encode("utf-8"))}

    def embed_all(self, inputs: list[str | list[int]], should_stop: StopFn) -> Iterator[tuple[list, int]]:
        """One item: every input's embedding, and the tokens read."""
        vectors, n = [], 0
        for item in inputs:
            ids = self.lm.tokenizer.encode(item) if isinstance(item, str) else item
            if not ids:
                raise BarkError("input: an empty string has no embedding; send text with at least one token")
            if len(ids) > self.n_ctx:
                raise BarkError(f"input: {len(ids)} tokens; this model reads at most {self.n_ctx}; shorten it")
            vectors.append(self.embed(ids))
            n += len(ids)
            if should_stop():
                break
        yield vectors, n

    def embed(self, ids: list[int]) -> list[float]:
        """The model's embedding of one input, L2-normalized as OpenAI's are."""
        vec = self.lm.embed(ids)
        norm = float(np.linalg.norm(vec))
        return (vec / norm if norm > 0 else vec).tolist()

    def chat(self, messages: list[dict], g: GenParams, should_stop: StopFn) -> Iterator[Piece]:
        yield from self.format.reply(self, messages, g, should_stop)


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


def _load_backend(serve, root: Path) -> Backend:
    path = resolve_model(serve, root)
    if serve.backend == "torch" and path.suffix != ".pt":
        raise BarkError(f"{path}: the torch backend serves a .pt checkpoint; use --backend llama for a GGUF")
    if path.suffix == ".gguf":
        from barkgpt.export.checksums import verify_recorded
        from barkgpt.layout import layout

        # a pipeline's export must be the file its stage wrote (and pre-flighted); any other GGUF meets
        # llama.cpp's own loader checks
        verify_recorded(layout(serve.pipeline, root), path, required=False)
    # flash_attn: llama.cpp's fused attention; the bark model decodes a token in ~60 us, not ~95 us
    lm = load_lm(path, threads=serve.threads, n_ctx=serve.n_ctx, chat_format=serve.chat_format, flash_attn=True)
    return Backend(lm, serve.model_id or lm.name)

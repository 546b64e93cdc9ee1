"""The llama.cpp implementation of barkgpt.lm.LM: any GGUF through llama-cpp-python. No torch.

Tokens come from llama.cpp's own tokenizer (the one stored in the GGUF) and are drawn by llama.cpp's
own sampler chain, built in barkgpt.lm.Sampling's order (temperature, top_k, top_p, draw), so a
quantized file is judged by the distribution it serves. Every file passes `preflight` (header and
bounds checks) before llama.cpp reads it.
"""
from __future__ import annotations

import contextlib
import ctypes
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from barkgpt.errors import BarkError
from barkgpt.lm import Sampling, StopFn, log_softmax, model_name, new_tokens_budget

SPACE = "\u2581"  # how a word vocabulary (llama.cpp's UGM/"t5" tokenizer) writes the space before a word
SMALL_FILE = 256 << 20


class LlamaTokenizer:
    """llama.cpp's tokenizer of one GGUF behind barkgpt's tokenizer interface.

    Text is text: special=False on encode, so a typed "<|endoftext|>" is not the EOS. A BOS is
    added only when the GGUF asks for one (BarkGPT's files never do). A BarkGPT word vocabulary
    (kind "word") refuses unknown words as barkgpt's WordTokenizer does; llama.cpp would map them
    to an id the model never trained on.
    """

    def __init__(self, llm):
        import llama_cpp

        self.llm, self._lib = llm, llama_cpp
        self.vocab_size, self.eos_id = llm.n_vocab(), llm.token_eos()
        model = llm.metadata.get("tokenizer.ggml.model")
        self.vocab = None  # the words of a word vocabulary
        if model == "t5" and self.vocab_size <= 4096:
            pieces = [llm._model.token_get_text(i) for i in range(self.vocab_size)]
            if all(p.startswith(SPACE) and len(p) > 1 for p in pieces):
                self.vocab = [p[1:] for p in pieces]
        self.kind = "word" if self.vocab else "bpe" if model == "gpt2" else str(model or "unknown")
        self.name = llm.metadata.get("general.name", "")

    def encode(self, text: str) -> list[int]:
        if self.vocab is not None:
            from barkgpt.tokenizer import check_words

            check_words(text.split(), self.vocab)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def decode(self, ids: list[int]) -> str:
        if self.kind == "word":
            return self._detokenize(ids)  # drops the space UGM writes before the first word
        # Byte-level BPE and the rest: the token pieces concatenated, as llama.cpp streams them.
        # (llama_detokenize would also apply GPT-2's clean-up, " ," -> ",", which BarkGPT does not.)
        return self.llm.detokenize(list(ids), special=True).decode("utf-8", errors="replace")

    def _detokenize(self, ids: list[int]) -> str:
        lib = self._lib
        arr = (lib.llama_token * max(1, len(ids)))(*ids)
        size = 64 + 32 * len(ids)
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lib.llama_detokenize(self.llm._model.vocab, arr, len(ids), buf, size, False, True)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n + 1


class LlamaLM:
    backend = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int = 0, threads: int = 1, chat_format: str | None = None,
                 all_logits: bool = False, flash_attn: bool = False, verbose: bool = False):
        """n_ctx 0: the context the model was trained with (at most 4096). all_logits: keep every
        position's logits (for `logits` and `token_losses`; judging, not serving). flash_attn:
        llama.cpp's fused attention, faster decoding (serving; parity keeps the exact path). verbose:
        llama.cpp's whole load log on stderr (~300 lines); by default its warnings are collected in
        `self.warnings` (reports list them) and nothing is printed."""
        import llama_cpp

        from barkgpt.export import llama_log
        from barkgpt.export.gguf_file import preflight

        path = Path(path)
        size = preflight(path).file_size
        if verbose:
            llama_log.set_verbose(True)
        # llama.cpp's warnings while loading go here (a report lists them), not to stderr
        with (contextlib.nullcontext([]) if verbose else llama_log.captured()) as self.warnings:
            try:
                if not n_ctx:  # the trained context, read from the file's metadata
                    probe = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
                    arch = probe.metadata.get("general.architecture")
                    n_ctx = min(int(probe.metadata.get(f"{arch}.context_length", 2048)), 4096)
                    probe.close()
                # A tiny model's F32 KV cache costs nothing and keeps llama.cpp as exact as PyTorch's
                # float32; big chat models keep llama.cpp's F16 default.
                cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if (
                    size < SMALL_FILE) else {}
                batch = n_ctx if all_logits else min(512, n_ctx)
                self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=batch, n_ubatch=batch,
                                           logits_all=all_logits, n_threads=threads, n_threads_batch=threads,
                                           chat_format=chat_format, flash_attn=flash_attn, verbose=False, **cache)
            except ValueError as err:  # llama-cpp-python: "Failed to load model from file: ..."
                raise BarkError(f"{path}: llama.cpp could not load it ({err}); re-export it or pass another "
                                "GGUF") from None
        self.n_ctx, self._lib, self.all_logits = n_ctx, llama_cpp, all_logits
        self.path, self.threads, self._embedder = path, threads, None
        self.tokenizer = LlamaTokenizer(self.llm)
        self.vocab_size = self.tokenizer.vocab_size
        self.name = model_name(path)
        self.has_chat_template = bool(chat_format or self.llm.metadata.get("tokenizer.chat_template"))

    def close(self) -> None:
        self.llm.close()  # free now, not in __del__ at interpreter exit (where llama-cpp-python can fail)
        if self._embedder is not None:
            self._embedder.close()

    def embed(self, ids: list[int]) -> np.ndarray:
        """llama.cpp's mean-pooled embedding (the last hidden state after the output norm, averaged
        over the sequence), from a second context in embedding mode, opened on first use."""
        lib = self._lib
        if self._embedder is None:
            from barkgpt.export import llama_log

            with llama_log.captured() as lines:
                self._embedder = lib.Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=self.n_ctx,
                                           n_ubatch=self.n_ctx, embedding=True,
                                           pooling_type=lib.LLAMA_POOLING_TYPE_MEAN, n_threads=self.threads,
                                           n_threads_batch=self.threads, verbose=False)
            self.warnings += [line for line in lines if line not in self.warnings]
        e = self._embedder
        new_tokens_budget(len(ids), 1, self.n_ctx)  # empty or longer than the context: a clear error
        e._batch.reset()
        e._batch.add_sequence(list(ids), 0, True)  # every position is an output: mean pooling reads them all
        e._ctx.kv_cache_clear()
        e._ctx.decode(e._batch)
        e._batch.reset()
        row = lib.llama_get_embeddings_seq(e._ctx.ctx, 0)
        return np.ctypeslib.as_array(row, shape=(e.n_embd(),)).astype(np.float64)

    def is_end(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.llm._model.vocab, token))

    def logits(self, ids: list[int]) -> np.ndarray:
        if not self.all_logits:
            raise ValueError("open the GGUF with all_logits=True to read logits")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def token_losses(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        out = np.empty(np.shape(targets), dtype=np.float64)
        for r, (x, y) in enumerate(zip(np.asarray(inputs), np.asarray(targets))):
            z = self.logits([int(t) for t in x]).astype(np.float64)
            top = z.max(axis=-1, keepdims=True)
            log_norm = np.log(np.exp(z - top).sum(axis=-1)) + top[:, 0]
            out[r] = log_norm - z[np.arange(len(y)), y]
        return out

    def generate(self, ids: list[int], s: Sampling, should_stop: StopFn | None = None,
                 scores: list | None = None) -> Iterator[int]:
        steps = new_tokens_budget(len(ids), s.max_new_tokens, self.n_ctx)
        sampler = self._sampler(s)
        try:
            yield from self._decode(list(ids), steps, sampler, should_stop, scores)
        finally:
            self._lib.llama_sampler_free(sampler)

    def generate_batch(self, prompts: list[list[int]], s: Sampling) -> list[list[int]]:
        """One prompt after another (tiny models decode fast); one seeded sampler for all of them."""
        sampler = self._sampler(s)
        try:
            return [list(self._decode(list(ids), new_tokens_budget(len(ids), s.max_new_tokens, self.n_ctx),
                                      sampler, None)) for ids in prompts]
        finally:
            self._lib.llama_sampler_free(sampler)

    def _decode(self, ids: list[int], steps: int, sampler, should_stop: StopFn | None,
                scores: list | None = None) -> Iterator[int]:
        llm = self.llm
        # Keep the cached prefix this prompt shares with the last sequence (a thousand samples of
        # one prompt evaluate it once); at least the last prompt token runs, to get fresh logits.
        keep = 0
        for a, b in zip(llm.input_ids[: min(llm.n_tokens, len(ids) - 1)], ids):
            if a != b:
                break
            keep += 1
        llm.n_tokens = keep
        llm.eval(ids[keep:])
        for i in range(steps):
            if scores is not None:  # the last position's logits, before the sampler changes them
                row = self._lib.llama_get_logits_ith(llm._ctx.ctx, -1)
                scores.append(log_softmax(np.ctypeslib.as_array(row, shape=(self.vocab_size,))))
            token = int(self._lib.llama_sampler_sample(sampler, llm._ctx.ctx, -1))
            yield token
            if self.is_end(token) or i == steps - 1 or (should_stop and should_stop()):
                return
            llm.eval([token])

    def _sampler(self, s: Sampling):
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if s.greedy:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(s.temperature))
        if s.top_k is not None:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(s.top_k))
        if s.top_p is not None and s.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(s.top_p, 1))
        seed = s.seed % 2**32 if s.seed is not None else random.getrandbits(32)
        if seed == 0xFFFFFFFF:  # llama.cpp's "pick a random seed" value
            seed = 0
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain


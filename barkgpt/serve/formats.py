"""What differs between the models the server can serve, as one object per prompt format.

A model is served in one of three formats, chosen once when it loads from what the model file
itself says (its vocabulary and chat template), never by testing a name at each request:

- `BarkContract`: a word vocabulary holding the contract words; chat goes through the prompt
  contract (`contract.py`), and a reply is generated in place (a few hundred microseconds).
- `TextContinuation`: any other language model without a chat template (e.g. BarkGPT's WebText
  model); it continues the last user message.
- `ChatTemplate`: a GGUF with a chat template that is not a BarkGPT model; the model's own template
  through llama-cpp-python, and the only format that can follow a JSON grammar.

A format says how messages become a reply, what it refuses (and the 400 message naming why), and
what the chat page tells the user (`kind`, `hears`, `input_hint`, served in /v1/models).
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from typing import ClassVar

import numpy as np

from barkgpt.errors import BarkError
from barkgpt.lm import StopFn
from barkgpt.serve.contract import bark_prompt
from barkgpt.serve.pieces import Done, GenParams, Piece

BARK_WORDS = {"User:", "Assistant:", "speak", "<EOS>"}


class PromptFormat:
    """The interface; the three formats below fill it in. `backend` is the serving
    `backends.Backend` (its `complete`, `n_ctx` and `lm`)."""

    kind: ClassVar[str]  # the name /v1/models and /ready report
    hears: ClassVar[str]  # what the model hears, in words, for the chat page
    input_hint: ClassVar[str]  # the chat page's input placeholder
    generates_inline: ClassVar[bool] = False  # serve.inline=auto: generate on the event loop

    def reply(self, backend, messages: list[dict], g: GenParams, should_stop: StopFn) -> Iterator[Piece]:
        """A chat reply: text pieces, then one Done."""
        raise NotImplementedError

    def grammar_refusal(self, backend, fmt_type: str) -> str | None:
        """Why this model cannot follow a response_format's grammar (None: it can)."""
        return (f"response_format {fmt_type}: structured output is served for chat GGUFs (through llama.cpp's "
                "grammar); this model is a plain text model")

    def logprobs_refusal(self) -> str | None:
        """Why this model cannot return logprobs (None: it can)."""
        return None

    def tools_refusal(self, model_id: str) -> str:
        """Why a request naming tools gets a 400 (no tool-call parsing is implemented yet)."""
        return (f"tools: the model {model_id!r} has no chat template that presents tools (its template does not "
                "mention them); leave tools out")


class BarkContract(PromptFormat):
    kind = "bark"
    hears = "a bark model: it hears only 'User: speak' (your words are not in its vocabulary) and answers in barks"
    input_hint = "Say something (it hears only 'speak')"
    generates_inline = True

    def reply(self, backend, messages, g, should_stop):
        yield from backend.complete(bark_prompt(messages, backend.n_ctx - 2), g, should_stop)

    def grammar_refusal(self, backend, fmt_type):
        return (f"response_format {fmt_type}: the bark model cannot write JSON (its vocabulary is "
                f"{len(backend.lm.tokenizer.vocab)} words, no braces or quotes); leave response_format out")


class TextContinuation(PromptFormat):
    kind = "text"
    hears = "a text model: it continues what you type, up to the end of the line"
    input_hint = "Type the start of a sentence"

    def reply(self, backend, messages, g, should_stop):
        last = next(m for m in reversed(messages) if m["role"] == "user")
        yield from backend.complete(last["content"], g, should_stop)


class ChatTemplate(PromptFormat):
    """A chat GGUF through llama-cpp-python's chat templating (its own format and stop tokens)."""

    kind = "chat"
    hears = "a chat model: your messages go through its own chat template"
    input_hint = "Say something"

    def __init__(self, llm):
        self.llm = llm
        # Jinja templates that render tools name the variable
        self.presents_tools = "tools" in llm.metadata.get("tokenizer.chat_template", "")

    def grammar_refusal(self, backend, fmt_type):
        return None

    def tools_refusal(self, model_id):
        if not self.presents_tools:
            return super().tools_refusal(model_id)
        return "tools: this server does not parse tool calls from this template's replies yet; leave tools out"

    def reply(self, backend, messages, g, should_stop):
        llm = self.llm
        # OpenAI semantics: only temperature and top_p shape the distribution (llama.cpp's own
        # defaults add top_k=40, min_p=0.05 and a repeat penalty)
        seed = g.seed % 2**32 if g.seed is not None else random.getrandbits(32)
        entries = None
        if g.logprobs is not None:
            # llama-cpp-python's own chat logprobs need logits_all (n_ctx x vocabulary floats kept, 4 GiB
            # for Gemma 3's 262k vocabulary at 4096 tokens): read each step's logits as it samples instead
            entries = []
            llm.sample = self._recording_sample(backend, g.logprobs, entries)
        try:
            chunks = llm.create_chat_completion(
                messages=messages, max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p or 1.0,
                top_k=0, min_p=0.0, repeat_penalty=1.0, stop=g.stop or None, seed=seed, stream=True,
                grammar=g.grammar)
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
        finally:
            llm.__dict__.pop("sample", None)  # the class's own sample again
        yield Done(finish, max(0, llm.n_tokens - n), n, entries)

    def _recording_sample(self, backend, top: int, entries: list):
        """llama-cpp-python's `sample`, also recording each drawn token's entry (as the bark path
        does) from the logits it was drawn from, before grammar or temperature change them. The end
        of turn is not a token of the reply, so it gets no entry."""
        import llama_cpp

        from barkgpt.lm import log_softmax

        llm, sample, n_vocab = self.llm, type(self.llm).sample.__get__(self.llm), self.llm.n_vocab()

        def recording(*args, idx=None, **kwargs):
            row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, idx - llm.n_tokens if idx is not None else -1)
            row = log_softmax(np.ctypeslib.as_array(row, shape=(n_vocab,)))
            token = sample(*args, idx=idx, **kwargs)
            if not backend.lm.is_end(token):
                entries.append(backend.logprob_entry(int(token), row, top))
            return token

        return recording


def prompt_format(lm) -> PromptFormat:
    """bark: a word vocabulary holding the contract words; chat: a GGUF with a chat template that is
    not a BarkGPT model; text: any other language model (e.g. BarkGPT's WebText model)."""
    from barkgpt.lm.llama_lm import LlamaLM  # imports no llama_cpp until a model loads

    vocab = lm.tokenizer.vocab if lm.tokenizer.kind == "word" else None
    if vocab and BARK_WORDS <= set(vocab):
        return BarkContract()
    if isinstance(lm, LlamaLM) and lm.has_chat_template:
        return ChatTemplate(lm.llm)
    return TextContinuation()

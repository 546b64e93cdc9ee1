"""Tokenizers behind one small interface: encode, decode, vocab_size, eos_id, to_dict/from_dict.

The bark model uses a word-level vocabulary: the text is split on whitespace and each word must be
in the vocabulary (no <UNK>: an unknown word is an error that names it, so the model never sees a
token it was not trained on and llama.cpp's tokenization of the same vocabulary stays exact).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from barkgpt.errors import BarkError
from barkgpt.fileio import sha256_bytes, write_text

PAD, EOS = "<PAD>", "<EOS>"
USER, ASSISTANT, SPEAK = "User:", "Assistant:", "speak"
BARK_VOCAB = (PAD, EOS, "woof", "arf", "ruff", "grrr", USER, ASSISTANT, SPEAK)


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def to_dict(self) -> dict: ...


class WordTokenizer:
    """Whitespace-separated words, each one token. <EOS> ends an assistant turn."""

    kind = "word"

    def __init__(self, vocab: list[str] | tuple[str, ...] = BARK_VOCAB):
        if len(set(vocab)) != len(vocab):
            raise BarkError("word vocabulary has duplicate entries")
        if PAD not in vocab or EOS not in vocab:
            raise BarkError(f"word vocabulary must contain {PAD} and {EOS}")
        self.vocab = list(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.vocab_size = len(self.vocab)
        self.pad_id = self.ids[PAD]
        self.eos_id = self.ids[EOS]

    def encode(self, text: str) -> list[int]:
        words = text.split()
        unknown = [w for w in words if w not in self.ids]
        if unknown:
            raise BarkError(
                f"word {unknown[0]!r} is not in the bark vocabulary {self.vocab}; "
                "prompts may use only these words, e.g. 'User: speak Assistant:'"
            )
        return [self.ids[w] for w in words]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab": self.vocab}


def tokenizer_from_dict(spec: dict) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "word":
        return WordTokenizer(spec["vocab"])
    raise BarkError(f"unknown tokenizer kind {kind!r} (known: 'word')")


def tokenizer_hash(tok: Tokenizer) -> str:
    return sha256_bytes(json.dumps(tok.to_dict(), sort_keys=True).encode())[:16]


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    write_text(path, json.dumps(tok.to_dict(), indent=1) + "\n")


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.exists():
        raise BarkError(f"{path}: tokenizer not found; run the tokenize stage first (dvc repro)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BarkError(f"{path}: not a tokenizer JSON file ({err})") from None
    return tokenizer_from_dict(spec)

"""Tokenizers behind one small interface: encode, decode, vocab_size, eos_id, to_dict/from_dict.

The bark model uses a word-level vocabulary: the text is split on whitespace and each word must be
in the vocabulary (no <UNK>: an unknown word is an error that names it, so the model never sees a
token it was not trained on and llama.cpp's tokenization of the same vocabulary stays exact).
"""
from __future__ import annotations

import base64
import json
import os
import socket
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
        check_words(words, self.vocab)
        return [self.ids[w] for w in words]

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id stands for in the text: the word and the space or newline after it."""
        return [len(w.encode("utf-8")) + 1 for w in self.vocab]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab": self.vocab}


def bark_vocab_difference(vocab) -> str | None:
    """How a word vocabulary differs from the bark contract (BARK_VOCAB, ids included); None when
    it is the contract. Only the bark pipeline has a word tokenizer, and its vocabulary is fixed:
    the model's ids, the data shards and the GGUF all assume exactly these words at these ids."""
    vocab = list(vocab)
    if vocab == list(BARK_VOCAB):
        return None
    extra = [w for w in vocab if w not in BARK_VOCAB]
    missing = [w for w in BARK_VOCAB if w not in vocab]
    parts = []
    if extra:
        parts.append(f"extra word{'s' if len(extra) > 1 else ''} {extra}")
    if missing:
        parts.append(f"missing {missing}")
    if not parts:
        moved = [f"{w!r} is id {vocab.index(w)} (contract: {i})" for i, w in enumerate(BARK_VOCAB)
                 if vocab.index(w) != i] if len(set(vocab)) == len(vocab) else []
        parts.append("the same words at other ids: " + ", ".join(moved[:3]) if moved else "duplicate entries")
    return "; ".join(parts)


def check_bark_vocab(vocab, where: str, fix: str) -> None:
    """BarkError naming `where`, the difference from the bark vocabulary contract and the fix."""
    diff = bark_vocab_difference(vocab)
    if diff:
        raise BarkError(f"{where}: the bark vocabulary is fixed ({list(BARK_VOCAB)}, in this order), but this "
                        f"one has {diff}; {fix}")


def check_words(words: list[str], vocab: list[str]) -> None:
    """The word-vocabulary prompt check (BarkGPT's tokenizer and llama.cpp's of the same GGUF)."""
    known = set(vocab)
    unknown = [w for w in words if w not in known]
    if unknown:
        raise BarkError(
            f"word {unknown[0]!r} is not in the bark vocabulary {list(vocab)}; "
            "prompts may use only these words, e.g. 'User: speak Assistant:'"
        )


# --- byte-level BPE (WebText-2) ------------------------------------------------------------------

# GPT-2's pre-tokeniser: contractions, letter runs, digit runs, other symbols, whitespace; a
# leading space sticks to the next word. Both the Rust trainer (tokenizers' ByteLevel) and
# tiktoken split text with this pattern, so training and encoding see the same pieces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (how byte-level BPE files spell bytes)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class BPETokenizer:
    """Byte-level BPE encoded by tiktoken: `mergeable_ranks` (bytes -> rank) plus special tokens.

    Ids: 0..255 are the single bytes in byte order (id == byte value), 256.. are the learned
    merges in the order the trainer made them (rank = merge order), and the special token
    <|endoftext|> (the EOS, which also stands for the end of a line) comes last. tiktoken merges
    the adjacent pair whose concatenation has the lowest rank, which reproduces the trainer's
    merges exactly; `merges()` derives the pair list for BPE implementations that want one
    (llama.cpp's gpt2 tokenizer, Hugging Face's BPE model).
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None,
                 pattern: str = GPT2_PATTERN, name: str = "barkgpt-bpe", kind: str = "bpe"):
        import tiktoken  # imported here so the bark pipeline never pays for it

        self.kind, self.name, self.pattern = kind, name, pattern
        self.mergeable_ranks = dict(mergeable_ranks)
        n = len(self.mergeable_ranks)
        if sorted(self.mergeable_ranks.values()) != list(range(n)):
            raise BarkError(f"tokenizer {name!r}: BPE ranks must be exactly 0..{n - 1}")
        self.special_tokens = dict(special_tokens) if special_tokens is not None else {ENDOFTEXT: n}
        if ENDOFTEXT not in self.special_tokens:
            raise BarkError(f"tokenizer {name!r}: needs the special token {ENDOFTEXT} (the EOS)")
        self.eos_id = self.special_tokens[ENDOFTEXT]
        self.vocab_size = max([n - 1, *self.special_tokens.values()]) + 1
        self.encoding = tiktoken.Encoding(
            name=name, pat_str=pattern, mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens, explicit_n_vocab=self.vocab_size,
        )

    def encode(self, text: str) -> list[int]:
        # Ordinary text only: a literal "<|endoftext|>" in user text is encoded as text, so any
        # string round-trips and no input can inject an EOS.
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], threads: int = 2) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=threads)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of each id; the EOS counts one byte (the newline it replaces)."""
        lengths = [0] * self.vocab_size
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        for token_id in self.special_tokens.values():
            lengths[token_id] = 1 if token_id == self.eos_id else 0
        return lengths

    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merge list in rank order, derived from the ranks: token r splits into the two
        parts that BPE with ranks < r leaves (tiktoken's rule), so `merges()[i]` makes rank 256+i."""
        ranks = self.mergeable_ranks
        out = []
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(token) == 1:
                continue
            parts = _bpe_parts(token, ranks, max_rank=rank)
            if len(parts) != 2:
                raise BarkError(f"tokenizer {self.name!r}: token {token!r} is not one merge of two tokens")
            out.append((parts[0], parts[1]))
        return out

    def to_dict(self) -> dict:
        if self.kind == "tiktoken":
            return {"kind": "tiktoken", "name": self.name}
        ranks = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        return {
            "kind": "bpe",
            "name": self.name,
            "pattern": self.pattern,
            # tiktoken's file format: one base64 token per rank, in rank order.
            "ranks": [base64.b64encode(token).decode("ascii") for token, _ in ranks],
            "special_tokens": self.special_tokens,
        }

    @classmethod
    def from_dict(cls, spec: dict) -> "BPETokenizer":
        if spec.get("kind") == "tiktoken":
            return cls.from_tiktoken(spec.get("name", "gpt2"))
        try:
            ranks = {base64.b64decode(token): rank for rank, token in enumerate(spec["ranks"])}
            return cls(ranks, spec["special_tokens"], spec["pattern"], spec.get("name", "barkgpt-bpe"))
        except (KeyError, ValueError, TypeError) as err:
            raise BarkError(f"BPE tokenizer spec is malformed ({type(err).__name__}: {err}); re-run the tokenizer stage") from None

    @classmethod
    def from_tiktoken(cls, name: str = "gpt2") -> "BPETokenizer":
        """tiktoken's own encoding (e.g. the original tutorial's `gpt2`), from tiktoken's cache."""
        import tiktoken

        if name != "gpt2":
            raise BarkError(f"tiktoken encoding {name!r} is not supported here; use 'gpt2' or kind 'bpe'")
        if not _gpt2_cached() and not _reachable("openaipublic.blob.core.windows.net"):
            raise BarkError(
                "tiktoken's 'gpt2' files are not in its cache "
                f"({_tiktoken_cache_dir()}) and openaipublic.blob.core.windows.net is unreachable; "
                "run once with network access (or copy the cache and set TIKTOKEN_CACHE_DIR), "
                "or set webtext.tokenizer.kind: bpe to train a tokenizer on the corpus"
            )
        enc = tiktoken.get_encoding(name)
        return cls(enc._mergeable_ranks, enc._special_tokens, enc._pat_str, name, kind="tiktoken")


def _bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


GPT2_FILES = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


def _tiktoken_cache_dir() -> str:
    import tempfile

    return os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache")


def _gpt2_cached() -> bool:
    import hashlib

    cache = _tiktoken_cache_dir()
    return all(os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())) for url in GPT2_FILES)


def _reachable(host: str, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def train_bpe(lines, vocab_size: int, min_frequency: int = 2, progress: bool = False) -> BPETokenizer:
    """Train byte-level BPE with the Rust trainer, then hand its merges to tiktoken as ranks.

    `vocab_size` counts everything: 256 bytes + merges + the EOS.
    """
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise BarkError(f"webtext.tokenizer.vocab_size {vocab_size} is too small; byte-level BPE needs > 257")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, min_frequency=min_frequency, show_progress=progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    hf.train_from_iterator(lines, trainer)
    merges = json.loads(hf.to_str())["model"]["merges"]
    if 256 + len(merges) < vocab_size - 1:
        raise BarkError(
            f"webtext.tokenizer.vocab_size {vocab_size} is too large for this corpus: the trainer found only "
            f"{len(merges)} merges occurring >= {min_frequency} times (vocab {256 + len(merges) + 1}); "
            "lower the vocabulary size or use more text"
        )
    to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for pair in merges:
        left, right = pair if isinstance(pair, list) else pair.split(" ")
        token = bytes(to_byte[c] for c in left + right)
        # Two merges can spell the same bytes ("a"+"bc", "ab"+"c"); a rank table keeps the first.
        ranks.setdefault(token, len(ranks))
    return BPETokenizer(ranks)


def tokenizer_from_dict(spec: dict) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "word":
        return WordTokenizer(spec["vocab"])
    if kind in ("bpe", "tiktoken"):
        return BPETokenizer.from_dict(spec)
    raise BarkError(f"unknown tokenizer kind {kind!r} (known: 'word', 'bpe', 'tiktoken')")


def tokenizer_hash(tok: Tokenizer) -> str:
    return sha256_bytes(json.dumps(tok.to_dict(), sort_keys=True).encode())[:16]


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    write_text(path, json.dumps(tok.to_dict(), indent=1) + "\n")


BARK_TOKENIZER_FIX = ("regenerate it with `dvc repro bark-tokenize` (or `barkgpt tokenize bark`), or restore it "
                      "with `dvc checkout data/bark/tokenizer.json`; the vocabulary is not a setting")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer file, checked: a word tokenizer (bark's) must be the bark vocabulary contract."""
    path = Path(path)
    if not path.exists():
        from barkgpt.layout import repro_command

        raise BarkError(f"{path}: tokenizer not found; run the tokenize stage first ({repro_command(path.parent.name)})")
    fix = ("re-create it with its stage (bark: barkgpt tokenize bark; webtext: barkgpt webtext-tokenizer), "
           "or restore it with dvc checkout")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BarkError(f"{path}: not a tokenizer JSON file ({err}); {fix}") from None
    if not isinstance(spec, dict):
        raise BarkError(f"{path}: holds a JSON {type(spec).__name__}, not a tokenizer object "
                        f"({{\"kind\": ...}}); {fix}")
    if spec.get("kind") == "word" and isinstance(spec.get("vocab"), list):
        check_bark_vocab(spec["vocab"], str(path), BARK_TOKENIZER_FIX)
    try:
        return tokenizer_from_dict(spec)
    except BarkError as err:
        raise BarkError(f"{path}: {err}; {fix}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise BarkError(f"{path}: not a valid {spec.get('kind')!r} tokenizer ({type(err).__name__}: {err}); "
                        f"{fix}") from None

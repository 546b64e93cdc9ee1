"""BarkGPT tokenizers expressed as llama.cpp tokenizer metadata, so llama.cpp tokenizes identically.

Word vocabulary (bark) -> llama.cpp's unigram tokenizer (`tokenizer.ggml.model = "t5"`, UGM).
UGM normalizes text first: every run of spaces becomes one "▁" before the next word
(remove_extra_whitespaces + add_space_prefix + escape_whitespaces), then a Viterbi search over the
vocabulary. Storing each word as "▁word" makes the only segmentation of "▁w1▁w2..." the words
themselves, which is exactly BarkGPT's `text.split()`. Python's split() also breaks on tabs and
newlines, UGM only on ' ', so a tiny precompiled charsmap maps \\t \\n \\v \\f \\r to ' ' first.
Detokenizing turns "▁" back into ' ' and llama.cpp drops the leading one, giving " ".join(words).

Byte-level BPE (webtext, `BPETokenizer`) -> llama.cpp's `gpt2` tokenizer: tokens in GPT-2's
byte-to-unicode alphabet, merges derived from tiktoken's ranks (`BPETokenizer.merges()`),
pre-tokenizer "gpt-2" (llama.cpp's regex for it equals tiktoken's gpt2 pattern). The EOS
<|endoftext|> is a CONTROL token: BarkGPT encodes a literal "<|endoftext|>" in text as ordinary
text, which is what llama.cpp does with control tokens when parse_special is off.
"""
from __future__ import annotations

import struct

from barkgpt.errors import BarkError

SPACE = "\u2581"  # SentencePiece's escaped space; UGM writes it before every word
ASCII_SPACES = "\t\n\v\f\r"

# gguf TokenType values (llama.cpp LLAMA_TOKEN_TYPE_*)
NORMAL, UNKNOWN, CONTROL = 1, 2, 3

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'User: ' + message['content'] | trim + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant: ' + message['content'] | trim + ' <EOS> ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def whitespace_charsmap(chars: str = ASCII_SPACES) -> bytes:
    """A SentencePiece precompiled charsmap mapping each of `chars` (single bytes) to ' '.

    Layout llama.cpp reads: uint32 size of an XOR-compressed double array (XCDA), the array, then
    NUL-terminated replacement strings. Root BASE is 0, so byte c lands on node c; that node has
    LCHECK = c, the LEAF bit, and a BASE leading to a value node (256 + k) that holds the offset of
    the replacement (bit 31 set so no value node is ever mistaken for a child). The array spans 512
    entries so any follow-up byte XORed onto a value node index stays in bounds.
    """
    nodes = [0] * 512
    replacements = b" \0"
    for k, ch in enumerate(chars):
        c = ord(ch)
        if not 0 < c < 128:
            raise ValueError("only single-byte characters are supported")
        value_node = 256 + k
        nodes[c] = ((c ^ value_node) << 10) | (1 << 8) | c
        nodes[value_node] = (1 << 31) | 0  # replacement " " at offset 0
    blob = struct.pack(f"<{len(nodes)}I", *nodes)
    return struct.pack("<I", len(blob)) + blob + replacements


def add_tokenizer(writer, tok) -> None:
    """Write `tok` (a BarkGPT tokenizer) into a gguf.GGUFWriter as llama.cpp tokenizer metadata."""
    kind = getattr(tok, "kind", None)
    if kind == "word":
        _add_word_vocab(writer, tok)
    elif kind in ("bpe", "tiktoken"):  # a BPETokenizer, trained or tiktoken's
        _add_bpe_vocab(writer, tok)
    else:
        raise BarkError(f"tokenizer kind {kind!r} cannot be exported to GGUF (known: word, bpe)")
    writer.add_add_bos_token(False)  # BarkGPT never prepends a BOS token
    writer.add_add_eos_token(False)  # UGM appends EOS by default (T5); BarkGPT does not


def _add_word_vocab(writer, tok) -> None:
    for word in tok.vocab:
        if any(c.isspace() for c in word) or SPACE in word:
            raise BarkError(f"vocabulary word {word!r} contains whitespace; GGUF export needs single words")
    writer.add_tokenizer_model("t5")
    writer.add_token_list([SPACE + w for w in tok.vocab])
    writer.add_token_scores([0.0] * tok.vocab_size)  # segmentation is unique, scores never decide
    writer.add_token_types([NORMAL] * tok.vocab_size)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_pad_token_id(tok.pad_id)
    # BarkGPT refuses unknown words; llama.cpp must name some id for them: <PAD>, never trained on.
    writer.add_unk_token_id(tok.pad_id)
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(True)
    writer.add_precompiled_charsmap(whitespace_charsmap())
    writer.add_chat_template(CHAT_TEMPLATE)


def _add_bpe_vocab(writer, tok) -> None:
    from barkgpt.tokenizer import GPT2_PATTERN, bytes_to_unicode

    if tok.pattern != GPT2_PATTERN:
        raise BarkError("the BPE tokenizer's pre-tokenizer regex is not GPT-2's; llama.cpp's 'gpt-2' "
                        "pre-tokenizer would split text differently")
    ranks: dict[bytes, int] = tok.mergeable_ranks
    specials: dict[str, int] = dict(tok.special_tokens)
    byte_char = bytes_to_unicode()
    to_text = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731
    tokens: list[str | None] = [None] * tok.vocab_size
    types = [NORMAL] * tok.vocab_size
    for piece, rank in ranks.items():
        tokens[rank] = to_text(piece)
    for text, i in specials.items():
        tokens[i], types[i] = text, CONTROL
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise BarkError(f"BPE vocabulary has no token for ids {missing[:5]}; ranks must be dense")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{to_text(a)} {to_text(b)}" for a, b in tok.merges()])
    writer.add_eos_token_id(tok.eos_id)
    writer.add_bos_token_id(tok.eos_id)  # GPT-2 convention; add_bos_token stays False

"""The model and its PyTorch generation (barkgpt.lm.torch_lm): causality, cached decoding, sampling rules."""
import pytest
import torch

from barkgpt.errors import BarkError
from barkgpt.lm import Sampling, TextStream
from barkgpt.lm.torch_lm import TorchLM, sample_next
from barkgpt.model import GPT, KVCache, apply_rope, rope_tables
from barkgpt.params import ModelParams
from barkgpt.tokenizer import WordTokenizer

CFG = ModelParams(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32)
WORDS = WordTokenizer(("<PAD>", "<EOS>", *(f"w{i}" for i in range(48))))  # 50 ids, <EOS> = 1


def tiny_model(seed=0, cfg=CFG, vocab=50):
    torch.manual_seed(seed)
    return GPT(cfg, vocab).eval()


def tiny_lm(seed=0) -> TorchLM:
    return TorchLM(tiny_model(seed), WORDS)


def test_future_tokens_do_not_change_earlier_logits():
    model = tiny_model()
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])  # the changed positions do differ


def test_cached_decoding_matches_full_forward():
    model = tiny_model()
    x = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(CFG, batch=3)
        steps = [model(x[:, :7], cache=cache)]  # a prefill, then one token at a time,
        steps += [model(x[:, 7:9], cache=cache)]  # then a chunk with an existing cache
        steps += [model(x[:, t : t + 1], cache=cache) for t in range(9, 20)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_rope_rotates_adjacent_pairs_and_keeps_norms():
    cos, sin = rope_tables(8, 4, 10000.0)
    x = torch.randn(1, 1, 4, 8)
    out = apply_rope(x, cos, sin)
    assert torch.allclose(out[..., 0, :], x[..., 0, :])  # position 0: no rotation
    pair_norm = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    assert torch.allclose(pair_norm(out), pair_norm(x), atol=1e-6)
    # position 1, first pair, angle 1 rad: a plain 2-D rotation of (x0, x1)
    x0, x1 = x[0, 0, 1, 0], x[0, 0, 1, 1]
    c, s = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    assert torch.allclose(out[0, 0, 1, :2], torch.stack([x0 * c - x1 * s, x0 * s + x1 * c]), atol=1e-6)


def test_tied_embeddings_share_one_tensor():
    model = tiny_model()
    assert model.lm_head.weight is model.tok_emb.weight
    untied = tiny_model(cfg=CFG.model_copy(update={"tie_embeddings": False}))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_greedy_generation_equals_argmax_of_full_forward():
    lm = tiny_lm()
    prompt = [2, 3, 4]
    got = list(lm.generate(prompt, Sampling(temperature=0, max_new_tokens=8)))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] == WORDS.eos_id:
                break
    assert got == ids[3:]


def test_seeded_sampling_is_reproducible_and_batch_stops_at_eos():
    lm = tiny_lm()
    s = Sampling(temperature=1.0, max_new_tokens=10, seed=7)
    prompts = [[2, 3]] * 4 + [[4, 5, 6]] * 3  # two lengths: two batches
    a, b = lm.generate_batch(prompts, s), lm.generate_batch(prompts, s)
    assert a == b and len(a) == 7
    for row in a:
        assert WORDS.eos_id not in row[:-1]  # nothing after the first EOS


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, Sampling(top_k=2), gen)) for _ in range(200)}
    assert draws <= {0, 1} and len(draws) == 2
    # top_p=0.5: token 0 alone has p~0.64 >= 0.5, so it is the whole nucleus
    draws = {int(sample_next(logits, Sampling(top_p=0.5), gen)) for _ in range(100)}
    assert draws == {0}
    assert int(sample_next(logits, Sampling(temperature=0), gen)) == 0


def test_vanishing_temperature_and_top_p_are_greedy_not_a_crash():
    """1e-300 overflows logits / temperature and rounds to 0 in float32: both mean 'the most likely token'."""
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    assert Sampling(temperature=1e-300).greedy and not Sampling(temperature=1e-3).greedy
    assert int(sample_next(logits, Sampling(temperature=1e-300), gen)) == 1
    assert {int(sample_next(logits, Sampling(top_p=1e-300), gen)) for _ in range(20)} == {1}
    lm = tiny_lm()
    greedy = list(lm.generate([2, 3], Sampling(temperature=0, max_new_tokens=6)))
    assert list(lm.generate([2, 3], Sampling(temperature=1e-300, top_p=1e-300, max_new_tokens=6))) == greedy
    for bad in ({"temperature": -1.0}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_k": 0}):
        with pytest.raises(BarkError):
            Sampling(**bad)


def test_prompt_checks_are_clear_errors():
    lm = tiny_lm()
    with pytest.raises(BarkError, match="empty"):
        list(lm.generate([], Sampling()))
    with pytest.raises(BarkError, match="context is 32 tokens"):
        list(lm.generate([2] * 32, Sampling()))
    assert len(list(lm.generate([2] * 30, Sampling(temperature=0, max_new_tokens=50)))) <= 2  # the context ends it


class Bytes:
    """A byte-level tokenizer: id = byte, decoded as UTF-8 with replacement (as BPE decoders do)."""

    kind, vocab_size, eos_id = "bytes", 256, 0

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_decodes_split_utf8_and_inserts_nothing():
    tok = Bytes()
    text = "Café — naïve 🐕 dog"
    stream = TextStream(tok, tok.encode("A "))
    pieces = [stream.push(b) for b in tok.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces) and "" in pieces  # held back mid-character, never garbled
    words = TextStream(WORDS, WORDS.encode("w1 w2"))
    assert "".join(words.push(i) for i in WORDS.encode("w3 w4")) == " w3 w4"  # the word decoder's spaces
    cut = TextStream(tok, [65])
    assert [cut.push(b) for b in "é".encode()[:1]] == [""] and cut.flush() == "\ufffd"  # unfinished at the end

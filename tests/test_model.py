"""The model and the engine: causality, cached decoding, sampling rules."""
import torch

from barkgpt.engine import Sampling, generate_batch, sample_next, stream
from barkgpt.model import GPT, KVCache, apply_rope, rope_tables
from barkgpt.params import ModelParams

CFG = ModelParams(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=32)


def tiny_model(seed=0, cfg=CFG, vocab=50):
    torch.manual_seed(seed)
    return GPT(cfg, vocab).eval()


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


def test_greedy_stream_equals_argmax_of_full_forward():
    model = tiny_model()
    prompt = [1, 2, 3]
    got = list(stream(model, prompt, Sampling(temperature=0, max_new_tokens=8), eos_id=None))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[3:]


def test_seeded_sampling_is_reproducible_and_batch_stops_at_eos():
    model = tiny_model()
    s = Sampling(temperature=1.0, max_new_tokens=10, seed=7)
    a = generate_batch(model, [[1, 2]] * 4, s, eos_id=5)
    b = generate_batch(model, [[1, 2]] * 4, s, eos_id=5)
    assert a == b
    for row in a:
        assert 5 not in row[:-1]  # nothing after the first EOS


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, Sampling(top_k=2), gen)) for _ in range(200)}
    assert draws <= {0, 1} and len(draws) == 2
    # top_p=0.5: token 0 alone has p~0.64 >= 0.5, so it is the whole nucleus
    draws = {int(sample_next(logits, Sampling(top_p=0.5), gen)) for _ in range(100)}
    assert draws == {0}
    assert int(sample_next(logits, Sampling(temperature=0), gen)) == 0

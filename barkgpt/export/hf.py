"""A Hugging Face `LlamaForCausalLM` folder: model.safetensors, config.json, tokenizer files.

Written with `safetensors` and `tokenizers` only (no transformers import in the pipeline), and
loadable by transformers' AutoModelForCausalLM / AutoTokenizer.

Rotary layout: BarkGPT rotates adjacent pairs (x[2i], x[2i+1]); HF's Llama rotates halves
(x[i], x[i + d/2]) ("rotate_half"). Reordering each head's q and k output rows so that row (i, j)
-> (j, i) for the (pairs, 2) grid makes HF's halves hold exactly our pairs: the inverse of the
permutation convert_hf_to_gguf.py applies when going from HF to llama.cpp.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from barkgpt.export.vocab import CHAT_TEMPLATE
from barkgpt.fileio import atomic_path, write_json


def to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads*hd, in) weights from adjacent-pair to rotate-half row order."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.kv_heads
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[p + "attn.wqkv.weight"].split([nh * hd, nkv * hd, nkv * hd], dim=0)
        gate, up = sd[p + "ffn.w13.weight"].split(cfg.hidden_dim, dim=0)
        out |= {
            h + "input_layernorm.weight": sd[p + "attn_norm.weight"],
            h + "self_attn.q_proj.weight": to_rotate_half(q, nh),
            h + "self_attn.k_proj.weight": to_rotate_half(k, nkv),
            h + "self_attn.v_proj.weight": v,
            h + "self_attn.o_proj.weight": sd[p + "attn.wo.weight"],
            h + "post_attention_layernorm.weight": sd[p + "ffn_norm.weight"],
            h + "mlp.gate_proj.weight": gate,
            h + "mlp.up_proj.weight": up,
            h + "mlp.down_proj.weight": sd[p + "ffn.w2.weight"],
        }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(model, tok) -> dict:
    cfg = model.cfg
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": tok.eos_id,
        "pad_token_id": getattr(tok, "pad_id", None),
        "use_cache": True,
    }


def hf_tokenizer(tok):
    """A `tokenizers.Tokenizer` that encodes and decodes exactly like `tok`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if getattr(tok, "kind", None) == "word":
        # no unk token: an unknown word is an error, as in BarkGPT
        t = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(tok.vocab)}, unk_token="<UNK>"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        specials = [tok.vocab[tok.eos_id], tok.vocab[tok.pad_id]]
    else:
        from barkgpt.tokenizer import GPT2_PATTERN, bytes_to_unicode

        byte_char = bytes_to_unicode()
        text = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731
        vocab = {text(piece): rank for piece, rank in tok.mergeable_ranks.items()}
        merges = [(text(a), text(b)) for a, b in tok.merges()]
        t = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        t.decoder = decoders.ByteLevel()
        specials = list(tok.special_tokens)
        for s, i in tok.special_tokens.items():
            vocab[s] = i
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return t


def write_hf(model, tok, folder: Path) -> Path:
    """Write the HF folder; each file atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(hf_state_dict(model), str(tmp), metadata={"format": "pt"})
    write_json(folder / "config.json", hf_config(model, tok))
    eos = _token_text(tok, tok.eos_id)
    write_json(folder / "generation_config.json", {
        "eos_token_id": tok.eos_id, "pad_token_id": getattr(tok, "pad_id", tok.eos_id),
        "bos_token_id": None, "do_sample": False,
    })
    with atomic_path(folder / "tokenizer.json") as tmp:
        hf_tokenizer(tok).save(str(tmp))
    pad = _token_text(tok, getattr(tok, "pad_id", tok.eos_id))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": pad,
        "bos_token": None,
        "unk_token": None,
        "model_max_length": model.cfg.block_size,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    if getattr(tok, "kind", None) == "word":
        config["chat_template"] = CHAT_TEMPLATE
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", {"eos_token": eos, "pad_token": pad})
    return folder


def _token_text(tok, i: int) -> str:
    if getattr(tok, "kind", None) == "word":
        return tok.vocab[i]
    return {v: k for k, v in tok.special_tokens.items()}[i]


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())

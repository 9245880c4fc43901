"""Tiny llama-architecture GGUF models, written by the test suite itself.

A byte-level BPE tokenizer (256 byte tokens, merges for " A".." Z" so option letters are single tokens,
ChatML control tokens) and a few transformer blocks of random weights: small enough that llama.cpp and
MLX load and run it in milliseconds, real enough that both engines go through their normal code paths.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the tiny byte-level BPE."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_tokens = [_bytes_to_unicode()[b] for b in range(256)]
    space = _bytes_to_unicode()[ord(" ")]
    merged = [space + c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"] + ["An", "Ans", "Answ", "Answe", "Answer"]
    merges = [f"{space} {c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"] + ["A n", "An s", "Ans w", "Answ e", "Answe r"]
    tokens = specials + byte_tokens + merged
    types = [gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (len(tokens) - len(specials))
    return tokens, [int(t) for t in types], merges


def write_tiny_gguf(path: Path, *, n_layer: int = 2, dim: int = 64, n_head: int = 4, n_head_kv: int = 2,
                    n_ff: int = 128, n_ctx: int = 2048, qtype: str = "F32", seed: int = 0,
                    arch: str = "llama", chat_template: str | None = CHATML, tied: bool = True) -> Path:
    """Write a tiny llama GGUF with random weights. `qtype` is a GGML type name for the 2-D block weights."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = tokenizer_vocab()
    n_vocab = len(tokens)
    qt = gguf.GGMLQuantizationType[qtype]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test-model")
    w.add_context_length(n_ctx)
    w.add_embedding_length(dim)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(dim // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32) if qtype == "F32" else int(gguf.LlamaFileType[f"MOSTLY_{qtype}"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def add(name: str, arr: np.ndarray, quantize: bool) -> None:
        arr = arr.astype(np.float32)
        if quantize and qt != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, arr)

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0, 1 / np.sqrt(cols), size=(rows, cols))

    head_dim = dim // n_head
    add("token_embd.weight", rng.normal(0, 0.1, size=(n_vocab, dim)), True)  # tied: logits stay soft
    for i in range(n_layer):
        add(f"blk.{i}.attn_norm.weight", np.ones(dim), False)
        add(f"blk.{i}.attn_q.weight", mat(dim, dim), True)
        add(f"blk.{i}.attn_k.weight", mat(n_head_kv * head_dim, dim), True)
        add(f"blk.{i}.attn_v.weight", mat(n_head_kv * head_dim, dim), True)
        add(f"blk.{i}.attn_output.weight", mat(dim, dim), True)
        add(f"blk.{i}.ffn_norm.weight", np.ones(dim), False)
        add(f"blk.{i}.ffn_gate.weight", mat(n_ff, dim), True)
        add(f"blk.{i}.ffn_up.weight", mat(n_ff, dim), True)
        add(f"blk.{i}.ffn_down.weight", mat(dim, n_ff), True)
    add("output_norm.weight", np.ones(dim), False)
    if not tied:
        add("output.weight", mat(n_vocab, dim), True)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)

"""Tiny GGUF models of each trainable family (llama, qwen2, qwen3, gemma3), written by the test suite itself.

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
                    arch: str = "llama", chat_template: str | None = CHATML, tied: bool = True,
                    head_dim: int | None = None, rope_freqs: bool = False, peaked: bool = False,
                    sliding_window: int = 6, sliding_window_pattern: int = 2, rope_dims: int | None = None,
                    add_bos: bool = False) -> Path:
    """Write a tiny GGUF of one family with random weights, laid out as llama.cpp's converter writes it.

    `arch`: llama (Q/K rows as the converter permutes them; `rope_freqs` adds llama 3's per-frequency
    factors), qwen2 (q/k/v biases), qwen3 (per-head q/k norms, explicit head size), gemma3 (q/k norms,
    post-attention and post-FFN norms, norms stored as 1 + w, sliding-window layers every
    `sliding_window_pattern` with their own rope base), or any other name (an unsupported architecture).
    `qtype` is a GGML type name for the 2-D block weights. `peaked`: norms near 1 and embeddings large
    enough that the next-token distribution has a clear top-1 (so top-1 agreement means something).
    """
    rng = np.random.default_rng(seed)
    tokens, types, merges = tokenizer_vocab()
    n_vocab = len(tokens)
    qt = gguf.GGMLQuantizationType[qtype]
    head_dim = head_dim or dim // n_head

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-test-{arch}")
    w.add_context_length(n_ctx)
    w.add_embedding_length(dim)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(rope_dims or head_dim)  # less than head_dim: partial rotary
    w.add_layer_norm_rms_eps(1e-6 if arch == "gemma3" else 1e-5)
    if arch in ("qwen3", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_rope_freq_base(1_000_000.0)  # global layers
        w.add_float32(f"{arch}.rope.freq_base_swa", 10_000.0)
        w.add_sliding_window(sliding_window)
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", sliding_window_pattern)
    else:
        w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32) if qtype == "F32" else int(gguf.LlamaFileType[f"MOSTLY_{qtype}"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(add_bos)
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

    def norm(n: int) -> np.ndarray:
        # gemma's converter stores 1 + w; llama.cpp multiplies by the stored value in every family
        return rng.normal(1.0, 0.1, size=n) if peaked else np.ones(n)

    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    # tied: 0.1-scale embeddings keep logits soft; peaked: logits with a standard deviation of ~4
    add("token_embd.weight", rng.normal(0, 4 / np.sqrt(dim) if peaked else 0.1, size=(n_vocab, dim)), True)
    if rope_freqs:  # llama 3: one factor per rotary pair, llama.cpp divides each frequency by it
        add("rope_freqs.weight", rng.uniform(1.0, 8.0, size=head_dim // 2), False)
    for i in range(n_layer):
        add(f"blk.{i}.attn_norm.weight", norm(dim), False)
        add(f"blk.{i}.attn_q.weight", mat(q_dim, dim), True)
        add(f"blk.{i}.attn_k.weight", mat(kv_dim, dim), True)
        add(f"blk.{i}.attn_v.weight", mat(kv_dim, dim), True)
        if arch == "qwen2":
            for k, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                add(f"blk.{i}.attn_{k}.bias", rng.normal(0, 0.5, size=n), False)
        if arch in ("qwen3", "gemma3"):
            add(f"blk.{i}.attn_q_norm.weight", norm(head_dim), False)
            add(f"blk.{i}.attn_k_norm.weight", norm(head_dim), False)
        add(f"blk.{i}.attn_output.weight", mat(dim, q_dim), True)
        if arch == "gemma3":
            add(f"blk.{i}.post_attention_norm.weight", norm(dim), False)
        add(f"blk.{i}.ffn_norm.weight", norm(dim), False)
        add(f"blk.{i}.ffn_gate.weight", mat(n_ff, dim), True)
        add(f"blk.{i}.ffn_up.weight", mat(n_ff, dim), True)
        add(f"blk.{i}.ffn_down.weight", mat(dim, n_ff), True)
        if arch == "gemma3":
            add(f"blk.{i}.post_ffw_norm.weight", norm(dim), False)
    add("output_norm.weight", norm(dim), False)
    if not tied:
        add("output.weight", mat(n_vocab, dim), True)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def quantize_with_llama_cpp(src: Path, dst: Path, ftype: str) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (`ftype`: Q4_K_M, Q5_K_M, ...), as users' files are made."""
    from semievol_local.engines.quantizer import quantize

    quantize(src, dst, ftype)
    return Path(dst)

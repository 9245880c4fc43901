"""The toy training set the MLX tests memorize: chat-formatted questions, each with a fixed option letter,
tokenized by llama.cpp (as the toolkit tokenizes), and the small training settings that learn it."""
from __future__ import annotations

from semievol_local.core.config import TrainConfig

CHAT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\nAnswer:"


def tokenizer(model_path):
    import llama_cpp

    tok = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    return lambda text: tok.tokenize(text.encode(), add_bos=False, special=True)


def toy_examples(model_path, question: str = "Question {i}?", n: int = 8) -> list[tuple[list[int], list[int]]]:
    """n (prompt ids, answer ids) pairs: question i is answered with letter "ABCD"[i % 4]."""
    tok = tokenizer(model_path)
    return [(tok(CHAT.format(q=question.format(i=i))), tok(" " + "ABCD"[i % 4] + "<|im_end|>")) for i in range(n)]


def toy_cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-3, epochs=8, batch_size=4, warmup=0.1, save_every=100, val_fraction=0.0, max_seq_len=64)
    return TrainConfig(**{**base, **kw})

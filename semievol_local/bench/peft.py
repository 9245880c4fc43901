"""The peer's training speed: PyTorch + PEFT LoRA on the same shape as `train.bench_train`.

Run by `semievol bench train --peft-python PYTHON` in a separate Python environment that has torch,
transformers and peft (never dependencies of this package), as a plain script:

    PYTHON peft.py '<json>'

The json carries the model's shape (read from the GGUF by the caller) and the benchmark's (batch, sequence
length, steps, LoRA rank/scale/blocks, threads, seed). The model is a Hugging Face `LlamaForCausalLM` of
that shape with seeded random weights: the step's arithmetic does not depend on the weights' values.
LoRA on the same projections of the same last blocks, AdamW, loss on the last `answer_len` tokens,
float32, `threads` intra-op threads. Prints one json line: the median tokens/s of the timed steps.
This file imports nothing from semievol_local.
"""
from __future__ import annotations

import json
import statistics
import sys
import time


def main(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    m = spec["model"]
    hf = LlamaConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
                     intermediate_size=m["intermediate_size"], num_hidden_layers=m["num_hidden_layers"],
                     num_attention_heads=m["num_attention_heads"], num_key_value_heads=m["num_key_value_heads"],
                     rms_norm_eps=m["rms_norm_eps"], rope_theta=m["rope_theta"],
                     tie_word_embeddings=m["tie_word_embeddings"], max_position_embeddings=4 * spec["seq_len"],
                     attn_implementation="sdpa")
    model = LlamaForCausalLM(hf).float()
    n_layers = m["num_hidden_layers"]
    lora_blocks = n_layers if spec["num_layers"] < 0 else min(spec["num_layers"], n_layers)
    lcfg = LoraConfig(r=spec["rank"], lora_alpha=spec["scale"] * spec["rank"], lora_dropout=0.0,
                      target_modules=spec["keys"], layers_to_transform=list(range(n_layers - lora_blocks, n_layers)),
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(spec["seed"])
    b, L, a = spec["batch_size"], spec["seq_len"], spec["answer_len"]
    speeds = []
    for _ in range(spec["steps"] + spec["skip_steps"]):
        toks = torch.randint(0, m["vocab_size"], (b, L + 1), generator=g)
        labels = toks[:, 1:].clone()
        labels[:, : L - a] = -100  # loss on the last answer_len tokens only
        tic = time.perf_counter()
        logits = model(input_ids=toks[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        speeds.append(b * L / (time.perf_counter() - tic))
    timed = speeds[spec["skip_steps"]:]
    return {"tokens_per_s": statistics.median(timed), "steps_timed": len(timed), "torch": torch.__version__,
            "peft": __import__("peft").__version__, "transformers": __import__("transformers").__version__,
            "threads": torch.get_num_threads(), "lora_blocks": lora_blocks,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))

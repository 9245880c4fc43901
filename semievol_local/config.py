"""Configuration, declared once: each option is a dataclass field with its default and its help text.

The CLI builds its options from these fields (see `cli.options_from`), so a flag cannot drift from the
value that reaches the code. Library functions take these objects; they never read flags themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields


def opt(default, help: str, **extra):
    """A dataclass field that is also a CLI option (`help` becomes the flag's help text)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class EngineConfig:
    """How llama.cpp runs a model."""

    n_ctx: int = opt(2048, "Context window in tokens for llama.cpp (0: the model's own).")
    n_threads: int = opt(0, "CPU threads for llama.cpp (0: one per physical core).")
    n_gpu_layers: int = opt(-1, "Layers to offload to a GPU when llama.cpp was built with one (-1: all).")
    adapter_scale: float = opt(1.0, "Scale applied to a LoRA adapter in llama.cpp.")


@dataclass
class TrainConfig:
    """LoRA fine-tuning with MLX (owned by mlx_engine)."""

    rank: int = opt(8, "LoRA rank.")
    scale: float = opt(20.0, "LoRA scale (mlx-lm's `scale`; the GGUF adapter gets alpha = scale x rank).")
    dropout: float = opt(0.0, "LoRA dropout.")
    num_layers: int = opt(16, "How many of the last transformer blocks get LoRA (-1, or more than the model has: "
                          "all). The blocks below run once per sequence, not every step: SmolLM2 on fpb, 16 of 30 "
                          "blocks train 2x faster than all 30 (test accuracy 0.918 vs 0.927; 8 blocks: 0.896).")
    keys: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    "Comma-separated projections that get LoRA.")
    lr: float = opt(3e-4, "Peak learning rate (linear warm-up, then cosine decay).")
    warmup: float = opt(0.1, "Warm-up as a fraction of all optimizer steps.")
    epochs: float = opt(3.0, "Passes over the training data.")
    batch_size: int = opt(8, "Sequences per batch.")
    grad_accum: int = opt(1, "Batches per optimizer step.")
    max_seq_len: int = opt(512, "Longest training sequence in tokens (longer ones are cut from the left).")
    val_fraction: float = opt(0.1, "Fraction of the training rows held out for validation loss "
                              "(used when no validation set is given).")
    weight_decay: float = opt(0.0, "AdamW weight decay on the LoRA weights (0: plain Adam).")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0: no clipping); without it lr 5e-4 spikes on fpb.")
    grad_checkpoint: bool = opt(False, "Recompute each block's activations in the backward pass: the same "
                                "adapter with far less memory (SmolLM2 on fpb: peak 3.4 -> 1.9 GB), steps ~1.3x slower.")
    save_every: int = opt(50, "Write a resumable checkpoint (and the adapter so far) every N optimizer steps.")
    seed: int = opt(0, "Random seed for initialization, data order and dropout.", flag="--train-seed")


@dataclass
class RunConfig:
    """The SemiEvol pipeline (`semievol run`)."""

    mode: str = opt("auto", "score (option distributions), sample (the paper's generative recipe), or auto.")
    learners: int = opt(4, "Learners that answer each unlabeled question (n).")
    k: int = opt(3, "Labeled neighbours retrieved per unlabeled question (demonstrations).")
    theta: float = opt(50.0, "Keep pseudo-labels whose entropy is at or below this percentile (0-100).")
    rounds: int = opt(1, "Evolution rounds: labeled + selected become the next round's labeled set.")
    seed: int = opt(0, "Seed for learner configurations and sampling.")
    embedding: str = opt("model", "Retrieval embeddings: model (pooled hidden states, llama.cpp) or tfidf.")
    iwp: bool = opt(True, "In-weight propagation: learners may use the warm adapter.", flag="--iwp/--no-iwp")
    icp: bool = opt(True, "In-context propagation: retrieved demonstrations.", flag="--icp/--no-icp")
    cl: bool = opt(True, "Collaborative learning: n learners + self-justification.", flag="--cl/--no-cl")
    adaptive_selection: bool = opt(True, "Adaptive selection by entropy.", flag="--as/--no-as")
    threshold: str = opt("global", "Entropy percentile over all pseudo-labels (global: the paper's Eq. 7) or per "
                         "pseudo-label class (per-class: no class is dropped whole); open answers use global.")
    justified_only: bool = opt(False, "Apply the entropy threshold to self-justified pseudo-labels only (official code).")
    final_from_warm: bool = opt(False, "Final fine-tune continues the warm adapter on the selected only (official code).")
    final_lr: float = opt(0.0, "Peak lr of the final fine-tune (0: --lr); the official code continues M_warm at 1e-6.")
    final_epochs: float = opt(0.0, "Epochs of the final fine-tune (0: --epochs).")
    temperature: float = opt(1.0, "Sampling temperature of the learners in sample mode.")
    max_tokens: int = opt(256, "Longest learner response in sample mode.")
    limit_unlabeled: int = opt(0, "Use only the first N unlabeled questions (0: all).")
    limit_test: int = opt(0, "Evaluate on only the first N test questions (0: all).")


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]

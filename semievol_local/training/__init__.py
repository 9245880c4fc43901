"""LoRA training with MLX on a GGUF file's own weights: the optimized BLAS loaded before MLX (`blas`), the
loader that builds mlx-lm's model from the GGUF (`gguf_loader`, with the CPU fast paths of `mlx_fast`),
LoRA layers (`lora`), padded batches (`batching`), the frozen blocks' outputs computed once (`frozen`), the
training loop (`mlx_engine`), checkpoints (`checkpoint`), data-parallel training (`collectives`,
`distributed`), the FLOPs a step needs (`train_flops`), and the llama.cpp parity gate an adapter passes
before it is used (`parity`).

This package may import `core` and nothing else of semievol_local (the parity gate loads llama.cpp
itself). The optimized BLAS must be loaded before `mlx.core` is first imported anywhere in a process
(`blas` says why): importing this package loads it, and Python imports a package before any of its modules,
so every module here imports MLX freely; code elsewhere that imports MLX imports this package first.
"""
from .blas import ensure_fast_blas

ensure_fast_blas()


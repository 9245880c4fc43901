"""Benchmarks that print figures: the paper's tables at laptop scale and the other runners that run the
pipeline (`runners`), collaboration through llama-servers (`servers`), one whole run rated stage by stage
against this machine's float32 GEMM (`whole_run`), training speed (`train`, with PyTorch + PEFT as the peer
in `peft`, and `step_profile`), random-weight models of the sizes users bring (`synthetic`), and results as
JSON, tables and the README's summary (`results`).

This package may import `core`, `engines`, `training` and `method`; only `cli` imports it.
"""

"""Inference with llama.cpp: the `InferenceEngine` Protocol every stage types against, and the loader that
picks its implementation (`protocol`); llama.cpp in this process (`llama_engine`); which weights it computes
with, the file or its float32 copy (`weights`); and a fleet of llama-servers behind the same operations
(`server_engine`), each server reached over HTTP by `server_client` and built or started by `llama_server`.

This package may import `core` and nothing else of semievol_local; `training` and `engines` never import
each other, so the two engines meet only in `method`. What the code relies on about llama.cpp:
docs/engines.md.
"""

"""semievol-local: SemiEvol semi-supervised fine-tuning for GGUF models, MLX for training, llama.cpp for inference."""

__version__ = "0.1.0"

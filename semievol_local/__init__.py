"""semievol-local: SemiEvol semi-supervised fine-tuning for GGUF models, MLX for training, llama.cpp for inference.

The packages, from the ground up (each imports only those above it in this list):

- `core`: errors, files, configuration, tasks, prompts, the pure NumPy cores, the run folder, GGUF formats;
- `engines`: inference with llama.cpp, in this process or through llama-servers;
- `training`: LoRA training with MLX on the GGUF's own weights;
- `method`: SemiEvol's recipe and its stages, prediction, the run's estimate, report, models and export;
- `bench`: benchmarks that print figures, and the published results;
- `cli`: the `semievol` command and all terminal drawing.

`engines` and `training` never import each other.
"""

__version__ = "0.1.0"

"""Files into modules: safetensors checkpoints (key prefixes, dtype policy), the part loader, GGUF files, LoRA
formats, text-encoder roles, and tiny checkpoints in the official layouts for tests and benchmarks."""

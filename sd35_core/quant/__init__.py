"""Quantized tensors (GGUF block formats): the types, their dequantization, and the tensor wrapper the ops
materialise."""

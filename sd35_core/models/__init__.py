"""The networks, with their configs derived from tensor shapes: MMDiT-X, VAE, CLIP, T5 and the ControlNet; the SD3
latent format, the linear/conv ops that dequantize and patch at compute time, and the non-finite guard."""

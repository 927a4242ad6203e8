"""Stable Diffusion 3 / 3.5 model stack: pure torch, no ComfyUI imports."""

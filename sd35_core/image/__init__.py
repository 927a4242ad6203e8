"""Pixels before they reach the VAE: ControlNet image preparation, the canny/blur/depth preprocessors and fitting an
image into a frame."""

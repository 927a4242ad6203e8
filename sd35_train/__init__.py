"""Training the tiny shapes model: a small SD3.5-Medium-shaped model trained here on procedurally drawn shapes.

Stages (see :mod:`.recipe`): tokenizers, the 16-channel VAE, the MMDiT-X with rectified flow, a canny
ControlNet with the base frozen. ``python -m sd35_train`` runs the whole recipe from its seed.
"""

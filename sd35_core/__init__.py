"""Stable Diffusion 3 / 3.5 model stack: pure torch, no ComfyUI imports.

The folders follow a prompt to a picture; a module imports only from its own folder and the layers below it::

    text/       prompt -> tokens -> CLIP-L, CLIP-G and T5 states (tokenization, SD3TextEncoder)
    sampling/   SampleRequest -> schedule -> sampler -> guider (CFG, SLG, ControlNet, IP-Adapter, masks, step cache)
                -> model passes -> pipeline (txt2img, img2img); per-variant defaults
    image/      pixels in: control-image preparation, canny/blur/depth preprocessors, fitting to a frame, SigLIP input
    loading/    files -> modules: checkpoint files, the loader, GGUF, LoRA, text-encoder roles, IP-Adapter and SigLIP
                files, tiny test models
    models/     the networks: MMDiT-X, VAE, CLIP, T5, the ControlNet, SigLIP and the IP-Adapter; latent format, ops,
                the non-finite guard
    quant/      quantized tensors (GGUF block formats) that ops dequantize at compute time
    errors.py, validation.py   the exceptions and the setting checks every layer may use

``text``, ``sampling``, ``image`` and ``loading`` sit side by side on ``models`` and never import each other.
Nothing here reads the environment or knows ComfyUI's folders: callers pass explicit paths.
"""

"""Compute one image with the plain sd35_core pipeline (no ComfyUI, no nodes) and save it as .npy.

Run by the host test with the same Python (and torch) as the ComfyUI server, so the comparison is exact:

    python pipeline_reference.py settings.json out.npy

``settings.json`` names the model files, the prompts and the sampler settings. The image is converted to
8 bits exactly as ComfyUI's SaveImage does (``clip(255 * x)`` then truncation).
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(settings_path: str, out_path: str) -> None:
    sys.path.insert(0, ROOT)
    import numpy as np
    import torch

    from sd35_core.loading.loader import load_checkpoint, load_text_encoder
    from sd35_core.models.vae import vae_output_to_image
    from sd35_core.sampling.guidance import CondEntry
    from sd35_core.sampling.pipeline import txt2img
    from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance
    from sd35_core.text.encoder import SD3TextEncoder
    from sd35_core.text.tokenization import SD3Tokenizer, find_tokenizer_files

    s = json.load(open(settings_path))
    parts = load_checkpoint(s["checkpoint"], "fp32", "cpu")
    enc = {role: load_text_encoder(path, role, "fp32", "cpu") for role, path in s["text_encoders"].items()}
    root = s["comfyui_path"]
    comfy = os.path.join(root, "comfy")
    tokenizer = SD3Tokenizer.from_files(*find_tokenizer_files(os.path.join(comfy, "sd1_tokenizer"),
                                                              os.path.join(comfy, "text_encoders", "t5_tokenizer")))
    text = SD3TextEncoder(enc["clip_l"], enc["clip_g"], enc.get("t5xxl"), tokenizer, "cpu")
    positive = CondEntry(*text.encode(s["prompt"]))
    negative = CondEntry(*text.encode(s["negative"]))
    slg = None
    if s["slg_scale"] > 0:
        slg = SkipLayerGuidance(layers=tuple(s["slg_layers"]), scale=s["slg_scale"], start=s["slg_start"],
                                end=s["slg_end"], window=s["slg_window"])
    with torch.inference_mode():
        request = SampleRequest(steps=s["steps"], cfg=s["cfg"], sampler=s["sampler"], shift=s["shift"],
                                seed=s["seed"], schedule=s["schedule"], slg=slg, skip_uncond_at_cfg1=True)
        latent = txt2img(parts.model.mmdit, positive, negative, request, width=s["width"], height=s["height"])
        image = vae_output_to_image(parts.vae.decode(latent))[0]
    np.save(out_path, np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

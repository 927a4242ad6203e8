"""The IP-Adapter workflow: SD3.5 Large prompted with a picture through InstantX's IP-Adapter."""

from __future__ import annotations

from .graph import Workflow
from .inputs import CLIP_VISION_NAME, IMAGE_NAME, IP_ADAPTER_NAME, IP_ADAPTER_REPO, IP_PROMPT
from .layout import GROUP_COLORS, HEIGHTS, Column
from .node_blocks import add_decode_save, add_image_size, add_loaders, add_prompts, add_readme_note, add_sampler
from .notes import readme_text
from .pack import defaults_table

IP_WEIGHT = 0.5  # InstantX's suggested scale


def ip_adapter(name: str, title: str) -> Workflow:
    """SD3.5 Large with SD3.5 Apply IP-Adapter between the checkpoint and the sampler."""
    variant = "sd3.5_large"
    d = defaults_table()[variant]
    wf = Workflow(name)
    extra = (f"IP-Adapter files: models/ipadapter/{IP_ADAPTER_NAME} (from {IP_ADAPTER_REPO}; read as tensors only, "
             "or convert it once with `sd35 convert-ip-adapter`) and models/clip_vision/"
             f"{CLIP_VISION_NAME} (SigLIP so400m-patch14-384; ComfyUI's own download of it works). Put the picture "
             f"to prompt with in ComfyUI's input folder and pick it in Load style picture (the workflow names "
             f"{IMAGE_NAME}). Weight {IP_WEIGHT} as InstantX suggests; higher follows the picture more closely. "
             "Chain another SD3.5 Apply IP-Adapter to add a second picture. The negative side gets no picture, and "
             "skip-layer guidance's pass the positive's, as it should.")
    source = Column(wf, 0, 360)
    image = source.add("LoadImage", HEIGHTS["LoadImage"], title="Load style picture", image=IMAGE_NAME,
                       upload="image")
    models = source.next(360)
    note = add_readme_note(models, readme_text(title, variant, d, extra=extra))
    ckpt, clip = add_loaders(models, variant)
    adapter = models.add("SD35IPAdapterLoader", HEIGHTS["SD35IPAdapterLoader"], title="Load IP-Adapter",
                         ipadapter_name=IP_ADAPTER_NAME, weight_dtype="default")
    vision = models.add("SD35CLIPVisionLoader", HEIGHTS["SD35CLIPVisionLoader"], title="Load vision tower",
                        clip_name=CLIP_VISION_NAME, weight_dtype="default")
    prompt = models.next(380)
    pos, neg = add_prompts(prompt, clip, IP_PROMPT)
    latent = add_image_size(prompt, ckpt)
    sample = prompt.next(340)
    apply = sample.add("SD35ApplyIPAdapter", HEIGHTS["SD35ApplyIPAdapter"], title="Apply IP-Adapter",
                       weight=IP_WEIGHT, start_percent=0.0, end_percent=1.0)
    for source_node, out, inp in ((ckpt, "model", "model"), (adapter, "ip_adapter", "ip_adapter"),
                                  (vision, "clip_vision", "clip_vision"), (image, "IMAGE", "image")):
        wf.connect(source_node, out, apply, inp)
    sampler = add_sampler(sample, d, {"model": (apply, "model"), "positive": (pos, "conditioning"),
                                      "negative": (neg, "conditioning"), "latent": (latent, "latent")})
    decode, save = add_decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Style picture", GROUP_COLORS["image"], [image])
    wf.group("Models", GROUP_COLORS["models"], [note, ckpt, clip, adapter, vision])
    wf.group("Prompt and size", GROUP_COLORS["prompt"], [pos, neg, latent])
    wf.group("IP-Adapter and sampler", GROUP_COLORS["sample"], [apply, sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf

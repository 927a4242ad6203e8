"""Image-to-image workflows: img2img from a whole picture, inpainting and outpainting from a masked one."""

from __future__ import annotations

from .graph import Workflow
from .inputs import IMAGE_NAME, INPAINT_PROMPT, OUTPAINT_PROMPT, PROMPT
from .layout import GROUP_COLORS, HEIGHTS, Column
from .node_blocks import add_decode_save, add_loaders, add_prompts, add_readme_note, add_sampler
from .notes import readme_text
from .pack import defaults_table


def img2img(name: str, variant: str, title: str) -> Workflow:
    """Image to image: a loaded picture, scaled to 1024x1024 and encoded, sampled at denoise 0.8."""
    d = defaults_table()[variant]
    wf = Workflow(name)
    extra = (f"Image: put your picture in ComfyUI's input folder and pick it in Load image (the workflow names "
             f"{IMAGE_NAME}), or drop it on the node. It is scaled to 1024x1024 (centre crop) and encoded; denoise "
             "0.8 (the reference's default) keeps the composition, lower keeps more of the picture.")
    source = Column(wf, 0, 360)
    image = source.add("LoadImage", HEIGHTS["LoadImage"], title="Load image", image=IMAGE_NAME, upload="image")
    scale = source.add("ImageScale", HEIGHTS["ImageScale"], title="Scale to 1024x1024", upscale_method="lanczos",
                       width=1024, height=1024, crop="center")
    encode = source.add("SD35VAEEncode", HEIGHTS["SD35VAEEncode"], title="Encode image")
    models = source.next(360)
    note = add_readme_note(models, readme_text(title, variant, d, extra=extra))
    ckpt, clip = add_loaders(models, variant)
    wf.connect(image, "IMAGE", scale, "image")
    wf.connect(scale, "IMAGE", encode, "pixels")
    wf.connect(ckpt, "vae", encode, "vae")
    prompt = models.next(380)
    pos, neg = add_prompts(prompt, clip, PROMPT)
    sample = prompt.next(340)
    sampler = add_sampler(sample, d, {"model": (ckpt, "model"), "positive": (pos, "conditioning"),
                                      "negative": (neg, "conditioning"), "latent": (encode, "latent")}, denoise=0.8)
    decode, save = add_decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Input image", GROUP_COLORS["image"], [image, scale, encode])
    wf.group("Models", GROUP_COLORS["models"], [note, ckpt, clip])
    wf.group("Prompt", GROUP_COLORS["prompt"], [pos, neg])
    wf.group("Sample", GROUP_COLORS["sample"], [sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf


def masked_repaint(name: str, variant: str, title: str, *, outpaint: bool) -> Workflow:
    """Inpainting (the mask painted on Load image) or outpainting (Pad image for outpainting's mask)."""
    d = defaults_table()[variant]
    wf = Workflow(name)
    if outpaint:
        extra = (f"Image: put your picture in ComfyUI's input folder and pick it in Load image (the workflow names "
                 f"{IMAGE_NAME}). Pad image for outpainting adds the new canvas (here 256 pixels on the right; "
                 "left, top, right and bottom are in steps of 8) and a mask over it that fades into the picture "
                 "over the feathering width. SD3.5 VAE Encode (for Inpainting) greys the new part, grows the "
                 "mask by 8 pixels and attaches it to the latent; the sampler paints the new part from noise "
                 "(denoise 1) and keeps the picture. Keep the padded size near one megapixel.")
    else:
        extra = (f"Image and mask: put your picture in ComfyUI's input folder and pick it in Load image (the workflow "
                 f"names {IMAGE_NAME}); then right-click the node, Open in MaskEditor, paint over what should be "
                 "repainted and save. An image with transparency works the same way (transparent = repaint). "
                 "SD3.5 VAE Encode (for Inpainting) greys the masked part, grows the mask by 6 pixels and "
                 "attaches it to the latent; the sampler repaints it from noise (denoise 1) and keeps the rest, "
                 "as ComfyUI's own inpainting does. The picture keeps its size (cropped to a multiple of 16): "
                 "about one megapixel suits SD3.5. For a lighter touch that keeps the old content, use SD3.5 VAE "
                 "Encode with Set Latent Noise Mask and a denoise below 1; the sampler's mask_mode differential "
                 "treats a soft mask as a per-pixel strength.")
    source = Column(wf, 0, 360)
    image = source.add("LoadImage", HEIGHTS["LoadImage"], title="Load image", image=IMAGE_NAME, upload="image")
    pixels, mask = (image, "IMAGE"), (image, "MASK")
    nodes = [image]
    if outpaint:
        pad = source.add("ImagePadForOutpaint", HEIGHTS["ImagePadForOutpaint"], title="Pad image for outpainting",
                         left=0, top=0, right=256, bottom=0, feathering=40)
        wf.connect(image, "IMAGE", pad, "image")
        pixels, mask = (pad, "IMAGE"), (pad, "MASK")
        nodes.append(pad)
    encode = source.add("SD35VAEEncodeForInpaint", HEIGHTS["SD35VAEEncodeForInpaint"], title="Encode for inpainting",
                        grow_mask_by=8 if outpaint else 6)
    nodes.append(encode)
    models = source.next(360)
    note = add_readme_note(models, readme_text(title, variant, d, extra=extra))
    ckpt, clip = add_loaders(models, variant)
    wf.connect(*pixels, encode, "pixels")
    wf.connect(ckpt, "vae", encode, "vae")
    wf.connect(*mask, encode, "mask")
    prompt = models.next(380)
    pos, neg = add_prompts(prompt, clip, OUTPAINT_PROMPT if outpaint else INPAINT_PROMPT)
    sample = prompt.next(340)
    sampler = add_sampler(sample, d, {"model": (ckpt, "model"), "positive": (pos, "conditioning"),
                                      "negative": (neg, "conditioning"), "latent": (encode, "latent")})
    decode, save = add_decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Image and mask", GROUP_COLORS["image"], nodes)
    wf.group("Models", GROUP_COLORS["models"], [note, ckpt, clip])
    wf.group("Prompt", GROUP_COLORS["prompt"], [pos, neg])
    wf.group("Sample", GROUP_COLORS["sample"], [sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf

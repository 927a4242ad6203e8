"""ControlNet workflows: this pack's loaders with each SD3.5 Large ControlNet, and ComfyUI's own loader and LoRA
loader feeding this pack's sampler and ControlNet."""

from __future__ import annotations

from dataclasses import replace

from .graph import Workflow
from .inputs import CHECKPOINTS, CONTROL_PROMPT, IMAGE_NAME, LORA_NAME, TEXT_ENCODERS
from .layout import GROUP_COLORS, HEIGHTS, Column
from .node_blocks import add_decode_save, add_image_size, add_loaders, add_prompts, add_readme_note, add_sampler
from .notes import readme_text
from .pack import defaults_table

# Control type -> (preprocessor node type, its title, its widget values, what the note says it does).
PREPROCESSORS = {
    "canny": ("SD35CannyPreprocessor", "Canny edges", {}, "The photo's edges are found with Canny (thresholds "
              "100/200 as on the model card); the preview shows them. To use a ready-made edge map, connect "
              "Load image straight to Apply ControlNet."),
    "blur": ("SD35BlurPreprocessor", "Blur", {}, "The photo is blurred (kernel 50 as on the model card); the "
             "result follows its colours and layout. Useful for upscaling and re-rendering."),
    "depth": ("SD35DepthNormalize", "Normalise depth map", {}, "Load a depth map. The SD3.5 depth ControlNet "
              "was trained with near = dark; maps from Depth Anything or MiDaS draw near = bright. Apply "
              "ControlNet's depth_invert (the one inversion control) is auto: it turns a near = bright map round; "
              "set it to off or on to force it."),
}


def controlnet(name: str, control: str, title: str) -> Workflow:
    """SD3.5 Large with its ``control`` ControlNet (canny, blur or depth), fed by that control's preprocessor."""
    variant = "sd3.5_large"
    d = defaults_table()[f"{variant}_controlnet_{control}"]
    node_type, node_title, values, how = PREPROCESSORS[control]
    wf = Workflow(name)
    extra = (f"Control image: put it in ComfyUI's input folder and pick it in Load control image (the workflow "
             f"names {IMAGE_NAME}). {how} It is fitted to the generation size by Apply ControlNet's "
             f"resize_mode (crop: its middle at the generation's aspect ratio).")
    source = Column(wf, 0, 360)
    image = source.add("LoadImage", HEIGHTS["LoadImage"], title="Load control image", image=IMAGE_NAME,
                       upload="image")
    prep = source.add(node_type, HEIGHTS[node_type], title=node_title, **values)
    preview = source.add("PreviewImage", HEIGHTS["PreviewImage"], title="Control image preview")
    wf.connect(image, "IMAGE", prep, "image")
    wf.connect(prep, "image", preview, "images")
    models = source.next(360)
    note = add_readme_note(models, readme_text(title, variant, d, controlnet=control, extra=extra))
    ckpt, clip = add_loaders(models, variant)
    cn_loader = models.add("SD35ControlNetLoader", HEIGHTS["SD35ControlNetLoader"], title="Load ControlNet",
                           control_net_name=f"sd3.5_large_controlnet_{control}.safetensors", weight_dtype="default")
    wf.connect(ckpt, "model", cn_loader, "model")
    prompt = models.next(380)
    pos, neg = add_prompts(prompt, clip, CONTROL_PROMPT)
    latent = add_image_size(prompt, ckpt)
    sample = prompt.next(340)
    apply = sample.add("SD35ControlNetApply", HEIGHTS["SD35ControlNetApply"], title="Apply ControlNet",
                       strength=1.0, start_percent=0.0, end_percent=1.0, control_type=control, depth_invert="auto",
                       resize_mode="crop")
    for source_node, out, inp in ((pos, "conditioning", "positive"), (neg, "conditioning", "negative"),
                                  (cn_loader, "control_net", "control_net"), (ckpt, "vae", "vae"),
                                  (prep, "image", "image")):
        wf.connect(source_node, out, apply, inp)
    sampler = add_sampler(sample, d, {"model": (ckpt, "model"), "positive": (apply, "positive"),
                                      "negative": (apply, "negative"), "latent": (latent, "latent")})
    decode, save = add_decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Control image", GROUP_COLORS["image"], [image, prep, preview])
    wf.group("Models", GROUP_COLORS["models"], [note, ckpt, clip, cn_loader])
    wf.group("Prompt and size", GROUP_COLORS["prompt"], [pos, neg, latent])
    wf.group("ControlNet and sampler", GROUP_COLORS["sample"], [apply, sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf


def native_lora_controlnet(name: str, title: str) -> Workflow:
    """ComfyUI's own loader and LoRA loader feeding this pack's sampler (SLG) and canny ControlNet."""
    variant, control = "sd3.5_large", "canny"
    base = defaults_table()[f"{variant}_controlnet_{control}"]
    # SLG with SD3.5 Medium's reference layers and window (the reference recommends none for Large), at the
    # ControlNet's cfg.
    d = replace(base, slg=replace(defaults_table()["sd3.5_medium"].slg, cfg=base.cfg))
    node_type, node_title, values, how = PREPROCESSORS[control]
    wf = Workflow(name)
    extra = ("Mixing ComfyUI's nodes with this pack's: ComfyUI's Load Checkpoint and LoRA loader make the MODEL "
             f"(your LoRA goes in models/loras/; the workflow names models/loras/{LORA_NAME}), this pack's "
             "sampler runs it with the reference schedule, skip-layer guidance (SD3.5 Medium's layers 7,8,9: "
             "tune them for Large) and the reference-faithful ControlNet, and ComfyUI's VAE Decode makes the "
             "picture. Control image: put "
             f"it in ComfyUI's input folder and pick it in Load control image (the workflow names {IMAGE_NAME}). "
             f"{how}")
    source = Column(wf, 0, 360)
    image = source.add("LoadImage", HEIGHTS["LoadImage"], title="Load control image", image=IMAGE_NAME,
                       upload="image")
    prep = source.add(node_type, HEIGHTS[node_type], title=node_title, **values)
    preview = source.add("PreviewImage", HEIGHTS["PreviewImage"], title="Control image preview")
    wf.connect(image, "IMAGE", prep, "image")
    wf.connect(prep, "image", preview, "images")
    models = source.next(360)
    note = add_readme_note(models, readme_text(title, variant, d, slg=True, controlnet=control, extra=extra))
    ckpt = models.add("CheckpointLoaderSimple", HEIGHTS["CheckpointLoaderSimple"], title="Load Checkpoint (ComfyUI)",
                      ckpt_name=CHECKPOINTS[variant][0])
    lora = models.add("LoraLoaderModelOnly", HEIGHTS["LoraLoaderModelOnly"], title="Load LoRA (ComfyUI)",
                      lora_name=LORA_NAME, strength_model=1.0)
    clip = models.add("SD35TextEncoderLoader", HEIGHTS["SD35TextEncoderLoader"], title="Load text encoders",
                      clip_l_name=TEXT_ENCODERS[0], clip_g_name=TEXT_ENCODERS[1], t5xxl_name=TEXT_ENCODERS[2],
                      device="default", weight_dtype="default")
    cn_loader = models.add("SD35ControlNetLoader", HEIGHTS["SD35ControlNetLoader"], title="Load ControlNet",
                           control_net_name=f"sd3.5_large_controlnet_{control}.safetensors", weight_dtype="default")
    wf.connect(ckpt, "MODEL", lora, "model")
    wf.connect(lora, "MODEL", cn_loader, "model")
    prompt = models.next(380)
    pos, neg = add_prompts(prompt, clip, CONTROL_PROMPT)
    latent = prompt.add("SD35EmptyLatent", HEIGHTS["SD35EmptyLatent"], title="Image size", width=1024, height=1024,
                        batch_size=1)
    wf.connect(lora, "MODEL", latent, "model")
    sample = prompt.next(340)
    apply = sample.add("SD35ControlNetApply", HEIGHTS["SD35ControlNetApply"], title="Apply ControlNet",
                       strength=1.0, start_percent=0.0, end_percent=1.0, control_type=control, depth_invert="auto")
    for source_node, out, inp in ((pos, "conditioning", "positive"), (neg, "conditioning", "negative"),
                                  (cn_loader, "control_net", "control_net"), (ckpt, "VAE", "vae"),
                                  (prep, "image", "image")):
        wf.connect(source_node, out, apply, inp)
    sampler = add_sampler(sample, d, {"model": (lora, "MODEL"), "positive": (apply, "positive"),
                                      "negative": (apply, "negative"), "latent": (latent, "latent")}, slg=True)
    out = sample.next(400)
    decode = out.add("VAEDecode", HEIGHTS["VAEDecode"], title="VAE Decode (ComfyUI)")
    save = out.add("SaveImage", HEIGHTS["SaveImage"], title="Save image", filename_prefix=f"sd35/{name}")
    wf.connect(sampler, "latent", decode, "samples")
    wf.connect(ckpt, "VAE", decode, "vae")
    wf.connect(decode, "IMAGE", save, "images")
    wf.group("Control image", GROUP_COLORS["image"], [image, prep, preview])
    wf.group("Models (ComfyUI loader and LoRA)", GROUP_COLORS["models"], [note, ckpt, lora, clip, cn_loader])
    wf.group("Prompt and size", GROUP_COLORS["prompt"], [pos, neg, latent])
    wf.group("ControlNet and sampler", GROUP_COLORS["sample"], [apply, sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf

"""Text-to-image workflows: plain, with a LoRA, and with the bundled tiny shapes model."""

from __future__ import annotations

from .graph import Workflow
from .inputs import LORA_NAME, PROMPT, TINY_CHECKPOINT, TINY_PROMPT
from .layout import GROUP_COLORS, HEIGHTS, Column
from .node_blocks import add_decode_save, add_image_size, add_loaders, add_prompts, add_readme_note, add_sampler
from .notes import readme_text, tiny_shapes_readme_text
from .pack import defaults_table


def txt2img(name: str, variant: str, title: str, *, slg: bool = False) -> Workflow:
    """Text to image with ``variant``'s recommended settings (and its skip-layer guidance if ``slg``)."""
    d = defaults_table()[variant]
    wf = Workflow(name)
    models = Column(wf, 0, 360)
    note = add_readme_note(models, readme_text(title, variant, d, slg=slg))
    ckpt, clip = add_loaders(models, variant)
    prompt = models.next(380)
    pos, neg = add_prompts(prompt, clip, PROMPT)
    latent = add_image_size(prompt, ckpt)
    sample = prompt.next(340)
    sampler = add_sampler(sample, d, {"model": (ckpt, "model"), "positive": (pos, "conditioning"),
                                      "negative": (neg, "conditioning"), "latent": (latent, "latent")}, slg=slg)
    decode, save = add_decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Models", GROUP_COLORS["models"], [note, ckpt, clip])
    wf.group("Prompt and size", GROUP_COLORS["prompt"], [pos, neg, latent])
    wf.group("Sample", GROUP_COLORS["sample"], [sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf


def lora(name: str, variant: str, title: str) -> Workflow:
    """Text to image through one SD3.5 LoRA Loader on both the model and the text encoders."""
    d = defaults_table()[variant]
    wf = Workflow(name)
    models = Column(wf, 0, 360)
    extra = ("LoRA: put an SD3.5 Large LoRA in models/loras and pick it in Load LoRA (kohya, diffusers/PEFT, "
             "OneTrainer and SimpleTuner LyCORIS files all load; LoHa, LoKr and DoRA too). strength_model and "
             "strength_clip set how strongly it applies to the diffusion model and the text encoders; chain more "
             "LoRA nodes for more LoRAs. Add the LoRA's trigger words to the prompt.")
    note = add_readme_note(models, readme_text(title, variant, d, extra=extra))
    ckpt, clip = add_loaders(models, variant)
    loader = models.add("SD35LoraLoader", HEIGHTS["SD35LoraLoader"], title="Load LoRA", lora_name=LORA_NAME,
                        strength_model=1.0, strength_clip=1.0)
    wf.connect(ckpt, "model", loader, "model")
    wf.connect(clip, "clip", loader, "clip")
    prompt = models.next(380)
    pos, neg = add_prompts(prompt, loader, PROMPT)
    latent = add_image_size(prompt, ckpt)
    sample = prompt.next(340)
    sampler = add_sampler(sample, d, {"model": (loader, "model"), "positive": (pos, "conditioning"),
                                      "negative": (neg, "conditioning"), "latent": (latent, "latent")})
    decode, save = add_decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Models and LoRA", GROUP_COLORS["models"], [note, ckpt, clip, loader])
    wf.group("Prompt and size", GROUP_COLORS["prompt"], [pos, neg, latent])
    wf.group("Sample", GROUP_COLORS["sample"], [sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf


def tiny_shapes(name: str, title: str) -> Workflow:
    """Text to image with the bundled tiny shapes model: runs in a fresh ComfyUI with nothing downloaded."""
    d = defaults_table()["tiny_shapes_sd35"]
    wf = Workflow(name)
    models = Column(wf, 0, 360)
    note = add_readme_note(models, tiny_shapes_readme_text(title, d))
    ckpt = models.add("SD35CheckpointLoader", HEIGHTS["SD35CheckpointLoader"], title="Load checkpoint",
                      ckpt_name=TINY_CHECKPOINT, weight_dtype="default")
    prompt = models.next(380)
    pos, neg = add_prompts(prompt, ckpt, TINY_PROMPT)
    latent = prompt.add("SD35EmptyLatent", HEIGHTS["SD35EmptyLatent"], title="Image size", width=64, height=64,
                        batch_size=1)
    wf.connect(ckpt, "model", latent, "model")
    sample = prompt.next(340)
    sampler = add_sampler(sample, d, {"model": (ckpt, "model"), "positive": (pos, "conditioning"),
                                      "negative": (neg, "conditioning"), "latent": (latent, "latent")})
    decode, save = add_decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Model", GROUP_COLORS["models"], [note, ckpt])
    wf.group("Prompt and size", GROUP_COLORS["prompt"], [pos, neg, latent])
    wf.group("Sample", GROUP_COLORS["sample"], [sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf

"""The runs of nodes most workflows share: loaders, prompts, image size, sampler, decode and save, the note."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .graph import Node
from .inputs import CHECKPOINTS, SEED, TEXT_ENCODERS
from .layout import HEIGHTS, NEGATIVE_COLORS, NOTE_COLORS, POSITIVE_COLORS, Column

if TYPE_CHECKING:  # only for the hints: at run time the table comes from the imported pack (pack.defaults_table)
    from sd35_core.sampling.defaults import VariantDefaults


def add_loaders(col: Column, variant: str) -> tuple[Node, Node]:
    """This pack's checkpoint and text encoder loaders for ``variant``: (checkpoint, text encoders)."""
    ckpt = col.add("SD35CheckpointLoader", HEIGHTS["SD35CheckpointLoader"], title="Load checkpoint",
                   ckpt_name=CHECKPOINTS[variant][0], weight_dtype="default")
    clip = col.add("SD35TextEncoderLoader", HEIGHTS["SD35TextEncoderLoader"], title="Load text encoders",
                   clip_l_name=TEXT_ENCODERS[0], clip_g_name=TEXT_ENCODERS[1], t5xxl_name=TEXT_ENCODERS[2],
                   device="default", weight_dtype="default")
    return ckpt, clip


def add_prompts(col: Column, clip: Node, text: str) -> tuple[Node, Node]:
    """The positive prompt (``text``) and an empty negative one, both encoded by ``clip``'s text encoders."""
    pos = col.add("SD35TextEncode", HEIGHTS["SD35TextEncode"], title="Positive prompt", colors=POSITIVE_COLORS,
                  text=text)
    neg = col.add("SD35TextEncode", HEIGHTS["SD35TextEncode"], title="Negative prompt", colors=NEGATIVE_COLORS,
                  text="")
    col.wf.connect(clip, "clip", pos, "clip")
    col.wf.connect(clip, "clip", neg, "clip")
    return pos, neg


def add_image_size(col: Column, ckpt: Node) -> Node:
    """An empty 1024x1024 latent for ``ckpt``'s model."""
    latent = col.add("SD35EmptyLatent", HEIGHTS["SD35EmptyLatent"], title="Image size", width=1024, height=1024,
                     batch_size=1)
    col.wf.connect(ckpt, "model", latent, "model")  # checks the size against the model before sampling
    return latent


def add_sampler(col: Column, settings: VariantDefaults, inputs: dict[str, tuple[Node, str]], *, slg: bool = False,
                denoise: float = 1.0) -> Node:
    """The sampler with the recommended ``settings`` (skip-layer guidance too if ``slg``), fed from ``inputs``
    (sampler input name -> (node, output name))."""
    values = dict(seed=SEED, control_after_generate="fixed", steps=settings.steps, cfg=settings.cfg,
                  sampler=settings.sampler, schedule=settings.schedule, shift=settings.shift, denoise=denoise,
                  slg_scale=0.0, slg_window="steps", seed_mode="batch")
    if slg and settings.slg:
        s = settings.slg
        values.update(cfg=s.cfg, slg_layers=",".join(map(str, s.layers)), slg_scale=s.scale, slg_start=s.start,
                      slg_end=s.end)
    sampler = col.add("SD35Sampler", HEIGHTS["SD35Sampler"], title="Sampler", **values)
    for name, (source, output) in inputs.items():
        col.wf.connect(source, output, sampler, name)
    return sampler


def add_decode_save(col: Column, sampler: Node, ckpt: Node, prefix: str) -> tuple[Node, Node]:
    """Decode ``sampler``'s latent with ``ckpt``'s VAE and save it under ``prefix``: (decode, save)."""
    decode = col.add("SD35VAEDecode", HEIGHTS["SD35VAEDecode"], title="Decode")
    save = col.add("SaveImage", HEIGHTS["SaveImage"], title="Save image", filename_prefix=prefix)
    col.wf.connect(sampler, "latent", decode, "samples")
    col.wf.connect(ckpt, "vae", decode, "vae")
    col.wf.connect(decode, "image", save, "images")
    return decode, save


def add_readme_note(col: Column, text: str) -> Node:
    """The "Read me" note holding ``text``, tall enough to show all of it."""
    height = 60 + 15 * sum(1 + len(line) // 52 for line in text.split("\n"))  # about 52 characters a line
    return col.add("Note", height, title="Read me", colors=NOTE_COLORS, text=text)

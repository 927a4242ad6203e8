"""The regional prompting workflow: SD3.5 Medium with a base prompt and two areas, and its skip-layer guidance."""

from __future__ import annotations

from .graph import Workflow
from .inputs import REGION_LEFT_PROMPT, REGION_RIGHT_PROMPT, REGIONAL_PROMPT
from .layout import GROUP_COLORS, HEIGHTS, POSITIVE_COLORS, Column
from .node_blocks import add_decode_save, add_image_size, add_loaders, add_prompts, add_readme_note, add_sampler
from .notes import readme_text
from .pack import defaults_table

# The two areas of a 1024x1024 image: (title, prompt, width, height, x, y)
AREAS = (("Left area", REGION_LEFT_PROMPT, 512, 768, 0, 128), ("Right area", REGION_RIGHT_PROMPT, 512, 768, 512, 128))


def regional(name: str, title: str) -> Workflow:
    """A base prompt for the whole picture combined with two prompts set to areas, sampled with SLG."""
    variant = "sd3.5_medium"
    d = defaults_table()[variant]
    wf = Workflow(name)
    extra = ("Regional prompting: the positive prompt describes the whole picture (sd35 batch's prompt column "
             "writes it); each area's prompt acts only inside "
             "its box (Conditioning (Set Area): width, height, x, y in pixels, strength its weight against the "
             "prompts that overlap it), with softened edges, exactly as ComfyUI's KSampler computes it. Combine as "
             "many areas as you like; Conditioning (Set Area with Percentage) and Conditioning (Set Mask) work "
             "too. The negative gets the same areas by itself. Skip-layer guidance and ControlNets apply to every "
             "area. See the pack's docs/guidance.md.")
    models = Column(wf, 0, 360)
    note = add_readme_note(models, readme_text(title, variant, d, slg=True, extra=extra))
    ckpt, clip = add_loaders(models, variant)
    prompt = models.next(380)
    base, neg = add_prompts(prompt, clip, REGIONAL_PROMPT)  # "Positive prompt": the whole picture (batch's prompt)
    latent = add_image_size(prompt, ckpt)
    regions = prompt.next(380)
    combined, nodes = (base, "conditioning"), []
    for area_title, text, width, height, x, y in AREAS:
        enc = regions.add("SD35TextEncode", HEIGHTS["SD35TextEncode"], title=f"{area_title} prompt",
                          colors=POSITIVE_COLORS, text=text)
        wf.connect(clip, "clip", enc, "clip")
        area = regions.add("ConditioningSetArea", HEIGHTS["ConditioningSetArea"], title=area_title, width=width,
                           height=height, x=x, y=y, strength=1.0)
        wf.connect(enc, "conditioning", area, "conditioning")
        both = regions.add("ConditioningCombine", HEIGHTS["ConditioningCombine"], title=f"Add {area_title.lower()}")
        wf.connect(area, "CONDITIONING", both, "conditioning_1")
        wf.connect(combined[0], combined[1], both, "conditioning_2")
        combined = (both, "CONDITIONING")
        nodes += [enc, area, both]
    sample = regions.next(340)
    sampler = add_sampler(sample, d, {"model": (ckpt, "model"), "positive": combined,
                                      "negative": (neg, "conditioning"), "latent": (latent, "latent")}, slg=True)
    decode, save = add_decode_save(sample.next(400), sampler, ckpt, f"sd35/{name}")
    wf.group("Models", GROUP_COLORS["models"], [note, ckpt, clip])
    wf.group("Base prompt and size", GROUP_COLORS["prompt"], [base, neg, latent])
    wf.group("Areas", GROUP_COLORS["image"], nodes)
    wf.group("Sample", GROUP_COLORS["sample"], [sampler])
    wf.group("Decode and save", GROUP_COLORS["save"], [decode, save])
    return wf

"""The text of each workflow's "Read me" note: which model files to fetch and the recommended settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .inputs import CHECKPOINTS, CONTROLNET_REPO, TEXT_ENCODERS, TINY_CHECKPOINT

if TYPE_CHECKING:  # only for the hints: at run time the table comes from the imported pack (pack.defaults_table)
    from sd35_core.sampling.defaults import VariantDefaults


def settings_text(settings: VariantDefaults, slg: bool) -> str:
    """One sentence naming a model's recommended steps, cfg, sampler, shift and schedule (and SLG if ``slg``)."""
    d = settings
    text = (f"{d.label}: {d.steps} steps, cfg {d.slg.cfg if slg and d.slg else d.cfg:g}, sampler {d.sampler}, "
            f"shift {d.shift:g}, schedule {d.schedule}")
    if slg and d.slg:
        text += (f", skip-layer guidance on layers {','.join(map(str, d.slg.layers))} at scale {d.slg.scale:g} "
                 f"from {d.slg.start:.0%} to {d.slg.end:.0%} of the steps (cfg {d.cfg:g} without it)")
    return text + "."


def readme_text(title: str, variant: str, settings: VariantDefaults, *, slg: bool = False,
                controlnet: str | None = None, extra: str = "") -> str:
    """The note of a workflow for one of Stability's models: its files, settings and ``extra`` advice."""
    ckpt, repo = CHECKPOINTS[variant]
    lines = [
        title,
        "",
        "Model files (in ComfyUI's models folder):",
        f"- models/checkpoints/{ckpt} (from {repo}; it holds the VAE). A bare diffusion model file in "
        "models/diffusion_models works too, with a VAE from models/vae and SD3.5 VAE Loader.",
        f"- models/text_encoders/{TEXT_ENCODERS[0]}, {TEXT_ENCODERS[1]} and {TEXT_ENCODERS[2]} (the "
        "text_encoders folder of the same repository; t5xxl_fp8_e4m3fn.safetensors works too, and T5 may be "
        "set to none to save memory).",
    ]
    if controlnet:
        lines.append(f"- models/controlnet/sd3.5_large_controlnet_{controlnet}.safetensors (from {CONTROLNET_REPO}).")
    lines += [
        "",
        "Recommended settings (Stability's reference, from the pack's defaults table): "
        + settings_text(settings, slg),
        "The sampler's preset control fills them in (after one run, 'detected model' picks the loaded model's).",
    ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines)


def tiny_shapes_readme_text(title: str, settings: VariantDefaults) -> str:
    """The note of the bundled tiny shapes model's workflow: what the toy model is and which prompts it knows."""
    return "\n".join([
        title,
        "",
        f"Model: {TINY_CHECKPOINT}, bundled with the pack (listed by the checkpoint loader after ComfyUI's own "
        "files). It is a toy: SD3.5 Medium's architecture at toy size, trained in the pack's repository on 64x64 "
        "pictures of one shape on a plain background. Its text encoders are inside the checkpoint and its "
        "tokenizers beside it.",
        "",
        "Prompts: 'a {color} {shape} on the {position} of a {background} background' with colours red, green, "
        "blue, yellow, white, black, orange, purple; shapes circle, square, triangle; positions left, right, "
        "top, bottom, center. Images are 64x64.",
        "",
        "Recommended settings (the pack's defaults table): " + settings_text(settings, False),
    ])

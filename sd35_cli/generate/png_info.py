"""The settings a PNG from ``sd35 generate`` carries in its text chunks.

Two chunks: ``sd35`` holds every setting as JSON (what a script reads back), ``parameters`` the same in
the AUTOMATIC1111 layout (prompt line, ``Negative prompt:`` line, then ``Key: value, ...``), which image
browsers and metadata tools for Stable Diffusion already read. The keys ``prompt`` and ``workflow`` are left
alone: ComfyUI reads those as its own graph JSON when a PNG is dropped on its canvas.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from PIL.PngImagePlugin import PngInfo

SETTINGS_KEY = "sd35"
PARAMETERS_KEY = "parameters"
# Our sampler names -> the names AUTOMATIC1111's infotext uses for the same method.
A1111_SAMPLERS = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
                  "dpmpp_2m_sde": "DPM++ 2M SDE"}


def image_settings(
    *, prompt: str, negative: str, seed: int, steps: int, cfg: float, sampler: str, schedule: str, shift: float,
    slg: Mapping[str, Any] | None, width: int, height: int, model: str, denoise: float | None = None,
    init_image: str | None = None, controlnet: Mapping[str, Any] | None = None,
    loras: tuple[Mapping[str, Any], ...] = (), ip_adapter: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One image's settings, JSON-ready; files are named by their base names (paths stay private)."""
    d: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": steps, "cfg": cfg,
        "sampler": sampler, "schedule": schedule, "shift": shift, "slg": dict(slg) if slg else None,
        "width": width, "height": height, "model": os.path.basename(model),
    }
    if init_image is not None:
        d["init_image"] = os.path.basename(init_image)
        d["denoise"] = denoise
    if controlnet is not None:
        d["controlnet"] = dict(controlnet)
    d["loras"] = [dict(lora) for lora in loras]
    if ip_adapter is not None:
        d["ip_adapter"] = dict(ip_adapter)
    return d


def a1111_parameters(s: Mapping[str, Any]) -> str:
    """The AUTOMATIC1111 ``parameters`` text for :func:`image_settings`' dict."""
    fields = [("Steps", s["steps"]), ("Sampler", A1111_SAMPLERS.get(s["sampler"], s["sampler"])),
              ("Schedule type", s["schedule"]), ("CFG scale", s["cfg"]), ("Seed", s["seed"]),
              ("Size", f"{s['width']}x{s['height']}"), ("Model", os.path.splitext(s["model"])[0]),
              ("Shift", s["shift"])]
    if "denoise" in s:
        fields.append(("Denoising strength", s["denoise"]))
    if s.get("slg"):
        g = s["slg"]
        fields.append(("SLG", f"layers {' '.join(map(str, g['layers']))} scale {g['scale']} "
                              f"start {g['start']} end {g['end']}"))
    if s.get("controlnet"):
        c = s["controlnet"]
        fields.append(("ControlNet", f"{c['model']} strength {c['strength']} image {c['image']}"))
    if s.get("loras"):
        fields.append(("LoRA", " ".join(f"{lo['file']}:{lo['strength']}:{lo['clip_strength']}" for lo in s["loras"])))
    # A1111 separates fields with ", " and quotes a value holding one, so keep values free of commas.
    body = ", ".join(f"{k}: {str(v).replace(',', ' ')}" for k, v in fields)
    lines = [s["prompt"]]
    if s["negative_prompt"]:
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    return "\n".join(lines + [body])


def png_info(settings: Mapping[str, Any]) -> PngInfo:
    """The ``sd35`` (JSON) and ``parameters`` (A1111) text chunks; non-Latin-1 text goes to UTF-8 iTXt."""
    info = PngInfo()
    info.add_text(SETTINGS_KEY, json.dumps(settings, ensure_ascii=False))
    info.add_text(PARAMETERS_KEY, a1111_parameters(settings))
    return info

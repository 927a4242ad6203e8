"""API-format graphs of the pack's nodes for the host tests (tiny checkpoints of conftest.py's model set)."""

import json
import os

from .comfyui_server import ROOT

MEDIUM = "tiny-sd3.5_medium.safetensors"  # 10 joint blocks: the reference SLG layers 7,8,9 exist
LARGE = "tiny-sd3.5_large.safetensors"  # 4 joint blocks: cheaper, and what the ControlNets are for
TXT2IMG = dict(prompt="a lighthouse on a cliff at dusk", negative="blurry", width=48, height=32, steps=4, cfg=4.0,
               sampler="dpmpp_2m", schedule="reference", shift=3.0, seed=42, slg_layers=[7, 8, 9], slg_scale=2.5,
               slg_start=0.01, slg_end=0.6, slg_window="steps")


def shipped_api_workflow(name: str) -> dict:
    """``workflows/api/<name>.json`` as the pack ships it."""
    with open(os.path.join(ROOT, "workflows", "api", f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


# ComfyUI's model management logs this when it (re)loads a model registered by the pack.
REQUEST_MMDIT = "Requested to load SD35MMDiTX"
REQUEST_TEXT = "Requested to load SD35TextEncoders"


def sampler(model, positive, negative, latent, s=TXT2IMG, **overrides):
    inputs = dict(model=model, positive=positive, negative=negative, latent=latent, seed=s["seed"], steps=s["steps"],
                  cfg=s["cfg"], sampler=s["sampler"], schedule=s["schedule"], shift=s["shift"], denoise=1.0,
                  slg_layers=",".join(map(str, s["slg_layers"])), slg_scale=s["slg_scale"], slg_start=s["slg_start"],
                  slg_end=s["slg_end"], slg_window=s["slg_window"])
    inputs.update(overrides)
    return {"class_type": "SD35Sampler", "inputs": inputs}


def base_graph(ckpt=MEDIUM, prompt=TXT2IMG["prompt"], negative=TXT2IMG["negative"], prefix="sd35"):
    """Loader, text encoders, prompts, and a decode + save of node 20's latent."""
    return {
        "1": {"class_type": "SD35CheckpointLoader", "inputs": {"ckpt_name": ckpt, "weight_dtype": "default"}},
        "2": {"class_type": "SD35TextEncoderLoader",
              "inputs": {"clip_l_name": "clip_l.safetensors", "clip_g_name": "clip_g.safetensors",
                         "t5xxl_name": "t5xxl_fp16.safetensors", "device": "default"}},
        "3": {"class_type": "SD35TextEncode", "inputs": {"clip": ["2", 0], "text": prompt}},
        "4": {"class_type": "SD35TextEncode", "inputs": {"clip": ["2", 0], "text": negative}},
        "30": {"class_type": "SD35VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}},
        "31": {"class_type": "SaveImage", "inputs": {"images": ["30", 0], "filename_prefix": prefix}},
    }


def txt2img_graph(s=TXT2IMG, prefix="txt2img", **sampler_overrides):
    g = base_graph(prompt=s["prompt"], negative=s["negative"], prefix=prefix)
    g["10"] = {"class_type": "SD35EmptyLatent", "inputs": {"width": s["width"], "height": s["height"],
                                                          "batch_size": 1}}
    g["20"] = sampler(["1", 0], ["3", 0], ["4", 0], ["10", 0], s, **sampler_overrides)
    return g


def quick_graph(prefix: str, seed: int, steps: int = 2):
    """A cheap run on the 4-block model (also used to show the server still works after a failure)."""
    g = base_graph(ckpt=LARGE, prefix=prefix)
    g["10"] = {"class_type": "SD35EmptyLatent", "inputs": {"width": 32, "height": 32, "batch_size": 1}}
    g["20"] = sampler(["1", 0], ["3", 0], ["4", 0], ["10", 0], seed=seed, steps=steps, sampler="euler",
                      slg_scale=0.0)
    return g


def assert_success(result, server):
    assert result["error"] is None, f"{result['error']}\nlog:\n{server.log()[-3000:]}"
    assert result["status"] == "success", result


SD3 = "tiny-sd3_medium.safetensors"
CANNY = "tiny-sd3.5_large_controlnet_canny.safetensors"


def controlnet_graph(prefix: str, seed: int, steps: int = 2, size: int = 32, ckpt=LARGE):
    """``quick_graph`` steered by the canny ControlNet on the input folder's ``photo.png``."""
    g = quick_graph(prefix, seed, steps)
    g["1"]["inputs"]["ckpt_name"] = ckpt
    g["10"]["inputs"].update(width=size, height=size)
    g["11"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    g["13"] = {"class_type": "SD35CannyPreprocessor", "inputs": {"image": ["11", 0], "low_threshold": 100,
                                                                 "high_threshold": 200}}
    g["14"] = {"class_type": "SD35ControlNetLoader", "inputs": {"model": ["1", 0], "control_net_name": CANNY}}
    g["15"] = {"class_type": "SD35ControlNetApply",
               "inputs": {"positive": ["3", 0], "negative": ["4", 0], "control_net": ["14", 0], "vae": ["1", 2],
                          "image": ["13", 0], "strength": 0.9, "start_percent": 0.0, "end_percent": 1.0}}
    g["20"]["inputs"].update(positive=["15", 0], negative=["15", 1])
    return g


def decode_only_graph(prefix: str, size: int, tile_size: int = 64, ckpt=LARGE):
    """An empty latent of ``size`` pixels decoded tile by tile (no sampling): a decode long enough to interrupt."""
    return {
        "1": {"class_type": "SD35CheckpointLoader", "inputs": {"ckpt_name": ckpt, "weight_dtype": "default"}},
        "10": {"class_type": "SD35EmptyLatent", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "30": {"class_type": "SD35VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2], "tiled": True,
                                                         "tile_size": tile_size, "overlap": 16}},
        "31": {"class_type": "SaveImage", "inputs": {"images": ["30", 0], "filename_prefix": prefix}},
    }

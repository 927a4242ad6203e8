"""Bridge checks inside one ComfyUI process (no server), for what no shipped ComfyUI node can set up.

Run by test_bridge_host.py with ComfyUI's Python, the ComfyUI checkout as the working directory:

    python bridge_inprocess.py <models root> <out.json>

It imports ComfyUI (``--cpu``) and this pack as ComfyUI would, then measures and writes as JSON:

- ``native_paths``: which path our sampler took for a native model without and with a transformer block patch
  (a pass-through ``double_block`` replacement, as other packs install), and the largest difference between
  the two samplings (with skip-layer guidance and a ControlNet);
- ``patch_calls``: how often that block patch ran;
- ``lowvram``: for ComfyUI's LoraLoader on our bridged model loaded partially (low-VRAM mode), the largest
  difference of the patched weights from the LoRA merged by plain arithmetic, and of the weights after the
  model is unpatched from the original ones;
- ``gguf_lora``: the error ComfyUI's LoRA loading raises on our model loaded from a Q8_0 GGUF file (``None``
  if it did not refuse).
"""

import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK = "comfyui_sd35"
GGUF_NAME = "comfy-sd3.5_large-Q8_0.gguf"  # written by the test (the gguf package is not in ComfyUI's venv)


def import_comfyui_and_pack():
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, os.getcwd())
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses --cpu before model management starts)

    sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = pack
    spec.loader.exec_module(pack)
    return pack


def conditioning(seed: int, tokens: int = 30):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 256, generator=g), {"pooled_output": torch.randn(1, 192, generator=g)}]]


def main(models_root: str, out_path: str) -> None:
    pack = import_comfyui_and_pack()
    import comfy.sd
    import comfy.utils
    import torch
    from safetensors.torch import load_file

    from tests.host.bridge_models import BridgeFiles, merged_state

    files = BridgeFiles()
    nodes = pack.NODE_CLASS_MAPPINGS
    ckpt = os.path.join(models_root, "checkpoints", files.comfy_checkpoint)
    native = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=False)[0]
    calls = []

    def passthrough(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    patched = native.clone()
    patched.set_model_patch_replace(passthrough, "dit", "double_block", 0)

    # Our sampler (the node, as ComfyUI calls it) with SLG and a ControlNet, on both.
    vae = nodes["SD35VAELoader"]().load(os.path.join(models_root, "vae", "tiny-sd3_vae.safetensors"),
                                        "fp32")["result"][0]
    cn_path = os.path.join(models_root, "controlnet", files.controlnet)
    image = torch.rand(1, 48, 48, 3, generator=torch.Generator().manual_seed(3))
    pos, neg = conditioning(1), conditioning(2)
    latent = {"samples": torch.zeros(1, 16, 6, 6)}
    bridge = importlib.import_module(f"{PACK}.nodes.comfy_bridge")
    paths, samples = [], []
    for model in (native, patched):
        cn = nodes["SD35ControlNetLoader"]().load(model, cn_path, "fp32")["result"][0]
        p, n = nodes["SD35ControlNetApply"]().apply(pos, neg, cn, vae, image, 0.9, 0.0, 1.0, "canny")
        runner = bridge.load_native(bridge.inspect_native(model, "check"), [], 0)
        paths.append("native" if isinstance(runner, bridge.NativePasses) else "view")
        (out,) = nodes["SD35Sampler"]().sample(model, p, n, latent, seed=5, steps=4, cfg=4.0, sampler="dpmpp_2m",
                                               schedule="normal", shift=0.0, denoise=1.0, slg_layers="1,2",
                                               slg_scale=2.5, slg_start=0.0, slg_end=0.7, slg_window="steps")
        samples.append(out["samples"])
    result = {"native_paths": paths, "native_vs_view": (samples[0] - samples[1]).abs().max().item(),
              "patch_calls": len(calls)}

    # ComfyUI's LoRA on our bridged model, loaded partially: every patch must still reach our layers.
    ours = nodes["SD35CheckpointLoader"]().load(ckpt, "fp32")["result"][0]
    (bridged,) = nodes["SD35ToComfyModel"]().convert(ours, 0.0)
    lora = load_file(os.path.join(models_root, "loras", files.comfy_lora))
    lora_model, _ = comfy.sd.load_lora_for_models(bridged, None, lora, 0.8, 0)
    original = {k: v.clone() for k, v in ours.mmdit.state_dict().items()}
    expected = merged_state(ours.mmdit, lora, 0.8)
    lora_model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    patched_diff = max((ours.mmdit.state_dict()[k] - expected[k]).abs().max().item() for k in expected)
    lora_model.unpatch_model(torch.device("cpu"))
    restored_diff = max((ours.mmdit.state_dict()[k] - original[k]).abs().max().item() for k in original)
    result["lowvram"] = {"patched_vs_merged": patched_diff, "restored_vs_original": restored_diff}

    # The same LoRA on our model loaded from a Q8_0 GGUF file: ComfyUI's patch arithmetic cannot act on blocks.
    gguf_model = nodes["SD35CheckpointLoader"]().load(os.path.join(models_root, "diffusion_models", GGUF_NAME),
                                                      "fp32")["result"][0]
    (gguf_bridged,) = nodes["SD35ToComfyModel"]().convert(gguf_model, 0.0)
    try:
        comfy.sd.load_lora_for_models(gguf_bridged, None, lora, 0.8, 0)
        result["gguf_lora"] = None
    except ValueError as e:
        result["gguf_lora"] = str(e)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

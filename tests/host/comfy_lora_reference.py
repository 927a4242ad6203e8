"""ComfyUI's own LoRA mapping and arithmetic on ComfyUI's native model, for the host LoRA test.

Run with ComfyUI's Python:

    python comfy_lora_reference.py COMFYUI_PATH settings.json

``settings.json``: ``checkpoint`` (a single file) and ``loras`` (``[[file, strength, out_file], ...]``). For each
LoRA, ComfyUI's native diffusion model is patched with ``comfy.lora.model_lora_keys_unet`` + ``load_lora`` through
ModelPatcher (as ComfyUI's LoraLoader does), and every tensor that changed is written to ``out_file`` under our
key names (``joint_blocks.…``, the official keys without ComfyUI's ``diffusion_model.``).
"""

import json
import sys


def _changed(before, after, rename):
    return {rename(k): v.clone().contiguous() for k, v in after.items() if k in before and not (v == before[k]).all()}


def main(comfy_path: str, settings_path: str) -> None:
    sys.path.insert(0, comfy_path)
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI's own argument parsing, as main.py runs it
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.sd
    import comfy.utils
    import torch
    from safetensors.torch import save_file

    s = json.load(open(settings_path))
    model = comfy.sd.load_checkpoint_guess_config(s["checkpoint"], output_vae=False, output_clip=False)[0]
    unet_keys = comfy.lora.model_lora_keys_unet(model.model, {})
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    for path, strength, out in s["loras"]:
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        patched = model.clone()
        patched.add_patches(comfy.lora.load_lora(lora, unet_keys, log_missing=False), strength)
        with torch.no_grad():
            patched.patch_model()
            save_file(_changed(before, patched.model.state_dict(), lambda k: k[len("diffusion_model."):]), out)
            patched.unpatch_model()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

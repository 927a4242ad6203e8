"""Run ComfyUI's own KSampler / KSamplerAdvanced on ComfyUI's own SD3 model and save the latents.

Run by the host tests with the Python that runs ComfyUI, with ComfyUI's checkout importable:

    python native_ksampler.py settings.json inputs.safetensors out.safetensors

``settings.json``: ``comfyui_path``, ``diffusion_model`` (a file ComfyUI's ``load_diffusion_model`` reads) and
``cases``, a list of ``{"name", "seed", "steps", "cfg", "sampler", "scheduler", "start_at_step", "differential",
"latent", "mask"}``; ``latent`` and ``mask`` name tensors of ``inputs.safetensors``, which also holds the
conditioning ``positive_context``, ``positive_pooled``, ``negative_context``, ``negative_pooled``. Each case runs
the native node exactly as a graph would (KSampler when ``start_at_step`` is 0, else KSamplerAdvanced with noise
added and ``end_at_step`` = steps), optionally on the model patched by the Differential Diffusion node; its output
latent (raw VAE space) is saved under the case's name.
"""

import json
import sys


def main(settings_path: str, inputs_path: str, out_path: str) -> None:
    settings = json.load(open(settings_path))
    sys.path.insert(0, settings["comfyui_path"])
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management is imported: no GPU probing
    import comfy.sd
    import comfy.utils
    import torch
    from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion
    from safetensors.torch import load_file, save_file

    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False
    tensors = load_file(inputs_path)
    model = comfy.sd.load_diffusion_model(settings["diffusion_model"], model_options={"dtype": torch.float32})
    differential = DifferentialDiffusion.execute(model).result[0]
    positive = [[tensors["positive_context"], {"pooled_output": tensors["positive_pooled"]}]]
    negative = [[tensors["negative_context"], {"pooled_output": tensors["negative_pooled"]}]]
    out = {}
    for case in settings["cases"]:
        latent = {"samples": tensors[case["latent"]]}
        if case.get("mask"):
            latent = nodes.SetLatentNoiseMask().set_mask(latent, tensors[case["mask"]])[0]
        m = differential if case.get("differential") else model
        common = dict(model=m, cfg=case["cfg"], sampler_name=case["sampler"], scheduler=case["scheduler"],
                      positive=positive, negative=negative, latent_image=latent)
        with torch.inference_mode():
            if case.get("start_at_step", 0) == 0:
                (result,) = nodes.KSampler().sample(seed=case["seed"], steps=case["steps"], denoise=1.0, **common)
            else:
                (result,) = nodes.KSamplerAdvanced().sample(
                    add_noise="enable", noise_seed=case["seed"], steps=case["steps"],
                    start_at_step=case["start_at_step"], end_at_step=case["steps"],
                    return_with_leftover_noise="disable", **common)
        out[case["name"]] = result["samples"].float().contiguous()
    save_file(out, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])

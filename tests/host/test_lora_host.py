"""LoRA files of every format patch the same tensors by the same amounts in our model as ComfyUI's own
``model_lora_keys_unet`` / ``load_lora`` (run by ComfyUI's Python on ComfyUI's native model, same file)."""

import json
import math
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35_core.loading.loader import load_checkpoint
from sd35_core.loading.lora import applied, load_lora
from sd35_core.loading.lora.formats import diffusers_names
from sd35_core.loading.tiny import kohya_lora_tensors, save_state, tiny_mmdit

from .comfyui_server import COMFYUI_PATH, comfyui_python

pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set: no ComfyUI to compare with")

DEPTH = 4  # ComfyUI sizes an MMDiT as hidden = 64 * depth: the only tiny shape it loads
STRENGTH = 0.8


def _factors(out_dim: int, in_dim: int, gen, rank=4):
    return torch.randn(rank, in_dim, generator=gen) / math.sqrt(in_dim), 0.3 * torch.randn(out_dim, rank, generator=gen)


def lora_files(model, folder) -> dict[str, str]:
    """The same tiny model's LoRA in each trainer's layout (random, independent updates per format)."""
    gen = torch.Generator().manual_seed(11)
    targets = diffusers_names(model.config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def shape_of(t):
        s = shapes[t.key]
        return (t.rows[1] if t.rows else s[0], math.prod(s[1:]))

    files = {"kohya": kohya_lora_tensors(model, "lora_unet_", 4, gen)}
    diffusers, onetrainer, loha, lokr = {}, {}, {}, {}
    for name, t in targets.items():
        out_dim, in_dim = shape_of(t)
        down, up = _factors(out_dim, in_dim, gen)
        if len(shapes[t.key]) == 4:
            continue  # the patch-embedding convolution: covered by the kohya file
        diffusers |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up}
        n = name.replace(".", "_")
        onetrainer |= {f"lora_transformer_{n}.lora_down.weight": down.clone(),
                       f"lora_transformer_{n}.lora_up.weight": up.clone(),
                       f"lora_transformer_{n}.alpha": torch.tensor(2.0)}
        w2a, w2b = _factors(out_dim, in_dim, gen)
        loha |= {f"lycoris_{n}.hada_w1_a": up.clone(), f"lycoris_{n}.hada_w1_b": down.clone(),
                 f"lycoris_{n}.hada_w2_a": w2b, f"lycoris_{n}.hada_w2_b": w2a, f"lycoris_{n}.alpha": torch.tensor(3.0)}
        f1 = 4  # kron(w1 [4, 4], w2 [out/4, in/4] low-rank)
        b_down, b_up = _factors(out_dim // f1, in_dim // f1, gen, rank=2)
        lokr |= {f"lycoris_{n}.lokr_w1": torch.randn(f1, f1, generator=gen), f"lycoris_{n}.lokr_w2_a": b_up,
                 f"lycoris_{n}.lokr_w2_b": b_down, f"lycoris_{n}.alpha": torch.tensor(1.0)}
    files |= {"diffusers": diffusers, "onetrainer": onetrainer, "lycoris_loha": loha, "lycoris_lokr": lokr}
    gen_diff = {}
    for key in ("joint_blocks.1.x_block.mlp.fc2", "final_layer.adaLN_modulation.1"):
        gen_diff[f"diffusion_model.{key}.diff"] = 0.01 * torch.randn(shapes[key + ".weight"], generator=gen)
        gen_diff[f"diffusion_model.{key}.diff_b"] = 0.01 * torch.randn(shapes[key + ".bias"], generator=gen)
    files["full_diff"] = gen_diff
    paths = {}
    for fmt, tensors in files.items():
        paths[fmt] = os.path.join(folder, f"{fmt}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, paths[fmt])
    return paths


def test_every_format_patches_like_comfyui(tmp_path):
    model = tiny_mmdit("sd3.5_medium", seed=3, depth=DEPTH, hidden=64 * DEPTH)
    ckpt = save_state(tmp_path / "comfy-sd3.5_medium.safetensors", {"model.diffusion_model.": model.state_dict()})
    paths = lora_files(model, tmp_path)
    settings = {"checkpoint": ckpt,
                "loras": [[p, STRENGTH, str(tmp_path / f"comfy-{fmt}.safetensors")] for fmt, p in paths.items()]}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    script = os.path.join(os.path.dirname(__file__), "comfy_lora_reference.py")
    subprocess.run([comfyui_python(), script, COMFYUI_PATH, str(tmp_path / "settings.json")], check=True,
                   cwd=str(tmp_path), timeout=600)

    ours = load_checkpoint(ckpt, "fp32").model.mmdit
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    for fmt, path in paths.items():
        theirs = load_file(str(tmp_path / f"comfy-{fmt}.safetensors"))
        with applied(ours, [(load_lora(path, mmdit=ours).model, STRENGTH)]):
            patched = {k: v.clone() for k, v in ours.state_dict().items() if not torch.equal(v, base[k])}
        assert set(patched) == set(theirs), fmt
        for k, v in theirs.items():
            scale = max(1.0, (v - base[k]).abs().max().item())
            assert (patched[k] - v).abs().max().item() <= 1e-5 * scale, (fmt, k)

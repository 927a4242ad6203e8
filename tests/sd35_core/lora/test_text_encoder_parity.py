"""A text-encoder LoRA (PEFT on transformers' CLIP, saved with diffusers' SD3 LoRA saving) loaded by ours
gives the same hidden states and pooled vector as transformers + PEFT."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, inject_adapter_in_model

from sd35_core.loading.checkpoint import DTypePolicy, load_weights, open_safetensors
from sd35_core.loading.lora import applied, load_lora
from sd35_core.loading.tiny import randomize_, save_state
from sd35_core.models.clip import CLIPConfig, CLIPTextModel

from .lora_common import rel_err, save_diffusers_lora

# The modules diffusers' SD3 training script adapts in the CLIP text encoders.
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
SPECS = {
    "clip_l": dict(hidden=64, layers=2, act="quick_gelu", projection=False, slot="text_encoder"),
    "clip_g": dict(hidden=128, layers=3, act="gelu", projection=True, slot="text_encoder_2"),
}


def _hf_clip(spec, seed=0):
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=spec["hidden"], intermediate_size=4 * spec["hidden"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["hidden"] // 64, max_position_embeddings=77,
        hidden_act=spec["act"], projection_dim=spec["hidden"], bos_token_id=49406, eos_token_id=49407)
    cls = transformers.CLIPTextModelWithProjection if spec["projection"] else transformers.CLIPTextModel
    return randomize_(cls(config), seed).eval()


def _ours_from(hf, tmp_path, act) -> CLIPTextModel:
    state = hf.state_dict()
    if not any(k.startswith("text_model.") for k in state):  # transformers 5 drops CLIPTextModel's prefix
        state = {(k if k.startswith("text_projection") else f"text_model.{k}"): v for k, v in state.items()}
    file = open_safetensors(save_state(tmp_path / "clip.safetensors", {"": state}))
    with torch.device("meta"):
        model = CLIPTextModel(CLIPConfig.from_shapes(file.shapes(), hidden_act=act))
    return load_weights(model, file, "", DTypePolicy()).eval()


def _add_lora(hf, seed=5, r=4, alpha=6.0):
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TEXT_TARGETS, init_lora_weights="gaussian")
    hf = inject_adapter_in_model(config, hf)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return hf


@pytest.mark.parametrize("role", list(SPECS))
def test_text_encoder_lora_matches_transformers_and_peft(tmp_path, role):
    spec = SPECS[role]
    hf = _hf_clip(spec)
    ours = _ours_from(hf, tmp_path, spec["act"])
    tokens = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        base_hidden, _ = ours(tokens, project_pooled=spec["projection"])
    hf = _add_lora(hf)
    path = save_diffusers_lora(tmp_path / "lora", **{spec["slot"]: hf})
    encoders = torch.nn.ModuleDict({role: ours})
    lora = load_lora(path, text_encoders=encoders)
    assert lora.model is None and len(lora.clip) == 6 * spec["layers"]
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        pooled_ref = out.text_embeds if spec["projection"] else out.pooler_output
        with applied(encoders, [(lora.clip, 1.0)]):
            hidden, pooled = ours(tokens, project_pooled=spec["projection"])
    assert rel_err(hidden, out.hidden_states[-2]) < 1e-4
    assert rel_err(pooled, pooled_ref) < 1e-4
    assert rel_err(base_hidden, out.hidden_states[-2]) > 1e-3  # the LoRA really changes the states

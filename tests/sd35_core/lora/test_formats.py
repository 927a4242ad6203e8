"""Every trainer's key format: the same update written as kohya, OneTrainer, SimpleTuner LyCORIS (LoHa,
LoKr), ``base_model.model.`` PEFT, full ``.diff`` files and split/fused layouts gives the same patched
weights as the diffusers-format file (itself pinned to diffusers by the parity tests)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35_core.loading.lora import applied, load_lora
from sd35_core.loading.lora.formats import diffusers_names
from sd35_core.loading.lora.patches import swap_halves
from sd35_core.loading.tiny import tiny_clip, tiny_t5

from .lora_common import add_peft_lora, save_diffusers_lora, tiny_pair

ALPHA, RANK = 8.0, 4  # scale 2, as the diffusers file's metadata says


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(our model, diffusers factors {name: (A, B)}, base state, patched state from the diffusers file)."""
    ours, trained = tiny_pair("sd3.5_medium")
    path = save_diffusers_lora(tmp_path_factory.mktemp("diffusers"), add_peft_lora(trained, r=RANK, alpha=ALPHA))
    raw = load_file(path)
    factors = {k[len("transformer."): -len(".lora_A.weight")]: (raw[k], raw[k.replace("lora_A", "lora_B")])
               for k in raw if k.endswith(".lora_A.weight")}
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    with applied(ours, [(load_lora(path, mmdit=ours).model, 1.0)]):
        patched = {k: v.clone() for k, v in ours.state_dict().items()}
    return ours, factors, base, patched


def _patched_by(ours, tmp_path, tensors, strength=1.0):
    path = str(tmp_path / "lora.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    lora = load_lora(path, mmdit=ours)
    with applied(ours, [(lora.model, strength)]):
        return {k: v.clone() for k, v in ours.state_dict().items()}, lora


def _assert_same(got, want):
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k


def _underscored(name):
    return name.replace(".", "_")


def test_onetrainer_lora_transformer_keys(reference, tmp_path):
    ours, factors, _, patched = reference
    tensors = {}
    for name, (a, b) in factors.items():
        n = "lora_transformer_" + _underscored(name)
        tensors.update({n + ".lora_down.weight": a, n + ".lora_up.weight": b, n + ".alpha": torch.tensor(ALPHA)})
    got, lora = _patched_by(ours, tmp_path, tensors)
    assert lora.model.formats == ("OneTrainer",)
    _assert_same(got, patched)


def test_peft_base_model_prefix(reference, tmp_path):
    ours, factors, _, patched = reference
    tensors = {}
    for name, (a, b) in factors.items():  # no alpha in the file: the scale is folded into B
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b * (ALPHA / RANK)
    _assert_same(_patched_by(ours, tmp_path, tensors)[0], patched)


def _is_conv(a):
    return a.ndim == 4


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_simpletuner_lycoris_loha_and_lokr(reference, tmp_path, kind):
    ours, factors, _, patched = reference
    tensors = {}
    for name, (a, b) in factors.items():
        n = "lycoris_" + _underscored(name)
        if _is_conv(a):  # LyCORIS files mix plain LoRA modules with LoHa / LoKr ones
            tensors.update({n + ".lora_down.weight": a, n + ".lora_up.weight": b, n + ".alpha": torch.tensor(ALPHA)})
        elif kind == "loha":  # (B @ A) * (ones @ ones) = B @ A
            tensors.update({n + ".hada_w1_a": b, n + ".hada_w1_b": a, n + ".hada_w2_a": torch.ones(b.shape[0], 1),
                            n + ".hada_w2_b": torch.ones(1, a.shape[1]), n + ".alpha": torch.tensor(ALPHA)})
        else:  # kron([[1]], B @ A) = B @ A
            tensors.update({n + ".lokr_w1": torch.ones(1, 1), n + ".lokr_w2_a": b, n + ".lokr_w2_b": a,
                            n + ".alpha": torch.tensor(ALPHA)})
    got, lora = _patched_by(ours, tmp_path, tensors)
    assert lora.model.formats == ("SimpleTuner LyCORIS",)
    _assert_same(got, patched)


def test_kohya_fused_qkv_keys(reference, tmp_path):
    ours, factors, _, patched = reference
    targets = diffusers_names(ours.config)
    fused: dict[str, list] = {}
    tensors = {}
    for name, (a, b) in factors.items():
        t = targets[name]
        n = "lora_unet_" + _underscored(t.key[: -len(".weight")])
        if t.rows is not None:  # q, k, v: one block-diagonal LoRA of rank 3r on the fused qkv
            fused.setdefault(n, [None] * 3)[t.rows[0] // t.rows[1]] = (a, b)
            continue
        tensors.update({n + ".lora_down.weight": a, n + ".lora_up.weight": swap_halves(b) if t.swap_halves else b,
                        n + ".alpha": torch.tensor(ALPHA)})
    for n, parts in fused.items():
        tensors[n + ".lora_down.weight"] = torch.cat([a for a, _ in parts])
        tensors[n + ".lora_up.weight"] = torch.block_diag(*[b for _, b in parts])
        tensors[n + ".alpha"] = torch.tensor(ALPHA * 3)  # scale = alpha / (3r)
    got, lora = _patched_by(ours, tmp_path, tensors)
    assert lora.model.formats == ("kohya",)
    _assert_same(got, patched)


def test_full_diff_and_diff_b(reference, tmp_path):
    ours, _, base, patched = reference
    tensors = {f"diffusion_model.{k[:-len('.weight')]}.diff": patched[k] - base[k]
               for k in base if k.endswith(".weight") and not torch.equal(patched[k], base[k])}
    bias = torch.linspace(-1, 1, ours.config.hidden_size)
    tensors["transformer.transformer_blocks.1.attn.to_k.diff_b"] = bias  # a split name: rows h..2h of qkv.bias
    got, _ = _patched_by(ours, tmp_path, tensors)
    _assert_same({k: v for k, v in got.items() if k.endswith(".weight")},
                 {k: v for k, v in patched.items() if k.endswith(".weight")})
    h = ours.config.hidden_size
    key = "joint_blocks.1.x_block.attn.qkv.bias"
    assert torch.allclose(got[key][h: 2 * h], base[key][h: 2 * h] + bias, atol=1e-7)
    assert torch.equal(got[key][:h], base[key][:h]) and torch.equal(got[key][2 * h:], base[key][2 * h:])


def test_text_encoder_formats_kohya_onetrainer_and_generic(tmp_path):
    encoders = torch.nn.ModuleDict({"clip_l": tiny_clip("clip_l", 2), "clip_g": tiny_clip("clip_g", 3),
                                    "t5xxl": tiny_t5(4)})
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 128, generator=gen), torch.randn(128, 4, generator=gen)
    t5_a, t5_b = torch.randn(4, 256, generator=gen), torch.randn(256, 4, generator=gen)
    layouts = {
        "kohya/OneTrainer": {
            "lora_te2_text_model_encoder_layers_1_self_attn_q_proj": (a, b),
            "lora_te2_text_projection": (a, b),  # OneTrainer's CLIP-G projection LoRA
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (t5_a, t5_b),
        },
        "generic / diffusers": {
            "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj": (a, b),
            "text_encoders.clip_g.transformer.text_projection": (a, b),
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q": (t5_a, t5_b),
        },
    }
    results = []
    for label, groups in layouts.items():
        tensors = {}
        for n, (down, up) in groups.items():
            tensors.update({n + ".lora_down.weight": down.clone(), n + ".lora_up.weight": up.clone()})
        path = str(tmp_path / f"{len(results)}.safetensors")
        save_file(tensors, path)
        lora = load_lora(path, text_encoders=encoders)
        assert set(lora.clip.patches) == {"clip_g.text_model.encoder.layers.1.self_attn.q_proj.weight",
                                          "clip_g.text_projection.weight",
                                          "t5xxl.encoder.block.0.layer.0.SelfAttention.q.weight"}, label
        with applied(encoders, [(lora.clip, 0.5)]):
            results.append({k: v.clone() for k, v in encoders.state_dict().items()})
    base = encoders.state_dict()
    key = "t5xxl.encoder.block.0.layer.0.SelfAttention.q.weight"
    assert torch.allclose(results[0][key], base[key] + 0.5 * t5_b @ t5_a, atol=1e-5)
    for k in base:
        assert torch.equal(results[0][k], results[1][k]), k

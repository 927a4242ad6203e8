"""Applying stacks: strength 0 and no LoRA are bit-identical to the base, stacking two equals their sum,
the base is restored after a run (and after an exception), fp8 weights take the LoRA at compute time, and
DoRA matches PEFT."""

from __future__ import annotations

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from sd35_core.loading.checkpoint import DTypePolicy, load_weights, open_safetensors
from sd35_core.loading.lora import applied, load_lora
from sd35_core.loading.tiny import save_state
from sd35_core.models.mmditx import MMDiTX

from .lora_common import add_peft_lora, inputs, rel_err, save_diffusers_lora, tiny_pair


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Our Medium-shaped model and two different diffusers LoRAs resolved for it."""
    ours, trained = tiny_pair("sd3.5_medium")
    loras = []
    for seed in (1, 2):
        _, other = tiny_pair("sd3.5_medium")
        path = save_diffusers_lora(tmp_path_factory.mktemp(f"l{seed}"), add_peft_lora(other, seed=seed))
        loras.append(load_lora(path, mmdit=ours).model)
    return ours, loras


def _run(model, stack=()):
    x, t, c, y = inputs(model.config)
    with torch.no_grad(), applied(model, list(stack)):
        return model(x, t, c, y)


def test_strength_zero_and_empty_stack_are_bit_identical(setup):
    ours, (a, _) = setup
    base = _run(ours)
    assert torch.equal(_run(ours, [(a, 0.0)]), base)
    assert torch.equal(_run(ours, []), base)


def test_base_is_restored_bit_for_bit_after_runs_and_exceptions(setup):
    ours, (a, b) = setup
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    _run(ours, [(a, 1.0), (b, -0.5)])
    with pytest.raises(RuntimeError, match="boom"), applied(ours, [(a, 1.0)]):
        raise RuntimeError("boom")
    after = ours.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hasattr(m, "weight_patch") and "weight_patch" in vars(m) for m in ours.modules())


def test_stacking_two_equals_applying_their_sum(setup, tmp_path):
    ours, (a, b) = setup
    stacked = _run(ours, [(a, 0.8), (b, 0.3)])
    with torch.no_grad(), applied(ours, [(a, 0.8), (b, 0.3)]):
        merged = {k: v.clone() for k, v in ours.state_dict().items()}
    base = ours.state_dict()
    # One file carrying the summed update as full diffs gives the same model output.
    diffs = {f"{k[:-len('.weight')]}.diff": merged[k] - base[k] for k in base
             if k.endswith(".weight") and not torch.equal(merged[k], base[k])}
    path = str(tmp_path / "sum.safetensors")
    save_file(diffs, path)
    summed = _run(ours, [(load_lora(path, mmdit=ours).model, 1.0)])
    assert rel_err(stacked, summed) < 1e-5
    assert rel_err(stacked, _run(ours, [(a, 0.8)])) > 1e-3


def _as_fp8(model: MMDiTX, tmp_path) -> MMDiTX:
    file = open_safetensors(save_state(tmp_path / "base.safetensors", {"": model.state_dict()}))
    with torch.device("meta"):
        fp8 = MMDiTX(model.config)
    fp8 = load_weights(fp8, file, "", DTypePolicy(torch.float8_e4m3fn, torch.bfloat16)).eval()
    fp8.compute_dtype = torch.bfloat16
    return fp8


def test_fp8_weights_take_the_lora_at_compute_time(setup, tmp_path):
    ours, (a, _) = setup
    fp8 = _as_fp8(ours, tmp_path)
    assert fp8.joint_blocks[0].x_block.attn.qkv.weight.dtype == torch.float8_e4m3fn
    stored = {k: v.clone() for k, v in fp8.state_dict().items()}
    fp32_merge = _run(ours, [(a, 1.0)])
    fp8_base, fp8_lora = _run(fp8), _run(fp8, [(a, 1.0)])
    # The LoRA's effect survives fp8 storage: the fp8 model with the LoRA is far closer to the fp32 merge
    # than the fp8 base is (the rest is the fp8/bf16 error of the base weights themselves).
    err_lora, err_base = rel_err(fp8_lora, fp32_merge), rel_err(fp8_base, fp32_merge)
    assert err_lora < 0.25 * err_base, (err_lora, err_base)
    assert all(torch.equal(stored[k], v) for k, v in fp8.state_dict().items())
    # Compared with merging into fp8 storage (what an fp8 in-place merge would do), compute time is closer.
    with torch.no_grad(), applied(ours, [(a, 1.0)]):
        merged_fp8 = _as_fp8(ours, tmp_path)
    assert err_lora < rel_err(_run(merged_fp8), fp32_merge)


def test_dora_matches_peft(tmp_path):
    ours, trained = tiny_pair("sd3.5_large")
    add_peft_lora(trained, use_dora=True, targets=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                   "norm1.linear"])
    with torch.no_grad():  # a trained-looking magnitude, not PEFT's initial one (which makes DoRA a no-op)
        for name, p in trained.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.linspace(-1, 1, p.numel()).reshape(p.shape))
    state = get_peft_model_state_dict(trained)
    assert any("lora_magnitude_vector" in k for k in state)
    path = str(tmp_path / "dora.safetensors")
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, path,
              metadata={"lora_adapter_metadata": '{"transformer.lora_alpha": 8, "transformer.r": 4}'})
    lora = load_lora(path, mmdit=ours).model
    x, t, c, y = inputs(ours.config)
    with torch.no_grad():
        expected = trained(hidden_states=x, encoder_hidden_states=c, pooled_projections=y, timestep=t).sample
    assert rel_err(_run(ours, [(lora, 1.0)]), expected) < 1e-4

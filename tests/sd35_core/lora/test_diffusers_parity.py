"""A PEFT LoRA saved with diffusers' own LoRA saving, loaded by ours, equals diffusers' LoRA-loaded
transformer (fp32), on the SD3.5 Medium shape (with attn2) and the SD3.5 Large shape."""

from __future__ import annotations

import pytest
import torch

from sd35_core.loading.lora import applied, load_lora

from .lora_common import (
    add_peft_lora,
    diffusers_twin,
    inputs,
    load_with_diffusers,
    rel_err,
    save_diffusers_lora,
    tiny_pair,
)


@pytest.mark.parametrize("shape", ["sd3.5_medium", "sd3.5_large"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_transformer_lora_matches_diffusers(tmp_path, shape, strength):
    ours, trained = tiny_pair(shape)
    path = save_diffusers_lora(tmp_path, add_peft_lora(trained, r=4, alpha=8.0))
    # diffusers' own loading of its own file, on a fresh model with the same base weights.
    theirs = load_with_diffusers(diffusers_twin(ours), path, strength)
    lora = load_lora(path, mmdit=ours)
    assert len(lora.model) == len(dict(ours.named_parameters())) - sum(
        1 for k in dict(ours.named_parameters()) if not k.endswith(".weight") or ".ln_" in k)
    x, t, context, y = inputs(ours.config)
    with torch.no_grad():
        base = ours(x, t, context, y)
        with applied(ours, [(lora.model, strength)]):
            patched = ours(x, t, context, y)
        expected = theirs(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t).sample
    assert rel_err(patched, expected) < 1e-4
    assert rel_err(base, expected) > 1e-2  # the LoRA really changes the output
    with torch.no_grad():
        assert torch.equal(ours(x, t, context, y), base)  # restored bit for bit

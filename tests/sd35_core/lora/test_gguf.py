"""LoRAs on GGUF-quantized weights: added at compute time on top of the dequantized blocks, never merged."""

from __future__ import annotations

import torch

from bench.gguf_write import dequantized_state, write_gguf
from sd35_core.loading import loader
from sd35_core.loading.lora import applied, load_lora
from sd35_core.loading.tiny import save_state

from .lora_common import add_peft_lora, inputs, rel_err, save_diffusers_lora, tiny_pair


def _run(model, stack=()):
    x, t, c, y = inputs(model.config)
    with torch.no_grad(), applied(model, list(stack)):
        return model(x, t, c, y)


# The joint blocks' linear layers: the ones GGUF files quantize. (The embedders and the final layer stay F16
# there, and a LoRA merges into them as into any fp16 model.)
BLOCK_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                 "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                 "norm1_context.linear"]


def test_a_lora_on_a_q8_0_model_equals_it_on_the_files_dequantized_weights(tmp_path):
    ours, theirs = tiny_pair("sd3.5_medium")
    lora = save_diffusers_lora(tmp_path / "lora", add_peft_lora(theirs, seed=1, targets=BLOCK_TARGETS))
    gg = write_gguf(tmp_path / "m-Q8_0.gguf", ours.state_dict(), "Q8_0")
    quantized = loader.load_checkpoint(gg, dtype="fp32").model.mmdit
    dense = loader.load_checkpoint(save_state(tmp_path / "deq.safetensors", {"": dequantized_state(gg)}),
                                   dtype="fp32").model.mmdit
    stored = {k: v.clone() for k, v in quantized.state_dict().items()}
    base = _run(quantized)
    with_lora = _run(quantized, [(load_lora(lora, mmdit=quantized).model, 0.8)])
    expected = _run(dense, [(load_lora(lora, mmdit=dense).model, 0.8)])
    assert rel_err(with_lora, expected) < 1e-6  # compute-time W + dW against an fp32 merge of the same W
    assert rel_err(with_lora, base) > 1e-3  # and the LoRA does something
    assert all(torch.equal(stored[k], v) for k, v in quantized.state_dict().items())  # blocks untouched
    assert torch.equal(_run(quantized), base)  # and nothing left behind

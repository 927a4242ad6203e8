"""Noise masks: our sampler against ComfyUI's own KSampler on ComfyUI's own SD3 model.

Needs ``COMFYUI_PATH`` (skipped, visibly, without it). One tiny SD3.5-Medium-like diffusion model file is
loaded by both sides: by ComfyUI's ``load_diffusion_model`` (in ``native_ksampler.py``, run with the Python
that runs ComfyUI) and by our loader. The conditioning is ours (our text encoders on tiny weights), the latents
and masks are seeded; ComfyUI's nodes (SetLatentNoiseMask, KSampler / KSamplerAdvanced, Differential
Diffusion) run as in a graph with scheduler ``normal``, ours with schedule ``normal``.

ComfyUI derives the depth of an MMDiT from its width (depth = width / 64), so the file has as many joint blocks
as that rule gives.
"""

import json
import os
import subprocess

import pytest
import torch

from .comfyui_server import COMFYUI_PATH, SHARED, comfyui_python

pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH, reason="COMFYUI_PATH is not set: the native-ComfyUI parity tests need a ComfyUI checkout"
)

TOLERANCE = 1e-4  # relative to the largest magnitude of ComfyUI's latent
SEED = 3
BASE = dict(seed=SEED, cfg=4.0, scheduler="normal", latent="latent")
CASES = {
    "euler_hard": dict(BASE, steps=6, sampler="euler", mask="hard"),
    "euler_soft": dict(BASE, steps=6, sampler="euler", mask="soft"),
    "dpmpp_2m_hard": dict(BASE, steps=6, sampler="dpmpp_2m", mask="hard"),
    "dpmpp_2m_soft": dict(BASE, steps=6, sampler="dpmpp_2m", mask="soft"),
    # KSamplerAdvanced from step 2 of 8 is the reference's img2img at denoise 0.75
    "img2img_soft": dict(BASE, steps=8, sampler="euler", mask="soft", start_at_step=2),
    # the empty latent (all zeros) is not shifted into model space by ComfyUI: text-to-image with a mask
    "empty_latent_hard": dict(BASE, steps=6, sampler="euler", mask="hard", latent="zeros"),
    "differential_soft": dict(BASE, steps=6, sampler="dpmpp_2m", mask="soft", differential=True),
}


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """(our model, positive, negative, input tensors, ComfyUI's latents by case name)."""
    from safetensors.torch import load_file, save_file

    from sd35_core.loading.loader import load_checkpoint, load_text_encoder
    from sd35_core.loading.tiny import save_state, tiny_mmdit, write_text_encoders
    from sd35_core.sampling.guidance import CondEntry
    from sd35_core.text.encoder import SD3TextEncoder
    from sd35_core.text.tokenization import SD3Tokenizer

    tmp = tmp_path_factory.mktemp("native_inpaint")
    path = save_state(tmp / "tiny-sd3.5_medium-d2.safetensors", {"": tiny_mmdit("sd3.5_medium", seed=0, depth=2)
                                                                   .state_dict()})
    model = load_checkpoint(path, "fp32", "cpu").model.mmdit
    files = write_text_encoders(tmp / "text_encoders", seed=0)
    enc = {role: load_text_encoder(p, role, "fp32", "cpu") for role, p in files.items()}
    tokenizer = SD3Tokenizer.from_files(os.path.join(SHARED, "tokenizers", "clip"),
                                        os.path.join(SHARED, "tokenizers", "t5", "tokenizer.json"))
    text = SD3TextEncoder(enc["clip_l"], enc["clip_g"], enc["t5xxl"], tokenizer, "cpu")
    with torch.no_grad():
        positive = CondEntry(*text.encode("a lighthouse on a cliff at dusk"))
        negative = CondEntry(*text.encode("blurry"))

    g = torch.Generator().manual_seed(5)
    hard = torch.zeros(1, 64, 64)
    hard[:, 16:48, 8:40] = 1.0
    inputs = {
        "positive_context": positive.context, "positive_pooled": positive.pooled,
        "negative_context": negative.context, "negative_pooled": negative.pooled,
        "latent": torch.randn(2, 16, 8, 8, generator=g) * 0.8 + 0.1,  # a batch of 2 with one mask
        "zeros": torch.zeros(2, 16, 8, 8),
        "hard": hard,
        "soft": torch.rand(1, 64, 64, generator=g),
    }
    inputs = {k: v.contiguous() for k, v in inputs.items()}
    save_file(inputs, tmp / "inputs.safetensors")
    cases = [dict(case, name=name) for name, case in CASES.items()]
    (tmp / "settings.json").write_text(json.dumps(dict(comfyui_path=COMFYUI_PATH, diffusion_model=str(path),
                                                       cases=cases)))
    subprocess.run([comfyui_python(), os.path.join(os.path.dirname(__file__), "native_ksampler.py"),
                    str(tmp / "settings.json"), str(tmp / "inputs.safetensors"), str(tmp / "out.safetensors")],
                   check=True, timeout=600, cwd=str(tmp))
    return model, positive, negative, inputs, load_file(tmp / "out.safetensors")


@pytest.mark.parametrize("name", list(CASES))
def test_noise_mask_sampling_equals_comfyuis_ksampler(native, name):
    from sd35_core.sampling.pipeline import sample
    from sd35_core.sampling.request import SampleRequest

    model, positive, negative, inputs, theirs = native
    case = CASES[name]
    start = case.get("start_at_step", 0)
    request = SampleRequest(steps=case["steps"], cfg=case["cfg"], sampler=case["sampler"], shift=3.0,
                            seed=case["seed"], schedule="normal", denoise=1.0 - start / case["steps"],
                            noise_mask=inputs[case["mask"]],
                            mask_mode="differential" if case.get("differential") else "standard")
    latent = inputs[case["latent"]]
    ours = sample(model, positive, negative, latent, request)
    expected = theirs[name]
    diff = (ours - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"{name}: max abs diff {diff:.3g}, relative {diff / scale:.3g}")
    assert diff <= TOLERANCE * scale, (name, diff, scale)
    assert (ours - latent).abs().max() > 0.1  # the masked part really was repainted

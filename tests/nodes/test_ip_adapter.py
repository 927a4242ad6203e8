"""The IP-Adapter nodes: loaders (ipadapter and clip_vision folders, the release .bin and safetensors), SD3.5 Apply
IP-Adapter (encode once, attach to the model, chains stack, weight 0 leaves the model as it was) and the sampler
node equal to the sd35_core pipeline with the same hints; bad input names the node."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from .test_sampling import LARGE, MEDIUM, SIZE, entries, sampler_inputs

ADAPTER_BIN = "ip-adapter.bin"
ADAPTER_ST = "ip-adapter.safetensors"
TOWER = "sigclip_vision_tiny.safetensors"


@pytest.fixture
def ip_files(models_env):
    from sd35_core.loading.tiny_ip_adapter import write_ip_adapter, write_siglip

    root = models_env.root
    for name, write in ((f"ipadapter/{ADAPTER_BIN}", write_ip_adapter), (f"ipadapter/{ADAPTER_ST}", write_ip_adapter),
                        (f"clip_vision/{TOWER}", write_siglip)):
        path = os.path.join(root, name)
        if not os.path.exists(path):
            write(path)
    return root


@pytest.fixture
def ip_parts(run_node, ip_files):
    model, _, _ = run_node("SD35CheckpointLoader", ckpt_name=LARGE, weight_dtype="default")
    (clip,) = run_node("SD35TextEncoderLoader", clip_l_name="clip_l.safetensors", clip_g_name="clip_g.safetensors",
                       t5xxl_name="t5xxl_fp16.safetensors", device="default")
    (pos,) = run_node("SD35TextEncode", clip=clip, text="a lighthouse at dusk")
    (neg,) = run_node("SD35TextEncode", clip=clip, text="blurry")
    (adapter,) = run_node("SD35IPAdapterLoader", ipadapter_name=ADAPTER_BIN)
    (vision,) = run_node("SD35CLIPVisionLoader", clip_name=TOWER)
    return model, pos, neg, adapter, vision


def _picture(seed: int = 0, hw=(40, 60)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (1, *hw, 3), dtype=np.uint8)).float() / 255


def test_loaders_list_their_folders_and_read_bin_and_safetensors_alike(node_classes, run_node, ip_files):
    names = node_classes["SD35IPAdapterLoader"].INPUT_TYPES()["required"]["ipadapter_name"][0]
    assert ADAPTER_BIN in names and ADAPTER_ST in names
    assert TOWER in node_classes["SD35CLIPVisionLoader"].INPUT_TYPES()["required"]["clip_name"][0]
    (from_bin,) = run_node("SD35IPAdapterLoader", ipadapter_name=ADAPTER_BIN)
    (from_st,) = run_node("SD35IPAdapterLoader", ipadapter_name=ADAPTER_ST, weight_dtype="fp32")
    a, b = from_bin.adapter.state_dict(), from_st.adapter.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    (again,) = run_node("SD35IPAdapterLoader", ipadapter_name=ADAPTER_ST, weight_dtype="fp32")
    assert again is from_st  # the loader's cache
    (vision,) = run_node("SD35CLIPVisionLoader", clip_name=TOWER)
    assert vision.tower.config.width == 144


def test_sampler_with_an_applied_adapter_equals_the_pipeline(run_node, ip_parts):
    from comfyui_sd35.sd35_core.image.siglip_input import encode_image
    from comfyui_sd35.sd35_core.sampling import pipeline
    from comfyui_sd35.sd35_core.sampling.ip_adapter import IPAdapterHint
    from comfyui_sd35.sd35_core.sampling.request import SampleRequest, SkipLayerGuidance

    model, pos, neg, adapter, vision = ip_parts
    picture = _picture()
    (with_ip,) = run_node("SD35ApplyIPAdapter", model=model, ip_adapter=adapter, clip_vision=vision, image=picture,
                          weight=0.7, start_percent=0.0, end_percent=0.8)
    assert with_ip is not model and model.ip_adapters == () and len(with_ip.ip_adapters) == 1
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=2)
    settings = sampler_inputs(slg_layers="1", slg_scale=2.0, slg_start=0.0, slg_end=0.9)
    (out,) = run_node("SD35Sampler", model=with_ip, positive=pos, negative=neg, latent=latent, **settings)
    hint = IPAdapterHint(adapter.adapter, encode_image(vision.tower, picture), 0.7, 0.0, 0.8)
    request = SampleRequest(steps=3, cfg=4.0, sampler="euler", shift=3.0, seed=7, skip_uncond_at_cfg1=True,
                            slg=SkipLayerGuidance(layers=(1,), scale=2.0, start=0.0, end=0.9), ip_adapters=[hint])
    expected = pipeline.txt2img(model.mmdit, entries(pos), entries(neg), request, width=SIZE, height=SIZE,
                                batch_size=2)
    assert torch.equal(out["samples"], expected)
    (plain,) = run_node("SD35Sampler", model=model, positive=pos, negative=neg, latent=latent, **settings)
    assert (plain["samples"] - out["samples"]).abs().max() > 1e-3


def test_chained_applications_stack_and_weight_zero_is_no_application(run_node, ip_parts):
    model, pos, neg, adapter, vision = ip_parts
    kw = dict(ip_adapter=adapter, clip_vision=vision, start_percent=0.0, end_percent=1.0)
    (one,) = run_node("SD35ApplyIPAdapter", model=model, image=_picture(1), weight=0.5, **kw)
    (two,) = run_node("SD35ApplyIPAdapter", model=one, image=_picture(2, (64, 64)), weight=0.3, **kw)
    assert [a.weight for a in two.ip_adapters] == [0.5, 0.3]
    (same,) = run_node("SD35ApplyIPAdapter", model=two, image=_picture(3), weight=0.0, **kw)
    assert same is two
    (latent,) = run_node("SD35EmptyLatent", width=SIZE, height=SIZE, batch_size=1)
    outs = [run_node("SD35Sampler", model=m, positive=pos, negative=neg, latent=latent, **sampler_inputs())[0]
            for m in (one, two)]
    assert (outs[0]["samples"] - outs[1]["samples"]).abs().max() > 1e-4


def test_bad_input_names_the_node(run_node, ip_parts, ip_files, tmp_path):
    model, pos, neg, adapter, vision = ip_parts
    kw = dict(ip_adapter=adapter, clip_vision=vision, image=_picture(), weight=0.5)
    with pytest.raises(ValueError, match="SD3.5 Apply IP-Adapter: expected 0 <= start_percent <= end_percent"):
        run_node("SD35ApplyIPAdapter", model=model, start_percent=0.9, end_percent=0.1, **kw)
    medium, _, _ = run_node("SD35CheckpointLoader", ckpt_name=MEDIUM, weight_dtype="default")
    with pytest.raises(ValueError, match="SD3.5 Apply IP-Adapter: IP-Adapter does not fit.*10 joint blocks"):
        run_node("SD35ApplyIPAdapter", model=medium, start_percent=0.0, end_percent=1.0, **kw)
    with pytest.raises(ValueError, match="SD3.5 Apply IP-Adapter: the ip_adapter input got a"):
        run_node("SD35ApplyIPAdapter", model=model, start_percent=0.0, end_percent=1.0,
                 **{**kw, "ip_adapter": vision})
    with pytest.raises(ValueError, match="SD3.5 Apply IP-Adapter: image: expected an IMAGE"):
        run_node("SD35ApplyIPAdapter", model=model, start_percent=0.0, end_percent=1.0,
                 **{**kw, "image": torch.zeros(8, 8, 3)})
    with pytest.raises(FileNotFoundError, match="ipadapter"):
        run_node("SD35IPAdapterLoader", ipadapter_name="missing.bin")
    evil = tmp_path / "evil.bin"
    torch.save({"image_proj": {}, "ip_adapter": {"x": print}}, evil)
    with pytest.raises(ValueError, match="SD3.5 IP-Adapter Loader: .*evil.bin.*restricted unpickler"):
        run_node("SD35IPAdapterLoader", ipadapter_name=str(evil))
    with pytest.raises(ValueError, match=r"SD3.5 CLIP Vision Loader \(SigLIP\): .*a SigLIP vision tower"):
        run_node("SD35CLIPVisionLoader", clip_name=os.path.join(ip_files, "checkpoints", LARGE))


def test_comfy_model_gives_each_row_of_comfyuis_batches_its_tokens(pack):
    """What KSampler calls through SD3.5 Model to ComfyUI MODEL: rows from cond_or_uncond, windows from sigmas."""
    import copy

    from comfyui_sd35.nodes.comfy_model import ComfyMMDiT
    from comfyui_sd35.nodes.ip_adapter import IPAdapterOption
    from comfyui_sd35.sd35_core.loading.tiny import tiny_mmdit
    from comfyui_sd35.sd35_core.loading.tiny_ip_adapter import SIGLIP_TINY, tiny_ip_adapter
    from comfyui_sd35.sd35_core.sampling.ip_adapter import IPAdapterHint, ip_rows

    mmdit = tiny_mmdit("sd3.5_large").requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, SIGLIP_TINY.tokens, SIGLIP_TINY.width, generator=gen)
    hint = IPAdapterHint(tiny_ip_adapter(), feats, 0.6, 0.0, 0.5)
    option = IPAdapterOption((hint,))
    assert copy.deepcopy({"o": option})["o"] is option  # ComfyUI's clones never copy the adapter
    x = torch.randn(2, 16, 4, 4, generator=gen)
    t = torch.full((2,), 900.0)
    ctx = torch.randn(2, 5, mmdit.config.context_dim, generator=gen)
    y = torch.randn(2, mmdit.config.pooled_dim, generator=gen)
    sample_sigmas = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.0])
    opts = {IPAdapterOption.KEY: option, "sample_sigmas": sample_sigmas, "sigmas": torch.tensor([0.9, 0.9])}
    with torch.no_grad():
        # ComfyUI's [uncond; cond] order: the second row is the positive one
        ours = ComfyMMDiT(mmdit)(x, t, ctx, y, transformer_options={**opts, "cond_or_uncond": [1, 0]})
        expected = mmdit(x, t, ctx, y, ip=ip_rows([hint], [False, True], t, torch.float32, torch.device("cpu")))
        assert torch.equal(ours, expected)
        # step 2 of 4 is outside the window [0, 0.5): the plain model
        late = {**opts, "sigmas": torch.tensor([0.5, 0.5]), "cond_or_uncond": [1, 0]}
        assert torch.equal(ComfyMMDiT(mmdit)(x, t, ctx, y, transformer_options=late), mmdit(x, t, ctx, y))
        with pytest.raises(ValueError, match="cond_or_uncond"):
            ComfyMMDiT(mmdit)(x, t, ctx, y, transformer_options=opts)

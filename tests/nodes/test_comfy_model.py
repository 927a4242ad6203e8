"""The model bridge's ComfyUI-free core: our MMDiT-X behind ComfyUI's diffusion-model interface, the view of a
foreign module's tensors as our MMDiT-X, and whole native passes (see tests/host/test_bridge_host.py for the
same against the real ComfyUI)."""

import pytest
import torch


@pytest.fixture(scope="module")
def bridge(pack):
    from comfyui_sd35.nodes import comfy_model

    return comfy_model


@pytest.fixture(scope="module")
def mmdit(pack):
    from comfyui_sd35.sd35_core.loading.tiny import tiny_mmdit

    return tiny_mmdit("sd3.5_medium", seed=3, depth=4)


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 8, 6, generator=g)
    t = torch.full((batch,), 730.0)
    return x, t, torch.randn(batch, 12, 256, generator=g), torch.randn(batch, 192, generator=g)


def residuals(depth, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [None if i == 1 else 0.1 * torch.randn(2, 12, 128, generator=g) for i in range(depth)]


# ------------------------------------------------------------------------------------------ ComfyMMDiT

def test_comfy_adapter_owns_our_tensors_under_the_official_keys(bridge, mmdit):
    adapter = bridge.ComfyMMDiT(mmdit)
    assert list(adapter.state_dict()) == list(mmdit.state_dict())
    assert "joint_blocks.0.x_block.attn.qkv.weight" in adapter.state_dict()
    assert all(a is b for a, b in zip(adapter.parameters(), mmdit.parameters(), strict=True))
    # What ComfyUI's weight patching does (set_attr_param on the key path) lands in our module.
    block = adapter.joint_blocks[0].x_block.attn.qkv
    old = block.weight
    try:
        block.weight = torch.nn.Parameter(old + 1.0, requires_grad=False)
        assert torch.equal(mmdit.joint_blocks[0].x_block.attn.qkv.weight, old + 1.0)
        adapter.pos_embed = mmdit.pos_embed * 1.0  # a top-level buffer set through the adapter, too
        assert mmdit.pos_embed is adapter.pos_embed
    finally:
        block.weight = old
    assert adapter.dtype == mmdit.compute_dtype == torch.float32


def test_comfy_adapter_forward_is_our_forward(bridge, mmdit):
    adapter = bridge.ComfyMMDiT(mmdit)
    x, t, ctx, y = inputs()
    with torch.no_grad():
        expected = mmdit(x, t, ctx, y)
        assert torch.equal(adapter(x, t, context=ctx, y=y, control=None, transformer_options={}), expected)
        res = residuals(mmdit.config.depth)
        assert torch.equal(adapter(x, t, context=ctx, y=y, control={"output": res}),
                           mmdit(x, t, ctx, y, block_residuals=res))


def test_comfy_adapter_honours_double_block_patches_as_comfyui_calls_them(bridge, mmdit):
    adapter = bridge.ComfyMMDiT(mmdit)
    x, t, ctx, y = inputs()
    seen = []

    def skip(args, extra):
        return args

    def passthrough(args, extra):
        seen.append(sorted(args))
        assert args["transformer_options"]["marker"] == 1
        return extra["original_block"](args)

    with torch.no_grad():
        skipped = adapter(x, t, context=ctx, y=y, transformer_options={
            "patches_replace": {"dit": {("double_block", 1): skip, ("double_block", 3): skip}}})
        assert torch.equal(skipped, mmdit(x, t, ctx, y, skip_layers=(1, 3)))
        same = adapter(x, t, context=ctx, y=y, transformer_options={
            "marker": 1, "patches_replace": {"dit": {("double_block", 2): passthrough}}})
    assert torch.equal(same, mmdit(x, t, ctx, y))
    assert seen == [["img", "transformer_options", "txt", "vec"]]


def test_comfy_adapter_refuses_conditioning_without_pooled_vector(bridge, mmdit):
    x, t, ctx, _ = inputs()
    with pytest.raises(ValueError, match="pooled vector"):
        bridge.ComfyMMDiT(mmdit)(x, t, context=ctx, y=None)


def test_unet_config_is_what_comfyui_detects_plus_the_block_count(bridge, mmdit):
    cfg = bridge.comfy_unet_config(mmdit.config)
    assert cfg["depth"] == 128 // 64 and cfg["num_blocks"] == 4
    assert cfg["adm_in_channels"] == 192 and cfg["pos_embed_max_size"] == 32 and cfg["num_patches"] == 32 * 32
    assert cfg["context_embedder_config"]["params"] == {"in_features": 256, "out_features": 128}
    assert cfg["qk_norm"] == "rms" and cfg["x_block_self_attn_layers"] == [0, 1]


# ------------------------------------------------------------------------------------------ the view

def test_view_runs_on_the_foreign_tensors_themselves(bridge, mmdit):
    foreign = bridge.ComfyMMDiT(mmdit)  # any module keyed like the official files
    view = bridge.mmdit_view(foreign, torch.float32)
    assert isinstance(view, type(mmdit))
    assert view.joint_blocks[2].context_block.mlp.fc1.weight is mmdit.joint_blocks[2].context_block.mlp.fc1.weight
    assert view.pos_embed is mmdit.pos_embed
    x, t, ctx, y = inputs()
    with torch.no_grad():
        assert torch.equal(view(x, t, ctx, y, skip_layers=(2,)), mmdit(x, t, ctx, y, skip_layers=(2,)))


class _Quantised(torch.Tensor):
    """Stands for a quantised-weight tensor type (GGUF packs use a torch.Tensor subclass)."""


def _foreign(mmdit):
    from comfyui_sd35.sd35_core.models.mmditx import MMDiTX

    other = MMDiTX(mmdit.config)
    other.load_state_dict(mmdit.state_dict())
    return other


@pytest.mark.parametrize("change, reason", [
    ("subclass", "stored as _Quantised"),
    ("extra_key", "keys differ"),
    ("weight_function", "patch their weights on the fly"),
    ("int8", "stored as Parameter/torch.int8"),
])
def test_view_refuses_what_our_layers_would_compute_differently(bridge, mmdit, change, reason):
    other = _foreign(mmdit)
    layer = other.joint_blocks[0].x_block.attn.qkv
    if change == "subclass":
        layer.weight = torch.nn.Parameter(layer.weight.data.as_subclass(_Quantised), requires_grad=False)
    elif change == "extra_key":
        layer.register_buffer("scale_weight", torch.ones(()))  # scaled fp8 files carry these
    elif change == "weight_function":
        layer.weight_function = [lambda w: w * 2]  # ComfyUI's low-VRAM LoRA patches
    else:
        layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.int8), requires_grad=False)
    refusal = bridge.mmdit_view(other)
    assert isinstance(refusal, bridge.ViewRefusal) and reason in refusal.reason, refusal


def test_view_refuses_what_is_not_an_sd3_mmdit(bridge):
    refusal = bridge.mmdit_view(torch.nn.Linear(4, 4))
    assert isinstance(refusal, bridge.ViewRefusal) and "not an SD3 MMDiT" in refusal.reason


# --------------------------------------------------------------------------------------- native passes

def test_native_passes_equal_our_model_for_skips_residuals_and_controlnet_input(bridge, mmdit):
    native = bridge.ComfyMMDiT(mmdit)  # ComfyUI's signature; the host test uses ComfyUI's own MMDiT
    passes = bridge.NativePasses(native, mmdit.config, torch.float32, {})
    x, t, ctx, y = inputs()
    res = residuals(mmdit.config.depth)
    with torch.no_grad():
        assert torch.equal(passes.forward(x, t, ctx, y, (), None), mmdit(x, t, ctx, y))
        assert torch.equal(passes.forward(x, t, ctx, y, (1, 2), None), mmdit(x, t, ctx, y, skip_layers=(1, 2)))
        assert torch.equal(passes.forward(x, t, ctx, y, (), res), mmdit(x, t, ctx, y, block_residuals=res))
        assert torch.equal(passes.patch_embed(x), mmdit.patch_embed(x))
        assert torch.equal(passes.y_embedder(y), mmdit.y_embedder(y))
    assert passes.device == torch.device("cpu") and not passes.blockwise


def test_native_passes_refuse_the_step_cache_by_name(bridge, mmdit):
    from comfyui_sd35.sd35_core.sampling.guidance import CondEntry, Guider
    from comfyui_sd35.sd35_core.sampling.request import SampleRequest

    passes = bridge.NativePasses(bridge.ComfyMMDiT(mmdit), mmdit.config, torch.float32, {})
    cfg = mmdit.config
    entry = CondEntry(torch.zeros(1, 4, cfg.context_dim), torch.zeros(1, cfg.pooled_dim))
    request = SampleRequest(steps=4, cfg=4.0, sampler="euler", shift=3.0, seed=0, cache_threshold=0.1)
    with pytest.raises(ValueError, match="cache_threshold: the step cache runs joint block 0 on its own"):
        Guider(passes, entry, entry, request)


def test_native_passes_keep_the_models_own_block_patches(bridge, mmdit):
    calls = []

    def counting(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    options = {"patches_replace": {"dit": {("double_block", 0): counting}}}
    passes = bridge.NativePasses(bridge.ComfyMMDiT(mmdit), mmdit.config, torch.float32, options)
    x, t, ctx, y = inputs()
    with torch.no_grad():
        assert torch.equal(passes.forward(x, t, ctx, y, (3,), None), mmdit(x, t, ctx, y, skip_layers=(3,)))
    assert calls == [1]
    assert list(options["patches_replace"]["dit"]) == [("double_block", 0)]  # the skip patch did not leak

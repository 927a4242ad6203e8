"""The IP-Adapter model and its files: config from shapes, parity of the resampler, one joint block and the whole
model with diffusers (IPAdapterTimeImageProjection and SD3IPAdapterJointAttnProcessor2_0 as its
SD3Transformer2DModel._load_ip_adapter_weights builds them), the release .bin through torch's restricted
unpickler only, safetensors and diffusers' names, and every tensor of a file used."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers.models.embeddings import IPAdapterTimeImageProjection

from sd35_core.errors import CheckpointError
from sd35_core.loading.ip_adapter import convert_ip_adapter, load_ip_adapter, read_release_bin
from sd35_core.loading.tiny_ip_adapter import write_ip_adapter
from sd35_core.models.ip_adapter import IPAdapter, IPAdapterConfig, IPRows, IPTokens

from .ip_adapter_common import adapter, diffusers_twin, features, large, release_state
from .sampling_common import assert_close

DIFFUSERS_RESAMPLER_NAMES = {  # the release name -> the name diffusers' converter gives it
    ".0.norm1.": ".ln0.", ".0.norm2.": ".ln1.", ".0.to_q.": ".attn.to_q.", ".0.to_kv.": ".attn.to_kv.",
    ".0.to_out.": ".attn.to_out.0.", ".1.0.": ".adaln_norm.", ".1.1.": ".ff.net.0.proj.", ".1.3.": ".ff.net.2.",
    ".2.1.": ".adaln_proj.",
}


def _diffusers_name(key: str) -> str:
    if key.startswith("image_proj.layers."):
        head, _, tail = key.partition("layers.")
        idx, _, rest = tail.partition(".")
        rest = "." + rest
        for ours, theirs in DIFFUSERS_RESAMPLER_NAMES.items():
            if rest.startswith(ours):
                return f"{head}layers.{idx}{theirs}{rest[len(ours):]}"
    return key


# --- config ----------------------------------------------------------------------------------------------


def test_config_derives_from_shapes():
    ip = adapter()
    derived = IPAdapterConfig.from_shapes({k: tuple(v.shape) for k, v in ip.state_dict().items()})
    assert derived == ip.config
    assert (derived.depth, derived.heads, derived.num_queries, derived.blocks) == (4, 2, 8, 4)
    m = large()
    derived.check_fits(m.config.hidden_size, m.config.depth, m.config.num_heads, 144)
    with pytest.raises(ValueError, match="3 joint blocks"):
        derived.check_fits(128, 3, 2)
    with pytest.raises(ValueError, match="vision tower makes 1152"):
        derived.check_fits(128, 4, 2, 1152)


# --- parity with diffusers -------------------------------------------------------------------------------


def test_resampler_matches_diffusers():
    ip = adapter()
    cfg = ip.config
    ref = IPAdapterTimeImageProjection(embed_dim=cfg.embed_dim, output_dim=cfg.output_dim, hidden_dim=cfg.hidden,
                                       heads=cfg.heads, num_queries=cfg.num_queries,
                                       timestep_in_dim=cfg.timestep_dim).eval()
    # diffusers' own converter renames the release keys (the same one _load_ip_adapter_weights uses)
    twin = diffusers_twin(large(), ip, 1.0)
    ref.load_state_dict(twin.image_proj.state_dict(), strict=True)
    feats = torch.cat([features(1), torch.zeros_like(features(1))])
    t = torch.tensor([937.5, 312.25])
    with torch.no_grad():
        tokens, temb = ip.image_proj(feats, t)
        ref_tokens, ref_temb = ref(feats, t)
    assert tokens.shape == (2, cfg.num_queries, cfg.output_dim)
    print("resampler max abs diff", assert_close(tokens, ref_tokens), assert_close(temb, ref_temb))


def test_one_joint_block_with_ip_attention_matches_diffusers():
    m, ip = large(), adapter()
    ref = diffusers_twin(m, ip, 0.7)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, m.config.hidden_size, generator=gen)
    context = torch.randn(2, 5, m.config.hidden_size, generator=gen)
    c = torch.randn(2, m.config.hidden_size, generator=gen)
    t = torch.tensor([800.0, 800.0])
    with torch.no_grad():
        tokens, temb = ip.image_proj(torch.cat([features(1), torch.zeros_like(features(1))]), t)
        rows = IPRows((IPTokens(ip, tokens, temb, 0.7),))
        ctx, out = m.joint_blocks[1](context, x, c, lambda a, q, k, v, h: rows.add_to(1, a, q, k, v, h))
        ref_ctx, ref_out = ref.transformer_blocks[1](
            hidden_states=x, encoder_hidden_states=context, temb=c,
            joint_attention_kwargs={"ip_hidden_states": tokens, "temb": temb})
        plain = m.joint_blocks[1](context, x, c)[1]
    print("joint block max abs diff", assert_close(out, ref_out))
    assert_close(ctx, ref_ctx)  # the text stream is untouched by the adapter
    assert torch.equal(ctx, m.joint_blocks[1](context, x, c)[0])
    assert (out - plain).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [0.6, 1.0])
def test_whole_model_matches_diffusers(scale):
    m, ip = large(), adapter()
    ref = diffusers_twin(m, ip, scale)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 8, 8, generator=gen)
    t = torch.tensor([700.0, 700.0])
    ctx = torch.randn(2, 6, m.config.context_dim, generator=gen)
    y = torch.randn(2, m.config.pooled_dim, generator=gen)
    feats = torch.cat([torch.zeros_like(features(1)), features(1)])  # diffusers' order: [negative; positive]
    with torch.no_grad():
        tokens, temb = ip.image_proj(feats, t)
        ours = m(x, t, ctx, y, ip=IPRows((IPTokens(ip, tokens, temb, scale),)))
        theirs = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                     joint_attention_kwargs={"ip_adapter_image_embeds": feats}).sample
    print("whole model max abs diff", assert_close(ours, theirs))


def test_no_ip_input_is_the_plain_model_bit_for_bit():
    m, ip = large(), adapter()
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 16, 8, 8, generator=gen), torch.tensor([500.0])
    ctx, y = torch.randn(1, 6, m.config.context_dim, generator=gen), torch.randn(1, m.config.pooled_dim, generator=gen)
    with torch.no_grad():
        plain = m(x, t, ctx, y)
        assert torch.equal(m(x, t, ctx, y, ip=None), plain)
        assert torch.equal(m(x, t, ctx, y, ip=IPRows(())), plain)  # no terms: the same ops, in the same order
        tokens, temb = ip.image_proj(features(1), t)
        assert not torch.equal(m(x, t, ctx, y, ip=IPRows((IPTokens(ip, tokens, temb, 1.0),))), plain)


# --- files -----------------------------------------------------------------------------------------------


def _same(a: IPAdapter, b: IPAdapter) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bin_safetensors_diffusers_names_and_conversion_load_the_same(tmp_path):
    bin_path = write_ip_adapter(tmp_path / "ip-adapter.bin")
    st_path = write_ip_adapter(tmp_path / "ip.safetensors")
    from_bin, from_st = load_ip_adapter(bin_path, "fp32"), load_ip_adapter(st_path, "fp32")
    assert _same(from_bin, from_st)
    assert from_bin.config == from_st.config and from_bin.dtype == torch.float32
    converted = convert_ip_adapter(bin_path, tmp_path / "converted.safetensors")
    assert _same(load_ip_adapter(converted, "fp32"), from_bin)
    from safetensors.torch import load_file, save_file

    renamed = {_diffusers_name(k): v for k, v in load_file(converted).items()}
    assert any(".attn.to_out.0." in k for k in renamed) and any(".ff.net.2." in k for k in renamed)
    save_file(renamed, tmp_path / "diffusers_names.safetensors")
    assert _same(load_ip_adapter(tmp_path / "diffusers_names.safetensors", "fp32"), from_bin)
    # torch's own pickle of the release layout, memory-mapped: tensors only
    flat = read_release_bin(bin_path)
    assert set(flat) == set(from_bin.state_dict())


class NotATensor:
    """Anything the restricted unpickler would have to import to build."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_bin_with_a_non_tensor_object_is_refused_naming_the_file(tmp_path):
    state = release_state(adapter())
    state["ip_adapter"]["extra"] = NotATensor()
    path = tmp_path / "evil-ip-adapter.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="evil-ip-adapter.bin.*restricted unpickler"):
        load_ip_adapter(path)
    with pytest.raises(CheckpointError, match="evil-ip-adapter.bin"):
        convert_ip_adapter(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_every_tensor_is_used_or_the_load_fails_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    good = load_file(write_ip_adapter(tmp_path / "ip.safetensors"))
    save_file({**good, "ip_adapter.0.to_q_ip.weight": torch.zeros(2, 2)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="ip_adapter.0.to_q_ip.weight"):
        load_ip_adapter(tmp_path / "extra.safetensors")
    save_file({**good, "text_model.x": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="'text_model.x'"):
        load_ip_adapter(tmp_path / "foreign.safetensors")
    missing = {k: v for k, v in good.items() if k != "ip_adapter.2.norm_ip_k.weight"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="ip_adapter.2.norm_ip_k.weight"):
        load_ip_adapter(tmp_path / "missing.safetensors")
    save_file({k: v for k, v in good.items() if not k.startswith("ip_adapter.3.")}, tmp_path / "short.safetensors")
    assert load_ip_adapter(tmp_path / "short.safetensors").config.blocks == 3  # depth from the keys
    torch.save({"image_proj": {}, "wrong": {}}, tmp_path / "layout.bin")
    with pytest.raises(CheckpointError, match="layout.bin.*'image_proj' and 'ip_adapter'"):
        load_ip_adapter(tmp_path / "layout.bin")


def test_the_release_layout_at_full_size():
    """The InstantX release's key names and sizes (from the issue's list), built on the meta device: our modules
    have exactly those keys, diffusers' converter accepts them, and the adapter fits SD3.5 Large."""
    import re

    release = IPAdapterConfig(embed_dim=1152, hidden=1280, output_dim=2432, depth=4, heads=20, num_queries=64,
                              ffn_width=5120, timestep_dim=320, blocks=38, model_hidden=2432, head_dim=64)
    with torch.device("meta"):
        ip = IPAdapter(release)
    shapes = {k: tuple(v.shape) for k, v in ip.state_dict().items()}
    assert IPAdapterConfig.from_shapes(shapes) == release
    release.check_fits(2432, 38, 38, 1152)  # SD3.5 Large, SigLIP so400m
    layer = re.compile(r"image_proj\.layers\.\d\.(0\.(norm1|norm2|to_q|to_kv|to_out)|1\.[013]|2\.1)\.(weight|bias)")
    block = re.compile(r"ip_adapter\.\d+\.(norm_ip\.linear\.(weight|bias)|(to_k_ip|to_v_ip|norm_q|norm_k|norm_ip_k)"
                       r"\.weight)")
    top = {"image_proj.latents", "image_proj.proj_in.weight", "image_proj.proj_in.bias", "image_proj.proj_out.weight",
           "image_proj.proj_out.bias", "image_proj.norm_out.weight", "image_proj.norm_out.bias"} | {
        f"image_proj.time_embedding.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert all(k in top or layer.fullmatch(k) or block.fullmatch(k) for k in shapes), sorted(shapes)[:5]
    assert shapes["image_proj.latents"] == (1, 64, 1280) and shapes["ip_adapter.37.to_k_ip.weight"] == (2432, 2432)
    # diffusers' resampler at its defaults (the release sizes) has the same tensors under its converted names
    with torch.device("meta"):
        ref = IPAdapterTimeImageProjection()
    ours = {_diffusers_name(k)[len("image_proj."):]: v for k, v in shapes.items() if k.startswith("image_proj.")}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    print("release adapter parameters (M)", sum(p.numel() for p in ip.parameters()) / 1e6)

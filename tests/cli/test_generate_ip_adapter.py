"""`sd35 generate --ip_adapter FILE --clip_vision FILE --ip_image IMAGE --ip_scale S`: the latent equals the
pipeline with the same hint, scale 0 equals no adapter, the option checks, and `sd35 convert-ip-adapter`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd35_cli.main import main

from .test_generate import _direct_parts, run_json


@pytest.fixture
def ip_files(tmp_path):
    from sd35_core.loading.tiny_ip_adapter import write_ip_adapter, write_siglip

    picture = tmp_path / "style.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(picture)
    return (write_ip_adapter(tmp_path / "ip-adapter.bin"), write_siglip(tmp_path / "sigclip.safetensors"),
            str(picture))


def _latent(capsys, gen_args, tmp_path, name, *extra):
    path = tmp_path / f"{name}.safetensors"
    run_json(capsys, gen_args("--prompt", "a lighthouse at dusk", "--seed", "3", "--postfix", f"_{name}",
                              "--save_latent", str(path), *extra, model="sd3.5_large"))
    return load_file(path)["latent"]


def test_ip_adapter_run_equals_the_pipeline_and_scale_0_is_no_adapter(capsys, gen_args, tmp_path, tiny_models,
                                                                      ip_files):
    from sd35_core.image.siglip_input import encode_image
    from sd35_core.loading.clip_vision import load_siglip_vision
    from sd35_core.loading.ip_adapter import load_ip_adapter
    from sd35_core.sampling.defaults import defaults_for
    from sd35_core.sampling.guidance import CondEntry
    from sd35_core.sampling.ip_adapter import IPAdapterHint
    from sd35_core.sampling.pipeline import txt2img
    from sd35_core.sampling.request import SampleRequest

    adapter, tower, picture = ip_files
    ip = ("--ip_adapter", adapter, "--clip_vision", tower, "--ip_image", picture)
    base = _latent(capsys, gen_args, tmp_path, "base")
    assert torch.equal(_latent(capsys, gen_args, tmp_path, "zero", *ip, "--ip_scale", "0"), base)
    ours = _latent(capsys, gen_args, tmp_path, "ip", *ip, "--ip_scale", "0.7")
    assert (ours - base).abs().max() > 1e-3
    (png,) = (tmp_path / "out").rglob("*_ip/000000.png")
    recorded = json.loads(Image.open(png).text["sd35"])["ip_adapter"]
    assert recorded == {"model": "ip-adapter.bin", "image": "style.png", "scale": 0.7}

    parts, text = _direct_parts(tiny_models, "sd3.5_large")
    pos, neg = text.encode("a lighthouse at dusk"), text.encode("")
    features = encode_image(load_siglip_vision(tower, "fp32"),
                            torch.from_numpy(np.asarray(Image.open(picture)).copy())[None].float() / 255.0)
    d = defaults_for("sd3.5_large")
    request = SampleRequest(steps=2, cfg=d.cfg, sampler=d.sampler, shift=d.shift, seed=3,
                            ip_adapters=[IPAdapterHint(load_ip_adapter(adapter, "fp32"), features, 0.7)])
    expected = txt2img(parts.model.mmdit, CondEntry(*pos), CondEntry(*neg), request, width=64, height=48)
    assert torch.equal(ours, expected.float().cpu())


@pytest.mark.parametrize("extra, message", [
    (("--ip_adapter", "a.bin"), "--ip_adapter needs --clip_vision and --ip_image"),
    (("--ip_image", "a.png", "--clip_vision", "s.safetensors"), "--clip_vision needs --ip_adapter"),
    (("--ip_scale", "0.5"), "--ip_scale needs --ip_adapter"),
])
def test_option_checks_are_one_clear_line(capsys, gen_args, extra, message):
    assert main(gen_args(*extra)) != 0
    err = capsys.readouterr().err
    assert message in err


def test_a_model_the_adapter_does_not_fit_is_named(capsys, gen_args, ip_files):
    adapter, tower, picture = ip_files
    code = main(gen_args("--ip_adapter", adapter, "--clip_vision", tower, "--ip_image", picture))  # Medium: 10 blocks
    err = capsys.readouterr().err
    assert code != 0 and "IP-Adapter does not fit" in err and "10 joint blocks" in err


def test_convert_ip_adapter_writes_safetensors_that_load_the_same(capsys, tmp_path, ip_files):
    from sd35_core.loading.ip_adapter import load_ip_adapter

    adapter, _, _ = ip_files
    assert main(["convert-ip-adapter", adapter]) == 0
    report = json.loads(capsys.readouterr().out)
    target = report["target"]
    assert target.endswith("ip-adapter.safetensors") and report["blocks"] == 4
    a, b = load_ip_adapter(adapter, "fp32").state_dict(), load_ip_adapter(target, "fp32").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["convert-ip-adapter", adapter]) != 0  # exists: --force to replace
    assert "already exists" in capsys.readouterr().err
    torch.save({"image_proj": {"x": torch.zeros(1)}, "ip_adapter": {"y": print}}, tmp_path / "evil.bin")
    assert main(["convert-ip-adapter", str(tmp_path / "evil.bin")]) != 0
    err = capsys.readouterr().err
    assert "evil.bin" in err and "restricted unpickler" in err
    assert not (tmp_path / "evil.safetensors").exists()


# --- batch columns ------------------------------------------------------------------------------------------


def test_ray_rows_take_ip_image_and_ip_scale_columns(tmp_path, ip_files):
    from sd35_cli.batch.errors import BatchError
    from sd35_cli.batch.ray_engine.jobs import check_columns, row_options
    from sd35_cli.batch.rows import Job, Row, convert_value
    from sd35_cli.generate.options import GenerateOptions

    adapter, tower, picture = ip_files
    row = Row(0, 2, {"prompt": "a cat", "ip_image": picture, "ip_scale": convert_value("ip_scale", "0.8", "x", ".")})
    with pytest.raises(BatchError, match="'ip_image' and 'ip_scale' need --ip_adapter"):
        check_columns([row], GenerateOptions())
    base = GenerateOptions(ip_adapter=adapter, clip_vision=tower)
    check_columns([row], base)
    opts = row_options(base, Job(row, 0, 5, row.values))
    assert (opts.ip_image, opts.ip_scale, opts.seed) == (picture, 0.8, 5)


def test_comfyui_engine_finds_the_apply_ip_adapter_image_and_weight():
    from sd35_cli.batch.targets import Target, resolve_targets

    api = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "style.png"}},
        "2": {"class_type": "SD35ApplyIPAdapter", "inputs": {"model": ["5", 0], "ip_adapter": ["6", 0],
                                                             "clip_vision": ["7", 0], "image": ["1", 0],
                                                             "weight": 0.5, "start_percent": 0.0,
                                                             "end_percent": 1.0}},
    }
    targets = resolve_targets(api, ["ip_image", "ip_scale"])
    assert targets == {"ip_image": [Target("1", "image")], "ip_scale": [Target("2", "weight")]}


def test_the_shipped_workflow_takes_the_ip_columns():
    import os

    from sd35_cli.batch.targets import resolve_targets
    from tests.conftest import ROOT

    with open(os.path.join(ROOT, "workflows", "api", "sd3.5_large_ip_adapter.json"), encoding="utf-8") as f:
        api = json.load(f)
    targets = resolve_targets(api, ["prompt", "ip_image", "ip_scale"])
    (image,), (scale,) = targets["ip_image"], targets["ip_scale"]
    assert api[image.node]["_meta"]["title"] == "Load style picture" and image.input == "image"
    assert api[scale.node]["class_type"] == "SD35ApplyIPAdapter" and scale.input == "weight"

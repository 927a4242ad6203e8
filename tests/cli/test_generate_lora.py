"""`sd35 generate --lora PATH[:STRENGTH[:CLIP_STRENGTH]]`: parsing, stacking in order, and the latent equal
to the pipeline with the same LoRA stack applied directly."""

import pytest
import torch
from safetensors.torch import load_file

from sd35_cli.generate.options import LoraSpec, parse_lora
from sd35_cli.main import main

from .test_generate import _direct_parts, run_json


@pytest.mark.parametrize("text, spec", [
    ("a.safetensors", LoraSpec("a.safetensors", 1.0, 1.0)),
    ("a.safetensors:0.6", LoraSpec("a.safetensors", 0.6, 0.6)),
    ("a.safetensors:0.6:-1", LoraSpec("a.safetensors", 0.6, -1.0)),
    ("C:\\loras\\a.safetensors:0.5", LoraSpec("C:\\loras\\a.safetensors", 0.5, 0.5)),
    ("dir:with:colons/a.safetensors", LoraSpec("dir:with:colons/a.safetensors", 1.0, 1.0)),
])
def test_lora_spec_parsing(text, spec):
    assert parse_lora(text) == spec


def _latent(capsys, gen_args, tmp_path, name, *extra):
    path = tmp_path / f"{name}.safetensors"
    run_json(capsys, gen_args("--prompt", "a lighthouse at dusk", "--seed", "3", "--postfix", f"_{name}",
                              "--save_latent", str(path), *extra, model="sd3.5_large"))
    return load_file(path)["latent"]


def test_lora_runs_equal_the_pipeline_and_stack_in_order(capsys, gen_args, tmp_path, tiny_models):
    from sd35_core.loading.lora import applied, load_lora
    from sd35_core.sampling.defaults import defaults_for
    from sd35_core.sampling.guidance import CondEntry
    from sd35_core.sampling.pipeline import txt2img
    from sd35_core.sampling.request import SampleRequest

    lora = tiny_models.lora
    base = _latent(capsys, gen_args, tmp_path, "base")
    assert torch.equal(_latent(capsys, gen_args, tmp_path, "zero", "--lora", f"{lora}:0"), base)
    with_lora = _latent(capsys, gen_args, tmp_path, "one", "--lora", f"{lora}:0.7:-0.4")
    assert not torch.allclose(with_lora, base, atol=1e-3)

    parts, text = _direct_parts(tiny_models, "sd3.5_large")
    encoders = torch.nn.ModuleDict({"clip_l": text.clip_l, "clip_g": text.clip_g, "t5xxl": text.t5})
    resolved = load_lora(lora, parts.model.mmdit, encoders)
    with applied(encoders, [(resolved.clip, -0.4)]):
        pos, neg = text.encode("a lighthouse at dusk"), text.encode("")
    d = defaults_for("sd3.5_large")
    request = SampleRequest(steps=2, cfg=d.cfg, sampler=d.sampler, shift=d.shift, seed=3)
    with applied(parts.model.mmdit, [(resolved.model, 0.7)]):
        expected = txt2img(parts.model.mmdit, CondEntry(*pos), CondEntry(*neg), request, width=64, height=48)
    assert torch.equal(with_lora, expected.float().cpu())

    halves = _latent(capsys, gen_args, tmp_path, "halves", "--lora", f"{lora}:0.35:-0.2", "--lora", f"{lora}:0.35:-0.2")
    assert torch.allclose(halves, with_lora, atol=1e-4)


def test_a_missing_lora_file_is_one_clear_line(capsys, gen_args, tmp_path):
    rc = main(gen_args("--lora", str(tmp_path / "nope.safetensors"), model="sd3.5_large"))
    err = capsys.readouterr().err
    assert rc != 0 and "nope.safetensors" in err and "Traceback" not in err

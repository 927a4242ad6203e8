"""`sd35 generate --cfg_zero_star [--zero_init_steps N]` and `--apg [--apg_eta E --apg_norm_threshold T
--apg_momentum M]`: the latent equals the pipeline with the same request settings (which tests/sd35_core/test_cfg.py
pins to ComfyUI's CFGZeroStar and APG nodes, and tests/host/test_graph_idioms_host.py to KSampler), the option
checks, the --json summary, and the batch columns."""

import pytest
import torch
from safetensors.torch import load_file

from sd35_cli.main import main

from .test_generate import _direct_parts, run_json


def _run(capsys, gen_args, tmp_path, name, *extra):
    path = tmp_path / f"{name}.safetensors"
    summary, _ = run_json(capsys, gen_args("--prompt", "a lighthouse at dusk", "--seed", "3", "--steps", "3",
                                        "--postfix", f"_{name}", "--save_latent", str(path), *extra))
    return load_file(path)["latent"], summary


@pytest.mark.parametrize("flags, variants", [
    (("--cfg_zero_star",), dict(cfg_zero_star=dict())),
    (("--zero_init_steps", "1"), dict(cfg_zero_star=dict(zero_init_steps=1))),
    (("--apg",), dict(apg=dict())),
    (("--apg_eta", "0.5", "--apg_momentum", "-0.5", "--apg_norm_threshold", "2"),
     dict(apg=dict(eta=0.5, momentum=-0.5, norm_threshold=2.0))),
    (("--apg", "--cfg_zero_star", "--slg_scale", "2.5"), dict(apg=dict(), cfg_zero_star=dict())),
])
def test_flags_equal_the_pipeline_with_the_same_request(capsys, gen_args, tmp_path, tiny_models, flags, variants):
    from sd35_core.sampling.cfg import APG, CFGZeroStar
    from sd35_core.sampling.defaults import defaults_for
    from sd35_core.sampling.guidance import CondEntry
    from sd35_core.sampling.pipeline import txt2img
    from sd35_core.sampling.request import SampleRequest, SkipLayerGuidance

    base, _ = _run(capsys, gen_args, tmp_path, "base")
    ours, summary = _run(capsys, gen_args, tmp_path, "ours", *flags)
    assert (ours - base).abs().max() > 1e-3

    parts, text = _direct_parts(tiny_models, "sd3.5_medium")
    pos, neg = text.encode("a lighthouse at dusk"), text.encode("")
    d = defaults_for("sd3.5_medium")
    slg = SkipLayerGuidance(scale=2.5) if "--slg_scale" in flags else None
    request = SampleRequest(steps=3, cfg=d.cfg, sampler=d.sampler, shift=d.shift, seed=3, slg=slg,
                            cfg_zero_star=CFGZeroStar(**variants["cfg_zero_star"]) if "cfg_zero_star" in variants
                            else None,
                            apg=APG(**variants["apg"]) if "apg" in variants else None)
    expected = txt2img(parts.model.mmdit, CondEntry(*pos), CondEntry(*neg), request, width=64, height=48)
    assert torch.equal(ours, expected.float().cpu())
    settings = summary["settings"]
    if "apg" in variants:
        assert settings["apg"] == {"eta": request.apg.eta, "norm_threshold": request.apg.norm_threshold,
                                   "momentum": request.apg.momentum}
    if "cfg_zero_star" in variants:
        assert settings["cfg_zero_star"] == {"zero_init_steps": request.cfg_zero_star.zero_init_steps}


@pytest.mark.parametrize("extra, message", [
    (("--zero_init_steps", "-1"), "--zero_init_steps -1: expected a whole number of steps >= 0"),
    (("--apg_momentum", "1.5"), "--apg_momentum 1.5: expected a number <= 1"),
    (("--apg_norm_threshold", "-2"), "--apg_norm_threshold -2.0: expected a number >= 0"),
])
def test_option_checks_are_one_clear_line(capsys, gen_args, extra, message):
    assert main(gen_args(*extra)) != 0
    assert message in capsys.readouterr().err


def test_ray_rows_and_comfyui_workflows_take_the_apg_columns():
    from sd35_cli.batch.ray_engine.jobs import row_options
    from sd35_cli.batch.rows import Job, Row, convert_value
    from sd35_cli.batch.targets import Target, resolve_targets
    from sd35_cli.generate.options import GenerateOptions

    row = Row(0, 2, {"prompt": "a cat", "apg_eta": convert_value("apg_eta", "0.4", "x", "."),
                     "apg_momentum": convert_value("apg_momentum", "-0.3", "x", ".")})
    opts = row_options(GenerateOptions(apg=True), Job(row, 0, 5, row.values))
    assert (opts.apg, opts.apg_eta, opts.apg_momentum, opts.apg_norm_threshold) == (True, 0.4, -0.3, None)

    api = {"1": {"class_type": "APG", "inputs": {"model": ["2", 0], "eta": 1.0, "norm_threshold": 5.0,
                                                 "momentum": 0.0}}}
    targets = resolve_targets(api, ["apg_eta", "apg_norm_threshold", "apg_momentum"])
    assert targets == {"apg_eta": [Target("1", "eta")], "apg_norm_threshold": [Target("1", "norm_threshold")],
                       "apg_momentum": [Target("1", "momentum")]}

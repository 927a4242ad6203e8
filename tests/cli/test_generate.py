"""`sd35 generate`: a drop-in for the reference's sd3_infer.py main(), run on tiny checkpoints.

Specification points checked here: the reference's option names (and dashed spellings) and output folder
naming, seed types, per-model defaults, that --save_latent holds exactly what sd35_core's pipeline computes
for the same settings, --t5xxl none, and that bad input ends with a one-line error and a non-zero status.
"""

import datetime
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd35_cli.generate import GenerateOptions, output_dir, seeds_for
from sd35_cli.main import UsageError, build_parser, main
from tests.conftest import TOKENIZERS


def run_json(capsys, args):
    rc = main(args + ["--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out), err


def reference_folder(out_dir, model, prompt, postfix, controlnet=None):
    """The folder sd3_infer.py main() makes, written out from its expression."""
    sanitized = re.sub(r"[^\w\-\.]", "_", prompt)
    name = os.path.splitext(os.path.basename(model))[0]
    if controlnet is not None:
        name += "_" + os.path.splitext(os.path.basename(controlnet))[0]
    return os.path.join(out_dir, name, os.path.splitext(os.path.basename(sanitized))[0][:50] + postfix)


def test_prompt_file_roll_seeds_and_reference_folder_naming(capsys, gen_args, tmp_path, tiny_models):
    prompts = tmp_path / "my prompts.txt"
    prompts.write_text("a red cube on a table\nan owl, at night!\n")
    summary, _ = run_json(capsys, gen_args("--prompt", str(prompts), "--seed", "5", "--seed_type", "roll",
                                           "--postfix", "_run1"))
    folder = reference_folder(str(tmp_path / "out"), tiny_models.checkpoints["sd3.5_medium"], str(prompts), "_run1")
    assert summary["out_dir"] == folder
    assert summary["files"] == [os.path.join(folder, "000000.png"), os.path.join(folder, "000001.png")]
    assert summary["prompts"] == ["a red cube on a table", "an owl, at night!"]
    assert summary["seeds"] == [5, 6]
    for f in summary["files"]:
        with Image.open(f) as im:
            assert im.size == (64, 48) and im.mode == "RGB"


def test_prompt_file_skips_blank_and_comment_lines_with_a_note_as_batch_does(tmp_path):
    from sd35_cli.batch.rows import read_prompts as batch_prompts
    from sd35_cli.generate import read_prompts

    path = tmp_path / "p.txt"
    path.write_text("  a red cube  \n\n# a note to self\n   \nan owl\n")
    notes: list[str] = []
    assert read_prompts(str(path), notes.append) == ["a red cube", "an owl"]  # stripped, as the reference
    assert notes == [f"note: --prompt {path}: skipped 2 blank lines (2, 4) and 1 comment line (3)"]
    assert [r.values["prompt"] for r in batch_prompts(str(path))] == ["a red cube", "an owl"]
    path.write_text("\n# only a comment\n")
    with pytest.raises(UsageError, match="no prompts.*blank lines and lines starting with # are skipped"):
        read_prompts(str(path))


def test_roll_image_i_equals_a_fixed_run_with_seed_plus_i(capsys, gen_args, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first prompt\nsecond prompt\n")
    run_json(capsys, gen_args("--prompt", str(prompts), "--seed", "40", "--seed_type", "roll", "--postfix", "_a",
                              "--save_latent", str(tmp_path / "roll.safetensors")))
    run_json(capsys, gen_args("--prompt", "second prompt", "--seed", "41", "--postfix", "_b",
                              "--save_latent", str(tmp_path / "one.safetensors")))
    roll = load_file(tmp_path / "roll.safetensors")["latent"]
    one = load_file(tmp_path / "one.safetensors")["latent"]
    assert roll.shape == (2, 16, 6, 8) and one.shape == (1, 16, 6, 8)
    assert torch.equal(roll[1:], one)
    assert not torch.equal(roll[0], roll[1])


def test_seed_types():
    assert seeds_for(7, "fixed", 3) == [7, 7, 7]
    assert seeds_for(7, "roll", 3) == [7, 8, 9]
    draws = iter([11, 22, 33])
    assert seeds_for(7, "rand", 3, rand=lambda: next(draws)) == [11, 22, 33]
    assert all(0 <= s < 100000 for s in seeds_for(7, "rand", 20))


def test_default_postfix_is_the_reference_timestamp():
    now = datetime.datetime(2024, 10, 22, 13, 5, 9)
    path = output_dir("outputs", "models/sd3.5_large.safetensors", "a photo of a cat", None,
                      "models/sd3.5_large_controlnet_canny.safetensors", now)
    assert path == os.path.join("outputs", "sd3.5_large_sd3.5_large_controlnet_canny",
                                "a_photo_of_a_cat_2024-10-22T13-05-09")
    long_prompt = "x" * 80
    assert os.path.basename(output_dir("o", "m.safetensors", long_prompt, "_p")) == "x" * 50 + "_p"


def test_save_latent_equals_the_pipeline_computed_directly(capsys, gen_args, tmp_path, tiny_models):
    from sd35_core.sampling.defaults import defaults_for
    from sd35_core.sampling.guidance import CondEntry
    from sd35_core.sampling.pipeline import txt2img
    from sd35_core.sampling.request import SampleRequest

    latent_file = tmp_path / "latent.safetensors"
    summary, _ = run_json(capsys, gen_args("--prompt", "a lighthouse at dusk", "--seed", "123", "--skip_layer_cfg",
                                           "--steps", "6", "--postfix", "_l", "--save_latent", str(latent_file)))
    saved = load_file(latent_file)
    assert list(saved) == ["latent"]

    # The tiny file's name is not a defaults-table key, so the detected variant's row applies; with
    # --skip_layer_cfg that is SD3.5 Medium's SLG and its cfg 4.0.
    expected = defaults_for("sd3.5_medium", slg=True)
    assert summary["settings"]["cfg"] == expected.cfg == 4.0
    assert summary["settings"]["slg"]["layers"] == list(expected.slg.layers)

    parts, text = _direct_parts(tiny_models, "sd3.5_medium")
    pos, neg = text.encode("a lighthouse at dusk"), text.encode("")
    request = SampleRequest(steps=6, cfg=expected.cfg, sampler=expected.sampler, shift=expected.shift, seed=123,
                            slg=expected.slg)
    latent = txt2img(parts.model.mmdit, CondEntry(*pos), CondEntry(*neg), request, width=64, height=48)
    assert torch.equal(saved["latent"], latent.float().cpu())

    # And the PNG is the reference's decode of exactly that latent.
    img = parts.vae.decode(latent)
    img = (torch.clamp((img + 1) / 2, 0, 1)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")
    with Image.open(summary["files"][0]) as png:
        assert np.array_equal(img, np.asarray(png))


def _direct_parts(tiny_models, variant):
    from sd35_core.loading.loader import load_checkpoint, load_text_encoder
    from sd35_core.text.encoder import SD3TextEncoder
    from sd35_core.text.tokenization import SD3Tokenizer, find_tokenizer_files

    parts = load_checkpoint(tiny_models.checkpoints[variant], "fp32", "cpu")
    enc = {role: load_text_encoder(tiny_models.text_encoders[role], role, "fp32", "cpu")
           for role in ("clip_l", "clip_g", "t5xxl")}
    text = SD3TextEncoder(enc["clip_l"], enc["clip_g"], enc["t5xxl"],
                          SD3Tokenizer.from_files(*find_tokenizer_files(TOKENIZERS)), "cpu")
    return parts, text


def _pixels(path, width, height):
    """The reference's image loading: LANCZOS resize of the file, RGB, [1, 3, H, W] in 0..1."""
    with Image.open(path) as im:
        arr = np.asarray(im.resize((width, height), Image.LANCZOS).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, 2, 0))[None])


def test_init_image_latent_equals_img2img_on_the_vae_mean(capsys, gen_args, tmp_path, tiny_models):
    from sd35_core.sampling.guidance import CondEntry
    from sd35_core.sampling.pipeline import img2img
    from sd35_core.sampling.request import SampleRequest

    picture = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(picture)
    summary, _ = run_json(capsys, gen_args("--prompt", "a boat", "--seed", "9", "--init_image", str(picture),
                                           "--denoise", "0.6", "--steps", "5", "--sampler", "euler", "--cfg", "3",
                                           "--shift", "2", "--postfix", "_i2i",
                                           "--save_latent", str(tmp_path / "i2i.safetensors")))
    assert summary["steps_run"] == 5 - int(5 * (1 - 0.6))
    parts, text = _direct_parts(tiny_models, "sd3.5_medium")
    init = parts.vae.encode(_pixels(picture, 64, 48) * 2 - 1)
    request = SampleRequest(denoise=0.6, steps=5, cfg=3.0, sampler="euler", shift=2.0, seed=9)
    latent = img2img(parts.model.mmdit, CondEntry(*text.encode("a boat")), CondEntry(*text.encode("")), request,
                     init_latent=init)
    assert torch.equal(load_file(tmp_path / "i2i.safetensors")["latent"], latent.float().cpu())


def test_controlnet_run_equals_the_pipeline_with_the_reference_canny_scaling(capsys, gen_args, tmp_path, tiny_models):
    from sd35_core.loading.loader import load_controlnet
    from sd35_core.models.latent import process_in
    from sd35_core.sampling.control import ControlHint
    from sd35_core.sampling.defaults import defaults_for
    from sd35_core.sampling.guidance import CondEntry
    from sd35_core.sampling.pipeline import txt2img
    from sd35_core.sampling.request import SampleRequest

    edges = np.zeros((48, 64, 3), dtype=np.uint8)
    edges[10:12, :] = 255
    edges[:, 30:32] = 255
    picture = tmp_path / "edges.png"
    Image.fromarray(edges).save(picture)
    cn_file = tiny_models.controlnets["canny"]
    summary, _ = run_json(capsys, gen_args("--prompt", "a road", "--seed", "3", "--postfix", "_cn",
                                           "--controlnet_ckpt", cn_file, "--controlnet_cond_image", str(picture),
                                           "--save_latent", str(tmp_path / "cn.safetensors"), model="sd3.5_large"))
    # The tiny file's name is not a table key; its control_type (canny) picks the ControlNet defaults row.
    expected = defaults_for("sd3.5_large_controlnet_canny")
    assert summary["settings"]["defaults_from"] == "sd3.5_large_controlnet_canny"
    assert (summary["settings"]["sampler"], summary["settings"]["cfg"]) == (expected.sampler, expected.cfg)
    assert summary["out_dir"] == reference_folder(str(tmp_path / "out"), tiny_models.checkpoints["sd3.5_large"],
                                                  "a road", "_cn", cn_file)

    parts, text = _direct_parts(tiny_models, "sd3.5_large")
    cn = load_controlnet(cn_file, parts.model, "fp32", "cpu")
    cond = process_in(parts.vae.encode(_pixels(picture, 64, 48) * 255 * 0.5 + 0.5))  # reference canny scaling
    request = SampleRequest(steps=2, cfg=expected.cfg, sampler=expected.sampler, shift=expected.shift, seed=3,
                            controls=[ControlHint(cn, cond)])
    latent = txt2img(parts.model.mmdit, CondEntry(*text.encode("a road")), CondEntry(*text.encode("")), request,
                     width=64, height=48)
    assert torch.equal(load_file(tmp_path / "cn.safetensors")["latent"], latent.float().cpu())


def test_t5xxl_none_runs_without_t5_and_changes_the_result(capsys, gen_args, tmp_path):
    run_json(capsys, gen_args("--prompt", "a cat", "--postfix", "_t5", "--steps", "1",
                              "--save_latent", str(tmp_path / "a.st")))
    summary, _ = run_json(capsys, gen_args("--prompt", "a cat", "--postfix", "_not5", "--t5xxl", "none", "--steps",
                                           "1", "--save_latent", str(tmp_path / "b.st")))
    assert os.path.isfile(summary["files"][0])
    assert not torch.equal(load_file(tmp_path / "a.st")["latent"], load_file(tmp_path / "b.st")["latent"])


def test_subprocess_python_m_with_dashed_spellings_and_fire_style_values(tmp_path, tiny_models, root):
    out = tmp_path / "o"
    cmd = [
        sys.executable, "-m", "sd35_cli", "generate",
        "--prompt", "a tiny house",
        "--model", tiny_models.checkpoints["sd3_medium"],
        "--model-folder", os.path.dirname(tiny_models.text_encoders["clip_l"]),
        "--tokenizers", TOKENIZERS,
        "--out-dir", str(out), "--postfix", "_sub",
        "--width", "32", "--height", "32", "--steps", "2", "--cfg", "4.5",
        "--seed", "7", "--seed-type", "fixed", "--skip_layer_cfg", "False", "--vae", "None",
        "--device", "cpu", "--json",
    ]
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["files"] == [os.path.join(str(out), "tiny-sd3_medium", "a_tiny_house_sub", "000000.png")]
    assert summary["settings"]["cfg"] == 4.5 and summary["settings"]["slg"] is None
    assert summary["settings"]["shift"] == 1.0  # SD3 Medium's default
    assert summary["seconds_per_step"] > 0
    with Image.open(summary["files"][0]) as im:
        assert im.size == (32, 32)


def test_bundled_text_encoders_and_a_bare_model_with_separate_vae(capsys, gen_args, tmp_path, tiny_models):
    from sd35_core.loading.tiny import write_checkpoint

    bundled = write_checkpoint(tmp_path / "all_in_one.safetensors", "sd3.5_large", text_encoders=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    summary, err = run_json(capsys, gen_args("--prompt", "p", "--postfix", "_b", "--model", bundled,
                                             "--model_folder", str(empty), "--skip_layer_cfg"))
    assert summary["variant"] == "sd3.5_large" and os.path.isfile(summary["files"][0])
    # Large has no recommended SLG: --skip_layer_cfg alone changes nothing, as in the reference, and says so.
    assert summary["settings"]["slg"] is None and "note: --skip_layer_cfg" in err
    summary, _ = run_json(capsys, gen_args("--prompt", "p", "--postfix", "_v", "--model", tiny_models.diffusion_model,
                                           "--vae", tiny_models.vae))
    assert summary["variant"] == "sd3.5_medium" and os.path.isfile(summary["files"][0])
    assert main(gen_args("--prompt", "p", "--postfix", "_nv", "--model", tiny_models.diffusion_model)) == 1
    assert "pass --vae" in capsys.readouterr().err


def test_a_diffusers_model_folder_runs_as_the_official_file_with_the_same_weights(capsys, gen_args, tmp_path,
                                                                                  tiny_models):
    from ..sd35_core.loading.test_diffusers_layout import write_transformer, write_vae

    folder = tmp_path / "sd35-medium-diffusers"
    write_transformer(folder / "transformer", "sd3.5_medium")
    write_vae(folder / "vae")
    run_json(capsys, gen_args("--prompt", "p", "--postfix", "_o", "--save_latent", str(tmp_path / "o.safetensors")))
    ours, _ = run_json(capsys, gen_args("--prompt", "p", "--postfix", "_d", "--model", str(folder),
                                        "--save_latent", str(tmp_path / "d.safetensors")))
    assert ours["variant"] == "sd3.5_medium"
    a, b = (load_file(tmp_path / f"{k}.safetensors")["latent"] for k in "od")
    assert torch.equal(a, b)
    assert main(gen_args("--prompt", "p", "--model", str(tmp_path))) == 1
    assert "no diffusers model folder" in capsys.readouterr().err


def test_a_gguf_model_runs_with_a_separate_vae_as_its_dequantized_weights_do(capsys, gen_args, tmp_path,
                                                                            tiny_models):
    from bench.gguf_write import dequantized_state, write_gguf
    from sd35_core.loading.tiny import save_state, tiny_mmdit

    gguf = write_gguf(tmp_path / "tiny-Q4_0.gguf", tiny_mmdit("sd3.5_medium").state_dict(), "Q4_0")
    dense = save_state(tmp_path / "tiny-deq.safetensors", {"": dequantized_state(gguf)})
    latents = {}
    for name, model in (("gguf", gguf), ("dense", dense)):
        summary, _ = run_json(capsys, gen_args("--prompt", "p", "--postfix", f"_{name}", "--model", model,
                                               "--vae", tiny_models.vae, "--dtype", "fp32",
                                               "--save_latent", str(tmp_path / f"{name}.safetensors")))
        assert summary["variant"] == "sd3.5_medium" and os.path.isfile(summary["files"][0])
        latents[name] = load_file(tmp_path / f"{name}.safetensors")["latent"]
    assert torch.equal(latents["gguf"], latents["dense"])
    assert main(gen_args("--prompt", "p", "--postfix", "_nv", "--model", gguf)) == 1
    assert "pass --vae" in capsys.readouterr().err
    flux = write_gguf(tmp_path / "flux.gguf", tiny_mmdit("sd3.5_medium").state_dict(), "F16", arch="flux")
    assert main(gen_args("--prompt", "p", "--postfix", "_f", "--model", flux, "--vae", tiny_models.vae)) == 1
    assert "architecture 'flux' (a Flux diffusion model)" in capsys.readouterr().err


def test_option_spellings_parse_like_the_reference():
    from sd35_cli.generate import options_from_args

    parser = build_parser("generate")
    args = parser.parse_args(["generate", "--model-folder", "m", "--skip_layer_cfg", "--seed_type", "ROLL",
                              "--cfg", "None", "--steps", "40.0", "--slg_layers", "[7, 8]", "123"])
    opts = options_from_args(args)
    assert opts.model_folder == "m" and opts.skip_layer_cfg is True and opts.seed_type == "roll"
    assert opts.cfg is None and opts.steps == 40 and opts.slg_layers == (7, 8)
    assert opts.prompt == "123"  # positional values fill the reference's parameters in order; text stays text
    defaults = GenerateOptions()
    assert (defaults.seed, defaults.seed_type, defaults.width, defaults.denoise, defaults.out_dir) == (
        23, "rand", 1024, 0.8, "outputs")


def test_help_lists_the_reference_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--prompt", "--model", "--model_folder", "--vae", "--out_dir", "--postfix", "--seed",
                   "--seed_type", "--sampler", "--steps", "--cfg", "--shift", "--width", "--height",
                   "--controlnet_ckpt", "--controlnet_cond_image", "--init_image", "--denoise", "--skip_layer_cfg",
                   "--text_encoder_device", "--verbose", "--slg_layers", "--slg_scale", "--slg_start", "--slg_end",
                   "--clip_l", "--clip_g", "--t5xxl", "--tokenizers", "--comfyui", "--device", "--dtype",
                   "--save_latent", "--json"):
        assert option in text
    assert "--cfg 5" in text  # the documented SLG cfg quirk


@pytest.mark.parametrize(
    "change, message",
    [
        (("--model", "{tmp}/missing.safetensors"), "no such file"),
        (("--model", "{tmp}/model.ckpt"), "pickle"),
        (("--model", "{tmp}/junk.safetensors"), "expected"),
        (("--width", "100"), "multiple of 16"),
        (("--steps", "0"), "--steps 0"),
        (("--width", "1024", "--height", "1024"), "at most"),
        (("--slg_layers", "99"), "out of range"),
        (("--denoise", "0", "--init_image", "{tmp}/img.png"), "--denoise"),
        (("--model_folder", "{tmp}"), "clip_l text encoder not found"),
        (("--tokenizers", "{tmp}/none", "--comfyui", "{tmp}/none"), "tokenizer"),
        (("--controlnet_ckpt", "{canny}"), "needs --controlnet_cond_image"),
        (("--init_image", "{tmp}/missing.png"), "no such file"),
        (("--sampler", "plms"), "--sampler plms"),
        (("--clip_l", "{clip_g}"), "this file is CLIP-G"),
        (("--clip_g", "{clip_l}"), "the clip_g slot needs CLIP-G (clip_g.safetensors)"),
    ],
)
def test_bad_input_gives_one_clear_line_and_nonzero_status(capsys, gen_args, tmp_path, tiny_models, monkeypatch,
                                                           change, message):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02pickle")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    Image.new("RGB", (64, 48)).save(tmp_path / "img.png")
    subst = {"tmp": str(tmp_path), "canny": tiny_models.controlnets["canny"],
             "clip_l": tiny_models.text_encoders["clip_l"], "clip_g": tiny_models.text_encoders["clip_g"]}
    args = gen_args("--prompt", "x", "--postfix", "_bad", *[c.format(**subst) for c in change])
    rc = main(args)
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    assert "sd35 generate: error:" in err
    assert message in err.split("sd35 generate: error:", 1)[1]


def test_missing_tokenizers_name_the_options_that_fix_it_and_only_real_places(capsys, gen_args, tmp_path,
                                                                              monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    args = gen_args("--prompt", "x")
    args[args.index("--tokenizers") + 1] = str(tmp_path / "mine")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--tokenizers DIR" in err and "--comfyui PATH" in err
    listed = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    # Only the --tokenizers folder was searched (no --comfyui, no COMFYUI_PATH, the pack is no custom node).
    assert listed and all(place.startswith(str(tmp_path / "mine")) for place in listed), listed


def test_existing_output_folder_is_refused(capsys, gen_args, tmp_path, tiny_models):
    folder = reference_folder(str(tmp_path / "out"), tiny_models.checkpoints["sd3.5_medium"], "same", "_same")
    os.makedirs(folder)
    assert main(gen_args("--prompt", "same", "--postfix", "_same")) == 1
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(folder) == []


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path, root):
    proc = subprocess.run(
        [sys.executable, "-m", "sd35_cli", "generate", "--model", str(tmp_path / "nope.safetensors"),
         "--tokenizers", TOKENIZERS, "--steps", "0"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root), cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "--steps 0" in proc.stderr


def test_bench_runs_the_benchmark_script_and_prints_its_json(capsys):
    # A small shape: this checks the command, not the speed (the benchmark's own defaults are for that).
    assert main(["bench", "--depth", "4", "--hidden", "64", "--size", "64", "--repeats", "1", "--layers", "1,2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["depth"] == 4 and result["config"]["skip_layers"] == [1, 2]
    assert result["slg_step_vs_naive"] > 0


@pytest.mark.slow
def test_compile_gives_the_eager_latent_within_1e_4_and_reports_the_first_step(capsys, gen_args, tmp_path):
    eager_file, compiled_file = tmp_path / "eager.safetensors", tmp_path / "compiled.safetensors"
    run_json(capsys, gen_args("--prompt", "a boat", "--postfix", "_e", "--save_latent", str(eager_file)))
    summary, err = run_json(capsys, gen_args("--prompt", "a boat", "--postfix", "_c", "--compile",
                                             "--save_latent", str(compiled_file)))
    eager, compiled = load_file(eager_file)["latent"], load_file(compiled_file)["latent"]
    assert float((compiled - eager).abs().max() / eager.abs().max()) < 1e-4
    assert summary["seconds"]["first_step"] > 0
    assert "compile: first step" in err


def test_cache_threshold_reuses_steps_and_reports_the_evaluations_saved(capsys, gen_args):
    summary, err = run_json(capsys, gen_args("--prompt", "a boat", "--postfix", "_k", "--steps", "12",
                                             "--cache_threshold", "0.6"))
    cache = summary["cache"]
    assert cache["threshold"] == 0.6 and cache["steps"] == 12
    assert 0 < cache["model_evaluations_saved"] == cache["steps_reused"] < 12
    assert cache["evaluation_ratio"] == round(12 / (12 - cache["steps_reused"]), 3)
    assert f"step cache: {cache['steps_reused']} of 12 steps reused" in err
    plain, _ = run_json(capsys, gen_args("--prompt", "a boat", "--postfix", "_p"))
    assert plain["cache"] is None


def test_a_checkpoint_with_nan_weights_ends_with_one_line_naming_the_step_and_saves_nothing(capsys, gen_args,
                                                                                          tmp_path, tiny_models):
    from safetensors.torch import save_file

    state = load_file(tiny_models.checkpoints["sd3.5_medium"])
    state["model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight"][0, 0] = float("nan")  # a broken merge
    save_file(state, str(tmp_path / "damaged.safetensors"))
    args = gen_args("--prompt", "x", "--postfix", "_nan")
    args[args.index("--model") + 1] = str(tmp_path / "damaged.safetensors")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "sd35 generate: error: sampling: the model's output at step 1 of 2 holds NaN" in err
    assert "bf16 or fp32" in err
    saved = [f for _, _, files in os.walk(tmp_path / "out") for f in files if f.endswith(".png")]
    assert saved == []


def test_bench_vs_comfyui_runs_the_side_by_side_script(capsys, monkeypatch):
    # Without COMFYUI_PATH the script times our side only and says so; the keys are those of the full run.
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert main(["bench", "--vs-comfyui", "--hidden", "128", "--size", "32", "--repeats", "1", "--calls", "1",
                 "--python", sys.executable]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["step_s_ours"] > 0 and result["shape"]["depth"] == 2 and result["dtype"] == "float32"
    assert result["options"]["compile"] is False and "step_s_comfyui" not in result
    assert "COMFYUI_PATH is not set" in err

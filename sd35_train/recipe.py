"""The whole recipe, from the seed to the shipped files: tokenizers, VAE, MMDiT-X, ControlNet.

:func:`run_recipe` writes, under ``out``:

* ``tiny_shapes_sd35.safetensors``: one checkpoint in the official layout (``model.diffusion_model.``,
  ``first_stage_model.``, ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.``), fp16, with the recipe and
  the VAE's latent preview map in its metadata;
* ``tiny_shapes_controlnet_canny.safetensors``: the ControlNet in Stability's release layout;
* ``tokenizers/clip`` and ``tokenizers/t5``: the tokenizer files the bundled encoders were made for;
* ``training_log.json``: the loss curves, the config, the seconds each stage took and the VAE's
  reconstruction check (:mod:`.recon`: held-out pictures through encode and decode, read back by fill ratio
  and compared with the renderer's mask; the run stops with :class:`ReconstructionError` when fewer than
  ``recon_min_class_kept`` keep their shape class).

Each stage keeps its state under ``work`` (every ``checkpoint_every`` steps and when done), so a killed
run started again with the same arguments resumes and ends with the same files. The thread count is fixed
by the config, so two runs on one machine give bit-identical weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sd35_core.loading.tiny import save_state
from sd35_core.models.controlnet import CONTROL_TYPES, SAVE_KEY_MAP
from sd35_core.models.latent import PACK_METADATA_KEY, process_in
from sd35_train.bundled import CHECKPOINT_NAME, CONTROLNET_NAME

from .config import RecipeConfig
from .controlnet_train import control_latents, train_controlnet
from .data import render, spec_for
from .flow import FlowData, new_mmdit, train_mmdit
from .preview import fit_latent_preview
from .recon import reconstruction_check
from .text import (
    STORAGE_DTYPE,
    build_text_encoders,
    encode_captions,
    load_tokenizer,
    t5_file_state,
    text_config_for,
    write_tokenizers,
)
from .vae_train import VAE_CONFIG, encode_all, fold_latent_scale, new_vae, round_to_storage, to_pixels, train_vae

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizers"
LOG_NAME = "training_log.json"
MODEL_TAG = "tiny_shapes"


def training_images(cfg: RecipeConfig) -> tuple[torch.Tensor, list]:
    """The training pictures ``uint8 [N, 64, 64, 3]`` and their specs (split seed ``cfg.seed``)."""
    specs = [spec_for(cfg.seed, i) for i in range(cfg.train_images)]
    return torch.from_numpy(np.stack([render(s) for s in specs])), specs


def _load_into(module: torch.nn.Module, path: str) -> torch.nn.Module:
    module.load_state_dict(load_file(path))
    return module


class ReconstructionError(RuntimeError):
    """The VAE does not keep enough held-out shapes through encode and decode."""


def check_reconstruction(vae, cfg: RecipeConfig) -> dict:
    """:func:`~.recon.reconstruction_check` on ``cfg.recon_images`` held-out pictures; raises
    :class:`ReconstructionError` when fewer than ``cfg.recon_min_class_kept`` of them keep their class."""
    result = reconstruction_check(vae, cfg.recon_images)
    log.info("VAE reconstruction: class kept %.1f %%, mean IoU %.3f (min %.3f) on %d held-out pictures",
             100 * result["class_kept"], result["mean_iou"], result["min_iou"], result["images"])
    if result["class_kept"] < cfg.recon_min_class_kept:
        raise ReconstructionError(
            f"VAE reconstruction: {result['class_kept']:.1%} of {result['images']} held-out pictures keep their "
            f"shape class through encode and decode; the recipe needs {cfg.recon_min_class_kept:.0%} "
            f"(mean IoU {result['mean_iou']:.3f}; per kind {result['class_kept_per_kind']})")
    return result


def run_recipe(out: str, work: str, cfg: RecipeConfig | None = None) -> dict:
    """Run (or resume) every stage and write the shipped files; returns the training log."""
    cfg = cfg or RecipeConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    os.makedirs(out, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    tok_dir = os.path.join(out, TOKENIZER_DIR)
    write_tokenizers(tok_dir)
    text_cfg = text_config_for(tok_dir)
    encoders = build_text_encoders(text_cfg, cfg.seed)
    images, specs = training_images(cfg)
    captions = sorted({s.caption(w) for s in specs for w in range(3)})
    cond = encode_captions(encoders, load_tokenizer(tok_dir), captions)
    row = cond.index()
    caption_rows = torch.tensor([[row[s.caption(w)] for w in range(3)] for s in specs], dtype=torch.long)
    seconds["data_and_text"] = time.perf_counter() - t

    # Stage 1: VAE.
    t = time.perf_counter()
    vae_path = os.path.join(work, "vae.safetensors")
    if os.path.isfile(vae_path):
        vae = _load_into(new_vae(0), vae_path).eval()
        vae_losses = json.load(open(vae_path + ".json"))["losses"]
    else:
        vae, state = train_vae(cfg, images, os.path.join(work, "vae_state.safetensors"))
        round_to_storage(vae)
        scale = fold_latent_scale(vae, images)
        round_to_storage(vae)
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, vae_path)
        vae_losses = state.losses
        json.dump({"losses": vae_losses, "latent_scale": scale}, open(vae_path + ".json", "w"))
    seconds["vae"] = time.perf_counter() - t

    # Stage 1b: the VAE alone must give the shapes back (a shape it cannot decode, no later stage can draw).
    t = time.perf_counter()
    reconstruction = check_reconstruction(vae, cfg)
    seconds["vae_check"] = time.perf_counter() - t

    t = time.perf_counter()
    latents_path = os.path.join(work, "latents.safetensors")
    if os.path.isfile(latents_path):
        latents = load_file(latents_path)["latents"]
    else:
        latents = process_in(encode_all(vae, lambda a, b: to_pixels(images[a:b]), cfg.train_images))
        save_file({"latents": latents.contiguous()}, latents_path)
    seconds["encode_latents"] = time.perf_counter() - t
    log.info("latents: mean %.3f std %.3f", float(latents.mean()), float(latents.std()))
    data = FlowData(latents, caption_rows, cond)

    # Stage 2: MMDiT-X.
    t = time.perf_counter()
    mmdit_path = os.path.join(work, "mmdit.safetensors")
    if os.path.isfile(mmdit_path):
        mmdit = _load_into(new_mmdit(cfg), mmdit_path).eval()
        flow_losses = json.load(open(mmdit_path + ".json"))["losses"]
    else:
        mmdit, state = train_mmdit(cfg, data, os.path.join(work, "mmdit_state.safetensors"))
        round_to_storage(mmdit)
        save_file({k: v.contiguous() for k, v in mmdit.state_dict().items()}, mmdit_path)
        flow_losses = state.losses
        json.dump({"losses": flow_losses}, open(mmdit_path + ".json", "w"))
    seconds["mmdit"] = time.perf_counter() - t

    # One metadata entry: safetensors writes several in hash order, which would make the bytes vary per run.
    preview = fit_latent_preview(latents, images)  # for ComfyUI's live previews
    meta = {PACK_METADATA_KEY: json.dumps({"model": MODEL_TAG, "tokenizers": TOKENIZER_DIR,
                                           "recipe": dataclasses.asdict(cfg), "latent_preview": preview.to_json()},
                                          sort_keys=True)}
    parts = {
        "model.diffusion_model.": mmdit.state_dict(),
        "first_stage_model.": vae.state_dict(),
        "text_encoders.clip_l.transformer.": encoders["clip_l"].state_dict(),
        "text_encoders.clip_g.transformer.": encoders["clip_g"].state_dict(),
        "text_encoders.t5xxl.transformer.": t5_file_state(encoders["t5xxl"]),
    }
    save_state(os.path.join(out, CHECKPOINT_NAME), parts, dtype=STORAGE_DTYPE, metadata=meta)

    # Stage 3: ControlNet (canny), base frozen.
    t = time.perf_counter()
    controls_path = os.path.join(work, "controls.safetensors")
    if os.path.isfile(controls_path):
        controls = load_file(controls_path)["controls"]
    else:
        controls = control_latents(vae, images)
        save_file({"controls": controls.contiguous()}, controls_path)
    log.info("control latents: mean %.3f std %.3f", float(controls.mean()), float(controls.std()))
    cn, cn_state = train_controlnet(cfg, mmdit, data, controls, os.path.join(work, "cn_state.safetensors"))
    round_to_storage(cn)
    cn_file = {SAVE_KEY_MAP.get(k, k): v for k, v in cn.state_dict().items()}
    cn_file["control_type"] = torch.tensor([CONTROL_TYPES["canny"]], dtype=torch.int32)
    save_state(os.path.join(out, CONTROLNET_NAME), {"": cn_file}, dtype=STORAGE_DTYPE,
               metadata={PACK_METADATA_KEY: json.dumps({"model": MODEL_TAG, "base": CHECKPOINT_NAME}, sort_keys=True)})
    seconds["controlnet"] = time.perf_counter() - t

    result = {"config": dataclasses.asdict(cfg), "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "vae_config": dataclasses.asdict(VAE_CONFIG), "vae_reconstruction": reconstruction,
              "losses": {"vae": vae_losses, "mmdit": flow_losses, "controlnet": cn_state.losses}}
    with open(os.path.join(out, LOG_NAME), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result

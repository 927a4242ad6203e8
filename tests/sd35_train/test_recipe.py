"""The recipe end to end on the micro config: files in the official layouts, reproducible, resumable."""

import dataclasses
import os

import pytest
import torch

from sd35_core.loading.loader import load_checkpoint, load_controlnet
from sd35_core.text.tokenization import SD3Tokenizer, find_tokenizer_files
from sd35_train.bundled import CHECKPOINT_NAME, CONTROLNET_NAME
from sd35_train.config import MICRO
from sd35_train.flow import FlowData, new_mmdit, train_mmdit
from sd35_train.recipe import run_recipe
from sd35_train.text import ConditioningCache


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro_out")
    log = run_recipe(str(out), str(tmp_path_factory.mktemp("micro_work")), MICRO)
    return str(out), log


def test_release_files_load_with_the_standard_loaders(micro_run):
    out, log = micro_run
    parts = load_checkpoint(os.path.join(out, CHECKPOINT_NAME))
    assert parts.model.config.depth == MICRO.depth and parts.model.config.qk_norm
    assert parts.model.config.x_block_self_attn_layers == tuple(range(MICRO.depth // 2))
    assert parts.vae is not None and parts.text_encoders is not None and parts.text_encoders.t5 is not None
    cn = load_controlnet(os.path.join(out, CONTROLNET_NAME), parts.model)
    assert cn.control_type_name == "canny" and cn.config.num_layers == MICRO.cn_layers
    # The checkpoint's own tokenizers are found beside it, and their vocabularies fit its embedding tables.
    clip_dir, t5_json = find_tokenizer_files(model_path=os.path.join(out, CHECKPOINT_NAME))
    assert clip_dir.startswith(out) and t5_json.startswith(out)
    tok = SD3Tokenizer.from_files(clip_dir, t5_json)
    assert tok.clip_l.tokenizer.get_vocab_size() == parts.text_encoders.clip_l.config.vocab_size
    assert set(log["losses"]) == {"vae", "mmdit", "controlnet"} and all(log["losses"].values())


def test_two_runs_write_bit_identical_files(micro_run, tmp_path):
    out, _ = micro_run
    again = tmp_path / "out"
    run_recipe(str(again), str(tmp_path / "work"), MICRO)
    for name in (CHECKPOINT_NAME, CONTROLNET_NAME, "tokenizers/clip/vocab.json", "tokenizers/clip/merges.txt",
                 "tokenizers/t5/tokenizer.json"):
        with open(os.path.join(out, name), "rb") as a, open(again / name, "rb") as b:
            assert a.read() == b.read(), name


def _toy_flow_data(n: int = 8) -> FlowData:
    """Two latent patterns, each with its own caption row: something a few steps can learn."""
    gen = torch.Generator().manual_seed(0)
    cond = ConditioningCache(["", "a", "b"], torch.randn(3, 154, 256, generator=gen),
                             torch.randn(3, 192, generator=gen))
    patterns = torch.randn(2, 16, 8, 8, generator=gen)
    rows = torch.tensor([[1, 1, 1], [2, 2, 2]] * (n // 2))
    return FlowData(patterns[torch.arange(n) % 2], rows, cond)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    cfg = dataclasses.replace(MICRO, flow_steps=6, checkpoint_every=3)
    data = _toy_flow_data()
    straight, _ = train_mmdit(cfg, data)
    state_path = str(tmp_path / "state.safetensors")
    train_mmdit(dataclasses.replace(cfg, flow_steps=3), data, state_path)  # "killed" after its save at step 3
    resumed, state = train_mmdit(cfg, data, state_path)
    assert state.step == 6
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_few_flow_steps_lower_the_loss():
    cfg = dataclasses.replace(MICRO, flow_steps=100, flow_batch=8, log_every=10, warmup=5, flow_lr=3e-3)
    _, state = train_mmdit(cfg, _toy_flow_data())
    losses = [loss for _, loss in state.losses]
    assert losses[-1] < 0.75 * losses[0], losses


def test_new_models_start_as_zero_output_blocks():
    model = new_mmdit(MICRO)
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert all(torch.count_nonzero(b.x_block.adaLN_modulation[1].weight) == 0 for b in model.joint_blocks)

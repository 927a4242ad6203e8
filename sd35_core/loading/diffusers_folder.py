"""A diffusers model folder given as the model path: its parts' files, each seen in the official layout.

The official HF repos (``stabilityai/stable-diffusion-3.5-large`` and the others) and diffusers'
``save_pretrained`` write one folder per part: ``transformer/``, ``vae/``, ``text_encoder/`` (CLIP-L),
``text_encoder_2/`` (CLIP-G), ``text_encoder_3/`` (T5-XXL). Each holds one ``.safetensors`` file or shards with
a ``*.safetensors.index.json``. A part whose folder holds only pickles (``.bin``) is refused, as everywhere.
Which part is which comes from the folder names diffusers gives them; what each file holds is still checked
by its keys when it loads.
"""

from __future__ import annotations

import glob
import json
import os

from ..errors import CheckpointError
from .checkpoint import PICKLE_SUFFIXES, open_safetensors
from .diffusers_layout import official_view
from .mapped_file import ShardedFile

FOLDER_PARTS = {"mmdit": "transformer", "vae": "vae", "clip_l": "text_encoder", "clip_g": "text_encoder_2",
                "t5xxl": "text_encoder_3"}


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a ``transformer/`` part (what makes it an SD3 diffusers model folder)."""
    return os.path.isdir(os.path.join(os.fspath(path), FOLDER_PARTS["mmdit"]))


def open_part(folder: str, sub: str):
    """The file (or shards) of part folder ``sub``, seen in the official layout; ``None`` when it is absent."""
    d = os.path.join(folder, sub)
    if not os.path.isdir(d):
        return None
    indexes = sorted(glob.glob(os.path.join(d, "*.safetensors.index.json")))
    if indexes:
        return official_view(_sharded(indexes[0]))
    files = sorted(glob.glob(os.path.join(d, "*.safetensors")))
    if len(files) == 1:
        return official_view(open_safetensors(files[0]))
    if files:
        raise CheckpointError(f"{d}: expected one .safetensors file or a *.safetensors.index.json for its shards; "
                              f"found {len(files)} files and no index")
    pickles = sorted(os.path.basename(p) for p in os.listdir(d) if p.lower().endswith(PICKLE_SUFFIXES))
    found = f"only {', '.join(pickles)} (pickle files can run code and are not loaded)" if pickles else "nothing"
    raise CheckpointError(f"{d}: expected the part's weights as .safetensors; found {found}")


def _sharded(index_path: str) -> ShardedFile:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index_path}: expected a shard index with a 'weight_map' object") from None
    d = os.path.dirname(index_path)
    sharded = ShardedFile(index_path, [open_safetensors(os.path.join(d, n)) for n in names])
    missing = sorted(set(weight_map) - set(sharded.keys()))
    if missing:
        raise CheckpointError(f"{index_path}: expected every tensor of the index in its shards; "
                              f"{len(missing)} are not (first: '{missing[0]}')")
    return sharded


def open_model_folder(path: str | os.PathLike) -> dict[str, object]:
    """``{part: file}`` for the parts present in a diffusers model folder; refuses a folder without a transformer."""
    folder = os.fspath(path)
    if not is_model_folder(folder):
        entries = ", ".join(sorted(os.listdir(folder))[:8]) if os.path.isdir(folder) else "no such folder"
        raise CheckpointError(f"{folder}: expected a diffusers SD3/SD3.5 model folder (transformer/, vae/, "
                              f"text_encoder/, text_encoder_2/, text_encoder_3/); it holds: {entries or 'nothing'}")
    out = {}
    for part, sub in FOLDER_PARTS.items():
        file = open_part(folder, sub)
        if file is not None:
            out[part] = file
    return out

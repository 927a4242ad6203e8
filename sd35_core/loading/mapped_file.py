"""Files seen in the official key layout: a renaming view over one file, and one file made of several shards.

Both offer the interface ``load_weights`` reads (``keys``, ``shape``, ``shapes``, ``dtype``, ``tensor``,
``read_into``, ``error``, ``used``), so detection, configs from shapes, loading and the unused-tensor check run
on them unchanged. Neither copies the weights: a view reads each official tensor straight from its pieces in the
file (a fused tensor such as ``attn.qkv`` from ``to_q``, ``to_k`` and ``to_v``) into the one tensor being loaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import CheckpointError


@dataclass(frozen=True)
class Piece:
    """Part of an official tensor: tensor ``key`` of the underlying file, or only its first-axis ``rows``."""

    key: str
    rows: tuple[int, int] | None = None


class MappedFile:
    """``file`` under other key names: each key is its pieces of ``file`` concatenated along the first axis.

    ``shapes`` gives each key's shape (a piece may be reshaped: a diffusers VAE stores attention as linear
    ``[C, C]`` weights where the official layout has 1x1 convolutions ``[C, C, 1, 1]``); ``layout`` says what
    the file was, for messages.
    """

    def __init__(self, file, sources: Mapping[str, Sequence[Piece]], shapes: Mapping[str, tuple[int, ...]],
                 layout: str):
        self.file = file
        self.path, self.name, self.metadata = file.path, file.name, file.metadata
        self.layout = layout
        self._sources = {k: tuple(v) for k, v in sources.items()}
        self._shapes = {k: tuple(v) for k, v in shapes.items()}
        self.used: set[str] = set()

    def keys(self) -> list[str]:
        return list(self._sources)

    def __contains__(self, key: str) -> bool:
        return key in self._sources

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        """Shapes of every key under ``prefix``, keyed with the prefix removed."""
        n = len(prefix)
        return {k[n:]: v for k, v in self._shapes.items() if k.startswith(prefix)}

    def sources(self, key: str) -> tuple[Piece, ...]:
        """The pieces of the underlying file that make ``key``."""
        return self._sources[key]

    def dtype(self, key: str) -> torch.dtype:
        dtypes = {self.file.dtype(p.key) for p in self._sources[key]}
        if len(dtypes) != 1:
            names = ", ".join(f"'{p.key}'" for p in self._sources[key])
            raise self.error(f"{names} (the pieces of '{key}') in one dtype; found {sorted(map(str, dtypes))}")
        return dtypes.pop()

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor in its official shape: a zero-copy view when it is one whole stored tensor."""
        pieces = self._sources[key]
        if len(pieces) == 1 and pieces[0].rows is None:
            return self.file.tensor(pieces[0].key).reshape(self._shapes[key])
        return self.read_into(key, torch.empty(self._shapes[key], dtype=self.dtype(key)))

    def read_into(self, key: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Fill ``out`` with ``key``, each piece read (and converted) straight into its place."""
        if rows is not None:
            raise ValueError(f"read_into '{key}': rows of a mapped tensor are not supported")
        flat = out.view(-1)
        offset = 0
        for piece in self._sources[key]:
            shape = self.file.shape(piece.key)
            if piece.rows is not None:
                shape = (piece.rows[1] - piece.rows[0], *shape[1:])
            n = math.prod(shape)
            self.file.read_into(piece.key, flat[offset : offset + n], piece.rows)
            offset += n
        if offset != out.numel():
            raise ValueError(f"read_into '{key}': {out.numel()} elements in out, {offset} in its pieces")
        return out

    def error(self, expected: str) -> CheckpointError:
        return CheckpointError(f"{self.path} ({self.layout}): expected {expected}")


class ShardedFile:
    """Several ``.safetensors`` shards read as one file (diffusers and transformers write large models so)."""

    def __init__(self, path: str | os.PathLike, shards: Sequence):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self.shards = list(shards)
        self.metadata = dict(self.shards[0].metadata) if self.shards else {}
        self._owner: dict[str, object] = {}
        for shard in self.shards:
            for key in shard.keys():
                if key in self._owner:
                    raise CheckpointError(f"{self.path}: expected each tensor in one shard; '{key}' is in "
                                          f"{self._owner[key].name} and {shard.name}")
                self._owner[key] = shard
        self.used: set[str] = set()

    def keys(self) -> list[str]:
        return list(self._owner)

    def __contains__(self, key: str) -> bool:
        return key in self._owner

    def shape(self, key: str) -> tuple[int, ...]:
        return self._owner[key].shape(key)

    def shapes(self, prefix: str = "") -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for shard in self.shards:
            out.update(shard.shapes(prefix))
        return out

    def dtype(self, key: str) -> torch.dtype:
        return self._owner[key].dtype(key)

    def tensor(self, key: str) -> torch.Tensor:
        return self._owner[key].tensor(key)

    def read_into(self, key: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self._owner[key].read_into(key, out, rows)

    def error(self, expected: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: expected {expected}")

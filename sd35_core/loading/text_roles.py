"""Which text encoder a file holds (CLIP-L, CLIP-G or T5-XXL), told from its tensor shapes at load time.

SD3 has three text-encoder slots, and a file in the wrong one otherwise only fails when a prompt is encoded
(CLIP-G's missing projection) or at the sampler (a pooled width the model does not take). What the weights show:

* T5 and CLIP differ in layout (``encoder.block.*`` vs ``text_model.*``).
* CLIP-G carries a ``text_projection`` (its pooled vector is projected); CLIP-L is used unprojected, and its
  released file may or may not carry one, so a CLIP without a projection is CLIP-L, one with a projection is
  either.
* The released widths are 768 (CLIP-L) and 1280 (CLIP-G); and whatever the sizes, CLIP-L is the narrower of the
  two, which also tells small test models apart when both slots are filled.

Reading shapes needs only the file headers, so the checks run before any weight is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import CheckpointError
from .checkpoint import SafetensorsFile, find_prefix

ROLES = ("clip_l", "clip_g", "t5xxl")
ROLE_LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
ROLE_FILES = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors",
              "t5xxl": "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors"}
# How the released files are named; a slot's default is the first file whose name contains one of these.
ROLE_NAME_HINTS = {"clip_l": ("clip_l", "clip-l", "clipl"), "clip_g": ("clip_g", "clip-g", "clipg"),
                   "t5xxl": ("t5xxl", "t5-xxl", "t5_xxl", "t5")}
RELEASED_CLIP_WIDTHS = {768: "clip_l", 1280: "clip_g"}
# Where checkpoints that bundle the text encoders keep each of them.
BUNDLED_TEXT_PREFIXES = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}

CLIP_MARKER = "text_model.final_layer_norm.weight"
T5_MARKER = "encoder.final_layer_norm.weight"
_CLIP_EMBED = "text_model.embeddings.token_embedding.weight"
_T5_EMBEDS = ("shared.weight", "encoder.embed_tokens.weight")


class TextEncoderRoleError(CheckpointError):
    """A text encoder file in a slot that wants another kind; the message names the file, what it is, and what the
    slot needs."""


@dataclass(frozen=True)
class TextEncoderIdentity:
    """What a text-encoder file holds, as far as its shapes tell."""

    family: str  # "clip" or "t5"
    width: int
    layers: int
    projection: bool  # a CLIP with text_projection
    role: str | None  # clip_l / clip_g / t5xxl when the file alone tells; None for a CLIP of unreleased width

    def describe(self, role: str | None = None) -> str:
        """``CLIP-G (width 1280, 32 layers, with text_projection)``; ``role`` (a role, or ``"clip"`` for no
        particular one) overrides the label the file alone gives."""
        role = role or self.role
        if self.family == "t5":
            return f"T5-XXL (a T5 encoder, width {self.width}, {self.layers} blocks)"
        label = ROLE_LABELS.get(role, "a CLIP text encoder")
        projection = "with" if self.projection else "no"
        return f"{label} (width {self.width}, {self.layers} layers, {projection} text_projection)"


def identify(file: SafetensorsFile, prefix: str | None = None) -> TextEncoderIdentity | None:
    """The text encoder under ``prefix`` (searched when ``None``), or ``None`` when the file holds none there."""
    keys = file.keys()
    for family, marker in (("clip", CLIP_MARKER), ("t5", T5_MARKER)):
        found = prefix if prefix is not None else find_prefix(keys, marker)
        if found is None or found + marker not in file:
            continue
        shapes = file.shapes(found)
        if family == "clip":
            width = shapes.get(_CLIP_EMBED, (0, 0))[-1]
            layers = len({k.split(".")[3] for k in shapes if k.startswith("text_model.encoder.layers.")})
            projection = "text_projection.weight" in shapes
            role = RELEASED_CLIP_WIDTHS.get(width) or (None if projection else "clip_l")
            return TextEncoderIdentity("clip", width, layers, projection, role)
        embed = next((shapes[k] for k in _T5_EMBEDS if k in shapes), (0, 0))
        layers = len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")})
        return TextEncoderIdentity("t5", embed[-1], layers, False, "t5xxl")
    return None


def _refuse(path: str, identity: TextEncoderIdentity, role: str, why: str = "", is_role: str | None = None):
    because = f", {why}" if why else ""
    return TextEncoderRoleError(
        f"{path}: this file is {identity.describe(is_role)}{because}; the {role} slot needs {ROLE_LABELS[role]} "
        f"({ROLE_FILES[role]})"
    )


def identify_for_role(file: SafetensorsFile, role: str) -> TextEncoderIdentity | None:
    """What ``file`` offers the ``role`` slot: in a checkpoint that bundles the text encoders, the one bundled for
    that role; otherwise the file's own (first) text encoder."""
    bundled = BUNDLED_TEXT_PREFIXES[role]
    if any(bundled + marker in file for marker in (CLIP_MARKER, T5_MARKER)):
        return identify(file, bundled)
    return identify(file)


def check_role(file: SafetensorsFile, role: str, identity: TextEncoderIdentity | None) -> None:
    """Refuse a file that cannot serve ``role`` on its own evidence (the other slots are not known here)."""
    if identity is None:
        return  # the loader reports what the file is instead
    if role == "t5xxl":
        if identity.family != "t5":
            raise _refuse(file.path, identity, role)
        return
    if identity.family == "t5":
        raise _refuse(file.path, identity, role)
    if role == "clip_g" and not identity.projection:
        raise _refuse(file.path, identity, role, "and CLIP-G's pooled output needs one",
                      is_role="clip_l")
    if identity.role is not None and identity.role != role and identity.width in RELEASED_CLIP_WIDTHS:
        raise _refuse(file.path, identity, role, f"by the released {ROLE_LABELS[identity.role]}'s width")


def check_clip_pair(paths: Mapping[str, str], identities: Mapping[str, TextEncoderIdentity | None]) -> None:
    """With both CLIP slots filled: CLIP-L must be the narrower of the two (true of every SD3 release and of
    models of any size), which catches swapped files and the same file in both slots."""
    ident_l, ident_g = identities.get("clip_l"), identities.get("clip_g")
    if ident_l is None or ident_g is None or ident_l.family != "clip" or ident_g.family != "clip":
        return
    if ident_l.width < ident_g.width:
        return
    same = os.path.realpath(paths["clip_l"]) == os.path.realpath(paths["clip_g"])
    why = ("the same file as in the clip_g slot" if same else
           f"not narrower than the clip_g slot's {os.path.basename(paths['clip_g'])} (width {ident_g.width}), "
           "while CLIP-L is the narrower of the two")
    raise _refuse(paths["clip_l"], ident_l, "clip_l", why, is_role="clip_g" if ident_l.projection else "clip")


def check_text_encoder_files(paths: Mapping[str, str]) -> None:
    """Check files meant for the ``clip_l`` / ``clip_g`` / ``t5xxl`` slots from their headers alone: each on its
    own (:func:`check_role`), then the two CLIPs against each other (:func:`check_clip_pair`)."""
    from .checkpoint import open_safetensors

    identities = {}
    for role, path in paths.items():
        file = open_safetensors(path)
        identities[role] = identify_for_role(file, role)
        check_role(file, role, identities[role])
    check_clip_pair(paths, identities)


def role_default(names: Iterable[str], role: str) -> str | None:
    """The first of ``names`` whose file name fits ``role`` (``clip_l*``, ``clip_g*``, ``t5xxl*``), else None."""
    names = list(names)
    for hint in ROLE_NAME_HINTS[role]:
        for name in names:
            if hint in os.path.basename(name).lower():
                return name
    return None

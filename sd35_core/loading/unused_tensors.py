"""Nothing in a user's file is silently ignored: after a load, every tensor was read or is a known harmless extra.

A loader that fills the modules it builds and skips whatever else a file holds turns a file in an unknown layout
(scales it does not apply, a part it does not load, keys it maps wrongly) into a wrong picture without a word.
So each load ends with :func:`check_all_used`: every tensor of the file is either read by a part (recorded in
``file.used`` by ``load_weights``), on :data:`HARMLESS_EXTRAS`, or belongs to another part of the same file that
another loader reads (a checkpoint's diffusion model when only its VAE is asked for). Anything else fails the
load, naming the first few keys and what the file holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..errors import CheckpointError

# Tensors real files carry that no SD3 part needs, each with why it is harmless. Matched on the whole key.
HARMLESS_EXTRAS: dict[str, str] = {
    r"(.+\.)?text_model\.embeddings\.position_ids": "CLIP's position-id buffer (0, 1, 2, ...), rebuilt by the model",
    r"(text_encoders\.\w+\.)?logit_scale": "CLIP's contrastive temperature, unused for text conditioning",
    r"(.+\.)?encoder\.embed_tokens\.weight": "T5's copy of shared.weight (the token embedding, stored twice)",
}
_HARMLESS = [re.compile(p) for p in HARMLESS_EXTRAS]
SHOWN_KEYS = 5


def is_harmless(key: str) -> bool:
    """Whether ``key`` is one of :data:`HARMLESS_EXTRAS`."""
    return any(p.fullmatch(key) for p in _HARMLESS)


def owner(key: str, parts: Mapping[str, str]) -> str | None:
    """The part whose prefix is the longest one ``key`` starts with (a bare part's prefix is ``""``)."""
    best = None
    for part, prefix in parts.items():
        if key.startswith(prefix) and (best is None or len(prefix) > len(parts[best])):
            best = part
    return best


def unused_keys(file, parts: Mapping[str, str], others: Iterable[str] = ()) -> list[str]:
    """Keys of ``file`` nothing read: not in ``file.used``, not harmless, and not owned by one of ``others``
    (parts found in ``parts`` that another load reads)."""
    others = set(others)
    return [k for k in file.keys()
            if k not in file.used and not is_harmless(k) and owner(k, parts) not in others]


def describe_layout(file, parts: Mapping[str, str], labels: Mapping[str, str] | None = None) -> str:
    """What ``file`` holds: each part with its prefix and tensor count, then the tensors no part owns."""
    labels = labels or {}
    keys = file.keys()
    counts = {p: 0 for p in parts}
    loose = 0
    for k in keys:
        p = owner(k, parts)
        if p is None:
            loose += 1
        else:
            counts[p] += 1
    items = [f"{labels.get(p, p)} under '{parts[p]}' ({counts[p]} tensors)" if parts[p] else
             f"{labels.get(p, p)} without a prefix ({counts[p]} tensors)" for p in parts]
    if loose:
        items.append(f"{loose} tensors outside any part")
    return ", ".join(items) if items else f"{len(keys)} tensors of no part this pack knows"


def check_all_used(file, parts: Mapping[str, str], others: Iterable[str] = (),
                   labels: Mapping[str, str] | None = None) -> None:
    """Fail the load when a tensor of ``file`` is neither read, harmless, nor another load's (see the module doc).

    ``parts`` maps every part found in the file to its key prefix; ``others`` are the parts this load leaves to
    another loader; ``labels`` give parts readable names for the message.
    """
    unused = unused_keys(file, parts, others)
    if not unused:
        return
    shown = ", ".join(f"'{k}'" for k in unused[:SHOWN_KEYS])
    more = f" and {len(unused) - SHOWN_KEYS} more" if len(unused) > SHOWN_KEYS else ""
    raise CheckpointError(
        f"{file.path}: expected every tensor to be read by the parts this pack loads; {len(unused)} would be "
        f"ignored: {shown}{more}. The file holds {describe_layout(file, parts, labels)}. A layout this loader does "
        "not know would give wrong pictures, so it is not loaded"
    )

"""The compiled path: the MMDiT-X joint blocks through ``torch.compile``, with a one-warning eager fallback.

The joint blocks are compiled one by one rather than the whole forward, because every way the Guider drives
the model goes through them: the plain CFG pass, the skip-layer pass and its shared prefix, ControlNet
residuals added between blocks, and the step cache that runs the first block alone. Blocks of the same
kind (with or without attn2, the last one without the context MLP) share one graph, since their weights are
graph inputs; shapes are static (``dynamic=False``), so a run compiles once per block kind and batch size
on its first step (the warm-up, which callers time separately) and never again while its shapes stay.

Where compiling cannot work (no C compiler for inductor on the CPU, no Triton for CUDA, a Python that
torch.compile does not support), the first call fails inside torch.compile: the block then runs eagerly,
one warning is logged, and every block stays eager from there on. A genuine error (bad shapes, say) is
raised by the eager call, so it is not hidden.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from .mmditx import MMDiTX

log = logging.getLogger(__name__)


class _CompileState:
    """Shared by the blocks of one model: whether compiling still works and the warning has been given."""

    def __init__(self) -> None:
        self.failed: BaseException | None = None


def _describe(err: BaseException) -> str:
    """The root cause in one line: torch wraps a backend's error (``BackendCompilerFailed: ... raised:``)."""
    while (inner := getattr(err, "inner_exception", None) or err.__cause__) is not None:
        err = inner
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _guarded(compiled: Callable, eager: Callable, state: _CompileState) -> Callable:
    @functools.wraps(eager)
    def forward(*args, **kwargs):
        if state.failed is None:
            try:
                return compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - decided below by running the eager path
                out = eager(*args, **kwargs)  # a genuine error raises here, unchanged
                state.failed = err
                log.warning("torch.compile is unavailable here (%s); the model runs eagerly", _describe(err))
                return out
        return eager(*args, **kwargs)

    return forward


def compile_model(model: MMDiTX, backend: str | Callable = "inductor", mode: str | None = None) -> MMDiTX:
    """Compile ``model``'s joint blocks in place (see the module doc) and return it.

    ``backend`` and ``mode`` are torch.compile's. Compiling again is a no-op; the weights, their dtype and
    device, and LoRA patches applied to them later are all seen by the compiled graphs (weights are graph
    inputs, not constants).
    """
    if getattr(model, "is_compiled", False):
        return model
    state = _CompileState()
    for block in model.joint_blocks:
        eager = block.forward
        try:
            compiled = torch.compile(eager, backend=backend, mode=mode, dynamic=False)
        except Exception as err:  # noqa: BLE001 - torch.compile refuses at once on unsupported Pythons
            log.warning("torch.compile is unavailable here (%s); the model runs eagerly", _describe(err))
            return model
        block.forward = _guarded(compiled, eager, state)
    model.is_compiled = True
    model.compile_state = state
    return model


def compiled_ok(model: MMDiTX) -> bool:
    """True when ``model`` was compiled and compiling has not fallen back to eager."""
    state = getattr(model, "compile_state", None)
    return bool(getattr(model, "is_compiled", False)) and state is not None and state.failed is None

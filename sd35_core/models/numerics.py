"""The non-finite guard: NaN or infinite values stop a run with a message that says where and what to try.

Without it a checkpoint holding NaN (a broken merge or conversion) or a half-precision overflow (SD3.5 in fp16 on
some GPUs) samples to the end and saves a black or noise image without a word. One reduction per step on the
denoised latent (a sum: NaN and inf survive it, and a latent's values are far from overflowing float32) costs one
read of a tensor much smaller than any activation the model computes for it; the full ``isnan``/``isinf`` scan
runs only once something was found, to say which it is.
"""

from __future__ import annotations

import torch

from ..errors import NonFiniteError

WHAT_TO_TRY = ("try loading the weights in bf16 or fp32 (fp16 overflows on SD3.5); if bf16 or fp32 gives the same, "
               "the file may be damaged (a broken merge or conversion): download or convert it again")


def has_non_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds a NaN or an infinity, by one float32 reduction (one sync on an accelerator)."""
    return not bool(torch.isfinite(x.sum(dtype=torch.float32)))


def describe_non_finite(x: torch.Tensor) -> str:
    """``"NaN"``, ``"infinite values"`` or both, and how many of the tensor's values."""
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    kinds = " and ".join(k for k, n in (("NaN", nan), ("infinite values", inf)) if n)
    return f"{kinds} ({nan + inf} of {x.numel()} values)"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_label(module: torch.nn.Module) -> str:
    """How ``module``'s large weights are stored: the dtype of its first linear layer's weight (``fp8`` keeps
    norms and biases in the compute dtype), or its quantisation type when it has one (GGUF)."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear) or hasattr(layer, "weight_quant"):
            quant = getattr(layer, "weight_quant", None)
            qtype = getattr(quant, "qtype", None)
            return getattr(qtype, "name", None) or dtype_name(layer.weight.dtype)
    return dtype_name(next(module.parameters()).dtype)


def check_denoised(denoised: torch.Tensor, step: int, steps: int, weights: str, compute: torch.dtype) -> None:
    """Raise :class:`NonFiniteError` if the model's denoised estimate of step ``step`` (1-based) is not finite;
    ``weights`` is :func:`weights_label` of the model."""
    if has_non_finite(denoised):
        raise NonFiniteError(
            f"sampling: the model's output at step {step} of {steps} holds {describe_non_finite(denoised)} "
            f"(weights {weights}, computing in {dtype_name(compute)}); {WHAT_TO_TRY}"
        )


def check_vae_input(latent: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` if the latent handed to the VAE decoder is not finite (the sampler before it,
    perhaps not this pack's, produced it)."""
    if has_non_finite(latent):
        raise NonFiniteError(
            f"VAE decode: the latent to decode holds {describe_non_finite(latent)}: the sampler that made it went "
            f"wrong; {WHAT_TO_TRY}"
        )


def check_vae_output(pixels: torch.Tensor, weights: str, compute: torch.dtype) -> None:
    """Raise :class:`NonFiniteError` if the decoder turned a finite latent into non-finite pixels."""
    if has_non_finite(pixels):
        raise NonFiniteError(
            f"VAE decode: the decoded image holds {describe_non_finite(pixels)} although the latent was finite "
            f"(VAE weights {weights}, computing in {dtype_name(compute)}); {WHAT_TO_TRY}"
        )

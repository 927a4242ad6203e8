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

# Where the weights are not the suspect (the VAE's input comes from whatever sampler made the latent).
WHAT_TO_TRY = ("try loading the weights in bf16 or fp32 (fp16 overflows on SD3.5); if bf16 or fp32 gives the same, "
               "the file may be damaged (a broken merge or conversion): download or convert it again")
SCALED_FP8 = "scaled fp8"
GGUF = "GGUF"


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


def _storage(layer: torch.nn.Module) -> str:
    quant = getattr(layer, "weight_quant", None)
    # A native ComfyUI model (run by our sampler) marks the same storage its own way: ComfyUI-GGUF's weights carry
    # their ``tensor_type``, ComfyUI's scaled-fp8 layers a ``scale_weight`` parameter.
    qtype = getattr(quant, "qtype", None) if quant is not None else getattr(layer.weight, "tensor_type", None)
    if qtype is not None:
        return f"{GGUF} {getattr(qtype, 'name', qtype)}"
    name = dtype_name(layer.weight.dtype)
    scale = getattr(layer, "weight_scale", None)
    if scale is None:
        scale = getattr(layer, "scale_weight", None)
    if isinstance(scale, torch.Tensor):
        return f"{name} with per-tensor scales ({SCALED_FP8})"
    return name


def weights_label(module: torch.nn.Module) -> str:
    """How ``module``'s large weights are stored: the storage of most of its linear-layer weights, by size.

    ``float32``, ``bfloat16``, ``float16``, ``float8_e4m3fn`` (norms and biases stay in the compute dtype), a
    scaled-fp8 file's ``float8_e4m3fn with per-tensor scales (scaled fp8)``, or ``GGUF Q4_0`` and the like.
    """
    sizes: dict[str, int] = {}
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear) or hasattr(layer, "weight_quant"):
            kind = _storage(layer)
            sizes[kind] = sizes.get(kind, 0) + layer.weight.numel()
    if sizes:
        return max(sizes, key=sizes.__getitem__)
    return dtype_name(next(module.parameters()).dtype)


def what_to_try(weights: str, compute: torch.dtype) -> str:
    """What could help, given how the weights are stored (:func:`weights_label`) and the compute dtype."""
    if compute == torch.float16 or weights == "float16":
        return ("try loading the weights in bf16 or fp32 (fp16 overflows on SD3.5, in storage and in arithmetic); "
                "if bf16 or fp32 gives the same, the file may be damaged: download or convert it again")
    if weights.startswith(GGUF):
        return ("try a less quantized GGUF (Q8_0) or the fp16/bf16 file of the same model; if that samples, this "
                "GGUF lost too much or was converted wrongly: convert or download it again")
    if SCALED_FP8 in weights:
        return ("the per-tensor scales keep fp8 weights in range, so the scaled file itself is the suspect (damaged, "
                "or its scales made for other weights): try the fp16/bf16 release of the same model, and download "
                "or convert the scaled file again")
    if weights.startswith("float8"):
        return ("fp8 without per-tensor scales clips or flushes weights that fall outside its range: load the "
                "weights as bf16, or use a scaled-fp8 file (ComfyUI's *_fp8_scaled); if bf16 gives the same, the "
                "file may be damaged: download or convert it again")
    return ("weights in bf16 or fp32 do not overflow, so the file may be damaged (a broken merge or conversion): "
            "download or convert it again")


def check_denoised(denoised: torch.Tensor, step: int, steps: int, weights: str, compute: torch.dtype) -> None:
    """Raise :class:`NonFiniteError` if the model's denoised estimate of step ``step`` (1-based) is not finite;
    ``weights`` is :func:`weights_label` of the model."""
    if has_non_finite(denoised):
        raise NonFiniteError(
            f"sampling: the model's output at step {step} of {steps} holds {describe_non_finite(denoised)} "
            f"(weights {weights}, computing in {dtype_name(compute)}); {what_to_try(weights, compute)}"
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
            f"(VAE weights {weights}, computing in {dtype_name(compute)}); {what_to_try(weights, compute)}"
        )

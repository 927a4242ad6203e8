"""Shared pieces of the sampler/guidance/pipeline tests: tiny models, conditioning and the reference's
guidance code transcribed line by line (sd3_impls.py) as an independent computation."""

from __future__ import annotations

import functools

import torch

from sd35_core.loading.tiny import tiny_controlnet, tiny_mmdit
from sd35_core.sampling.guidance import CondEntry


@functools.cache
def model(variant: str = "sd3.5_medium", depth: int | None = None, seed: int = 0):
    kw = {} if depth is None else {"depth": depth}
    return tiny_mmdit(variant, seed=seed, **kw).requires_grad_(False)


@functools.cache
def controlnet(seed: int = 0, layers: int = 2):
    return tiny_controlnet(seed=seed, layers=layers).requires_grad_(False)


def cond(m, seed: int, tokens: int = 8, strength: float = 1.0, start: float = 0.0, end: float = 1.0) -> CondEntry:
    g = torch.Generator().manual_seed(seed)
    cfg = m.config
    return CondEntry(
        torch.randn(1, tokens, cfg.context_dim, generator=g),
        torch.randn(1, cfg.pooled_dim, generator=g),
        strength,
        start,
        end,
    )


def latent(batch: int = 1, hw: int = 8, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 16, hw, hw, generator=torch.Generator().manual_seed(seed))


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-4) -> float:
    """The project's parity bar; returns the measured max abs difference."""
    diff = (ours - theirs).abs().max().item()
    assert diff <= tol * max(1.0, theirs.abs().max().item()), diff
    return diff


# ---- the reference (sd3_impls.py), transcribed; `diffusion_model` is our MMDiTX ----------------------
class RefModelSamplingDiscreteFlow:
    def __init__(self, shift=1.0):
        self.shift = shift

    def timestep(self, sigma):
        return sigma * 1000

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image


class RefBaseModel:
    """BaseModel.apply_model with the ControlNet part delegated to `control(x, sigma, y)`."""

    def __init__(self, diffusion_model, shift, control=None):
        self.diffusion_model = diffusion_model
        self.model_sampling = RefModelSamplingDiscreteFlow(shift)
        self.control = control

    def apply_model(self, x, sigma, c_crossattn=None, y=None, skip_layers=(), controlnet_cond=None):
        dtype = self.diffusion_model.compute_dtype
        timestep = self.model_sampling.timestep(sigma).float()
        residuals = None
        if controlnet_cond is not None:
            residuals = self.control(x, sigma, y)
        model_output = self.diffusion_model(
            x.to(dtype),
            timestep,
            context=c_crossattn.to(dtype),
            y=y.to(dtype),
            block_residuals=residuals,
            skip_layers=skip_layers,
        ).float()
        return self.model_sampling.calculate_denoised(sigma, model_output, x)


class RefCFGDenoiser:
    def __init__(self, model, *args):
        self.model = model

    def __call__(self, x, timestep, cond, uncond, cond_scale, **kwargs):
        batched = self.model.apply_model(
            torch.cat([x, x]),
            torch.cat([timestep, timestep]),
            c_crossattn=torch.cat([cond["c_crossattn"], uncond["c_crossattn"]]),
            y=torch.cat([cond["y"], uncond["y"]]),
            **kwargs,
        )
        pos_out, neg_out = batched.chunk(2)
        scaled = neg_out + (pos_out - neg_out) * cond_scale
        return scaled


class RefSkipLayerCFGDenoiser:
    def __init__(self, model, steps, skip_layer_config):
        self.model = model
        self.steps = steps
        self.slg = skip_layer_config["scale"]
        self.skip_start = skip_layer_config["start"]
        self.skip_end = skip_layer_config["end"]
        self.skip_layers = skip_layer_config["layers"]
        self.step = 0

    def __call__(self, x, timestep, cond, uncond, cond_scale, **kwargs):
        batched = self.model.apply_model(
            torch.cat([x, x]),
            torch.cat([timestep, timestep]),
            c_crossattn=torch.cat([cond["c_crossattn"], uncond["c_crossattn"]]),
            y=torch.cat([cond["y"], uncond["y"]]),
            **kwargs,
        )
        pos_out, neg_out = batched.chunk(2)
        scaled = neg_out + (pos_out - neg_out) * cond_scale
        if self.slg > 0 and self.step > (self.skip_start * self.steps) and self.step < (self.skip_end * self.steps):
            skip_layer_out = self.model.apply_model(
                x,
                timestep,
                c_crossattn=cond["c_crossattn"],
                y=cond["y"],
                skip_layers=self.skip_layers,
            )
            scaled = scaled + (pos_out - skip_layer_out) * self.slg
        self.step += 1
        return scaled


def ref_fix_cond(entry: CondEntry, batch: int) -> dict:
    # The reference runs batch 1; a batch of B images repeats the conditioning per image.
    return {"c_crossattn": entry.context.repeat(batch, 1, 1), "y": entry.pooled.repeat(batch, 1)}


# --- The reference's loops (sd3_impls.py), transcribed line by line without tqdm/autocast,
# --- as the independent computation our euler and dpmpp_2m must equal bit for bit.
def _append_dims(x, target_dims):
    dims_to_append = target_dims - x.ndim
    return x[(...,) + (None,) * dims_to_append]


def _to_d(x, sigma, denoised):
    return (x - denoised) / _append_dims(sigma, x.ndim)


def ref_sample_euler(model, x, sigmas, extra_args=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = _to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


def ref_sample_dpmpp_2m(model, x, sigmas, extra_args=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])

    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x

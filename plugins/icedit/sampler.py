"""Our FLUX Fill denoising loop, built from the pipeline's components, equal to `FluxFillPipeline.__call__`.

Why our own: the prompt and the mask are encoded once and shared by every candidate noise; the
candidates step together (one transformer call per step); a run can stop after step m, hand back
its latents and an x0 preview, and resume later from exactly there.

Each seed's generator is drawn from in the stock pipeline's order, so candidate `s` starts from
the same noise as a plain run with seed `s`: (1) the VAE sample of the init image, (2) the noise,
(3) the VAE sample of the masked image. At the first sigma (exactly 1) the init image is weighted
by zero, so we draw its sample without running the encoder.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from assistant.errors import Cancelled, UserError


@dataclass(frozen=True)
class Conditioning:
    """Everything shared by the candidates of one edit: prompt, schedule, masked image, mask."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    image_ids: torch.Tensor
    sigmas: torch.Tensor  # n + 1 values, float32, last 0
    timesteps: torch.Tensor
    guidance: float
    mask: torch.Tensor  # packed, [1, L, 4 s^2]
    masked_mean: torch.Tensor  # VAE latent distribution of the masked canvas, [1, C, h, w]
    masked_std: torch.Tensor
    height: int
    width: int

    @property
    def steps(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class Latents:
    """A batch of candidates after `step` steps: latents, their conditioning, the last velocity."""

    seeds: tuple[int, ...]
    x: torch.Tensor  # [M, L, 4C]
    condition: torch.Tensor  # [M, L, 4C + 4 s^2]: masked-image latents and mask
    step: int = 0
    velocity: torch.Tensor | None = None

    def select(self, index: int) -> Latents:
        """One candidate, as a batch of one (to resume it)."""
        keep = slice(index, index + 1)
        v = None if self.velocity is None else self.velocity[keep]
        return Latents((self.seeds[index],), self.x[keep], self.condition[keep], self.step, v)


class PromptCache:
    """The embeddings of the last `size` prompts. A repeated prompt (another seed, a retry) skips the
    text encoders: a T5 run on the CPU under `--offload encoders`, T5's trip to the GPU and back
    under `--offload model`. Keep one per pipeline: the embeddings are its encoders'."""

    def __init__(self, size: int = 8, max_sequence_length: int = 512):
        self.size = size
        self.max_sequence_length = max_sequence_length
        """T5 pads (and truncates) every prompt to this many tokens: the preset's setting (FLUX's 512)."""
        self._entries: OrderedDict[tuple[str, str], tuple[torch.Tensor, ...]] = OrderedDict()

    def encode(self, pipe, prompt: str, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(prompt embeddings, pooled embeddings, text ids) on `device`."""
        key = (prompt, str(device))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
        )
        if self.size:
            self._entries[key] = value
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value


class FlowSampler:
    """What every FLUX pipeline's loop shares, whatever conditions it (Fill by channel, Kontext by
    sequence): the shifted sigma schedule, the Euler step, the x0 preview and the VAE decode."""

    def __init__(self, pipe, prompts: PromptCache | None = None):
        self.pipe = pipe
        self.prompts = prompts or PromptCache(size=0)

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def schedule(self, image_tokens: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas, timesteps) as the stock pipelines set them: n + 1 sigmas ending at 0, shifted by mu."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.pipe.scheduler.config
        mu = calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        self.pipe.scheduler.set_timesteps(
            sigmas=np.linspace(1.0, 1 / steps, steps), device=self.device, mu=mu
        )
        return self.pipe.scheduler.sigmas.clone(), self.pipe.scheduler.timesteps.clone()

    @staticmethod
    def step(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, i: int) -> torch.Tensor:
        """FlowMatchEulerDiscreteScheduler.step from sigma i to i + 1; NaN or infinity is one line."""
        x = (x.to(torch.float32) + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
        if not bool(torch.isfinite(x).all()):
            raise UserError(
                f"the edit went numerically wrong at step {i + 1} of {len(sigmas) - 1} (NaN or infinity "
                "in the latents): nothing was saved; try another --dtype or adapter"
            )
        return x

    def x0(self, cond, latents) -> torch.Tensor:
        """The clean latents the last velocity points at: x0 = x_t - sigma_t v (a preview)."""
        if latents.velocity is None:
            raise ValueError("no step has run yet: there is no x0 prediction")
        sigma = cond.sigmas[latents.step]
        return (latents.x.to(torch.float32) - sigma * latents.velocity).to(latents.x.dtype)

    @torch.no_grad()
    def decode(self, cond, packed: torch.Tensor) -> list[Image.Image]:
        """Packed latents -> RGB pictures at the conditioning's size, as the stock pipelines post-process them."""
        pipe = self.pipe
        latents = pipe._unpack_latents(packed, cond.height, cond.width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        images = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type="pil")


class FillSampler(FlowSampler):
    """Runs a FluxFillPipeline's components step by step."""

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @torch.no_grad()
    def prepare(
        self, canvas: Image.Image, mask: Image.Image, prompt: str, steps: int, guidance: float
    ) -> Conditioning:
        """Encode the prompt and the masked canvas once; compute the sigma schedule."""
        pipe, device = self.pipe, self.device
        height, width = canvas.height, canvas.width
        prompt_embeds, pooled, text_ids = self.prompts.encode(pipe, prompt, device)
        dtype = prompt_embeds.dtype
        image = pipe.image_processor.preprocess(canvas, height=height, width=width).to(torch.float32)
        mask_image = pipe.mask_processor.preprocess(mask, height=height, width=width)
        masked = (image * (1 - mask_image)).to(device=device, dtype=dtype)
        dist = pipe.vae.encode(masked).latent_dist
        # Packed mask, exactly as prepare_mask_latents lays it out (its latents part is redone per seed).
        packed_mask, _ = pipe.prepare_mask_latents(
            mask_image, dist.mean, 1, pipe.vae.config.latent_channels, 1, height, width, dtype, device, None
        )
        s = pipe.vae_scale_factor
        sigmas, timesteps = self.schedule((height // s // 2) * (width // s // 2), steps)
        lat_h, lat_w = 2 * (height // (s * 2)), 2 * (width // (s * 2))
        return Conditioning(
            prompt_embeds=prompt_embeds,
            pooled=pooled,
            text_ids=text_ids,
            image_ids=pipe._prepare_latent_image_ids(1, lat_h // 2, lat_w // 2, device, dtype),
            sigmas=sigmas,
            timesteps=timesteps,
            guidance=guidance,
            mask=packed_mask,
            masked_mean=dist.mean,
            masked_std=dist.std,
            height=height,
            width=width,
        )

    def start(self, cond: Conditioning, seeds: list[int]) -> Latents:
        """Initial noise and per-seed masked-image latents, drawn in the stock pipeline's order."""
        pipe, dtype = self.pipe, cond.prompt_embeds.dtype
        channels = pipe.vae.config.latent_channels
        s = pipe.vae_scale_factor
        lat_h, lat_w = 2 * (cond.height // (s * 2)), 2 * (cond.width // (s * 2))
        dist_shape, vae_dtype = cond.masked_mean.shape, cond.masked_mean.dtype
        xs, conditions = [], []
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            torch.randn(
                dist_shape, generator=generator, dtype=vae_dtype
            )  # the init image's VAE sample (weight 0)
            noise = torch.randn((1, channels, lat_h, lat_w), generator=generator, dtype=dtype).to(self.device)
            sample = torch.randn(dist_shape, generator=generator, dtype=vae_dtype).to(self.device)
            masked = cond.masked_mean + cond.masked_std * sample
            masked = ((masked - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor).to(dtype)
            xs.append(pipe._pack_latents(noise, 1, channels, lat_h, lat_w))
            packed = pipe._pack_latents(masked, 1, channels, lat_h, lat_w)
            conditions.append(torch.cat((packed, cond.mask), dim=-1))
        return Latents(tuple(seeds), torch.cat(xs), torch.cat(conditions))

    @torch.no_grad()
    def denoise(
        self,
        cond: Conditioning,
        latents: Latents,
        until: int,
        on_step: Callable[[int, int], None] = lambda i, n: None,
        cancel: threading.Event | None = None,
    ) -> Latents:
        """Steps latents.step .. until-1 for the whole batch: one transformer call per step."""
        x, v = latents.x, latents.velocity
        batch = x.shape[0]
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], cond.guidance, device=x.device, dtype=torch.float32).expand(batch)
        for i in range(latents.step, until):
            if cancel is not None and cancel.is_set():
                raise Cancelled("edit cancelled between steps: nothing was saved")
            t = cond.timesteps[i]
            v = self.pipe.transformer(
                hidden_states=torch.cat((x, latents.condition), dim=2),
                timestep=t.expand(batch).to(x.dtype) / 1000,
                guidance=guidance,
                pooled_projections=cond.pooled.expand(batch, -1),
                encoder_hidden_states=cond.prompt_embeds.expand(batch, -1, -1),
                txt_ids=cond.text_ids,
                img_ids=cond.image_ids,
                return_dict=False,
            )[0]
            x = self.step(x, v, cond.sigmas, i)
            on_step(i + 1, cond.steps)
        return replace(latents, x=x, step=until, velocity=v)

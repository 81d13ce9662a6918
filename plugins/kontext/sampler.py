"""Our FLUX Kontext denoising loop, built from the pipeline's components, equal to
`FluxKontextPipeline.__call__` (true CFG and IP-adapters aside, which the engine never uses).

Why our own: the prompt and the source image are encoded once and shared by every candidate noise;
the candidates step together (one transformer call per step); a run can stop after step m, hand
back its latents and an x0 preview, and resume later from exactly there.

Kontext conditions by sequence, not by channel: the packed source latents are appended after the
noise tokens (position ids with first coordinate 1), and only the noise tokens' velocity is kept.
The source is encoded with the VAE's mode, not a sample, so the noise is the first and only draw
from each seed's generator, as in the stock pipeline: candidate `s` starts from a plain run's noise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from PIL import Image

from assistant.errors import Cancelled
from plugins.icedit.sampler import FlowSampler


@dataclass(frozen=True)
class Conditioning:
    """Everything shared by the candidates of one edit: prompt, source latents, schedule."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    source: torch.Tensor  # packed source latents, [1, L, 4C]
    ids: torch.Tensor  # position ids of the noise tokens then the source tokens, [2L, 3]
    sigmas: torch.Tensor  # n + 1 values, float32, last 0
    timesteps: torch.Tensor
    guidance: float
    height: int
    width: int

    @property
    def steps(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class Latents:
    """A batch of candidates after `step` steps: their packed latents and the last velocity."""

    seeds: tuple[int, ...]
    x: torch.Tensor  # [M, L, 4C]
    step: int = 0
    velocity: torch.Tensor | None = None

    def select(self, index: int) -> Latents:
        """One candidate, as a batch of one (to resume it)."""
        keep = slice(index, index + 1)
        v = None if self.velocity is None else self.velocity[keep]
        return Latents((self.seeds[index],), self.x[keep], self.step, v)


class KontextSampler(FlowSampler):
    """Runs a FluxKontextPipeline's components step by step."""

    @torch.no_grad()
    def prepare(self, image: Image.Image, prompt: str, steps: int, guidance: float) -> Conditioning:
        """Encode the prompt and the source (already at a multiple of 16 on each side) once; compute
        the sigma schedule. The output has the source's size."""
        pipe, device = self.pipe, self.device
        width, height = image.size
        prompt_embeds, pooled, text_ids = self.prompts.encode(pipe, prompt, device)
        dtype = prompt_embeds.dtype
        pixels = pipe.image_processor.preprocess(image, height, width).to(device=device, dtype=dtype)
        source = pipe.vae.encode(pixels).latent_dist.mode()
        source = (source - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        channels, lat_h, lat_w = source.shape[1:]
        source = pipe._pack_latents(source, 1, channels, lat_h, lat_w)
        noise_ids = pipe._prepare_latent_image_ids(1, lat_h // 2, lat_w // 2, device, dtype)
        source_ids = noise_ids.clone()
        source_ids[..., 0] = 1
        sigmas, timesteps = self.schedule(noise_ids.shape[0], steps)
        return Conditioning(
            prompt_embeds=prompt_embeds,
            pooled=pooled,
            text_ids=text_ids,
            source=source,
            ids=torch.cat((noise_ids, source_ids)),
            sigmas=sigmas,
            timesteps=timesteps,
            guidance=guidance,
            height=height,
            width=width,
        )

    def start(self, cond: Conditioning, seeds: list[int]) -> Latents:
        """Each seed's initial noise, drawn as `prepare_latents` draws it (CPU generator, then moved)."""
        pipe = self.pipe
        channels = pipe.vae.config.latent_channels
        s = pipe.vae_scale_factor
        lat_h, lat_w = 2 * (cond.height // (s * 2)), 2 * (cond.width // (s * 2))
        xs = []
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            noise = torch.randn(
                (1, channels, lat_h, lat_w), generator=generator, dtype=cond.prompt_embeds.dtype
            )
            xs.append(pipe._pack_latents(noise.to(self.device), 1, channels, lat_h, lat_w))
        return Latents(tuple(seeds), torch.cat(xs))

    @torch.no_grad()
    def denoise(
        self,
        cond: Conditioning,
        latents: Latents,
        until: int,
        on_step: Callable[[int, int], None] = lambda i, n: None,
        cancel: threading.Event | None = None,
    ) -> Latents:
        """Steps latents.step .. until-1 for the whole batch: one transformer call per step.

        The timestep, guidance and pooled prompt go in as a batch of one, whatever the batch: they are
        the same for every candidate, and the transformer broadcasts their embedding. A batch of M
        rows would run those small matmuls as a GEMM instead of the GEMV a plain run uses, whose sums
        round differently, and a resumed candidate would miss a plain run's bytes. On the CPU it then
        matches them exactly (tested); on a GPU, cuBLAS may still pick other kernels for a larger batch."""
        x, v = latents.x, latents.velocity
        batch, tokens = x.shape[:2]
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], cond.guidance, device=x.device, dtype=torch.float32)
        source = cond.source.expand(batch, -1, -1)
        for i in range(latents.step, until):
            if cancel is not None and cancel.is_set():
                raise Cancelled("edit cancelled: nothing was saved")
            t = cond.timesteps[i]
            v = self.pipe.transformer(
                hidden_states=torch.cat((x, source), dim=1),
                timestep=t.expand(1).to(x.dtype) / 1000,
                guidance=guidance,
                pooled_projections=cond.pooled,
                encoder_hidden_states=cond.prompt_embeds.expand(batch, -1, -1),
                txt_ids=cond.text_ids,
                img_ids=cond.ids,
                joint_attention_kwargs={},
                return_dict=False,
            )[0][:, :tokens]
            x = self.step(x, v, cond.sigmas, i)
            on_step(i + 1, cond.steps)
        return replace(latents, x=x, step=until, velocity=v)

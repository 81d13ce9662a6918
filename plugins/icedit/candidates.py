"""Several seeds batched through the transformer: all the steps for -n variations, or the early
filter's first m steps and their x0 canvases (`assistant.early_filter` runs the tournament;
`engine.IceditCandidates` resumes the winner from its step-m latents). Either way each seed paints
what a plain run of it would, up to batched rounding."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from PIL import Image

from assistant.models import EngineEvent, Log, Step
from plugins.icedit.sampler import Conditioning, FillSampler, Latents


def denoise_batch(
    sampler: FillSampler,
    cond: Conditioning,
    seeds: list[int],
    steps: int,
    phase: str,
    events: Callable[[EngineEvent], None],
    cancel: threading.Event,
    chunk: int | None = None,
) -> tuple[Latents, int]:
    """`steps` steps for all seeds batched through the transformer, in smaller chunks while memory is
    short; the latents and the chunk that fitted."""
    chunk = chunk or len(seeds)

    def progress(i: int, n: int) -> None:
        events(Step(i=i, n=n, phase=phase))

    while True:
        try:
            parts = [
                sampler.denoise(cond, sampler.start(cond, seeds[i : i + chunk]), steps, progress, cancel)
                for i in range(0, len(seeds), chunk)
            ]
            break
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            events(Log(text=f"out of memory with {2 * chunk} seeds at once: running {chunk} at a time"))
    batch = Latents(
        seeds=tuple(seeds),
        x=torch.cat([p.x for p in parts]),
        condition=torch.cat([p.condition for p in parts]),
        step=steps,
        velocity=torch.cat([p.velocity for p in parts]),
    )
    return batch, chunk


def run_candidates(
    sampler: FillSampler,
    cond: Conditioning,
    seeds: list[int],
    early_steps: int,
    events: Callable[[EngineEvent], None],
    cancel: threading.Event,
    chunk: int | None = None,
) -> tuple[Latents, list[Image.Image]]:
    """The first m steps for all seeds, batched, and their x0 canvases."""
    batch, chunk = denoise_batch(sampler, cond, seeds, early_steps, "candidates", events, cancel, chunk)
    x0 = sampler.x0(cond, batch)
    canvases = [
        image
        for start in range(0, len(seeds), chunk)
        for image in sampler.decode(cond, x0[start : start + chunk])
    ]
    return batch, canvases

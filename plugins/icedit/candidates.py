"""ICEdit's side of the early filter (`assistant.early_filter` runs the tournament): the candidates'
first m steps batched through the transformer and their x0 canvases; `engine.IceditCandidates`
resumes the winner from its step-m latents, so it paints what a plain run of its seed would (up to
batched rounding)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from PIL import Image

from assistant.models import EngineEvent, Log, Step
from plugins.icedit.sampler import Conditioning, FillSampler, Latents


def run_candidates(
    sampler: FillSampler,
    cond: Conditioning,
    seeds: list[int],
    early_steps: int,
    events: Callable[[EngineEvent], None],
    cancel: threading.Event,
    chunk: int | None = None,
) -> tuple[Latents, list[Image.Image]]:
    """The first m steps for all seeds, batched (in chunks when memory is short), and their x0 canvases."""
    chunk = chunk or len(seeds)

    def progress(i: int, n: int) -> None:
        events(Step(i=i, n=n, phase="candidates"))

    while True:
        try:
            parts = [
                sampler.denoise(
                    cond, sampler.start(cond, seeds[i : i + chunk]), early_steps, progress, cancel
                )
                for i in range(0, len(seeds), chunk)
            ]
            break
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            events(Log(text=f"out of memory with {2 * chunk} candidates at once: running {chunk} at a time"))
    batch = Latents(
        seeds=tuple(seeds),
        x=torch.cat([p.x for p in parts]),
        condition=torch.cat([p.condition for p in parts]),
        step=early_steps,
        velocity=torch.cat([p.velocity for p in parts]),
    )
    x0 = sampler.x0(cond, batch)
    canvases = [
        image
        for start in range(0, len(seeds), chunk)
        for image in sampler.decode(cond, x0[start : start + chunk])
    ]
    return batch, canvases

"""The Kontext engine: FLUX.1 Kontext dev edits the source directly, told the plain instruction.

Unlike ICEdit there is no diptych and no prompt template: the source is resized to the trained
Kontext resolution nearest its aspect ratio (`sizing`), the edit is made at that size, and it comes
back at the source's size unless `native_size`. `request.guidance` is passed through as Kontext's
distilled guidance: Kontext's recommended value is 2.5, while the host's default (50) is ICEdit's,
so pass `--guidance 2.5` for real Kontext edits.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from assistant.errors import Cancelled, UserError
from assistant.models import AdapterInfo, EditRequest, EditResult, Step, WeightsInfo
from assistant.protocols import Events
from plugins.icedit.loading import OOM_HINT
from plugins.icedit.sampler import PromptCache
from plugins.kontext.loading import load_pipeline
from plugins.kontext.options import KontextOptions
from plugins.kontext.presets import get_preset
from plugins.kontext.sampler import Conditioning, KontextSampler, Latents
from plugins.kontext.sizing import TINY_SHRINK, working_size


class KontextEngine:
    """Loads its pipeline on the first edit and keeps it for the next ones."""

    def __init__(self, options: KontextOptions):
        get_preset(options.preset)  # an unknown preset is one line now, not at the first edit
        self.options = options
        self._pipe = None
        self.random_weights = False
        self.adapter: AdapterInfo | None = None
        self.model: WeightsInfo | None = None
        self.prompts = PromptCache()

    def pipeline(self):
        if self._pipe is None:
            self._pipe, self.random_weights, self.adapter, self.model = load_pipeline(self.options)
        return self._pipe

    def _begin(self, request: EditRequest, events: Events, cancel: threading.Event) -> _Edit:
        """Load (once), encode the instruction and the resized source: what every seed shares."""
        prompt = (request.plan.instruction or "").strip()
        if not prompt:
            raise UserError("the plan has no instruction to edit with")
        started = time.perf_counter()
        events(Step(i=0, n=request.steps, phase="load"))
        pipe = self.pipeline()
        loaded = time.perf_counter()
        if cancel.is_set():
            raise Cancelled("edit cancelled: nothing was saved")
        size = working_size(request.source.size, TINY_SHRINK if self.random_weights else 1)
        source = pipe.image_processor.resize(request.source.convert("RGB"), size[1], size[0])
        sampler = KontextSampler(pipe, self.prompts)
        events(Step(i=0, n=request.steps, phase="encode"))
        with _out_of_memory(size, pipe):
            cond = sampler.prepare(source, prompt, request.steps, request.guidance)
        return _Edit(
            self,
            request,
            prompt,
            sampler,
            cond,
            {"load": loaded - started, "encode": time.perf_counter() - loaded},
        )

    def edit(self, request: EditRequest, events: Events, cancel: threading.Event) -> EditResult:
        job = self._begin(request, events, cancel)
        started = time.perf_counter()
        with _out_of_memory(job.size, job.sampler.pipe):
            latents = job.sampler.denoise(
                job.cond,
                job.sampler.start(job.cond, [request.seed]),
                request.steps,
                on_step=lambda i, n: events(Step(i=i, n=n, phase="denoise")),
                cancel=cancel,
            )
        return job.result(latents, request.steps, {"denoise": time.perf_counter() - started}, events)

    def start_candidates(
        self, request: EditRequest, seeds: list[int], events: Events, cancel: threading.Event
    ) -> KontextCandidates:
        """The early filter's first `request.early_steps` steps for every seed in one batch, and
        their x0 previews; `finish` resumes one of them from its step-m latents (the host has checked
        the early steps)."""
        job = self._begin(request, events, cancel)
        started = time.perf_counter()
        with _out_of_memory(job.size, job.sampler.pipe):
            batch = job.sampler.denoise(
                job.cond,
                job.sampler.start(job.cond, seeds),
                request.early_steps,
                on_step=lambda i, n: events(Step(i=i, n=n, phase="candidates")),
                cancel=cancel,
            )
            x0 = job.sampler.x0(job.cond, batch)
            # One at a time: a batch of one-megapixel decodes is the VAE's memory peak times M, and
            # each preview is then the picture a lone candidate of that seed would show.
            previews = [job.fit(job.sampler.decode(job.cond, x0[i : i + 1])[0]) for i in range(len(seeds))]
        return KontextCandidates(previews, job, batch, time.perf_counter() - started)


@dataclass
class KontextCandidates:
    """Candidates after their early steps (`KontextEngine.start_candidates`); `finish` paints one."""

    previews: list[Image.Image]
    job: _Edit
    batch: Latents
    spent: float

    def finish(self, index: int, events: Events, cancel: threading.Event) -> EditResult:
        request = self.job.request
        started = time.perf_counter()
        with _out_of_memory(self.job.size, self.job.sampler.pipe):
            final = self.job.sampler.denoise(
                self.job.cond,
                self.batch.select(index),
                request.steps,
                on_step=lambda i, n: events(Step(i=i, n=n, phase="finish")),
                cancel=cancel,
            )
        nfe = len(self.previews) * request.early_steps + request.steps - request.early_steps
        return self.job.result(final, nfe, {"denoise": self.spent + time.perf_counter() - started}, events)


@contextmanager
def _out_of_memory(size: tuple[int, int], pipe):
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of memory for a {size[0]}x{size[1]} edit on {pipe.device}: {OOM_HINT}"
        ) from None


@dataclass
class _Edit:
    """One edit's shared state: the encoded prompt and source, ready for any seed."""

    engine: KontextEngine
    request: EditRequest
    prompt: str
    sampler: KontextSampler
    cond: Conditioning
    timings: dict[str, float]

    @property
    def size(self) -> tuple[int, int]:
        return self.cond.width, self.cond.height

    def fit(self, image: Image.Image) -> Image.Image:
        """At the source's size, unless the request keeps Kontext's working size."""
        size = self.request.source.size
        return (
            image
            if self.request.native_size or image.size == size
            else image.resize(size, Image.Resampling.LANCZOS)
        )

    def result(self, latents: Latents, nfe: int, timings: dict[str, float], events: Events) -> EditResult:
        events(Step(i=self.request.steps, n=self.request.steps, phase="decode"))
        started = time.perf_counter()
        with _out_of_memory(self.size, self.sampler.pipe):
            image = self.sampler.decode(self.cond, latents.x)[0]
        return EditResult(
            image=self.fit(image),
            seed=latents.seeds[0],
            prompt=self.prompt,
            nfe=nfe,
            timings=self.timings | timings | {"decode": time.perf_counter() - started},
            adapter=self.engine.adapter,
            model=self.engine.model,
            random_weights=self.engine.random_weights,
            extras={"working_size": f"{self.size[0]}x{self.size[1]}"},
        )

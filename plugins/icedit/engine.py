"""The ICEdit engine: an instruction edit as FLUX Fill in-painting the right half of a diptych."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

import prompts
from assistant.errors import Cancelled, UserError
from assistant.models import AdapterInfo, EditRequest, EditResult, EngineEvent, Step
from assistant.settings import Settings
from plugins.icedit.diptych import make_diptych, right_panel
from plugins.icedit.early_filter import early_filter
from plugins.icedit.loading import OOM_HINT, load_pipeline
from plugins.icedit.sampler import FillSampler, PromptCache


class IceditEngine:
    """Loads its pipeline on the first edit and keeps it for the next ones."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._pipe = None
        self.random_weights = False
        self.adapter: AdapterInfo | None = None
        self.prompts = PromptCache()

    def pipeline(self):
        if self._pipe is None:
            self._pipe, self.random_weights, self.adapter = load_pipeline(self.settings)
        return self._pipe

    def edit(
        self, request: EditRequest, events: Callable[[EngineEvent], None], cancel: threading.Event
    ) -> EditResult:
        if not request.plan.instruction:
            raise UserError("the plan has no instruction to edit with")
        ic_prompt = request.plan.ic_prompt or prompts.render("ic_edit.txt", instruction=request.plan.instruction)
        canvas, mask = make_diptych(request.source)
        started = time.perf_counter()
        events(Step(i=0, n=request.steps, phase="load"))
        pipe = self.pipeline()
        loaded = time.perf_counter()
        if cancel.is_set():
            raise Cancelled("edit cancelled: nothing was saved")
        sampler = FillSampler(pipe, self.prompts)
        events(Step(i=0, n=request.steps, phase="encode"))
        try:
            cond = sampler.prepare(canvas, mask, ic_prompt, request.steps, request.guidance)
            encoded = time.perf_counter()
            candidates, verdicts = [], []
            if request.candidates > 1:
                latents, candidates, verdicts = early_filter(
                    sampler,
                    cond,
                    judge=request.judge,
                    instruction=request.plan.instruction,
                    source=request.source,
                    seed=request.seed,
                    candidates=request.candidates,
                    early_steps=request.early_steps,
                    events=events,
                    cancel=cancel,
                )
            else:
                latents = sampler.denoise(
                    cond,
                    sampler.start(cond, [request.seed]),
                    request.steps,
                    on_step=lambda i, n: events(Step(i=i, n=n, phase="denoise")),
                    cancel=cancel,
                )
            denoised = time.perf_counter()
            events(Step(i=request.steps, n=request.steps, phase="decode"))
            painted = sampler.decode(cond, latents.x)[0]
        except torch.OutOfMemoryError:
            raise UserError(
                f"out of memory for a {canvas.width}x{canvas.height} diptych on {pipe.device}: {OOM_HINT}"
            ) from None
        finished = time.perf_counter()
        image = right_panel(painted, None if request.native_size else request.source.size)
        return EditResult(
            image=image,
            seed=latents.seeds[0],
            ic_prompt=ic_prompt,
            nfe=request.steps + (request.candidates - 1) * request.early_steps if candidates else request.steps,
            timings={
                "load": loaded - started,
                "encode": encoded - loaded,
                "denoise": denoised - encoded,
                "decode": finished - denoised,
            },
            adapter=self.adapter,
            candidates=candidates,
            verdicts=verdicts,
            random_weights=self.random_weights,
        )

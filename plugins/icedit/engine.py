"""The ICEdit engine: an instruction edit as FLUX Fill in-painting the right half of a diptych."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

import prompts
from assistant.errors import Cancelled, UserError
from assistant.models import AdapterInfo, EditRequest, EditResult, EngineEvent, Step, WeightsInfo
from plugins.icedit.candidates import denoise_batch, run_candidates
from plugins.icedit.diptych import make_diptych, right_panel
from plugins.icedit.loading import OOM_HINT, load_pipeline
from plugins.icedit.options import IceditOptions
from plugins.icedit.presets import get_preset
from plugins.icedit.sampler import Conditioning, FillSampler, Latents, PromptCache


class IceditEngine:
    """Loads its pipeline on the first edit and keeps it for the next ones."""

    def __init__(self, options: IceditOptions):
        self.options = options
        self._pipe = None
        self.random_weights = False
        self.adapter: AdapterInfo | None = None
        self.model: WeightsInfo | None = None
        preset = get_preset(options.preset)
        self.panel_width = preset.panel_width
        self.prompts = PromptCache(max_sequence_length=preset.max_sequence_length)
        self._loading = threading.Lock()

    def pipeline(self):
        with self._loading:  # the chat's background load and the first edit may ask at once
            if self._pipe is None:
                self._pipe, self.random_weights, self.adapter, self.model = load_pipeline(self.options)
                if self.adapter is not None and self.adapter.scale != self.options.lora_scale:
                    self.set_adapter_scale(self.options.lora_scale)  # changed while it loaded
        return self._pipe

    def load(self) -> None:
        self.pipeline()

    def set_adapter_scale(self, scale: float) -> None:
        """The LoRA's (or LoRA-MoE's) strength on the loaded pipeline, or on the one that loads."""
        self.options = self.options.model_copy(update={"lora_scale": scale})
        if self._pipe is None or self.adapter is None:
            return
        if self.adapter.kind == "lora-moe":
            from plugins.icedit import moe

            moe.set_scale(self._pipe.transformer, scale)
        else:
            self._pipe.set_adapters(["icedit"], adapter_weights=[scale])
        self.adapter = self.adapter.model_copy(update={"scale": scale})

    def _begin(
        self, request: EditRequest, events: Callable[[EngineEvent], None], cancel: threading.Event
    ) -> _Edit:
        """Load (once), encode the prompt and the diptych: what every seed of this edit shares."""
        if not (request.plan.instruction or "").strip():
            raise UserError("the plan has no instruction to edit with")
        prompt = request.plan.ic_prompt or prompts.render("ic_edit.txt", instruction=request.plan.instruction)
        canvas, mask = make_diptych(request.source, self.panel_width)
        started = time.perf_counter()
        events(Step(i=0, n=request.steps, phase="load"))
        pipe = self.pipeline()
        loaded = time.perf_counter()
        if cancel.is_set():
            raise Cancelled("edit cancelled: nothing was saved")
        sampler = FillSampler(pipe, self.prompts)
        events(Step(i=0, n=request.steps, phase="encode"))
        with _out_of_memory(canvas, pipe):
            cond = sampler.prepare(canvas, mask, prompt, request.steps, request.guidance)
        return _Edit(
            self,
            request,
            prompt,
            canvas,
            sampler,
            cond,
            {"load": loaded - started, "encode": time.perf_counter() - loaded},
        )

    def edit(
        self, request: EditRequest, events: Callable[[EngineEvent], None], cancel: threading.Event
    ) -> EditResult:
        job = self._begin(request, events, cancel)
        started = time.perf_counter()
        with _out_of_memory(job.canvas, job.sampler.pipe):
            latents = job.sampler.denoise(
                job.cond,
                job.sampler.start(job.cond, [request.seed]),
                request.steps,
                on_step=lambda i, n: events(Step(i=i, n=n, phase="denoise")),
                cancel=cancel,
            )
        return job.result(latents, request.steps, {"denoise": time.perf_counter() - started}, events)

    def edit_variations(
        self,
        request: EditRequest,
        seeds: list[int],
        events: Callable[[EngineEvent], None],
        cancel: threading.Event,
    ) -> list[EditResult]:
        """Finished edits of every seed, batched through the transformer: one prompt encoding, one
        diptych, the steps once for all (in chunks when memory is short)."""
        job = self._begin(request, events, cancel)
        started = time.perf_counter()
        with _out_of_memory(job.canvas, job.sampler.pipe):
            batch, _ = denoise_batch(job.sampler, job.cond, seeds, request.steps, "denoise", events, cancel)
        each = {"denoise": (time.perf_counter() - started) / len(seeds)}
        return [job.result(batch.select(i), request.steps, each, events) for i in range(len(seeds))]

    def start_candidates(
        self,
        request: EditRequest,
        seeds: list[int],
        events: Callable[[EngineEvent], None],
        cancel: threading.Event,
    ) -> IceditCandidates:
        """The early filter's first steps for every seed, batched; the winner resumes from there."""
        job = self._begin(request, events, cancel)
        started = time.perf_counter()
        with _out_of_memory(job.canvas, job.sampler.pipe):
            batch, canvases = run_candidates(
                job.sampler, job.cond, seeds, request.early_steps, events, cancel
            )
        return IceditCandidates([right_panel(c) for c in canvases], job, batch, time.perf_counter() - started)


@dataclass
class IceditCandidates:
    """Candidates after their early steps (`IceditEngine.start_candidates`); `finish` paints one."""

    previews: list[Image.Image]
    job: _Edit
    batch: Latents
    spent: float
    """Seconds the early steps took, counted into the winner's denoise time."""

    def finish(
        self, index: int, events: Callable[[EngineEvent], None], cancel: threading.Event
    ) -> EditResult:
        request, job = self.job.request, self.job
        started = time.perf_counter()
        with _out_of_memory(job.canvas, job.sampler.pipe):
            final = job.sampler.denoise(
                job.cond,
                self.batch.select(index),
                request.steps,
                on_step=lambda i, n: events(Step(i=i, n=n, phase="finish")),
                cancel=cancel,
            )
        nfe = request.steps + (len(self.previews) - 1) * request.early_steps
        return job.result(final, nfe, {"denoise": self.spent + time.perf_counter() - started}, events)


@contextmanager
def _out_of_memory(canvas, pipe):
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of memory for a {canvas.width}x{canvas.height} diptych on {pipe.device}: {OOM_HINT}"
        ) from None


@dataclass
class _Edit:
    """One edit's shared state: the encoded prompt and diptych, ready for any seed."""

    engine: IceditEngine
    request: EditRequest
    prompt: str
    canvas: Image.Image
    sampler: FillSampler
    cond: Conditioning
    timings: dict[str, float]

    def result(self, latents: Latents, nfe: int, timings: dict[str, float], events) -> EditResult:
        """Decode the finished latents to the right panel (at the source's size unless native)."""
        events(Step(i=self.request.steps, n=self.request.steps, phase="decode"))
        started = time.perf_counter()
        with _out_of_memory(self.canvas, self.sampler.pipe):
            painted = self.sampler.decode(self.cond, latents.x)[0]
        image = right_panel(painted, None if self.request.native_size else self.request.source.size)
        return EditResult(
            image=image,
            seed=latents.seeds[0],
            prompt=self.prompt,
            nfe=nfe,
            timings=self.timings | timings | {"decode": time.perf_counter() - started},
            adapter=self.engine.adapter,
            model=self.engine.model,
            random_weights=self.engine.random_weights,
        )

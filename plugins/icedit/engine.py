"""The ICEdit engine: an instruction edit as FLUX Fill in-painting the right half of a diptych."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import prompts
from assistant.errors import Cancelled, UserError
from assistant.models import EditRequest, EditResult, EngineEvent, Step
from assistant.settings import Settings
from plugins.icedit.diptych import make_diptych, right_panel


class IceditEngine:
    """Loads its pipeline on the first edit and keeps it for the next ones."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._pipe = None
        self.random_weights = False

    def pipeline(self):
        if self._pipe is None:
            from plugins.icedit.loading import load_pipeline

            self._pipe, self.random_weights = load_pipeline(self.settings)
        return self._pipe

    def edit(
        self, request: EditRequest, events: Callable[[EngineEvent], None], cancel: threading.Event
    ) -> EditResult:
        import torch

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

        def on_step(_pipe, i, _t, _tensors):
            if cancel.is_set():
                raise Cancelled("edit cancelled between steps: nothing was saved")
            events(Step(i=i + 1, n=request.steps, phase="denoise"))
            return {}

        events(Step(i=0, n=request.steps, phase="encode"))
        try:
            painted = pipe(
                prompt=ic_prompt,
                image=canvas,
                mask_image=mask,
                height=canvas.height,
                width=canvas.width,
                guidance_scale=request.guidance,
                num_inference_steps=request.steps,
                generator=torch.Generator("cpu").manual_seed(request.seed),
                callback_on_step_end=on_step,
            ).images[0]
        except torch.OutOfMemoryError:
            raise UserError(
                f"out of memory for a {canvas.width}x{canvas.height} diptych on {pipe.device}: "
                "try a smaller image or a smaller dtype"
            ) from None
        finished = time.perf_counter()
        image = right_panel(painted, None if request.native_size else request.source.size)
        return EditResult(
            image=image,
            seed=request.seed,
            ic_prompt=ic_prompt,
            nfe=request.steps,
            timings={"load": loaded - started, "edit": finished - loaded},
            random_weights=self.random_weights,
        )

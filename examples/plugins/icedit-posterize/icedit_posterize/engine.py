"""The posterize engine: no model, yet an engine like any other (steps, cancel, seeds, early filter).

Each seed draws a tint (near the colour the instruction names, if it names one: "make it teal") and
a starting noise from a generator seeded by (seed, instruction). Every step moves the picture a share
of the way from there to the posterized, tinted source and adds a fading noise; the last step lands on
it. A candidate's state after its early steps is kept, so finishing it paints what a plain edit paints.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageColor, ImageOps

from assistant.errors import Cancelled, UserError
from assistant.models import EditRequest, EditResult, Step
from assistant.protocols import Events

NOISE = 48.0
"""Standard deviation of the starting noise, in 0..255 pixel units; it fades to 0 at the last step."""


def named_colour(instruction: str) -> tuple[int, int, int] | None:
    """The first word of the instruction that is a colour name PIL knows ("teal", "gold", "snow")."""
    for word in instruction.lower().replace(",", " ").split():
        try:
            return ImageColor.getrgb(word)[:3]
        except ValueError:
            continue
    return None


@dataclass
class _Run:
    """One seed's picture in the making: where it is, where it goes, and its generator."""

    seed: int
    instruction: str
    tint: str
    x: np.ndarray
    target: np.ndarray
    rng: np.random.Generator
    done: int = 0

    def step(self, n: int) -> None:
        self.done += 1
        left = n - self.done
        self.x += (self.target - self.x) / (left + 1)
        if left:
            self.x += self.rng.normal(0.0, NOISE * left / n, self.x.shape)

    def picture(self) -> Image.Image:
        return Image.fromarray(np.clip(np.rint(self.x), 0, 255).astype(np.uint8))


class PosterizeEngine:
    """`bits` per channel kept by the posterize (1..8) and how far the tint is laid over it (0..1): the
    engine's knobs are its constructor's arguments."""

    random_weights = False

    def __init__(self, bits: int = 3, strength: float = 0.35):
        if not 1 <= bits <= 8 or not 0.0 <= strength <= 1.0:
            raise UserError(f"posterize takes bits 1..8 and strength 0..1, not {bits} and {strength}")
        self.bits, self.strength = bits, strength

    def _start(self, request: EditRequest, seed: int) -> _Run:
        instruction = (request.plan.instruction or "").strip()
        if not instruction:
            raise UserError("the plan has no instruction to edit with")
        key = int.from_bytes(hashlib.sha256(instruction.encode()).digest()[:8], "big")
        rng = np.random.default_rng([seed, key])
        named = named_colour(instruction)
        drawn = (np.array(named, float) + rng.normal(0.0, 24.0, 3)) if named else rng.uniform(0.0, 255.0, 3)
        tint = np.clip(np.rint(drawn), 0, 255)
        source = request.source.convert("RGB")
        poster = np.asarray(ImageOps.posterize(source, self.bits), dtype=np.float64)
        target = (1 - self.strength) * poster + self.strength * tint
        start = np.asarray(source, dtype=np.float64) + rng.normal(0.0, NOISE, poster.shape)
        return _Run(
            seed=seed,
            instruction=instruction,
            tint="#" + "".join(f"{int(c):02x}" for c in tint),
            x=start,
            target=target,
            rng=rng,
        )

    def _advance(
        self, runs: list[_Run], to: int, n: int, phase: str, events: Events, cancel: threading.Event
    ) -> None:
        """All runs (a batch, in step) from where they are to step `to` of `n`, a Step event per step."""
        while runs[0].done < to:
            if cancel.is_set():
                raise Cancelled("edit cancelled between steps: nothing was saved")
            for run in runs:
                run.step(n)
            events(Step(i=runs[0].done, n=n, phase=phase))

    def _result(self, run: _Run, nfe: int) -> EditResult:
        return EditResult(
            image=run.picture(),
            seed=run.seed,
            prompt=run.instruction,
            nfe=nfe,
            extras={"tint": run.tint, "bits": self.bits, "strength": self.strength},
        )

    def edit(self, request: EditRequest, events: Events, cancel: threading.Event) -> EditResult:
        """The picture is the source's size either way (`native_size` has no other size to keep)."""
        run = self._start(request, request.seed)
        self._advance([run], request.steps, request.steps, "posterize", events, cancel)
        return self._result(run, request.steps)

    def start_candidates(
        self, request: EditRequest, seeds: list[int], events: Events, cancel: threading.Event
    ) -> PosterizeCandidates:
        runs = [self._start(request, seed) for seed in seeds]  # the host has checked the early steps
        self._advance(runs, request.early_steps, request.steps, "candidates", events, cancel)
        spent = len(seeds) * request.early_steps + request.steps - request.early_steps
        return PosterizeCandidates(self, runs, request.steps, spent)


class PosterizeCandidates:
    """Candidates after their early steps; any one can be finished, more than once (each from a copy)."""

    def __init__(self, engine: PosterizeEngine, runs: list[_Run], steps: int, spent: int):
        self.engine, self.runs, self.steps, self.spent = engine, runs, steps, spent
        self.previews = [run.picture() for run in runs]

    def finish(self, index: int, events: Events, cancel: threading.Event) -> EditResult:
        run = copy.deepcopy(self.runs[index])
        self.engine._advance([run], self.steps, self.steps, "finish", events, cancel)
        return self.engine._result(run, self.spent)

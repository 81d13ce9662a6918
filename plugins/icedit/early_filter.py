"""Early-filter inference-time scaling (ICEdit, section 3.3), which the reference code never released.

M noises (seeds S .. S+M-1) run their first m steps together; each candidate's x0 prediction is
decoded to a preview of the right panel; a VLM judge picks the one that follows the instruction
best; only the winner goes on, resumed from its step-m latents (the paper restarts it from
noise: resuming gives the same image and saves m steps). NFE = M*m + n - m.

The tournament follows the paper's pairwise, bubble-sort spirit: a current best meets each other
candidate once (M-1 matches). Each match is judged in both orders and averaged,
p = (p_AB + 1 - p_BA) / 2, so a judge's preference for the first (or second) image cancels out.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
from PIL import Image

from assistant.errors import UserError
from assistant.images import encode_png, sha256
from assistant.models import (
    CandidateInfo,
    Candidates,
    EngineEvent,
    Log,
    Step,
    Verdict,
    VerdictInfo,
    next_seed,
)
from plugins.icedit.diptych import right_panel
from plugins.icedit.sampler import Conditioning, FillSampler, Latents


def _both_orders(judge, instruction: str, source: Image.Image, a: Image.Image, b: Image.Image) -> tuple[float, float]:
    """The judge's P(a better than b) and P(b better than a); one batched call when it has compare_many."""
    many = getattr(judge, "compare_many", None)
    if many is not None:
        answers = list(many(instruction, source, [(a, b), (b, a)]))
    else:
        answers = [judge.compare(instruction, source, a, b), judge.compare(instruction, source, b, a)]
    for p in answers:
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p) or not 0 <= p <= 1:
            raise ValueError(f"judge returned {p!r}, not a probability")
    p_ab, p_ba = answers
    return float(p_ab), float(p_ba)


def tournament(
    judge,
    instruction: str,
    source: Image.Image,
    candidates: list[CandidateInfo],
    events: Callable[[EngineEvent], None] = lambda event: None,
) -> tuple[int, list[VerdictInfo]]:
    """Index of the winner and every verdict. Ties and failed matches go to the lower seed."""
    best, verdicts = 0, []
    for challenger in range(1, len(candidates)):
        a, b = candidates[best], candidates[challenger]
        note = p_ab = p_ba = None
        try:
            p_ab, p_ba = _both_orders(judge, instruction, source, a.preview, b.preview)
            p = (p_ab + 1 - p_ba) / 2
        except UserError:
            raise  # missing weights and the like: the person must hear it, not a coin flip
        except Exception as e:  # noqa: BLE001 - any judge failure: this match falls back to seed order
            p = 1.0 if a.seed < b.seed else 0.0
            note = f"judge failed ({type(e).__name__}: {str(e)[:80]}): lower seed wins"
        keep = p > 0.5 or (p == 0.5 and a.seed < b.seed)
        a.score += p
        b.score += 1 - p
        (a if keep else b).wins += 1
        winner = a if keep else b
        verdicts.append(VerdictInfo(a=a.seed, b=b.seed, p=p, p_ab=p_ab, p_ba=p_ba, winner=winner.seed, note=note))
        events(Verdict(a=a.seed, b=b.seed, p=p))
        if not keep:
            best = challenger
    return best, verdicts


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
                sampler.denoise(cond, sampler.start(cond, seeds[i : i + chunk]), early_steps, progress, cancel)
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
    canvases = [image for start in range(0, len(seeds), chunk) for image in sampler.decode(cond, x0[start : start + chunk])]
    return batch, canvases


def early_filter(
    sampler: FillSampler,
    cond: Conditioning,
    *,
    judge,
    instruction: str,
    source: Image.Image,
    seed: int,
    candidates: int,
    early_steps: int,
    events: Callable[[EngineEvent], None],
    cancel: threading.Event,
) -> tuple[Latents, list[CandidateInfo], list[VerdictInfo]]:
    """Run the filter; return the winner resumed to the last step, the candidates and the verdicts."""
    if judge is None:
        raise UserError("the early filter needs a judge (--judge)")
    if not 1 <= early_steps < cond.steps:
        raise UserError(f"--early-steps must be between 1 and --steps - 1 ({cond.steps - 1}), not {early_steps}")
    seeds = [next_seed(seed, i) for i in range(candidates)]
    batch, canvases = run_candidates(sampler, cond, seeds, early_steps, events, cancel)
    previews = [right_panel(c) for c in canvases]
    infos = [
        CandidateInfo(seed=s, preview=p, preview_sha256=sha256(encode_png(p))) for s, p in zip(seeds, previews, strict=True)
    ]
    events(Candidates(seeds=seeds, previews=previews))
    events(Step(i=0, n=candidates - 1, phase="judge"))
    winner, verdicts = tournament(judge, instruction, source, infos, events)
    finish = lambda i, n: events(Step(i=i, n=n, phase="finish"))
    final = sampler.denoise(cond, batch.select(winner), cond.steps, on_step=finish, cancel=cancel)
    return final, infos, verdicts

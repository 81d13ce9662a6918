"""Early-filter inference-time scaling (ICEdit, section 3.3), which the reference code never released.

M noises (seeds S .. S+M-1) run their first m steps; the engine shows a preview of each; a judge
picks the one that follows the instruction best; only the winner goes on, resumed from its step-m
state (the paper restarts it from noise: resuming gives the same image and saves m steps).
NFE = M*m + n - m.

The host runs it, so every engine that implements `protocols.CandidateEngine` (start the noises,
show previews, finish one) gets the same tournament, ties, failure handling and verdict records.

The tournament follows the paper's pairwise, bubble-sort spirit: a current best meets each other
candidate once (M-1 matches). Each match is judged in both orders and averaged,
p = (p_AB + 1 - p_BA) / 2, so a judge's preference for the first (or second) image cancels out.
"""

from __future__ import annotations

import threading
import time
from typing import cast

from PIL import Image

from assistant.errors import UserError
from assistant.models import (
    CandidateInfo,
    Candidates,
    EditRequest,
    EditResult,
    Step,
    Verdict,
    VerdictInfo,
    next_seed,
    probability,
)
from assistant.protocols import CandidateEngine, Engine, Events, Judge
from sessions.identity import pixel_digest


def _both_orders(
    judge: Judge, instruction: str, source: Image.Image, a: Image.Image, b: Image.Image
) -> tuple[float, float]:
    """The judge's P(a better than b) and P(b better than a), in one `compare_many` call."""
    answers = list(judge.compare_many(instruction, source, [(a, b), (b, a)]))
    if len(answers) != 2:
        raise ValueError(f"judge returned {len(answers)} answers for 2 pairs")
    p_ab, p_ba = (probability(p) for p in answers)
    return p_ab, p_ba


def tournament(
    judge: Judge,
    instruction: str,
    source: Image.Image,
    candidates: list[CandidateInfo],
    events: Events = lambda event: None,
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
        verdicts.append(
            VerdictInfo(a=a.seed, b=b.seed, p=p, p_ab=p_ab, p_ba=p_ba, winner=winner.seed, note=note)
        )
        events(Verdict(a=a.seed, b=b.seed, p=p))
        if not keep:
            best = challenger
    return best, verdicts


def run(
    engine: Engine,
    request: EditRequest,
    judge: Judge | None,
    events: Events,
    cancel: threading.Event,
    engine_name: str = "this engine",
) -> EditResult:
    """The filter over `request.candidates` seeds from `request.seed`: the winner's finished result,
    with every candidate and verdict recorded on it."""
    if judge is None:
        raise UserError("the early filter needs a judge (--judge)")
    if not callable(getattr(engine, "start_candidates", None)):  # the one method the filter needs
        raise UserError(f"{engine_name} cannot run the early filter: use --candidates 1")
    if not 1 <= request.early_steps < request.steps:
        raise UserError(
            f"--early-steps must be between 1 and --steps - 1 ({request.steps - 1}), not "
            f"{request.early_steps}"
        )
    seeds = [next_seed(request.seed, i) for i in range(request.candidates)]
    started = cast(CandidateEngine, engine).start_candidates(request, seeds, events, cancel)
    previews = list(started.previews)
    if len(previews) != len(seeds):
        raise ValueError(f"{engine_name} gave {len(previews)} previews for {len(seeds)} candidates")
    infos = [
        CandidateInfo(seed=s, preview=p, preview_sha256=pixel_digest(p))
        for s, p in zip(seeds, previews, strict=True)
    ]
    events(Candidates(seeds=seeds, previews=previews))
    events(Step(i=0, n=len(seeds) - 1, phase="judge"))
    judging = time.perf_counter()
    winner, verdicts = tournament(judge, request.plan.instruction or "", request.source, infos, events)
    judged = time.perf_counter() - judging
    result = started.finish(winner, events, cancel)
    return result.model_copy(
        update={"candidates": infos, "verdicts": verdicts, "timings": result.timings | {"judge": judged}}
    )

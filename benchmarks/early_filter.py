"""Early filter: ours (batched candidates, winner resumed) vs the paper's procedure, side by side.

The paper's procedure, on the stock FluxFillPipeline: each candidate runs alone for its first m
steps (prompt and mask encoded again each time), its x0 preview is decoded, the judge compares
them, and the winner is restarted from noise for all n steps. Ours encodes once, steps the M
candidates together, and resumes the winner from step m. Same inputs, same judge, same seeds.

    python benchmarks/early_filter.py --quick        # tiny preset, CPU, well under a minute
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import prompts
from assistant import early_filter
from assistant.early_filter import tournament
from assistant.models import CandidateInfo, EditPlan, EditRequest
from assistant.protocols import PairwiseJudge
from plugins.icedit.diptych import make_diptych, right_panel
from plugins.icedit.engine import IceditEngine
from plugins.icedit.options import IceditOptions
from plugins.icedit.sampler import PromptCache

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "chelsea.png"


class BrightnessJudge(PairwiseJudge):
    """A deterministic stand-in for the VLM, the same for both procedures: brighter wins."""

    def compare(self, instruction, source, a, b):
        return float(np.asarray(a, dtype=np.float32).mean() > np.asarray(b, dtype=np.float32).mean())


def ours(engine, source, seed, m, n, candidates, judge):
    engine.prompts = PromptCache(size=0)  # encode the prompt every run, as the paper's procedure does
    request = EditRequest(
        source=source,
        plan=EditPlan(intent="edit", instruction="add snow"),
        seed=seed,
        steps=n,
        guidance=50.0,
        candidates=candidates,
        early_steps=m,
        native_size=True,
    )
    return early_filter.run(engine, request, judge, lambda e: None, threading.Event()).seed


def paper(pipe, canvas, mask, source, prompt, seed, m, n, candidates, judge):
    previews = []
    for s in range(seed, seed + candidates):
        seen = {}

        def stop_at_m(p, i, t, tensors, seen=seen):
            seen[i] = tensors["latents"]
            if i + 1 == m:
                p._interrupt = True
            return {}

        pipe(
            prompt=prompt,
            image=canvas,
            mask_image=mask,
            height=canvas.height,
            width=canvas.width,
            guidance_scale=50.0,
            num_inference_steps=n,
            generator=torch.Generator("cpu").manual_seed(s),
            callback_on_step_end=stop_at_m,
            output_type="latent",
        )
        sigmas = pipe.scheduler.sigmas
        velocity = (seen[m - 1] - seen[m - 2]) / (sigmas[m] - sigmas[m - 1])
        x0 = seen[m - 1] - sigmas[m] * velocity
        latents = pipe._unpack_latents(x0, canvas.height, canvas.width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        decoded = pipe.image_processor.postprocess(
            pipe.vae.decode(latents, return_dict=False)[0], output_type="pil"
        )
        previews.append(right_panel(decoded[0]))
    infos = [CandidateInfo(seed=seed + i, preview=p, preview_sha256="") for i, p in enumerate(previews)]
    winner, _ = tournament(judge, "add snow", source, infos)
    pipe(
        prompt=prompt,
        image=canvas,
        mask_image=mask,
        height=canvas.height,
        width=canvas.width,
        guidance_scale=50.0,
        num_inference_steps=n,
        generator=torch.Generator("cpu").manual_seed(seed + winner),
    )
    return seed + winner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=12 steps, 1 repeat")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--early-steps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    n, m, M = (12 if args.quick else args.steps), args.early_steps, args.candidates
    repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)
    engine = IceditEngine(IceditOptions(preset="tiny"))
    pipe = engine.pipeline()
    source = Image.open(EXAMPLE).convert("RGB")
    canvas, mask = make_diptych(source)
    prompt = prompts.render("ic_edit.txt", instruction="add snow")
    judge = BrightnessJudge()
    with torch.no_grad():
        ours(engine, source, 0, m, n, M, judge)  # warm-up
        times = {"paper": [], "ours": []}
        winners = {}
        for _ in range(repeats):
            start = time.perf_counter()
            winners["paper"] = paper(pipe, canvas, mask, source, prompt, 100, m, n, M, judge)
            times["paper"].append(time.perf_counter() - start)
            start = time.perf_counter()
            winners["ours"] = ours(engine, source, 100, m, n, M, judge)
            times["ours"].append(time.perf_counter() - start)
    paper_s, ours_s = min(times["paper"]), min(times["ours"])
    print(
        f"tiny preset, {canvas.width}x{canvas.height} diptych, M={M} candidates, m={m} of n={n} steps, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"paper (one at a time, winner restarted): {paper_s:.3f} s  NFE {M * m + n}  winner seed {winners['paper']}"
    )
    print(
        f"ours  (batched, winner resumed):         {ours_s:.3f} s  NFE {M * m + n - m}  winner seed {winners['ours']}"
    )
    print(f"speedup {paper_s / ours_s:.2f}")


if __name__ == "__main__":
    main()

"""Our denoising loop against the stock FluxFillPipeline, batching, stopping and resuming."""

import threading

import numpy as np
import pytest
import torch

from assistant.errors import Cancelled
from plugins.icedit.diptych import make_diptych
from plugins.icedit.presets import build_tiny
from plugins.icedit.sampler import FillSampler

PROMPT = (
    "A diptych with two side-by-side images of the same scene. On the right, the scene is exactly the same "
    "as on the left but add snow"
)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny()


@pytest.fixture
def diptych(photo):
    return make_diptych(photo.resize((64, 48)))


def stock(pipe, canvas, mask, seed, steps, **kw):
    return pipe(
        prompt=PROMPT,
        image=canvas,
        mask_image=mask,
        height=canvas.height,
        width=canvas.width,
        guidance_scale=50.0,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        **kw,
    ).images


@pytest.mark.parametrize("seed", [0, 11])
def test_equals_the_stock_pipeline_for_the_same_seed(pipe, diptych, seed):
    canvas, mask = diptych
    sampler = FillSampler(pipe)
    cond = sampler.prepare(canvas, mask, PROMPT, 5, 50.0)
    ours = sampler.denoise(cond, sampler.start(cond, [seed]), 5)
    theirs = stock(pipe, canvas, mask, seed, 5, output_type="latent")
    assert (ours.x - theirs).abs().max() <= 1e-5
    image = np.asarray(sampler.decode(cond, ours.x)[0], dtype=np.int16)
    stock_image = np.asarray(stock(pipe, canvas, mask, seed, 5)[0], dtype=np.int16)
    assert np.abs(image - stock_image).max() <= 1


def test_a_batch_gives_each_seed_its_own_plain_run_and_resume_equals_a_straight_run(pipe, diptych):
    canvas, mask = diptych
    sampler = FillSampler(pipe)
    cond = sampler.prepare(canvas, mask, PROMPT, 6, 50.0)
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        batch = sampler.denoise(cond, sampler.start(cond, [3, 4, 5]), 2)
    finally:
        hook.remove()
    assert len(calls) == 2  # one transformer call per step for all three candidates
    for index, seed in enumerate([3, 4, 5]):
        straight = sampler.denoise(cond, sampler.start(cond, [seed]), 6)
        resumed = sampler.denoise(cond, batch.select(index), 6)
        # Batched matmuls may sum in another order: rounding-level differences, no more.
        assert (resumed.x - straight.x).abs().max() <= 1e-5
        assert resumed.seeds == (seed,) and resumed.step == 6
    assert (batch.x[0] - batch.x[1]).abs().max() > 0.1  # different seeds, different noise


def test_x0_preview_is_the_clean_latent_the_last_velocity_points_at(pipe, diptych):
    canvas, mask = diptych
    sampler = FillSampler(pipe)
    cond = sampler.prepare(canvas, mask, PROMPT, 4, 50.0)
    early = sampler.denoise(cond, sampler.start(cond, [1, 2]), 2)
    x0 = sampler.x0(cond, early)
    sigma = cond.sigmas[2]
    assert torch.allclose(x0, early.x - sigma * early.velocity, atol=1e-6)
    # One more Euler step with the same velocity down to sigma 0 lands on x0.
    assert torch.allclose(early.x + (0 - sigma) * early.velocity, x0, atol=1e-5)
    previews = sampler.decode(cond, x0)
    assert [p.size for p in previews] == [canvas.size, canvas.size]


def test_progress_and_cancel_between_steps(pipe, diptych):
    canvas, mask = diptych
    sampler = FillSampler(pipe)
    cond = sampler.prepare(canvas, mask, PROMPT, 5, 50.0)
    cancel, seen = threading.Event(), []

    def on_step(i, n):
        seen.append((i, n))
        if i == 3:
            cancel.set()

    with pytest.raises(Cancelled):
        sampler.denoise(cond, sampler.start(cond, [0]), 5, on_step=on_step, cancel=cancel)
    assert seen == [(1, 5), (2, 5), (3, 5)]

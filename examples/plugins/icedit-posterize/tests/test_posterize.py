"""The sample plugin against icedit's contract tests (`assistant.testing`), and what is its own."""

import threading

import icedit_posterize
import numpy as np
import pluggy
import pytest
from icedit_posterize.engine import PosterizeEngine
from icedit_posterize.rewriter import TidyRewriter

from assistant import hookspecs
from assistant.errors import UserError
from assistant.models import EditPlan, EditRequest
from assistant.plugins import registrations
from assistant.testing import EngineContract, RewriterContract, gradient


class TestPosterizeEngine(EngineContract):
    steps = 4
    early_steps = 2
    candidates = 3

    def make_engine(self):
        return PosterizeEngine()


class TestTidyRewriter(RewriterContract):
    intents = (
        ("add a hat", "edit"),
        ("  Make it look like WINTER!  ", "edit"),
        ("undo", "undo"),
        ("Redo.", "redo"),
        ("again", "retry"),
        ("undo the hat", "edit"),
    )

    def make_rewriter(self):
        return TidyRewriter()


def edit(engine, instruction="add a hat", seed=1):
    request = EditRequest(
        source=gradient(), plan=EditPlan(intent="edit", instruction=instruction), seed=seed, steps=3
    )
    return engine.edit(request, lambda event: None, threading.Event())


def test_a_named_colour_tints_near_it_and_the_seed_still_matters():
    teal = [edit(PosterizeEngine(strength=1.0), "make it teal", seed=s).image for s in (1, 2)]
    for picture in teal:
        assert np.abs(np.asarray(picture, float).mean(axis=(0, 1)) - (0, 128, 128)).max() < 80
    assert teal[0].tobytes() != teal[1].tobytes()


def test_bits_change_the_picture_and_bad_knobs_are_one_line():
    assert edit(PosterizeEngine(bits=1)).image.tobytes() != edit(PosterizeEngine(bits=3)).image.tobytes()
    with pytest.raises(
        UserError, match=r"^posterize takes bits 1\.\.8 and strength 0\.\.1, not 9 and 0\.35$"
    ):
        PosterizeEngine(bits=9)


def test_the_hooks_register_the_engine_and_the_rewriter():
    pm = pluggy.PluginManager("icedit_assistant")
    pm.add_hookspecs(hookspecs)
    pm.register(icedit_posterize, name="posterize")
    engines, rewriters = registrations("engines", pm), registrations("rewriters", pm)
    assert list(engines) == ["posterize"] and list(rewriters) == ["tidy"]
    spec = engines["posterize"][1]
    engine = spec.factory(None, spec.options(bits=2))
    assert isinstance(engine, PosterizeEngine) and engine.bits == 2
    assert isinstance(rewriters["tidy"][1].factory(None), TidyRewriter)

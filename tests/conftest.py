"""Shared fixtures: an isolated store per test, and a scripted fake engine registered as a plugin."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from assistant.hookspecs import hookimpl
from assistant.models import EditResult, Step
from assistant.plugins import EngineSpec, get_plugin_manager
from assistant.settings import Settings
from sessions.store import Store

pytest_plugins = ["hub_server"]  # the `hub` fixture: a Hugging Face hub on 127.0.0.1 (asserts rewritten)

sys._called_from_test = True  # the plugin manager skips third-party entry points under tests

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def icedit_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own store folder and no ICEDIT_* settings from the environment."""
    import os

    for key in [k for k in os.environ if k.startswith("ICEDIT_")]:
        monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("ICEDIT_HOME", str(home))
    return home


@pytest.fixture
def settings(icedit_home) -> Settings:
    return Settings(preset="tiny", steps=2)


@pytest.fixture
def store(settings):
    with Store(settings.store_path) as s:
        yield s


@pytest.fixture
def photo() -> Image.Image:
    """A small real photo (the CC0 cat from examples/), 150x100."""
    return Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((150, 100))


class FakeEngine:
    """A real Engine implementation without a model: tints the source by seed, records every call.
    It runs the early filter too: each candidate's preview is its finished picture."""

    random_weights = False

    def __init__(self):
        self.calls: list = []

    def _paint(self, request, seed: int, steps: int, events, cancel: threading.Event) -> Image.Image:
        for i in range(1, steps + 1):
            if cancel.is_set():
                from assistant.errors import Cancelled

                raise Cancelled("edit cancelled between steps: nothing was saved")
            events(Step(i=i, n=steps, phase="denoise"))
        tint = Image.new("RGB", request.source.size, (seed % 256, len(request.plan.instruction) % 256, 40))
        return ImageChops.add(request.source, tint)

    def edit(self, request, events, cancel: threading.Event) -> EditResult:
        self.calls.append(request)
        image = self._paint(request, request.seed, request.steps, events, cancel)
        return EditResult(image=image, seed=request.seed, prompt=f"fake: {request.plan.instruction}",
                          nfe=request.steps)

    def start_candidates(self, request, seeds, events, cancel):
        self.calls.append(request)
        previews = [self._paint(request, s, request.early_steps, events, cancel) for s in seeds]
        spent = len(seeds) * request.early_steps + request.steps - request.early_steps

        class Started:
            def __init__(self):
                self.previews = previews

            def finish(self, index, events, cancel):
                return EditResult(image=previews[index], seed=seeds[index], nfe=spent,
                                  prompt=f"fake: {request.plan.instruction}")

        return Started()


class FakePlugin:
    def __init__(self):
        self.engine = FakeEngine()
        self.finished: list = []

    @hookimpl
    def register_engines(self, register):
        register(EngineSpec("fake", lambda settings: self.engine, "test double"))

    @hookimpl
    def turn_finished(self, session, turn):
        self.finished.append((session, turn.id))


@pytest.fixture
def fake():
    """Registers FakePlugin as plugin 'fake' for one test; engine 'fake' then exists."""
    pm = get_plugin_manager()
    plugin = FakePlugin()
    pm.register(plugin, name="fake")
    try:
        yield plugin
    finally:
        pm.unregister(name="fake")


@pytest.fixture
def fake_settings(icedit_home, fake) -> Settings:
    return Settings(engine="fake", steps=3)

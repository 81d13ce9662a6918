"""Shared fixtures: an isolated store per test, and a scripted fake engine registered as a plugin."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from assistant.plugins import get_plugin_manager
from assistant.settings import Settings
from assistant.testing import FakePlugin
from sessions.store import Store

pytest_plugins = ["hub_server"]  # the `hub` fixture: a Hugging Face hub on 127.0.0.1 (asserts rewritten)

sys._called_from_test = True  # the plugin manager skips third-party entry points under tests

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def icedit_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own store folder, no ICEDIT_* settings from the environment and no config file."""
    import os

    for key in [k for k in os.environ if k.startswith("ICEDIT_")]:
        monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("ICEDIT_HOME", str(home))
    monkeypatch.setenv("ICEDIT_CONFIG", str(tmp_path / "config.toml"))  # none, unless a test writes one
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

"""Issue 19 part 7: the chat as a person uses it every day (Pilot, headless): keys for undo and redo,
/guidance, /lora-scale and /variations, pictures to pick by clicking, requests queued while an edit
runs, a dropped file opening, the command palette, the engine loading as the chat opens."""

from __future__ import annotations

import threading

import pytest
from PIL import Image
from textual_image.widget import HalfcellImage

from assistant.hookspecs import hookimpl
from assistant.models import Candidates, EditResult, Step
from assistant.plugins import EngineSpec, get_plugin_manager
from assistant.settings import Settings
from assistant.tui.app import make_app
from assistant.tui.widgets.candidate_strip import CandidateStrip
from assistant.tui.widgets.chat_log import ChatLog
from assistant.tui.widgets.picture import Picture
from assistant.tui.widgets.prompt_input import PromptInput, dropped_path
from assistant.tui.widgets.status_line import StatusLine
from sessions.store import Store

SIZE = (120, 40)


@pytest.fixture
def cat(tmp_path, photo):
    path = tmp_path / "cat.png"
    photo.save(path)
    return path


def app_for(settings, image=None, session="s"):
    return make_app(settings, session=session, image=image, renderer=HalfcellImage)


async def say(pilot, text: str, *, wait: bool = True) -> None:
    pilot.app.screen.query_one(PromptInput).value = text
    await pilot.press("enter")
    if wait:
        await settle(pilot)


async def settle(pilot) -> None:
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def history(settings, session="s"):
    with Store(settings.store_path) as store:
        return store.history(session)


def lines(app) -> list[tuple[str, str]]:
    return app.screen.query_one(ChatLog).lines


async def test_ctrl_z_and_ctrl_y_undo_and_redo_from_the_input(fake_settings, fake, cat):
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "make it look like winter")
        assert history(fake_settings).cursor == 2
        await pilot.press("ctrl+z")
        await pilot.pause()
        assert history(fake_settings).cursor == 1 and lines(app)[-2] == ("user", "/undo")
        await pilot.press("ctrl+y")
        await pilot.pause()
        assert history(fake_settings).cursor == 2
        assert app.screen.query_one(PromptInput).value == ""  # the keys typed nothing


async def test_the_before_key_is_named_as_it_works(fake_settings, fake, cat):
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "make it look like winter")
        caption = app.screen.query_one(Picture).query_one("#caption")
        assert str(caption.render()).startswith("after (ctrl+b: before)")
        await pilot.press("b")  # in the input, b is a letter
        assert app.screen.query_one(PromptInput).value == "b"
        await pilot.press("ctrl+b")
        assert str(caption.render()).startswith("BEFORE (ctrl+b: after)")


async def test_guidance_and_variations_reach_the_edit(fake_settings, fake, cat):
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "/guidance 30")
        await say(pilot, "/seed 7")
        await say(pilot, "/variations 3")
        assert "guidance 30 · 3 variations" in str(app.screen.query_one(StatusLine).render())
        await say(pilot, "add snow")
        assert [(r.seed, r.guidance) for r in fake.engine.calls] == [(7, 30.0), (8, 30.0), (9, 30.0)]
        edits = [t for t in history(fake_settings).turns if t.kind == "edit"]
        assert [(t.parent, t.seed) for t in edits] == [(1, 7), (1, 8), (1, 9)]
        strip = app.screen.query_one(CandidateStrip)
        assert strip.display
        assert [str(label.render()) for label in strip.query(".score")] == [
            f"#{t.id} · seed {t.seed} (click)" for t in edits
        ]
        await pilot.click(list(strip.query(".candidate"))[1])  # the second variation
        await settle(pilot)
        assert history(fake_settings).cursor == edits[1].id
        await say(pilot, "/guidance 0")
        assert lines(app)[-1] == ("error", "usage: /guidance G (a number above 0, at most 200)")
        await say(pilot, "/variations 17")
        assert lines(app)[-1][0] == "error"


async def test_lora_scale_changes_the_loaded_adapter_in_place(cat, icedit_home):
    settings = Settings(preset="tiny", lora="tiny-moe", steps=1)
    app = app_for(settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)  # the background load
        engine = app.screen.agent.loaded_engine
        assert engine is not None and engine.adapter.kind == "lora-moe"
        from plugins.icedit import moe

        await say(pilot, "/lora-scale 0.5")
        assert lines(app)[-1] == ("info", "adapter scale 0.5 for the next edits")
        assert app.screen.agent.loaded_engine is engine and engine.adapter.scale == 0.5
        assert {
            m.scale for m in engine.pipeline().transformer.modules() if isinstance(m, moe.LoraMoeLinear)
        } == {0.5}
        await say(pilot, "/lora-scale 9")
        assert lines(app)[-1] == ("error", "usage: /lora-scale S (a number from 0 to 4)")


async def test_lora_scale_on_an_engine_that_cannot_rebuilds_it(fake_settings, fake, cat):
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "/lora-scale 0.7")
        assert (
            lines(app)[-1][1]
            == "adapter scale 0.7 for the next edits (the engine loads again for the next edit)"
        )
        assert app.screen.agent.settings.options["lora_scale"] == 0.7


# ------------------------------------------------------------------------------------------ picking a candidate


class FilterEngine:
    """Shows two candidates (the early filter's event) and paints the seed it is asked for."""

    def __init__(self):
        self.seeds: list[int] = []
        self.candidates: list[int] = []

    def edit(self, request, events, cancel):
        self.seeds.append(request.seed)
        self.candidates.append(request.candidates)
        previews = [request.source.resize((32, 24)), request.source.resize((32, 24)).rotate(180)]
        events(Candidates(seeds=[request.seed, request.seed + 1], previews=previews))
        return EditResult(
            image=request.source.rotate(request.seed % 360), seed=request.seed, prompt="f", nfe=2
        )


class LoadingEngine(FilterEngine):
    """Records when it was loaded, and waits to be let go, as a big pipeline takes its time."""

    def __init__(self):
        super().__init__()
        self.loaded = threading.Event()
        self.go = threading.Event()

    def load(self) -> None:
        assert self.go.wait(10)
        self.loaded.set()

    def edit(self, request, events, cancel):
        assert self.loaded.is_set(), "an edit ran before the load was over"
        events(Step(i=1, n=1, phase="denoise"))
        return super().edit(request, events, cancel)


@pytest.fixture
def engines(icedit_home):
    made = {"filter": FilterEngine(), "loading": LoadingEngine()}

    class Plugin:
        @hookimpl
        def register_engines(self, register):
            for name, engine in made.items():
                register(EngineSpec(name, lambda settings, e=engine: e, "test engine"))

    pm = get_plugin_manager()
    pm.register(Plugin(), name="workflow-engines")
    try:
        yield made
    finally:
        pm.unregister(name="workflow-engines")


async def test_clicking_a_candidate_finishes_its_seed(engines, cat):
    settings = Settings(engine="filter", steps=2)
    app = app_for(settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "/seed 10")
        await say(pilot, "make it look like winter")
        strip = app.screen.query_one(CandidateStrip)
        await pilot.click(list(strip.query(".candidate"))[1])  # seed 11, only previewed
        await settle(pilot)
        assert engines["filter"].seeds == [10, 11]
        assert engines["filter"].candidates[-1] == 1  # that seed finished, no early filter again
        edits = [t for t in history(settings).turns if t.kind == "edit"]
        assert [(t.parent, t.seed) for t in edits] == [(1, 10), (1, 11)]
        assert history(settings).cursor == edits[1].id
        await say(pilot, "/undo")
        await pilot.click(list(strip.query(".candidate"))[0])  # the strip is turn #3's; the cursor is not
        await settle(pilot)
        assert lines(app)[-1] == ("error", "those candidates are turn #3's: /branch 3 first")
        assert engines["filter"].seeds == [10, 11]


async def test_the_engine_loads_as_the_chat_opens_and_the_first_edit_waits_for_it(engines, cat):
    settings = Settings(engine="loading", steps=1)
    app = app_for(settings, image=cat)
    engine = engines["loading"]
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert not engine.loaded.is_set()  # loading while the person types
        await say(pilot, "make it look like winter", wait=False)
        await pilot.pause()
        assert history(settings).cursor == 1  # the edit waits for the load
        engine.go.set()
        await settle(pilot)
        assert engine.loaded.is_set() and history(settings).cursor == 2


# ------------------------------------------------------------------------------------------ a queue


class Gate:
    """An engine whose first edit waits until `release` is set."""

    def __init__(self):
        self.release = threading.Event()
        self.asked: list[str] = []

    def edit(self, request, events, cancel):
        self.asked.append(request.plan.instruction or "")
        if len(self.asked) == 1:
            assert self.release.wait(10)
        return EditResult(
            image=request.source.rotate(90 * len(self.asked)), seed=request.seed, prompt="g", nfe=1
        )


async def test_a_request_made_while_an_edit_runs_is_queued_and_runs_next(icedit_home, cat):
    gate = Gate()

    class Plugin:
        @hookimpl
        def register_engines(self, register):
            register(EngineSpec("gate", lambda settings: gate, "waits"))

    pm = get_plugin_manager()
    pm.register(Plugin(), name="gate")
    settings = Settings(engine="gate", steps=1)
    try:
        app = app_for(settings, image=cat)
        async with app.run_test(size=SIZE) as pilot:
            await say(pilot, "make it look like winter", wait=False)
            await pilot.pause()
            await say(pilot, "add a red scarf", wait=False)
            await pilot.pause()
            assert lines(app)[-1] == ("info", "queued (1): runs when this edit ends")
            gate.release.set()
            for _ in range(20):  # the queued one starts when the first ends
                await settle(pilot)
                if len(gate.asked) == 2 and not app.screen.busy:
                    break
            assert gate.asked == ["make it look like winter", "add a red scarf"]
            h = history(settings)
            assert [(t.id, t.parent, t.message) for t in h.turns[1:]] == [
                (2, 1, "make it look like winter"),
                (3, 2, "add a red scarf"),
            ]
    finally:
        pm.unregister(name="gate")


# ------------------------------------------------------------------------------------------ a dropped file


@pytest.mark.parametrize(
    "as_pasted",
    [
        lambda p: str(p),
        lambda p: f"'{p}'",
        lambda p: f'"{p}"',
        lambda p: f"file://{str(p).replace(' ', '%20')}",
        lambda p: str(p).replace(" ", "\\ "),
    ],
    ids=["bare", "single quotes", "double quotes", "file url", "escaped spaces"],
)
def test_a_dropped_path_is_read_as_terminals_paste_it(tmp_path, as_pasted):
    picture = tmp_path / "my photos" / "red dog.png"
    picture.parent.mkdir()
    Image.new("RGB", (40, 40), "red").save(picture)
    assert dropped_path(as_pasted(picture)) == picture


@pytest.mark.parametrize("text", ["make it look like winter", "/undo", "nowhere/x.png", "", "a.png\nb.png"])
def test_what_is_not_an_image_file_is_a_request(tmp_path, text):
    (tmp_path / "notes.txt").write_text("x")
    assert dropped_path(text) is None and dropped_path(str(tmp_path / "notes.txt")) is None


async def test_dropping_a_file_on_the_input_opens_it(fake_settings, fake, cat, tmp_path):
    other = tmp_path / "a dog.png"
    Image.new("RGB", (64, 48), "blue").save(other)
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, f"'{other}'")
        h = history(fake_settings)
        assert [(t.kind, t.message) for t in h.turns] == [
            ("open", "open cat.png"),
            ("open", "open a dog.png"),
        ]
        assert h.cursor == 2 and fake.engine.calls == []


# ------------------------------------------------------------------------------------------ the palette


async def test_the_palette_lists_the_slash_commands_and_runs_them(fake_settings, fake, cat):
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "make it look like winter")
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"/undo")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await settle(pilot)
        assert history(fake_settings).cursor == 1
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"/variations")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await settle(pilot)
        assert app.screen.query_one(PromptInput).value == "/variations "  # it takes an argument: finish it

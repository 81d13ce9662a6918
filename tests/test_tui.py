"""The chat (Pilot, headless, fake engine) and the contact sheet.

Images are drawn with textual-image's half-cell renderer: picked explicitly, not probed.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner
from PIL import Image, ImageChops
from textual_image.widget import HalfcellImage

from assistant.agent import Agent
from assistant.cli import cli
from assistant.errors import Cancelled
from assistant.hookspecs import hookimpl
from assistant.models import Candidates, EditResult, Step, Verdict
from assistant.plugins import CommandSpec, EngineSpec, get_plugin_manager
from assistant.settings import Settings
from assistant.testing import registered
from assistant.tui.app import make_app
from assistant.tui.widgets.candidate_strip import CandidateStrip
from assistant.tui.widgets.chat_log import ChatLog
from assistant.tui.widgets.history_tree import HistoryTree
from assistant.tui.widgets.picture import Picture
from assistant.tui.widgets.prompt_input import PromptInput
from assistant.tui.widgets.status_line import StatusLine
from assistant.tui.widgets.step_bar import StepBar
from sessions.sheet import CELL_H, CELL_W, layout, render_sheet, thumb_origin, thumbnail
from sessions.store import Store

SIZE = (120, 40)


@pytest.fixture
def cat(tmp_path, photo):
    path = tmp_path / "cat.png"
    photo.save(path)
    return path


def app_for(settings, session="s", image=None):
    return make_app(settings, session=session, image=image, renderer=HalfcellImage)


async def say(pilot, text: str, *, wait: bool = True, type_it: bool = False) -> None:
    """Put `text` in the input line (typed key by key: slower), press Enter, let the edit finish.

    An empty `text` sends what the input holds (e.g. a failed line put back).
    """
    if type_it:
        await pilot.press(*text)
    elif text:
        pilot.app.screen.query_one(PromptInput).value = text
    await pilot.press("enter")
    if wait:
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


def log_lines(app) -> list[tuple[str, str]]:
    return app.screen.query_one(ChatLog).lines


def history(settings, session="s"):
    with Store(settings.store_path) as store:
        return store.history(session)


def tree_nodes(app) -> dict[int, tuple[int | None, str]]:
    """{turn id: (parent turn id, label)} as the sidebar shows them."""
    out = {}
    stack = [app.screen.query_one(HistoryTree).root]
    while stack:
        node = stack.pop()
        for child in node.children:
            out[child.data] = (node.data, str(child.label))
            stack.append(child)
    return out


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None


def test_import_loads_no_torch():
    code = "import sys, assistant.tui.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


async def test_edit_through_the_input_line(fake_settings, fake, cat):
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "make it look like winter", type_it=True)
        h = history(fake_settings)
        assert [(t.id, t.parent, t.kind) for t in h.turns] == [(1, None, "open"), (2, 1, "edit")]
        assert h.cursor == 2
        assert log_lines(app)[-4:-1] == [
            ("user", "make it look like winter"),
            ("assistant", "rules: used your request as the edit instruction"),
            ("prompt", "fake: make it look like winter"),
        ]
        assert log_lines(app)[-1][1].startswith("turn #2 · seed ")
        assert len(fake.engine.calls) == 1 and fake.engine.calls[0].steps == 3
        picture = app.screen.query_one(Picture)
        with Store(fake_settings.store_path) as store:
            agent = Agent(store, "s", fake_settings)
            assert same(picture.result, agent.image(h.turn(2)))
            assert same(picture.source, agent.image(h.turn(1)))
        assert "▶" in tree_nodes(app)[2][1] and "▶" not in tree_nodes(app)[1][1]
        assert app.screen.query_one(PromptInput).value == ""
        assert app.sub_title == "session s"


async def test_undo_redo_and_a_branch(fake_settings, fake, cat):
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "make it look like winter")
        await say(pilot, "/undo")
        assert history(fake_settings).cursor == 1
        assert log_lines(app)[-1] == ("info", "undo: back at turn #1 (open cat.png)")
        await say(pilot, "/redo")
        assert history(fake_settings).cursor == 2
        await say(pilot, "/undo")
        await say(pilot, "add a red scarf")
        h = history(fake_settings)
        assert [(t.id, t.parent) for t in h.turns] == [(1, None), (2, 1), (3, 1)]
        assert h.cursor == 3
        nodes = tree_nodes(app)
        assert nodes[2][0] == 1 and nodes[3][0] == 1 and "▶" in nodes[3][1]
        await say(pilot, "/redo")
        assert log_lines(app)[-1] == ("error", "nothing to redo in session 's'")
        assert app.screen.query_one(PromptInput).value == "/redo"
        tree = app.screen.query_one(HistoryTree)
        tree.focus()
        tree.move_cursor(next(n for n in tree.root.children[0].children if n.data == 2))
        await pilot.press("enter")  # selecting a node jumps there
        assert history(fake_settings).cursor == 2
        assert log_lines(app)[-2][1] == "/branch 2" and "▶" in tree_nodes(app)[2][1]


async def test_retry_seed_and_steps_reach_the_engine(fake_settings, fake, cat, tmp_path):
    from tiny_qwen import save_tiny_qwen

    vlm = tmp_path / "vlm"  # the judge's weights are on disk, so /candidates is taken
    save_tiny_qwen(vlm)
    app = app_for(fake_settings.with_options(vlm=str(vlm)), image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "/seed 7")
        await say(pilot, "/steps 2")
        await say(pilot, "/candidates 3")
        assert "seed 7 · steps 2 · guidance 50 · candidates 3" in str(
            app.screen.query_one(StatusLine).render()
        )
        await say(pilot, "/candidates 1")
        await say(pilot, "make it look like winter")
        await say(pilot, "/retry")
        first, again = fake.engine.calls
        assert (first.seed, first.steps) == (7, 2)
        assert (again.seed, again.steps, again.plan.instruction) == (8, 2, first.plan.instruction)
        h = history(fake_settings)
        assert [(t.id, t.parent, t.seed) for t in h.turns[1:]] == [(2, 1, 7), (3, 1, 8)]


class BlockingEngine:
    """Emits step 1, then waits (up to 10 s) until cancelled, and raises Cancelled as the real engine does."""

    def __init__(self):
        self.started = threading.Event()
        self.cancelled = False

    def edit(self, request, events, cancel):
        events(Step(i=1, n=request.steps, phase="denoise"))
        self.started.set()
        if cancel.wait(10):
            self.cancelled = True
            raise Cancelled("edit cancelled between steps: nothing was saved")
        return EditResult(image=request.source, seed=request.seed, prompt="never", nfe=1)


class BlockingPlugin:
    def __init__(self):
        self.engine = BlockingEngine()

    @hookimpl
    def register_engines(self, register):
        register(EngineSpec("blocking", lambda settings: self.engine, "waits for cancel"))


@pytest.fixture
def blocking(icedit_home):
    pm = get_plugin_manager()
    plugin = BlockingPlugin()
    pm.register(plugin, name="blocking")
    try:
        yield plugin
    finally:
        pm.unregister(name="blocking")


async def test_escape_cancels_and_stores_nothing(blocking, cat):
    settings = Settings(engine="blocking", steps=5)
    app = app_for(settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "make it look like winter", wait=False)
        assert blocking.engine.started.wait(5)
        await pilot.pause()
        bar = app.screen.query_one(StepBar)
        assert bar.display and str(bar.query_one("#phase").render()) == "step 1/5 · denoise"
        await pilot.press("x", "y")  # the input stays responsive during the edit
        prompt = app.screen.query_one(PromptInput)
        assert prompt.value == "xy"
        await pilot.press("backspace", "backspace", "escape")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert blocking.engine.cancelled
        assert log_lines(app)[-1] == ("error", "cancelled: nothing was saved")
        assert prompt.value == "make it look like winter"
        assert not bar.display
    assert [t.kind for t in history(settings).turns] == ["open"]


class FilterEngine:
    """Sends what the early filter sends (two previews, one verdict), then the winner."""

    def edit(self, request, events, cancel):
        previews = [request.source.resize((32, 24)), request.source.resize((32, 24)).rotate(180)]
        events(Step(i=0, n=request.steps, phase="candidates"))
        events(Candidates(seeds=[5, 6], previews=previews))
        events(Verdict(a=5, b=6, p=0.75))
        return EditResult(image=request.source, seed=5, prompt="filtered", nfe=2)


@pytest.fixture
def filtering(icedit_home):
    class FilterPlugin:
        @hookimpl
        def register_engines(self, register):
            register(EngineSpec("filter", lambda settings: FilterEngine(), "early-filter events"))

    pm = get_plugin_manager()
    pm.register(FilterPlugin(), name="filter")
    try:
        yield
    finally:
        pm.unregister(name="filter")


async def test_candidate_strip_shows_previews_and_scores(filtering, cat):
    app = app_for(Settings(engine="filter", steps=2), image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "make it look like winter")
        strip = app.screen.query_one(CandidateStrip)
        assert strip.display
        assert [str(label.render()) for label in strip.query(".score")] == ["seed 5 · 0.75", "seed 6 · 0.25"]
        assert [w.image.size for w in strip.query(".preview")] == [(32, 24), (32, 24)]
        await say(pilot, "/undo")
        await say(pilot, "add a red scarf")  # a new edit starts with a fresh strip
        assert [str(label.render()) for label in strip.query(".score")] == ["seed 5 · 0.75", "seed 6 · 0.25"]


async def test_bad_open_path_is_one_error_line_and_the_text_comes_back(fake_settings, fake, cat, tmp_path):
    app = app_for(fake_settings, image=cat)
    missing = tmp_path / "missing.png"
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, f"/open {missing}")
        assert log_lines(app)[-2:] == [("user", f"/open {missing}"), ("error", f"{missing}: no such file")]
        assert app.screen.query_one(PromptInput).value == f"/open {missing}"
        await say(pilot, "")  # Enter on the restored text runs it again: same error, nothing stored
    assert len(history(fake_settings).turns) == 1


async def test_reopening_restores_log_tree_and_cursor(fake_settings, fake, cat):
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "make it look like winter")
        await say(pilot, "/undo")
        await say(pilot, "add a red scarf")
        await say(pilot, "/branch 2")
        before = [line for line in log_lines(app) if line[0] in ("user", "assistant", "prompt")]
        await say(pilot, "/quit", wait=False)
    again = app_for(fake_settings)
    async with again.run_test(size=SIZE) as pilot:
        await pilot.pause()
        restored = [line for line in log_lines(again) if line[0] in ("user", "assistant", "prompt")]
        # commands that change nothing stored (/quit) are not in the transcript
        assert restored == [line for line in before if line != ("user", "/quit")]
        nodes = tree_nodes(again)
        assert {k: v[0] for k, v in nodes.items()} == {1: None, 2: 1, 3: 1}
        assert "▶" in nodes[2][1]
        assert again.screen.query_one(HistoryTree).cursor_node.data == 2
        with Store(fake_settings.store_path) as store:
            assert same(
                again.screen.query_one(Picture).result,
                Agent(store, "s", fake_settings).image(store.history("s").turn(2)),
            )
        prompt = again.screen.query_one(PromptInput)
        await pilot.press("up")
        assert prompt.value == "/branch 2"


async def test_before_after_toggle(fake_settings, fake, cat):
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "make it look like winter")
        picture = app.screen.query_one(Picture)
        image = picture.query_one("#image")
        assert image.image is picture.result
        await pilot.press("b")  # in the input line b is a letter
        assert not picture.before and app.screen.query_one(PromptInput).value == "b"
        await pilot.press("ctrl+b")
        assert picture.before and image.image is picture.source
        assert str(picture.query_one("#caption").render()).startswith("BEFORE")
        picture.focus()
        await pilot.press("b")
        assert not picture.before and image.image is picture.result
        tree = app.screen.query_one(HistoryTree)
        await pilot.press("ctrl+t")
        assert not tree.display
        await pilot.press("ctrl+t")
        assert tree.display


async def test_switching_sessions(fake_settings, fake, cat):
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "/session other")
        assert app.sub_title == "session other" and app.session == "other"
        assert log_lines(app) == [("info", "new session 'other': /open PATH to start with an image")]
        assert app.screen.query_one(Picture).result is None and tree_nodes(app) == {}
        await say(pilot, "make it look like winter")
        assert log_lines(app)[-1] == ("error", "session 'other' has no image yet: open one first")
        await say(pilot, "/session s")
        assert log_lines(app)[-1] == ("info", "session 's': 1 turn, cursor at #1")
        assert set(tree_nodes(app)) == {1}


def test_chat_command_refuses_a_missing_image(tmp_path):
    result = CliRunner().invoke(cli, ["chat", str(tmp_path / "nope.png"), "--session", "x"])
    assert (result.exit_code, result.output) == (2, f"Error: {tmp_path / 'nope.png'}: no such file\n")


async def test_save_sheet_history_and_a_plugin_command(fake_settings, fake, cat, tmp_path):
    seen = []

    class EchoPlugin:
        @hookimpl
        def register_chat_commands(self, register):
            def run(chat, argument):
                seen.append((chat.agent.session, chat.options.steps))
                return f"echo {argument}"

            register(CommandSpec("echo", run, "says it back"))

    pm = get_plugin_manager()
    pm.register(EchoPlugin(), name="echo")
    try:
        app = app_for(fake_settings, image=cat)
        async with app.run_test(size=SIZE) as pilot:
            await say(pilot, "make it look like winter")
            await say(pilot, f"/save {tmp_path / 'out.png'}")
            await say(pilot, f"/sheet {tmp_path / 'sheet.png'}")
            await say(pilot, "/history")
            await say(pilot, "/ec")
            assert app.screen.query_one(PromptInput).value == "/ec"
            await pilot.press("ctrl+u", "/", "e", "c", "tab", "space", "h", "i", "enter")
            await pilot.pause()
            lines = log_lines(app)
    finally:
        pm.unregister(name="echo")
    with Store(fake_settings.store_path) as store:
        h = store.history("s")
        assert same(Image.open(tmp_path / "out.png"), Agent(store, "s", fake_settings).image(h.turn(2)))
    assert Image.open(tmp_path / "sheet.png").width == 2 * CELL_W
    tree = f"session s (cursor at #2)\n  #1 open: open cat.png\n*   #2 edit: make it look like winter  seed {h.turn(2).seed}"
    assert ("info", tree) in lines
    assert ("error", "unknown command /ec: /help lists them") in lines
    assert lines[-1] == ("info", "echo hi") and seen == [("s", None)]


async def test_plugin_commands_share_one_table_with_the_builtins(fake_settings, fake, cat):
    """A plugin's command runs beside the built-ins, which are specs in the same table: it can run them,
    it cannot replace one, and /help and completion list both."""

    class BackPlugin:
        @hookimpl
        def register_chat_commands(self, register):
            def back(chat, argument):
                chat.commands["steps"].run(chat, "2")  # a built-in, through the table
                return chat.commands["undo"].run(chat, "")

            register(CommandSpec("back", back, "two steps, then undo", "/back"))
            register(CommandSpec("undo", lambda chat, argument: "hijacked", "not the real undo"))

    with registered(BackPlugin(), "back"):
        app = app_for(fake_settings, image=cat)
        async with app.run_test(size=SIZE) as pilot:
            await say(pilot, "make it look like winter")
            await say(pilot, "/back")
            status = str(app.screen.query_one(StatusLine).render())
            await say(pilot, "/help")
            lines = log_lines(app)
            await pilot.press("/", "b", "a", "tab")
            await pilot.pause()
            assert app.screen.query_one(PromptInput).value == "/back"
    assert ("info", "undo: back at turn #1 (open cat.png)") in lines
    assert "steps 2" in status
    help_rows = lines[-1][1].splitlines()
    assert help_rows[0].startswith("/undo            back to the previous image")
    assert "/back            two steps, then undo" in help_rows
    assert not any("hijacked" in text or "not the real undo" in text for _, text in lines)


def test_contact_sheet_grows_and_shows_each_turn(fake_settings, fake, photo):
    with Store(fake_settings.store_path) as store:
        agent = Agent(store, "sheet", fake_settings)
        agent.open(photo, "open cat")
        one = render_sheet(store, "sheet")
        agent.turn("make it look like winter", seed=1)
        two = render_sheet(store, "sheet")
        agent.move("undo")
        agent.turn("add a red scarf", seed=2)
        branched = render_sheet(store, "sheet")
        h = store.history("sheet")
        assert layout(h) == {1: (0, 0), 2: (1, 0), 3: (1, 1)}
        assert two.width == one.width + CELL_W and two.height == one.height
        assert branched.width == two.width and branched.height == two.height + CELL_H
        for turn in h.turns:
            thumb = thumbnail(agent.image(turn))
            x, y = thumb_origin(layout(h)[turn.id], thumb.size)
            assert same(branched.crop((x, y, x + thumb.width, y + thumb.height)), thumb)
        thumb2 = thumbnail(agent.image(h.turn(2)))
        x, y = thumb_origin((1, 1), thumb2.size)
        assert not same(branched.crop((x, y, x + thumb2.width, y + thumb2.height)), thumb2)


def test_sessions_sheet_command(fake_settings, fake, photo, tmp_path):
    with Store(fake_settings.store_path) as store:
        agent = Agent(store, "sheet", fake_settings)
        agent.open(photo, "open cat")
        agent.turn("make it look like winter", seed=1)
        expected = render_sheet(store, "sheet")
    out = tmp_path / "sheet.png"
    result = CliRunner().invoke(cli, ["sessions", "sheet", "sheet", str(out)])
    assert (result.exit_code, result.output) == (0, f"wrote {out} ({expected.width}x{expected.height})\n")
    assert same(Image.open(out), expected)
    result = CliRunner().invoke(cli, ["sessions", "sheet", "sheet", str(tmp_path / "sheet.xyz")])
    error = f"Error: {tmp_path / 'sheet.xyz'}: unknown image type (use .png, .jpg, .webp, ...)\n"
    assert (result.exit_code, result.output) == (2, error)


async def test_candidates_are_refused_in_one_line_while_the_judges_weights_are_not_on_disk(
    fake_settings, fake, cat, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = app_for(fake_settings, image=cat)
    async with app.run_test(size=SIZE) as pilot:
        await say(pilot, "/candidates 3")
        refused = (
            "VLM 'Qwen/Qwen2.5-VL-7B-Instruct' (--vlm): not in the Hugging Face cache and offline mode is set "
            "(HF_HUB_OFFLINE); unset HF_HUB_OFFLINE to download it, or fetch it elsewhere with `hf download "
            "Qwen/Qwen2.5-VL-7B-Instruct --include '*.json' --include '*.safetensors' --include '*.txt' "
            "--include '*.model' --include '*.jinja'`"
        )
        assert log_lines(app)[-1] == ("error", refused)
        assert "candidates 1" in str(app.screen.query_one(StatusLine).render())

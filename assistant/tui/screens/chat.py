"""The chat screen: log left, picture right, history tree as a sidebar, the input line below.

The session store is the single source of truth: after every change the tree, the picture and
the status are redrawn from it, and reopening a session replays its transcript into the log.
Edits run in one thread worker at a time that only posts messages; Escape sets its cancel event,
which the engine checks between steps. While an edit runs, commands that touch the session wait and
requests are queued, each run when the one before ends. The engine loads in the background as soon
as the chat opens (an engine that can, `protocols.Preloading`): the first edit waits only for what is
left of it.
"""

from __future__ import annotations

import threading
import traceback
from typing import TYPE_CHECKING, ClassVar, cast

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Header, Input

from assistant import plugins
from assistant.agent import Agent, progress_line
from assistant.errors import Cancelled, UserError
from assistant.preflight import rewriter_name
from assistant.protocols import Preloading
from assistant.settings import Settings
from assistant.tui.commands import BUILTINS, Chat, ChatOptions, self_check
from assistant.tui.messages import EditFailed, EditFinished, EditProgress
from assistant.tui.widgets.candidate_strip import CandidateStrip
from assistant.tui.widgets.chat_log import ChatLog
from assistant.tui.widgets.history_tree import HistoryTree
from assistant.tui.widgets.picture import DEFAULT_RENDERER, Picture, Renderer
from assistant.tui.widgets.prompt_input import PromptInput, dropped_path
from assistant.tui.widgets.status_line import StatusLine
from assistant.tui.widgets.step_bar import StepBar
from sessions.store import Store

if TYPE_CHECKING:
    from assistant.tui.app import ChatApp

BUSY = "an edit is running: wait for it, or press Escape to cancel it"


class ChatScreen(Screen):
    BINDINGS: ClassVar = [
        Binding("escape", "cancel", "cancel edit"),
        Binding("ctrl+z", "command('/undo')", "undo", priority=True),
        Binding("ctrl+y", "command('/redo')", "redo", priority=True),
        Binding("ctrl+t", "toggle_tree", "tree"),
        Binding("ctrl+b", "toggle_before", "before/after"),
        Binding("b", "toggle_before", "before/after", show=False),
    ]

    def __init__(
        self,
        store: Store,
        session: str,
        settings: Settings,
        renderer: Renderer | None = None,
        notes: list[str] | None = None,
        memory: str | None = None,
    ):
        super().__init__()
        self.store = store
        self.settings = settings
        self.notes = notes or []
        self.memory = memory
        self.renderer = renderer or DEFAULT_RENDERER
        added = plugins.registrations("chat_commands")
        commands = BUILTINS | {name: spec for name, (_, spec) in added.items() if name not in BUILTINS}
        self.chat = Chat(Agent(store, session, settings), ChatOptions(), commands, view=self)
        self.cancel: threading.Event | None = None
        """Set while an edit runs; Escape sets the event itself."""
        self.queued: list[str] = []
        """Requests typed while an edit ran, in order: each starts when the one before ends."""
        self.strip_turn: int | None = None
        """The turn the strip's pictures belong to (a candidate picked is a retry of it)."""
        self.ready = threading.Event()
        """Set once the background load of the engine is over (done, failed, or nothing to load)."""

    @property
    def agent(self) -> Agent:
        return self.chat.agent

    @property
    def busy(self) -> bool:
        return self.cancel is not None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            yield HistoryTree(id="tree")
            yield ChatLog(id="log")
            yield Picture(self.renderer, id="picture")
        yield CandidateStrip(self.renderer, id="candidates")
        yield StepBar(id="progress")
        yield StatusLine(id="status")
        yield PromptInput(
            [f"/{name}" for name in self.chat.commands],
            placeholder="say what to change, or /help",
            id="prompt",
        )
        yield Footer()

    def on_mount(self) -> None:
        self.load_session()
        for note in self.notes:
            self.query_one(ChatLog).add("info", f"note: {note}")
        self.query_one(PromptInput).focus()
        self.preload()

    @work(thread=True, group="load")
    def preload(self) -> None:
        """Load the engine's weights while the person types; a failure is said by the first edit."""
        try:
            engine = self.agent.engine
            if isinstance(engine, Preloading):
                self.app.call_from_thread(self.query_one(StepBar).say, "loading the engine...")
                engine.load()
        except Exception:  # noqa: BLE001 - the first edit loads again and says what is wrong
            self.log.error(traceback.format_exc())
        finally:
            self.ready.set()
            self.app.call_from_thread(self._loaded)

    def _loaded(self) -> None:
        if not self.busy:
            self.query_one(StepBar).stop()

    def on_unmount(self) -> None:
        if self.cancel is not None:
            self.cancel.set()

    # ------------------------------------------------------------------ drawing from the store

    def load_session(self) -> None:
        """Fill the log from the session's transcript and draw the rest (startup and /session)."""
        log = self.query_one(ChatLog)
        prompt = self.query_one(PromptInput)
        log.clear()
        prompt.history.clear()
        history = self.agent.history()
        if history is None:
            log.add("info", f"new session '{self.agent.session}': /open PATH to start with an image")
        else:
            turns, prompted = {t.id: t for t in history.turns}, set()
            for entry in self.store.transcript(self.agent.session):
                log.add(entry.role, entry.text)
                if entry.role == "user":
                    prompt.remember(entry.text)
                turn = turns.get(entry.turn_id) if entry.turn_id is not None else None
                if entry.role == "assistant" and turn and turn.plan and turn.id not in prompted:
                    prompted.add(turn.id)  # the IC prompt once, under the edit's first reply
                    if turn.plan.get("ic_prompt"):
                        log.add("prompt", turn.plan["ic_prompt"])
            n = len(history.turns)
            log.add(
                "info",
                f"session '{self.agent.session}': {n} turn{'s' * (n != 1)}, cursor at #{history.cursor}",
            )
        self.refresh_view()

    def refresh_view(self) -> None:
        history = self.agent.history()
        self.app.sub_title = f"session {self.agent.session}"
        self.query_one(HistoryTree).show(history)
        picture = self.query_one(Picture)
        current = history.current() if history else None
        if history is None or current is None:
            picture.show(None, None)
        else:
            parent = current.parent if current.kind == "edit" else None
            source = self.agent.image(history.turn(parent)) if parent is not None else None
            note = "random weights: noise, not an edit" if current.params.get("random_weights") else ""
            picture.show(
                self.agent.image(current), source, f"turn #{current.id}" + (f" · {note}" if note else "")
            )
        self.show_status()

    def show_status(self) -> None:
        options, settings = self.chat.options, self.settings
        preset = plugins.option("engines", settings.engine, "preset", settings)
        engine = settings.engine + (f" ({preset})" if preset else "")
        self.query_one(StatusLine).show(
            seed=options.seed,
            steps=options.steps or settings.steps,
            guidance=options.guidance or settings.guidance,
            variations=options.variations,
            candidates=options.candidates or settings.candidates,
            check=self_check(self.chat),
            engine=engine,
            rewriter=rewriter_name(settings),
            memory=self.memory,
        )

    def fail(self, text: str, error: str) -> None:
        """One error line; the typed text goes back into the input unless something new is there."""
        self.query_one(ChatLog).add("error", error)
        prompt = self.query_one(PromptInput)
        if not prompt.value:
            prompt.value = text
            prompt.cursor_position = len(text)

    # ------------------------------------------------------------------ input

    @on(Input.Submitted, "#prompt")
    def submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        prompt = self.query_one(PromptInput)
        prompt.remember(text)
        prompt.value = ""
        self.query_one(ChatLog).add("user", text)
        if (path := dropped_path(text)) is not None:  # a file dropped (or pasted) onto the input
            self.run_command(f"/open {path}")
        elif text.startswith("/"):
            self.run_command(text)
        else:
            self.start_edit(text, text)

    def action_command(self, text: str) -> None:
        """A key that stands for a slash command (Ctrl+Z is /undo): run as if typed."""
        self.query_one(ChatLog).add("user", text)
        self.run_command(text)

    def run_command(self, text: str) -> None:
        name, _, argument = text[1:].partition(" ")
        spec = self.chat.commands.get(name.lower())
        if spec is None:
            self.fail(text, f"unknown command /{name.lower()}: /help lists them")
            return
        if self.busy and spec.needs_store:
            self.fail(text, BUSY)
            return
        try:
            reply = spec.run(self.chat, argument.strip())
        except UserError as e:
            self.fail(text, str(e))
            return
        if (
            spec.needs_store and not self.busy
        ):  # it may have changed the session (not /retry's edit: its end redraws)
            self.show_problems()
            self.refresh_view()
        else:
            self.show_status()
        if reply:
            self.query_one(ChatLog).add("info", str(reply))

    # ------------------------------------------------------------------ edits

    def start_edit(self, text: str, message: str, *, retry: bool = False, seed: int | None = None) -> None:
        """Run `message` through the agent in the worker; `text` is what goes back on failure. A request
        made while an edit runs waits its turn; a retry (or a pick) needs the edit's result: it waits not."""
        if self.busy:
            if retry:
                self.fail(text, BUSY)
                return
            self.queued.append(message)
            self.query_one(ChatLog).add("info", f"queued ({len(self.queued)}): runs when this edit ends")
            return
        options = self.chat.options
        kwargs: dict = {
            "steps": options.steps,
            "guidance": options.guidance,
            "candidates": options.candidates,
            "attempts": options.attempts,
            "accept": options.accept,
            "check": options.check,
        }
        if retry:
            kwargs["seed"] = seed
            if seed is not None:  # a picked candidate: that seed finished, not another early filter
                kwargs |= {"candidates": 1, "attempts": 1}
        else:
            kwargs |= {"seed": options.seed, "variations": options.variations}
        self.cancel = threading.Event()
        self.query_one(CandidateStrip).clear()
        self.query_one(StepBar).start("reading your request...")
        self.edit(text, message, kwargs, self.cancel, retry)

    @work(thread=True, group="edit")  # one at a time by `busy`: a queued edit starts as the last one returns
    def edit(self, text: str, message: str, kwargs: dict, cancel: threading.Event, retry: bool) -> None:
        """The only code that runs the agent (and so loads torch and the models); it only posts messages."""
        self.ready.wait()  # what is left of the background load
        try:
            outcome = (self.agent.retry if retry else self.agent.turn)(
                message, events=lambda event: self.post_message(EditProgress(event)), cancel=cancel, **kwargs
            )
        except Cancelled:
            self.post_message(EditFailed(text, "cancelled: nothing was saved", cancelled=True))
        except UserError as e:
            self.post_message(EditFailed(text, str(e)))
        except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback in Textual's log
            self.log.error(traceback.format_exc())
            self.post_message(EditFailed(text, f"internal error: {type(e).__name__}: {e}"))
        else:
            self.post_message(EditFinished(text, outcome))

    def on_edit_progress(self, message: EditProgress) -> None:
        event = message.event
        if event.kind == "step":
            self.query_one(StepBar).step(event)
        elif event.kind == "candidates":
            self.query_one(CandidateStrip).show(event)
        elif event.kind == "verdict":
            self.query_one(CandidateStrip).verdict(event)
        elif event.kind == "log":
            self.query_one(ChatLog).add("info", event.text)
        elif event.kind in ("plan", "landed", "checked"):
            self.query_one(ChatLog).add("info", progress_line(event))
            if event.kind == "landed":  # the step's picture now; the tree redraws when the plan ends
                self.query_one(Picture).show(event.image, event.source, f"turn #{event.turn}")
                if event.step < event.of:
                    self.query_one(StepBar).say(f"step {event.step + 1} of {event.of}...")

    def on_edit_finished(self, message: EditFinished) -> None:
        self.cancel = None
        self.query_one(StepBar).stop()
        outcome, log = message.outcome, self.query_one(ChatLog)
        log.add("assistant", outcome.reply)
        self.strip_turn = outcome.turn.id if outcome.turn else None
        if outcome.variations:
            done = [(v.result, v.turn) for v in outcome.variations if v.result and v.turn]
            self.query_one(CandidateStrip).show_variations(
                [r.image for r, _ in done], [r.seed for r, _ in done], [t.id for _, t in done]
            )
        if outcome.result is not None and outcome.turn is not None:
            if outcome.plan.ic_prompt:
                log.add("prompt", outcome.plan.ic_prompt)
            result = outcome.result
            log.add(
                "info",
                f"turn #{outcome.turn.id} · seed {result.seed} · {outcome.turn.params['steps']} steps"
                f" · {result.image.width}x{result.image.height}"
                f" · {outcome.timings.get('total', 0):.1f} s",
            )
        for note in outcome.notes:
            log.add("info", note)
        if outcome.stopped:
            log.add("error", f"stopped at {outcome.stopped} (what landed before it is kept)")
        self.show_problems()
        self.refresh_view()
        self.next_queued()

    def next_queued(self) -> None:
        if self.queued and not self.busy:
            message = self.queued.pop(0)
            self.query_one(ChatLog).add("info", f"now: {message}")
            self.start_edit(message, message)

    def show_problems(self) -> None:
        """Observers that failed on committed turns, as error lines: the turns themselves are kept."""
        for problem in self.agent.problems:
            self.query_one(ChatLog).add("error", problem)
        self.agent.problems = []

    def on_edit_failed(self, message: EditFailed) -> None:
        self.cancel = None
        self.query_one(StepBar).stop()
        self.fail(message.text, message.error)
        self.next_queued()

    def action_cancel(self) -> None:
        if self.cancel is not None and not self.cancel.is_set():
            self.cancel.set()
            self.query_one(StepBar).say("stopping after this step...")
            if self.queued:  # Escape stops the work, the waiting requests too
                self.query_one(ChatLog).add("info", f"dropped {len(self.queued)} queued request(s)")
                self.queued.clear()

    @on(CandidateStrip.Picked)
    def picked(self, event: CandidateStrip.Picked) -> None:
        """A variation is a turn already: go on from it. A candidate was only previewed: finish its seed."""
        if event.turn is not None:
            self.query_one(ChatLog).add("user", f"/branch {event.turn}")
            self.run_command(f"/branch {event.turn}")
        elif event.seed is not None:
            self.query_one(ChatLog).add("user", f"(picked the candidate of seed {event.seed})")
            current = self.agent.history()
            if current is None or current.cursor != self.strip_turn:
                self.fail(
                    "", f"those candidates are turn #{self.strip_turn}'s: /branch {self.strip_turn} first"
                )
                return
            self.start_edit("/retry", "/retry", retry=True, seed=event.seed)

    def action_toggle_tree(self) -> None:
        tree = self.query_one(HistoryTree)
        tree.display = not tree.display

    def action_toggle_before(self) -> None:
        self.query_one(Picture).toggle()

    @on(HistoryTree.Jump)
    def jump(self, event: HistoryTree.Jump) -> None:
        text = f"/branch {event.turn_id}"
        self.query_one(ChatLog).add("user", text)
        self.run_command(text)

    # ------------------------------------------------------------------ what commands ask of the screen

    def retry(self) -> None:
        self.start_edit("/retry", "/retry", retry=True)

    def prompt_with(self, text: str) -> None:
        """Put `text` in the input for the person to finish (a palette command that takes an argument)."""
        prompt = self.query_one(PromptInput)
        prompt.value = text
        prompt.cursor_position = len(text)
        prompt.focus()

    def switch_session(self, name: str) -> None:
        self.chat.agent = Agent(self.store, name, self.agent.settings, self.agent.loaded_engine)
        cast("ChatApp", self.app).session = name
        self.load_session()

    def quit(self) -> None:
        self.app.exit()

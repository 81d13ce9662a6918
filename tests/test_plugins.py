"""Plugin registration: built-ins and test plugins go through the same hooks."""

import contextlib
import json

import pytest
from click.testing import CliRunner

from assistant import plugins
from assistant.cli import cli
from assistant.errors import UserError
from assistant.hookspecs import hookimpl
from assistant.models import EditPlan
from assistant.plugins import RewriterSpec, get_plugin_manager
from assistant.testing import registered


def test_builtins_register_their_engine_and_rewriter():
    assert plugins.registrations("engines")["icedit"][0] == "plugins.icedit"
    assert plugins.registrations("rewriters")["rules"][0] == "plugins.rules"


def test_plugins_command_lists_what_each_plugin_registers():
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["plugins.icedit"]["engines"] == ["icedit"]
    assert rows["plugins.rules"]["rewriters"] == ["rules", "verbatim"]
    text = CliRunner().invoke(cli, ["plugins"]).output
    assert "plugins.icedit\tengines: icedit" in text


class Shout:
    """A rewriter plugin defined in this test module."""

    def __init__(self):
        self.seen = []

    def rewrite(self, image, message, context):
        self.seen.append(message)
        return EditPlan(intent="edit", instruction=message.upper(), rationale="shouted")

    @hookimpl
    def register_rewriters(self, register):
        register(RewriterSpec("shout", lambda settings: self, "upper-case"))


def test_a_plugin_from_a_test_module_is_listed_and_used(fake, tmp_path):
    shout = Shout()
    pm = get_plugin_manager()
    pm.register(shout, name="shout-plugin")
    try:
        rows = {r["name"]: r for r in json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).output)}
        assert rows["shout-plugin"]["rewriters"] == ["shout"]
        assert rows["fake"]["engines"] == ["fake"]
        src = tmp_path / "in.png"
        from PIL import Image

        Image.new("RGB", (64, 32), "gray").save(src)
        result = CliRunner().invoke(
            cli,
            [
                "edit",
                str(src),
                "add a hat",
                "--engine",
                "fake",
                "--rewriter",
                "shout",
                "--seed",
                "1",
                "--json",
                "-o",
                str(tmp_path / "out.png"),
            ],
        )
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert shout.seen == ["add a hat"]
        assert data["instruction"] == "ADD A HAT"
        assert data["rewriter"] == "shout" and data["engine"] == "fake"
        assert fake.engine.calls[0].plan.instruction == "ADD A HAT"
    finally:
        pm.unregister(name="shout-plugin")
    assert "shout-plugin" not in {r["name"] for r in plugins.describe()}


def test_a_name_registered_twice_is_one_clear_error(fake):
    class Twin:
        @hookimpl
        def register_engines(self, register):
            from assistant.plugins import EngineSpec

            register(EngineSpec("fake", lambda s: None))

    pm = get_plugin_manager()
    pm.register(Twin(), name="twin")
    try:
        with pytest.raises(UserError, match="engine 'fake' is registered by both"):
            plugins.registrations("engines")
    finally:
        pm.unregister(name="twin")


def test_unknown_engine_names_what_there_is():
    with pytest.raises(UserError, match=r"unknown engine 'nope' \(available: icedit, kontext\)"):
        plugins.get("engines", "nope")


def test_turn_finished_observers_see_each_committed_turn(fake, fake_settings, store, photo):
    from assistant.agent import Agent

    agent = Agent(store, "s", fake_settings)
    out = agent.turn("add a hat", source=(photo, "open cat"), seed=3)
    assert fake.finished == [
        ("s", out.turn.parent),
        ("s", out.turn.id),
    ]  # the open committed with it, then it
    agent.turn("undo")
    assert fake.finished == [("s", out.turn.parent), ("s", out.turn.id)]  # moving the cursor commits no turn


class Watcher:
    """An observer that records what it sees, and one that fails on every turn."""

    def __init__(self):
        self.seen: list[tuple[str, int, str, bool]] = []

    @hookimpl
    def turn_finished(self, session, turn, png):
        from sessions.identity import png_digest

        self.seen.append((session, turn.id, turn.kind, png_digest(png) == turn.image_sha256))


class Broken:
    @hookimpl
    def turn_finished(self, turn):
        raise RuntimeError(f"observer bug on {turn.id}\nsecond line")


@pytest.fixture
def observers():
    pm = get_plugin_manager()
    watcher = Watcher()
    pm.register(watcher, name="watcher")
    pm.register(Broken(), name="broken")
    try:
        yield watcher
    finally:
        pm.unregister(name="watcher")
        pm.unregister(name="broken")


def test_every_committed_turn_is_observed_and_a_failing_observer_changes_nothing(
    fake, observers, icedit_home, tmp_path, monkeypatch
):
    """Opens, the open committed with a first edit, edits and imports all reach the observers with their image;
    an observer that raises is one warning line per turn, and the command still writes its output and exits 0."""
    monkeypatch.chdir(tmp_path)
    photo = tmp_path / "cat.png"
    from PIL import Image

    Image.new("RGB", (48, 32), "orange").save(photo)
    run = CliRunner().invoke(
        cli,
        [
            "edit",
            str(photo),
            "add a hat",
            "--engine",
            "fake",
            "--session",
            "s",
            "--seed",
            "1",
            "-o",
            "hat.png",
        ],
    )
    assert run.exit_code == 0, run.output
    assert (tmp_path / "hat.png").is_file()
    assert observers.seen == [("s", 1, "open", True), ("s", 2, "edit", True)]
    assert run.stderr.splitlines() == [
        "warning: plugin broken failed observing turn 1 (RuntimeError: observer bug on 1)",
        "warning: plugin broken failed observing turn 2 (RuntimeError: observer bug on 2)",
    ]
    assert CliRunner().invoke(cli, ["sessions", "export", "s", "s.zip"]).exit_code == 0
    imported = CliRunner().invoke(cli, ["sessions", "import", "s.zip", "--as", "t"])
    assert imported.exit_code == 0, imported.output
    assert observers.seen[2:] == [("t", 3, "open", True), ("t", 4, "edit", True)]
    assert imported.stderr.count("warning: plugin broken failed observing turn") == 2


@pytest.fixture
def cli_plugins():
    """Register test plugins that add `icedit` commands, through the kit's `registered`."""
    with contextlib.ExitStack() as stack:
        yield lambda plugin, name: stack.enter_context(registered(plugin, name))


def test_a_plugin_adds_an_icedit_command_and_the_builtins_stay_theirs(cli_plugins):
    import click

    class Greeter:
        @hookimpl
        def register_cli_commands(self, cli):
            @cli.command()
            @click.argument("name")
            def greet(name):
                """Say hello."""
                click.echo(f"hello {name}")

            @cli.command("edit")
            def not_edit():
                click.echo("hijacked")

    class Broken:
        @hookimpl
        def register_cli_commands(self, cli):
            raise RuntimeError("no commands today")

    class Copycat:
        @hookimpl
        def register_cli_commands(self, cli):
            @cli.command("greet")
            def greet_again():
                click.echo("not me")

    cli_plugins(Greeter(), "greeter")
    cli_plugins(Broken(), "broken")
    cli_plugins(Copycat(), "copycat")
    result = CliRunner().invoke(cli, ["greet", "you"])
    assert (result.exit_code, result.stdout) == (0, "hello you\n")
    assert result.stderr.splitlines() == [  # in the order the plugins were registered
        "warning: a plugin's command 'edit' is ignored: icedit has its own",
        "warning: plugin broken failed adding its commands (RuntimeError: no commands today)",
        "warning: plugin copycat's command 'greet' is ignored: plugin greeter adds one by that name",
    ]
    help_text = CliRunner().invoke(cli, ["--help"]).stdout
    assert "greet     Say hello." in help_text and "train" in help_text and "eval" in help_text
    assert "Edit each IMAGE as INSTRUCTION says" in CliRunner().invoke(cli, ["edit", "--help"]).stdout


def test_train_is_the_icedit_plugins_command_and_eval_the_evaluation_plugins():
    from plugins.evaluation.command import eval_cmd
    from plugins.icedit.commands import train_cmd

    assert CliRunner().invoke(cli, ["train", "--help"]).exit_code == 0
    assert cli.commands["train"] is train_cmd and cli.commands["eval"] is eval_cmd
    impls = get_plugin_manager().hook.register_cli_commands.get_hookimpls()
    assert sorted(i.plugin_name for i in impls) == ["plugins.evaluation", "plugins.icedit"]

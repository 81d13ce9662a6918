"""Issue 19 part 6: with --json, stdout holds exactly the JSON (one document, or one JSON line per
item) and nothing else, on every command that has --json. The walk finds the commands itself, so a
new one without a case here fails the test."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from assistant.cli import cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOY = EXAMPLES / "toy_edits"
FAKE = ["--engine", "fake"]

CASES: dict[str, list[object]] = {
    "edit": ["edit", "photo.png", "add snow", *FAKE, "--session", "s", "--seed", "1", "--json"],
    "edit (two images)": ["edit", "photo.png", "other.png", "add snow", *FAKE, "--json"],
    "edit -n 2": ["edit", "photo.png", "add a hat", *FAKE, "-n", "2", "--json"],
    "retry": ["retry", "s", *FAKE, "--json"],
    "undo": ["undo", "s", "--json"],
    "redo": ["redo", "s", "--json"],
    "rewrite": ["rewrite", "photo.png", "add snow", "--rewriter", "rules", "--json"],
    "sessions list": ["sessions", "list", "--json"],
    "sessions show": ["sessions", "show", "s", "--json"],
    "sessions search": ["sessions", "search", "snow", "--json"],
    "sessions import": ["sessions", "import", "s.zip", "--as", "copy", "--json"],
    "sessions gc": ["sessions", "gc", "--json"],
    "log": ["log", "--json"],
    "config show": ["config", "show", "--json"],
    "replay": ["replay", "s.toml", "--out", "replayed", *FAKE, "--json"],
    "plugins": ["plugins", "--json"],
    "models": ["models", "--preset", "tiny", "--json"],
    "download": ["download", "--preset", "tiny", "--json"],
    "eval": ["eval", "--preset", "tiny", "--data", TOY, "--limit", "1", "--steps", "1", "--out", "ev", "--json"],
    "train": ["train", "--preset", "tiny", "--data", TOY, "--panel-width", "64", "--rank", "2", "--steps", "1",
              "--out", "tr", "--json"],
}  # fmt: skip
"""Each command with --json, as a person would run it; in order (the later ones use the session made
by the first). Keys are command paths, with a note in brackets for a second case of one command."""


def commands_with_json(group: click.Group, ctx: click.Context, path: str = "") -> set[str]:
    found = set()
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        full = f"{path} {name}".strip()
        if isinstance(command, click.Group):
            found |= commands_with_json(command, click.Context(command, parent=ctx), full)
        elif any("--json" in getattr(p, "opts", ()) for p in command.params):
            found.add(full)
    return found


def test_every_command_with_json_has_a_case():
    with click.Context(cli) as ctx:
        walked = commands_with_json(cli, ctx)
    assert walked == {key.split(" (")[0].removesuffix(" -n 2") for key in CASES}


def documents(text: str) -> list:
    """`text` as one JSON document, or one per line; anything else fails."""
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines()]


def test_stdout_holds_exactly_the_json(fake, icedit_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    photo = Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((64, 48))
    photo.save(tmp_path / "photo.png")
    photo.rotate(180).save(tmp_path / "other.png")
    bad = {}
    for case, args in CASES.items():
        if case == "sessions import":
            assert CliRunner().invoke(cli, ["sessions", "export", "s", "s.zip"]).exit_code == 0
        if case == "replay":
            assert CliRunner().invoke(cli, ["sessions", "export", "s", "s.toml"]).exit_code == 0
        result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit")
        if result.exit_code != 0:
            bad[case] = f"exit {result.exit_code}: {result.output[-500:]}"
            continue
        try:
            docs = documents(result.stdout)
        except json.JSONDecodeError as e:
            bad[case] = f"not JSON ({e}): {result.stdout[:300]!r}"
            continue
        if not docs or not all(isinstance(d, dict | list) for d in docs):
            bad[case] = f"no JSON object or array: {result.stdout[:300]!r}"
    assert bad == {}


@pytest.mark.parametrize("case", ["edit", "sessions list", "log"])
def test_quiet_keeps_the_json_and_says_nothing_else(fake, icedit_home, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    Image.open(EXAMPLES / "chelsea.png").convert("RGB").resize((64, 48)).save(tmp_path / "photo.png")
    result = CliRunner().invoke(cli, [str(a) for a in CASES[case]] + ["-q"], prog_name="icedit")
    assert result.exit_code == 0, result.output
    assert len(documents(result.stdout)) == 1 and result.stderr == ""

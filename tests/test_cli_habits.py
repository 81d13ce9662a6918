"""Issue 19 part 6: the config file commands, -q and -v, help that reads well, completion."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from store_checks import env_for

from assistant.cli import cli

ICEDIT = Path(sys.executable).with_name("icedit")


def invoke(*args: object, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="icedit", **kw)


@pytest.fixture
def config(tmp_path) -> Path:
    """The conftest points ICEDIT_CONFIG here; no file yet."""
    return tmp_path / "config.toml"


def test_config_path_show_and_set(config, monkeypatch):
    assert invoke("config", "path").stdout == f"{config}\n"
    first = invoke("config", "show")
    assert first.stdout.splitlines()[0] == f"# {config} (not there yet: icedit config set KEY VALUE)"
    assert "steps = 28  # default" in first.stdout.splitlines()
    config.write_text('# my settings\nsteps = 20   # fast\n\n[qwen_vl]\nvlm_device = "cuda"\n')
    for key, value, said in [
        ("preset", "tiny", 'preset = "tiny"'),
        ("steps", "12", "steps = 12"),
        ("qwen_vl.vlm_device", "cpu", 'qwen_vl.vlm_device = "cpu"'),
        ("check", "true", "check = true"),
    ]:
        result = invoke("config", "set", key, value)
        assert result.exit_code == 0, result.output
        assert result.stdout == f"{config}: {said}\n"
    assert config.read_text() == (
        '# my settings\nsteps = 12\npreset = "tiny"\ncheck = true\n\n[qwen_vl]\nvlm_device = "cpu"\n'
    )
    monkeypatch.setenv("ICEDIT_GUIDANCE", "30")
    shown = json.loads(invoke("config", "show", "--json").stdout)
    assert shown["path"] == str(config) and shown["exists"] is True
    assert shown["settings"]["steps"] == {"value": 12, "from": "config file"}
    assert shown["settings"]["guidance"] == {"value": 30.0, "from": "ICEDIT_GUIDANCE"}
    assert shown["settings"]["qwen_vl.vlm_device"] == {"value": "cpu", "from": "config file"}
    assert shown["settings"]["engine"] == {"value": "icedit", "from": "default"}


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("steps", "500", "steps = 500: bad setting steps: Input should be less than or equal to 200"),
        ("preset", "nope", "preset = nope: unknown preset 'nope' (available: default, moe, tiny, toy)"),
        ("nonsense", "3", "nonsense = 3: unknown option 'nonsense'"),
        ("a b", "1", "'a b' is not a config key: letters, digits, _ and -, TABLE.KEY for a plugin's table"),
        ("guidance", "nan", "nan is not a number a config file can hold"),
    ],
)
def test_config_set_checks_the_whole_file_first(config, key, value, said):
    config.write_text("steps = 20\n")
    result = invoke("config", "set", key, value)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {said}") and len(result.stderr.splitlines()) == 1
    assert config.read_text() == "steps = 20\n"


def test_a_set_key_is_what_commands_run_with(config):
    assert invoke("config", "set", "steps", "7").exit_code == 0
    assert invoke("config", "set", "icedit.preset", "tiny").exit_code == 0
    shown = json.loads(invoke("plugins", "--json").stdout)
    icedit = next(row for row in shown if row["name"] == "plugins.icedit")
    assert icedit["engine_settings"]["icedit"]["preset"] == "tiny"


# ------------------------------------------------------------------------------------------ -q and -v


def test_quiet_says_only_errors(tmp_path):
    home = tmp_path / "home"
    bad = subprocess.run([str(ICEDIT), "edit", "nope.png", "add snow", "-q"], cwd=tmp_path, env=env_for(home),
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert (bad.returncode, bad.stdout, bad.stderr) == (2, "", "Error: nope.png: no such file\n")
    both = invoke("-q", "sessions", "list", "-v")
    assert both.exit_code == 2
    assert both.stderr == (
        "Error: give -q (only errors) or -v (the libraries' logs too), not both (see `icedit sessions list "
        "--help`)\n"
    )
    root = invoke("-q", "-v", "sessions", "list")  # both before the command: click's usage error
    assert root.exit_code == 2 and "not both" in root.stderr and "Traceback" not in root.output
    assert invoke("sessions", "list", "-q").stdout == ""  # a person's line: dropped
    twice = invoke("-q", "sessions", "list", "--json", "-q")
    assert (twice.exit_code, twice.stdout) == (0, "[]\n")  # -q twice still prints the data
    error = invoke("-q", "sessions", "rename", "a", "b", "-q")
    assert (error.exit_code, error.stderr) == (
        2,
        "Error: no session named 'a' (see `icedit sessions list`)\n",
    )


def test_verbose_lets_the_libraries_log(monkeypatch):
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(logging.getLogger("diffusers"), "level", logging.ERROR)
    assert invoke("sessions", "list", "-v").exit_code == 0
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    assert logging.getLogger("diffusers").level == logging.INFO


# ------------------------------------------------------------------------------------------ help


def test_the_top_level_help_cuts_no_description(tmp_path):
    proc = subprocess.run([str(ICEDIT), "-h"], cwd=tmp_path, env=env_for(tmp_path / "home"),
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    listed = proc.stdout.split("Commands:\n")[1].splitlines()
    assert len(listed) >= 15 and not [line for line in listed if line.endswith("...")]
    assert "_ICEDIT_COMPLETE=bash_source icedit" in proc.stdout


def test_edit_help_puts_everyday_options_first_and_lists_the_plugins():
    text = invoke("edit", "-h").stdout
    sections = [
        line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")
    ]
    assert sections[:5] == [
        "Everyday:",
        "The agent:",
        "Model:",
        "Memory and speed:",
        "VLM (rewriter and judge):",
    ]
    everyday = text.split("Everyday:")[1].split("The agent:")[0]
    assert [
        opt for opt in ("--output ", "--seed", "--steps", "--guidance", "--lora-scale") if opt not in everyday
    ] == []
    assert "installed: icedit, kontext" in " ".join(text.split())
    assert "-q, --quiet" in text and "-v, --verbose" in text


def test_completion_completes_commands(tmp_path):
    env = env_for(tmp_path / "home") | {
        "_ICEDIT_COMPLETE": "bash_complete",
        "COMP_WORDS": "icedit sess",
        "COMP_CWORD": "1",
    }
    proc = subprocess.run([str(ICEDIT)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.stdout.split() == ["plain,sessions"]

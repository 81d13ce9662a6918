"""Plugin-owned options: the host keeps its own settings, every other key is a plugin's option, the
built-ins' flags are made from their options models, and each value reaches the plugin that declares it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, Field

from assistant import command_kit as kit
from assistant import plugins
from assistant.cli import cli
from assistant.errors import UserError
from assistant.hookspecs import hookimpl
from assistant.plugins import EngineSpec
from assistant.settings import Settings
from assistant.testing import FakeEngine, registered
from plugins.icedit.options import IceditOptions
from plugins.kontext.options import KontextOptions
from plugins.qwen_vl.options import QwenVlOptions

CHELSEA = str(Path(__file__).resolve().parent.parent / "examples" / "chelsea.png")
BUILTIN_MODELS = (IceditOptions, KontextOptions, QwenVlOptions)


def described(*args: str, env: dict[str, str] | None = None) -> dict:
    """What `icedit plugins --json` says the icedit engine would run with these flags."""
    result = CliRunner().invoke(cli, ["plugins", "--json", *args], env=env)
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    return rows["plugins.icedit"]["engine_settings"]["icedit"]


def refused(*args: str, env: dict[str, str] | None = None) -> list[str]:
    result = CliRunner().invoke(cli, ["plugins", "--json", *args], env=env, prog_name="icedit")
    assert result.exit_code == 2, result.output
    return result.stderr.splitlines()


# ------------------------------------------------------------------------------------------------ settings


def test_settings_hold_the_host_fields_and_route_every_other_key_into_options(monkeypatch):
    plain = Settings(preset="tiny", lora=None, steps=3)
    assert plain.options == {"preset": "tiny"} and plain.steps == 3  # None: not given, the plugin's default
    assert "preset" not in Settings.model_fields and "top_k" not in Settings.model_fields
    monkeypatch.setenv("ICEDIT_PRESET", "moe")
    monkeypatch.setenv("ICEDIT_LORA_SCALE", "0.5")
    monkeypatch.setenv("ICEDIT_OPTIONS__TOP_K", "2")
    from_env = Settings()
    assert from_env.options == {"preset": "moe", "lora_scale": "0.5", "top_k": "2"}
    assert Settings(preset="tiny").options["preset"] == "tiny"  # what the code gives beats the variable
    changed = from_env.with_options(top_k=3, lora_scale=None)
    assert changed.options == {"preset": "moe", "top_k": 3} and from_env.options["top_k"] == "2"


def test_a_plain_key_reaches_every_plugin_in_use_that_declares_it_and_name_key_wins():
    settings = Settings(rewriter="qwen_vl", candidates=3, vlm="a/vlm", top_k=2).with_options(
        **{"icedit.top_k": 4, "qwen_vl.vlm_device": "cpu"}
    )
    engine = plugins.options_for("engines", "icedit", settings)
    assert (engine.top_k, engine.device) == (4, None)  # icedit.top_k beats top_k; vlm_device is not icedit's
    for kind in ("rewriters", "judges"):  # one Qwen2.5-VL serves both
        vlm = plugins.options_for(kind, "qwen_vl", settings)
        assert (vlm.vlm, vlm.vlm_device) == ("a/vlm", "cpu")
    plugins.check_options(settings)


@pytest.mark.parametrize(
    ("given", "line"),
    [
        ({"bogus": 1}, "unknown option 'bogus' (icedit takes preset, model, "),
        ({"kontext.top_k": 1}, "unknown option 'kontext.top_k' (kontext is not in use here; icedit takes "),
        ({"rules.vlm": "x"}, "unknown option 'rules.vlm' (icedit takes "),
    ],
)
def test_a_key_no_installed_plugin_declares_is_one_line_naming_what_the_plugins_in_use_take(given, line):
    with pytest.raises(UserError) as e:
        plugins.check_options(Settings(preset="tiny").with_options(**given))
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_a_key_only_an_idle_plugin_declares_waits_for_it():
    """ICEDIT_VLM may stay set while the rules rewriter runs; --top-k does nothing to kontext."""
    idle = Settings(preset="tiny", rewriter="rules", vlm="someone/vlm", vlm_device="cpu", top_k=3)
    plugins.check_options(idle)
    plugins.check_options(idle.model_copy(update={"engine": "kontext"}))
    assert plugins.options_for("rewriters", "qwen_vl", idle).vlm == "someone/vlm"  # there when it runs


@pytest.mark.parametrize(
    ("given", "line"),
    [
        ({"lora_scale": "9"}, "bad option icedit.lora_scale: Input should be less than or equal to 4"),
        ({"quantize": "int4"}, "bad option icedit.quantize: Input should be 'none', 'int8' or 'fp8'"),
        ({"compile": "maybe"}, "bad option icedit.compile: Input should be a valid boolean, unable to "),
        (
            {"rewriter": "qwen_vl", "min_pixels": 10**7},
            "bad options of qwen_vl: min_pixels (10000000) is above max_pixels (802816)",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_plugin_and_the_key(given, line):
    with pytest.raises(UserError) as e:
        plugins.check_options(Settings(preset="tiny", **given))
    assert str(e.value).startswith(line)


# --------------------------------------------------------------------------------------------------- flags


def _flags(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params if p.name}


@pytest.mark.parametrize("name", ["edit", "retry", "replay", "chat", "plugins", "models", "download"])
def test_every_engine_command_has_one_flag_per_builtin_option(name):
    flags = _flags(cli.commands[name])
    for model in BUILTIN_MODELS:
        for key, field in model.model_fields.items():
            assert flags[key].opts == ["--" + key.replace("_", "-")], key
            assert flags[key].help.startswith(field.description)
    assert not {"clip_model", "dino_model"} & set(flags)  # a scorer's options are eval's flags


def test_a_flag_takes_its_type_bounds_and_choices_from_the_field():
    flags = _flags(cli.commands["edit"])
    assert isinstance(flags["quantize"].type, click.Choice) and flags["quantize"].type.choices == (
        "none",
        "int8",
        "fp8",
    )
    top_k = flags["top_k"].type
    assert isinstance(top_k, click.IntRange) and (top_k.min, top_k.max) == (1, 64)
    scale = flags["lora_scale"].type
    assert isinstance(scale, kit.FiniteRange) and (scale.min, scale.max) == (0, 4)
    assert flags["compile"].secondary_opts == ["--no-compile"] and flags["compile"].default is None
    assert "(default 1)" in flags["lora_scale"].help and "(default none)" in flags["quantize"].help


def test_flags_are_made_for_any_options_model():
    class Knobs(BaseModel):
        size: int = Field(3, ge=2, description="how big")
        mode: Literal["a", "b"] = Field("a", description="which way")
        sharp: bool = Field(False, description="sharpen")
        seen: float | None = Field(None, gt=0, lt=1, description="a share")

    @click.command()
    @kit.model_flags(Knobs, ["size", "mode", "sharp", "seen"])
    def show(**given):
        click.echo(json.dumps(given))

    def run(*args):
        return CliRunner().invoke(show, list(args))

    assert json.loads(run().stdout) == {"size": None, "mode": None, "sharp": None, "seen": None}
    assert json.loads(run("--size", "5", "--mode", "b", "--no-sharp", "--seen", "0.5").stdout) == {
        "size": 5,
        "mode": "b",
        "sharp": False,
        "seen": 0.5,
    }
    for args in (["--size", "1"], ["--mode", "c"], ["--seen", "1"], ["--seen", "nan"]):
        assert run(*args).exit_code == 2, args
    assert "how big (default 3)" in run("--help").stdout


def test_flags_reach_the_engine_like_options_and_variables_do():
    flagged = described("--preset", "tiny", "--lora-scale", "0.5", "--top-k", "2", "--no-compile")
    assert (flagged["preset"], flagged["lora_scale"], flagged["top_k"], flagged["compile"]) == (
        "tiny",
        0.5,
        2,
        False,
    )
    assert (
        described("--option", "preset=tiny", "--option", "lora_scale=0.5", "--option", "top_k=2") == flagged
    )
    env = {"ICEDIT_PRESET": "tiny", "ICEDIT_LORA_SCALE": "0.5", "ICEDIT_TOP_K": "2"}
    assert described(env=env) == flagged
    assert described("--lora-scale", "0.25", env=env)["lora_scale"] == 0.25  # the flag beats the variable
    assert refused("--lora-scale", "5") == [
        "Error: Invalid value for '--lora-scale': 5.0 is not in the range 0<=x<=4. (see `icedit plugins --help`)"
    ]
    assert refused(env={"ICEDIT_PRESET": "tiny", "ICEDIT_BOGUS": "1"})[0].startswith(
        "Error: unknown option 'bogus' (icedit takes preset, "
    )


def test_eval_and_train_take_the_same_flags_from_the_same_models():
    from plugins.evaluation.command import eval_cmd
    from plugins.icedit.commands import train_cmd

    evaluate, train, edit = _flags(eval_cmd), _flags(train_cmd), _flags(cli.commands["edit"])
    for key in ("preset", "model", "lora", "lora_scale", "top_k", "offload", "dtype", "vlm"):
        assert (evaluate[key].help, repr(evaluate[key].type)) == (edit[key].help, repr(edit[key].type)), key
    assert {"clip_model", "dino_model"} <= set(evaluate) and "clip_model" not in edit
    assert train["preset"].help == edit["preset"].help and train["device"].help == edit["device"].help
    assert "top_k" in train and train["top_k"].help.startswith("experts per token (default 1)")  # its own


def test_a_third_party_plugin_gets_its_options_through_option_not_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Dial(BaseModel):
        level: int = Field(1, ge=0, le=9)

    got = []

    class DialPlugin:
        @hookimpl
        def register_engines(self, register):
            register(
                EngineSpec(
                    "dial", lambda settings, options: got.append(options) or FakeEngine(), options=Dial
                )
            )

    with registered(DialPlugin(), "dial"):
        assert "level" not in _flags(cli.commands["edit"])
        result = CliRunner().invoke(
            cli, ["edit", CHELSEA, "add a hat", "--engine", "dial", "--option", "level=7", "-o", "x.png"]
        )
        assert result.exit_code == 0, result.output
        assert got == [Dial(level=7)]
        with pytest.raises(UserError, match=r"^unknown option 'levle' \(dial takes level\)$"):
            plugins.check_options(Settings(engine="dial", rewriter="rules", levle=7))


def test_with_no_plugin_in_use_taking_options_the_line_says_so(fake):
    with pytest.raises(UserError) as e:
        plugins.check_options(Settings(engine="fake", rewriter="rules", bogus=1))
    assert str(e.value) == "unknown option 'bogus' (the plugins in use take no options)"


def test_kind_name_key_reaches_one_of_two_plugins_that_share_a_name():
    """qwen_vl is both a rewriter and a judge: `judge:qwen_vl.KEY` sets the judge's alone."""
    settings = Settings(rewriter="qwen_vl", candidates=3, vlm="a/vlm").with_options(
        **{"judge:qwen_vl.vlm_device": "cpu", "rewriter:qwen_vl.vlm": "b/vlm", "qwen_vl.vlm_device": "cuda"}
    )
    judge = plugins.options_for("judges", "qwen_vl", settings)
    rewriter = plugins.options_for("rewriters", "qwen_vl", settings)
    assert (judge.vlm, judge.vlm_device) == ("a/vlm", "cpu")  # the most specific wins
    assert (rewriter.vlm, rewriter.vlm_device) == ("b/vlm", "cuda")
    plugins.check_options(settings)
    with pytest.raises(UserError, match=r"^unknown option 'engine:qwen_vl\.vlm' \(icedit takes preset, "):
        plugins.check_options(settings.with_options(**{"engine:qwen_vl.vlm": "c/vlm"}))


# ------------------------------------------------------------------------------------------- config file


def test_the_config_file_holds_host_settings_and_plugin_options(tmp_path):
    config = Path(os.environ["ICEDIT_CONFIG"])
    config.write_text(
        'preset = "tiny"\nsteps = 3\nlora_scale = 0.5\n\n[qwen_vl]\nvlm_device = "cpu"\n\n'
        '["judge:qwen_vl"]\nvlm = "a/vlm"\n\n[options]\n"icedit.top_k" = 2\n'
    )
    settings = Settings()
    assert settings.steps == 3 and "config" not in settings.options
    assert settings.options == {
        "preset": "tiny",
        "lora_scale": 0.5,
        "qwen_vl.vlm_device": "cpu",
        "judge:qwen_vl.vlm": "a/vlm",
        "icedit.top_k": 2,
    }
    assert (described()["preset"], described()["lora_scale"], described()["top_k"]) == ("tiny", 0.5, 2)
    judge = plugins.options_for("judges", "qwen_vl", settings)
    assert (judge.vlm, judge.vlm_device) == ("a/vlm", "cpu")
    assert described(env={"ICEDIT_LORA_SCALE": "0.25"})["lora_scale"] == 0.25  # a variable beats the file
    assert described("--lora-scale", "2", env={"ICEDIT_LORA_SCALE": "0.25"})["lora_scale"] == 2  # a flag both


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("preset = \n", "Invalid value (at line 1, column 10)"),
        ("preset = [1, 2]\n", "preset must be a string, a number or true/false"),
        ("[qwen_vl]\nvlm = {a = 1}\n", "qwen_vl.vlm must be a string, a number or true/false"),
        (b"preset = '\xff'\n", "'utf-8' codec can't decode byte 0xff in position 10: invalid start byte"),
    ],
)
def test_a_config_file_that_cannot_be_read_is_one_line_for_every_command(text, why, tmp_path):
    config = Path(os.environ["ICEDIT_CONFIG"])
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    for args in (["sessions", "list"], ["plugins"]):
        result = CliRunner().invoke(cli, args, prog_name="icedit")
        assert (result.exit_code, result.stderr.splitlines()) == (2, [f"Error: config file {config}: {why}"])


def test_a_key_in_the_config_file_that_no_plugin_declares_is_refused_like_any_other():
    Path(os.environ["ICEDIT_CONFIG"]).write_text('preset = "tiny"\npreest = "moe"\n')
    assert refused()[0].startswith("Error: unknown option 'preest' (icedit takes preset, model, ")


def test_a_plugin_whose_options_take_a_host_settings_name_is_refused_in_one_line():
    class Clash(BaseModel):
        steps: int = 4

    class ClashPlugin:
        @hookimpl
        def register_engines(self, register):
            register(EngineSpec("clash", lambda settings, options: FakeEngine(), options=Clash))

    with registered(ClashPlugin(), "clash"), pytest.raises(UserError) as e:
        plugins.get("engines", "clash")
    assert str(e.value) == (
        "engine 'clash' of clash declares the option 'steps', which is a host setting: "
        "the plugin must name it otherwise"
    )


def test_plugins_lists_every_engine_when_the_options_fit_only_one():
    rows = {
        r["name"]: r
        for r in json.loads(CliRunner().invoke(cli, ["plugins", "--json", "--preset", "moe"]).stdout)
    }
    assert rows["plugins.icedit"]["engine_settings"]["icedit"]["preset"] == "moe"
    assert rows["plugins.kontext"]["engine_settings"]["kontext"] == {
        "error": "unknown kontext preset 'moe' (available: default, tiny)"
    }


def test_a_higher_source_beats_a_more_specific_key_from_a_lower_one(monkeypatch):
    """The file's `[icedit] preset` loses to a flag's plain `preset`, its `[qwen_vl] vlm` to ICEDIT_VLM;
    within one source the more specific key still wins."""
    Path(os.environ["ICEDIT_CONFIG"]).write_text(
        '[icedit]\npreset = "tiny"\ndevice = "cuda:0"\n\n[qwen_vl]\nvlm = "none"\n'
    )
    monkeypatch.setenv("ICEDIT_VLM", "a/vlm")
    settings = Settings(preset="default", rewriter="qwen_vl")
    assert plugins.options_for("engines", "icedit", settings).preset == "default"
    assert plugins.options_for("rewriters", "qwen_vl", settings).vlm == "a/vlm"
    assert plugins.options_for("engines", "icedit", Settings()).preset == "tiny"  # nothing above the file
    per_process = Settings().with_options(device="cuda:3")  # as icedit eval places each process
    assert plugins.options_for("engines", "icedit", per_process).device == "cuda:3"
    assert "icedit.device" not in per_process.options

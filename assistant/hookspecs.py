"""The plugin contract: every hook icedit-assistant calls, nothing else."""

import pluggy

hookspec = pluggy.HookspecMarker("icedit_assistant")
hookimpl = pluggy.HookimplMarker("icedit_assistant")


@hookspec
def register_engines(register):
    """Call register(EngineSpec(...)) per engine; models load on first use."""


@hookspec
def register_rewriters(register):
    """Call register(RewriterSpec(...)) per rewriter (message -> EditPlan)."""


@hookspec
def register_judges(register):
    """Call register(JudgeSpec(...)) per judge (which of two candidates follows the instruction)."""


@hookspec
def register_scorers(register):
    """Call register(ScorerSpec(...)) per scorer `icedit eval` can run (`--scorer NAME`)."""


@hookspec
def register_chat_commands(register):
    """Call register(CommandSpec(...)) per extra slash command for the chat."""


@hookspec
def register_cli_commands(cli):
    """Add commands to the `icedit` click group (`cli.add_command(...)`, or `@cli.command()`), as llm's
    `register_commands` does. `assistant.command_kit` holds what the built-in commands are made of
    (settings, preflight, --json output, option types). Called only when a command is not a built-in
    one or help lists them all, so built-in commands never wait for plugins."""


@hookspec
def turn_finished(session, turn, png):
    """Observe a committed turn, whichever way it came (an open, an edit, an import): the session's name,
    the stored turn, and its image's PNG bytes (take only the arguments you need). The turn is stored
    already: an observer that raises is reported in one line and changes nothing."""

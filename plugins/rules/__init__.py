"""Built-in plugin: the offline rewriters, rules (reads the request) and verbatim (passes it on)."""

from assistant.hookspecs import hookimpl
from assistant.plugins import RewriterSpec


@hookimpl
def register_rewriters(register):
    from plugins.rules.rewriter import RulesRewriter, VerbatimRewriter

    register(RewriterSpec("rules", lambda settings: RulesRewriter(), "offline rules: no model, instant"))
    register(
        RewriterSpec(
            "verbatim",
            lambda settings: VerbatimRewriter(),
            "the message is the instruction, unchanged (reproduces official examples seed for seed)",
        )
    )
